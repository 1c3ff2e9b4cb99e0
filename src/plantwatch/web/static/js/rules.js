// Rules list and rule page: the enabled switches, delete, and live "last fired".
(function () {
  "use strict";

  function stateText(el, on) {
    if (!el) return;
    el.textContent = on ? "On" : "Off";
    el.dataset.state = on ? "on" : "off";
  }

  // A switch calls the toggle API and shows what the server answered.
  document.addEventListener("change", async (e) => {
    const input = e.target.closest ? e.target.closest("input[data-rule-toggle]") : null;
    if (!input) return;
    const id = input.dataset.ruleToggle;
    const state = document.getElementById("rule-state-" + id);
    const wanted = input.checked;
    input.disabled = true;
    if (state) state.textContent = wanted ? "Switching on…" : "Switching off…";
    try {
      const res = await pw.api("POST", "/api/v1/rules/" + encodeURIComponent(id) + "/toggle");
      const on = !!res.data.is_active;
      input.checked = on;
      stateText(state, on);
      if (on) document.getElementById("rule-error-" + id)?.remove(); // switching on clears it
      const active = document.getElementById("f-active"); // the builder's checkbox
      if (active && document.getElementById("rule-form")?.dataset.ruleId === String(id)) active.checked = on;
      pw.toast(`Rule “${res.data.name}” is ${on ? "on" : "off"}.`);
    } catch (err) {
      input.checked = !wanted;
      stateText(state, !wanted);
      pw.toast("Could not switch the rule: " + err.message, "error");
    } finally {
      input.disabled = false;
      input.focus();
    }
  });

  document.addEventListener("click", async (e) => {
    const button = e.target.closest ? e.target.closest("#rule-delete") : null;
    if (!button) return;
    if (!window.confirm(`Delete the rule “${button.dataset.ruleName}”? Its alerts stay.`)) return;
    button.disabled = true;
    try {
      await pw.api("DELETE", "/api/v1/rules/" + encodeURIComponent(button.dataset.ruleId));
      sessionStorage.setItem("pw-rules-flash", `Rule “${button.dataset.ruleName}” deleted.`);
      location.assign("/rules");
    } catch (err) {
      button.disabled = false;
      pw.toast("Could not delete: " + err.message, "error");
    }
  });

  // Live: an alert of a rule on this page updates its "last fired".
  let refreshTimer = null;
  document.addEventListener("pw:alert", (e) => {
    const a = e.detail || {};
    if (!a.rule_id) return;
    const fired = a.event === "created" || a.event === "repeated";
    const activity = document.getElementById("rule-activity");
    if (activity && activity.dataset.ruleId === String(a.rule_id)) {
      clearTimeout(refreshTimer);
      refreshTimer = setTimeout(() => {
        htmx.ajax("GET", `/rules/${a.rule_id}/activity`, { target: "#rule-activity", swap: "outerHTML" });
      }, 300);
      return;
    }
    const cell = document.querySelector(`#rule-row-${a.rule_id} [data-last-fired]`);
    if (cell && fired && a.at) {
      const time = document.createElement("time");
      time.dateTime = a.at;
      time.textContent = pw.fmtTime(a.at);
      cell.replaceChildren(time);
    }
  });

  document.addEventListener("DOMContentLoaded", () => {
    const flash = sessionStorage.getItem("pw-rules-flash");
    if (flash) {
      sessionStorage.removeItem("pw-rules-flash");
      pw.toast(flash);
    }
  });
})();
