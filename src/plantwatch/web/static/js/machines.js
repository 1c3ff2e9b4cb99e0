// Machines list: live status pills and a debounced re-fetch of the table fragment when
// alerts or devices change. The filter form, sort links and pager are plain htmx
// (and plain links/GET without JS); this script only keeps what is shown current.
(function () {
  "use strict";
  const TABLE = "machines-table";
  const VISIBLE_DELAY_MS = 800; // a change on a row on screen
  const OTHER_DELAY_MS = 5000; // a change that may move rows in or out of the page
  let timer = null;
  let due = 0;
  let inFlight = false;
  let again = false;

  const table = () => document.getElementById(TABLE);
  const row = (deviceId) =>
    table()?.querySelector('tr[data-device-id="' + String(Number(deviceId)) + '"]') || null;

  // Does the table's order or filter depend on live state (status, alerts, health)?
  function dependsOnLiveState() {
    const t = table();
    if (!t) return false;
    const sort = (t.dataset.sort || "").replace(/^-/, "");
    const params = new URLSearchParams(location.search);
    return ["status", "health", "alerts", "last_seen"].includes(sort) || !!params.get("status");
  }

  function refresh() {
    timer = null;
    const t = table();
    if (!t || !window.htmx) return;
    if (document.hidden) { again = true; return; } // catch up when the tab is shown
    if (inFlight) { again = true; return; }
    inFlight = true;
    // From the table itself, so it shares the filters' request queue (hx-sync): a
    // filter or sort the user picks meanwhile replaces this refresh, never the reverse.
    htmx.ajax("GET", location.pathname + location.search, { source: t, target: t, swap: "outerHTML" })
      .catch(() => {})
      .finally(() => {
        inFlight = false;
        if (again) { again = false; schedule(VISIBLE_DELAY_MS); }
      });
  }

  function schedule(delay) {
    const at = Date.now() + delay;
    if (timer && due <= at) return; // an earlier refresh is already planned
    if (timer) clearTimeout(timer);
    due = at;
    timer = setTimeout(refresh, delay);
  }

  // Patch the pill at once (the refresh brings health and last seen a moment later).
  function setStatus(tr, status) {
    const cell = tr.querySelector('[data-col="status"]');
    if (!cell) return;
    const label = status === "unknown" ? "never seen" : status;
    cell.innerHTML = "";
    const pill = document.createElement("span");
    pill.className = "pill status-" + label.replace(" ", "-");
    pill.textContent = label;
    cell.appendChild(pill);
  }

  document.addEventListener("pw:device", (e) => {
    const d = e.detail || {};
    const tr = row(d.device_id);
    if (tr && (d.event === "online" || d.event === "offline")) setStatus(tr, d.event);
    if (tr) schedule(VISIBLE_DELAY_MS);
    else if (dependsOnLiveState()) schedule(OTHER_DELAY_MS);
  });

  document.addEventListener("pw:alert", (e) => {
    const a = e.detail || {};
    if (a.device_id != null && row(a.device_id)) schedule(VISIBLE_DELAY_MS);
    else if (dependsOnLiveState()) schedule(OTHER_DELAY_MS);
  });

  document.addEventListener("pw:reset", () => schedule(VISIBLE_DELAY_MS));
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && again) { again = false; schedule(100); }
  });
})();
