// Alerts pages (/alerts and /alerts/{id}): live feed, in-place actions, SLA countdowns.
// Actions go to the REST API through pw.api; the server re-renders the fragments
// (/alerts/feed, /alerts/{id}/row, /alerts/{id}/body, /alerts/{id}/actions).
(function () {
  "use strict";

  const feed = () => document.getElementById("alerts-feed");
  const detail = () => document.getElementById("alert-detail");
  const dialog = () => document.getElementById("alert-actions-dialog");
  const rowOf = (id) => document.getElementById("alert-row-" + id);

  // --- SLA countdowns: deadlines come from the server as data-deadline (UTC ISO) ----------
  function duration(seconds) {
    let s = Math.floor(Math.abs(seconds));
    const days = Math.floor(s / 86400); s -= days * 86400;
    const hours = Math.floor(s / 3600); s -= hours * 3600;
    const minutes = Math.floor(s / 60); s -= minutes * 60;
    if (days) return days + "d " + hours + "h";
    if (hours) return hours + "h " + minutes + "m";
    if (minutes) return minutes + "m " + s + "s";
    return s + "s";
  }
  function tick() {
    const now = Date.now();
    document.querySelectorAll("[data-deadline]").forEach((el) => {
      const due = Date.parse(el.dataset.deadline);
      if (Number.isNaN(due)) return;
      const left = (due - now) / 1000;
      const step = el.dataset.step || "";
      const text = left < 0 ? step + " breached, " + duration(left) + " over" : step + " " + duration(left) + " left";
      if (el.textContent !== text) el.textContent = text;
      el.classList.toggle("is-breached", left < 0);
    });
  }

  // --- fragments ---------------------------------------------------------------------------
  async function fetchHtml(url, retried) {
    const r = await fetch(url, { credentials: "same-origin", headers: { "HX-Request": "true", Accept: "text/html" } });
    if (r.status === 401) {
      if (!retried && (await pw.refreshSession())) return fetchHtml(url, true);
      pw.goLogin();
      throw new Error("session ended");
    }
    return { status: r.status, html: r.status === 200 ? await r.text() : "" };
  }
  function parseOne(html, selector) {
    const t = document.createElement("template");
    t.innerHTML = html.trim();
    return t.content.querySelector(selector);
  }
  // Keep keyboard focus on the "same" control when a fragment is replaced.
  function focusKey(el) {
    if (!el) return null;
    if (el.dataset.quickAction) return '[data-quick-action="' + el.dataset.quickAction + '"]';
    if (el.hasAttribute("data-open-actions")) return "[data-open-actions]";
    if (el.classList.contains("al-title")) return ".al-title";
    return null;
  }
  function replaceKeepingFocus(old, fresh) {
    const active = document.activeElement;
    const inside = active && old.contains(active);
    const key = inside ? focusKey(active) : null;
    old.replaceWith(fresh);
    if (inside) (fresh.querySelector(key || "a, button") || fresh).focus?.();
  }
  function flash(el, cls) {
    el.classList.remove(cls);
    void el.offsetWidth; // restart the animation
    el.classList.add(cls);
    setTimeout(() => el.classList.remove(cls), 2600);
  }
  function announce(text) {
    const box = document.getElementById("alerts-announce");
    if (box) box.textContent = text;
  }

  // --- the feed: live rows ---------------------------------------------------------------
  const pendingRows = new Set();
  let pendingFeed = false;
  let timer = null;
  let lastFeed = 0;
  let running = false;

  function schedule(delay) {
    if (timer) return;
    timer = setTimeout(flush, delay ?? 350);
  }
  async function flush() {
    timer = null;
    if (!feed()) return;
    if (running) { schedule(300); return; }
    running = true;
    try {
      const rows = [...pendingRows];
      pendingRows.clear();
      if (pendingFeed || rows.length > 10) {
        // At most one list refresh a second, however many events arrive.
        const wait = 1000 - (Date.now() - lastFeed);
        if (wait > 0) { pendingFeed = true; running = false; schedule(wait); return; }
        pendingFeed = false;
        lastFeed = Date.now();
        await refreshFeed();
      } else {
        for (const id of rows) await refreshRow(id);
      }
    } catch (_) {
      // network trouble: the next event (or the stream's reset) refreshes again
    } finally {
      running = false;
    }
    if (pendingFeed || pendingRows.size) schedule();
  }

  async function refreshRow(id) {
    const f = feed();
    const old = rowOf(id);
    if (!f || !old) { pendingFeed = true; return; }
    const { status, html } = await fetchHtml("/alerts/" + id + "/row?" + f.dataset.query);
    const row = status === 200 ? parseOne(html, "tr") : null;
    if (!row) { pendingFeed = true; return; } // no longer matches the filters
    const current = rowOf(id);
    if (!current) return;
    replaceKeepingFocus(current, row);
    flash(row, "al-updated");
  }

  async function refreshFeed() {
    const f = feed();
    if (!f) return;
    const query = f.dataset.query;
    const { status, html } = await fetchHtml("/alerts/feed?" + query);
    if (status !== 200) return;
    const doc = new DOMParser().parseFromString(html, "text/html");
    const fresh = doc.getElementById("alerts-feed");
    if (!fresh || !feed() || feed().dataset.query !== query) return; // filters changed meanwhile
    for (const id of ["alerts-counters", "alerts-pager"]) {
      const now = document.getElementById(id);
      const next = fresh.querySelector("#" + id);
      if (now && next) {
        now.replaceWith(next);
        if (window.htmx) htmx.process(next);
      }
    }
    const body = document.getElementById("alerts-rows");
    const nextBody = fresh.querySelector("#alerts-rows");
    if (!body || !nextBody) return;
    const known = new Set([...body.querySelectorAll("tr[data-alert-id]")].map((r) => r.dataset.alertId));
    const active = document.activeElement;
    const focusRow = active && body.contains(active) ? active.closest("tr[data-alert-id]") : null;
    const focusSel = focusKey(active);
    const rows = [...nextBody.children];
    body.replaceChildren(...rows);
    for (const row of rows) {
      if (row.dataset.alertId && !known.has(row.dataset.alertId)) flash(row, "al-new");
    }
    if (focusRow) {
      const again = rowOf(focusRow.dataset.alertId);
      (again && (again.querySelector(focusSel || "a, button") || again.querySelector("a")))?.focus();
    }
  }

  // Which events may change which rows are listed (or the counters)?
  const MEMBERSHIP = new Set(["created", "resolved", "reopened", "acknowledged", "assigned"]);
  function onAlertEvent(d) {
    const f = feed();
    if (!f) return;
    const id = String(d.alert_id || "");
    const visible = id && rowOf(id);
    if (visible) pendingRows.add(id);
    if (d.event === "created" || d.event === "resolved" || d.event === "reopened") {
      pendingFeed = true; // counters change, rows may come or go
    } else if (!visible && (MEMBERSHIP.has(d.event) || f.dataset.sort !== "-triggered_at")) {
      pendingFeed = true;
    }
    if (d.event === "created") announce("New " + (d.severity || "") + " alert: " + (d.title || "") + " — " + (d.message || ""));
    schedule();
  }

  // --- the detail page ---------------------------------------------------------------------
  let detailTimer = null;
  function busyForm(el) {
    if (!el) return false;
    const a = document.activeElement;
    if (a && el.contains(a) && a.matches("input, textarea, select")) return true;
    return [...el.querySelectorAll("input[type=text], textarea")].some((x) => x.value.trim() !== "");
  }
  async function refreshDetail(withActions) {
    const wrap = detail();
    if (!wrap) return;
    const id = wrap.dataset.alertId;
    const actions = document.getElementById("alert-actions");
    const wantActions = actions && (withActions || !busyForm(actions));
    // Both fetched first, then swapped together: the page never shows a new state
    // next to controls of the old one.
    const [body, controls] = await Promise.all([
      fetchHtml("/alerts/" + id + "/body"),
      wantActions ? fetchHtml(actions.dataset.actionsUrl) : Promise.resolve(null),
    ]);
    const fresh = body.status === 200 ? parseOne(body.html, "#alert-body") : null;
    const old = document.getElementById("alert-body");
    if (fresh && old) old.replaceWith(fresh);
    // Never wipe what the user started typing while the fragments were on their way.
    if (controls && (controls.status === 200 || controls.status === 204) && (withActions || !busyForm(actions))) {
      actions.innerHTML = controls.html;
    }
    tick();
  }
  function scheduleDetail() {
    clearTimeout(detailTimer);
    detailTimer = setTimeout(() => refreshDetail(false).catch(() => {}), 300);
  }

  // --- actions -----------------------------------------------------------------------------
  const DONE = {
    acknowledge: "Acknowledged", assign: "Assignment saved", resolve: "Resolved",
    reopen: "Reopened", escalate: "Escalated", comments: "Comment added",
  };
  function bodyOf(form) {
    const data = new FormData(form);
    const body = {};
    if (form.dataset.alertAction === "assign") {
      const v = data.get("user_id");
      body.user_id = v ? Number(v) : null;
    }
    for (const k of ["note", "reason", "text"]) {
      const v = data.get(k);
      if (typeof v === "string" && v.trim()) body[k] = v.trim();
    }
    return body;
  }
  function clearErrors(scope) {
    if (!scope) return;
    scope.querySelectorAll(".al-field-error").forEach((e) => e.remove());
    scope.querySelectorAll("[aria-invalid]").forEach((e) => { e.removeAttribute("aria-invalid"); e.removeAttribute("aria-describedby"); });
    scope.querySelectorAll(".al-form-error").forEach((e) => { e.hidden = true; e.textContent = ""; });
  }
  let errorSeq = 0;
  function showError(form, scope, err) {
    const message = (err && err.message) || "The action failed";
    let placed = false;
    if (form && err instanceof pw.ApiError && err.status === 422) {
      for (const e of err.errors || []) {
        const path = String(e.path || (Array.isArray(e.loc) ? e.loc.join(".") : ""));
        const field = form.elements[path.split(".").pop()];
        if (!field || !field.setAttribute) continue;
        const note = document.createElement("span");
        note.className = "error-text al-field-error";
        note.id = "al-err-" + ++errorSeq;
        note.textContent = e.message || message;
        field.setAttribute("aria-invalid", "true");
        field.setAttribute("aria-describedby", note.id);
        field.insertAdjacentElement("afterend", note);
        if (!placed) field.focus();
        placed = true;
      }
    }
    const box = scope && scope.querySelector(".al-form-error");
    if (box && !placed) { box.textContent = message; box.hidden = false; }
    pw.toast(message, "error");
  }

  async function runAction(source, action, body, id) {
    const form = source.tagName === "FORM" ? source : null;
    const scope = source.closest(".al-actions");
    const buttons = form ? [...form.querySelectorAll("button")] : [source];
    clearErrors(scope);
    buttons.forEach((b) => { b.disabled = true; });
    try {
      await pw.api("POST", "/api/v1/alerts/" + id + "/" + action, body);
      pw.toast(DONE[action] + " (alert " + id + ")");
      await afterAction(id);
    } catch (err) {
      showError(form, scope, err);
    } finally {
      buttons.forEach((b) => { if (b.isConnected) b.disabled = false; });
    }
  }
  async function afterAction(id) {
    const dlg = dialog();
    if (dlg && dlg.open && dlg.dataset.alertId === id) {
      dlg.close();
    }
    if (rowOf(id)) {
      await refreshRow(id);
      pendingFeed = true;
      schedule(1000);
    }
    if (detail() && detail().dataset.alertId === id) await refreshDetail(true);
  }

  // The row's "Actions…" dialog: the controls are rendered by the server for this alert.
  let opener = null;
  async function openActions(button) {
    const dlg = dialog();
    const id = button.dataset.alertId;
    if (!dlg || !id) return;
    opener = button;
    const row = rowOf(id);
    dlg.dataset.alertId = id;
    document.getElementById("al-dialog-title").textContent =
      "Alert " + id + (row ? ": " + row.querySelector(".al-title").textContent.trim() : "");
    document.getElementById("al-dialog-sub").textContent = row ? row.querySelector(".al-message").textContent.trim() : "";
    document.getElementById("al-dialog-link").href = "/alerts/" + id;
    const box = document.getElementById("al-dialog-body");
    box.innerHTML = '<p class="muted">Loading…</p>';
    if (!dlg.open) dlg.showModal();
    try {
      const { status, html } = await fetchHtml("/alerts/" + id + "/actions");
      box.innerHTML = status === 200 ? html : '<p class="muted">This alert is gone.</p>';
    } catch (_) {
      box.innerHTML = '<p class="error-text">Could not load the actions.</p>';
    }
    box.querySelector("input, select, textarea, button")?.focus();
  }

  document.addEventListener("submit", (e) => {
    const form = e.target instanceof HTMLFormElement && e.target.matches("form[data-alert-action]") ? e.target : null;
    if (!form) return;
    e.preventDefault();
    const holder = form.closest("[data-alert-id]");
    if (holder) runAction(form, form.dataset.alertAction, bodyOf(form), holder.dataset.alertId);
  });
  document.addEventListener("click", (e) => {
    const t = e.target instanceof Element ? e.target : null;
    if (!t) return;
    const quick = t.closest("[data-quick-action]");
    if (quick) {
      e.preventDefault();
      runAction(quick, quick.dataset.quickAction, {}, quick.dataset.alertId);
      return;
    }
    const me = t.closest("[data-assign-me]");
    if (me) {
      e.preventDefault();
      const form = me.closest("form");
      const holder = me.closest("[data-alert-id]");
      if (form && holder) runAction(form, "assign", { user_id: Number(document.body.dataset.userId) }, holder.dataset.alertId);
      return;
    }
    const open = t.closest("[data-open-actions]");
    if (open) { e.preventDefault(); openActions(open); return; }
    if (t.closest("[data-close-dialog]")) dialog()?.close();
  });
  document.addEventListener("close", (e) => {
    if (e.target === dialog()) {
      document.getElementById("al-dialog-body").innerHTML = "";
      const again = opener && opener.isConnected ? opener : rowOf(dialog().dataset.alertId)?.querySelector("[data-open-actions]");
      again?.focus();
      opener = null;
    }
  }, true);

  // --- live events -------------------------------------------------------------------------
  document.addEventListener("pw:alert", (e) => {
    const d = e.detail || {};
    onAlertEvent(d);
    const wrap = detail();
    if (wrap && String(d.alert_id) === wrap.dataset.alertId) scheduleDetail();
  });
  document.addEventListener("pw:reset", () => {
    if (feed()) { pendingFeed = true; schedule(); }
    if (detail()) scheduleDetail();
  });
  // htmx swapped the feed (filters, pager, sorting): forget queued work for the old one.
  document.addEventListener("htmx:afterSwap", () => { pendingRows.clear(); tick(); });

  document.addEventListener("DOMContentLoaded", () => {
    tick();
    setInterval(tick, 1000);
  });
})();
