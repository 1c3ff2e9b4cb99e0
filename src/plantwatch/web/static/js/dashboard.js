// Dashboard: keeps its cards current from the live stream, without reloading.
// Alert and device events re-fetch the cards they affect (at most once a second, in one
// request: GET /dashboard/cards?card=..., whose cards htmx swaps in by id); power values
// re-fetch the energy card at most every 5 s, and energy today is refreshed every minute.
(function () {
  "use strict";
  const root = document.getElementById("dashboard");
  if (!root || !window.htmx) return;
  const url = root.dataset.cardsUrl;
  const shown = new Set((root.dataset.cards || "").split(",").filter(Boolean));
  const ALERT_CARDS = ["alerts", "health", "worst", "latest"];
  const DEVICE_CARDS = ["devices", "health", "worst"];
  const POWER_UNITS = new Set(["W", "w", "kW", "KW", "kw", "MW"]);

  // htmx queues requests per source element (keeping only the last one waiting), so
  // each queue below sends from its own element and never has two in flight.
  function refresh(source, cards) {
    const before = new Map(cards.map((c) => [c, document.getElementById("dash-" + c)?.textContent]));
    const query = cards.map((c) => "card=" + encodeURIComponent(c)).join("&");
    return htmx.ajax("GET", url + "?" + query, { source, target: root, swap: "none" }).then(() => {
      for (const c of cards) {
        const el = document.getElementById("dash-" + c);
        if (el && before.get(c) !== undefined && el.textContent !== before.get(c)) {
          el.classList.add("dash-flash");
          setTimeout(() => el.classList.remove("dash-flash"), 900);
        }
      }
      root.dataset.refreshed = String((Number(root.dataset.refreshed) || 0) + 1);
    });
  }

  // A throttled queue of cards to refresh: the first change is fetched at once, later
  // ones wait until `gapMs` after the previous request and go together.
  function queue(gapMs) {
    const source = document.createElement("span");
    source.hidden = true;
    root.appendChild(source);
    const pending = new Set();
    let timer = null;
    let busy = false;
    let last = 0;
    function run() {
      timer = null;
      const cards = [...pending].filter((c) => shown.has(c));
      pending.clear();
      if (!cards.length) return;
      busy = true;
      last = Date.now();
      refresh(source, cards).catch(() => {}).finally(() => {
        busy = false;
        if (pending.size) kick();
      });
    }
    function kick() {
      if (timer || busy) return;
      timer = setTimeout(run, Math.max(0, last + gapMs - Date.now()));
    }
    return (cards) => { cards.forEach((c) => pending.add(c)); kick(); };
  }

  const soon = queue(1000);
  const energy = queue(5000);
  const levels = new Map();  // parameter id -> its last limit level, to notice changes

  document.addEventListener("pw:alert", () => soon(ALERT_CARDS));
  document.addEventListener("pw:device", () => soon(DEVICE_CARDS));
  document.addEventListener("pw:reset", () => soon([...shown]));
  document.addEventListener("pw:kpi", (e) => {
    const values = (e.detail && e.detail.values) || [];
    let power = false;
    let limits = false;
    for (const v of values) {
      if (POWER_UNITS.has(v.unit)) power = true;
      const level = v.level || null;
      const was = levels.has(v.parameter_id) ? levels.get(v.parameter_id) : null;
      if (level !== was && (level === "warning" || level === "critical" || was === "warning" || was === "critical")) {
        limits = true;
      }
      levels.set(v.parameter_id, level);
    }
    if (power) energy(["energy"]);
    if (limits) soon(["worst"]);
  });
  // A card the page left to load by itself (energy today takes a while to add up).
  const lazy = [...root.querySelectorAll("[data-pending]")].map((el) => el.id.replace(/^dash-/, ""));
  if (lazy.length) energy(lazy);
  // Energy today grows with time even when no value changes.
  setInterval(() => energy(["energy"]), 60000);
})();
