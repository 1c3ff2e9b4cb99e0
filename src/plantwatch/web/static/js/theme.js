// Loaded before first paint (not deferred), so a dark-theme user never sees a white flash.
document.documentElement.dataset.theme = localStorage.getItem("pw-theme") || "auto";
