// Admin pages: dead letters (select + replay), users (invite, role and grants,
// deactivate/reactivate, re-invite). Changes go through the REST API (pw.api), which
// checks permissions; then the affected fragment is fetched again with htmx.
(function () {
  "use strict";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  function refresh(id) {
    const el = document.getElementById(id);
    if (!el || !el.dataset.url) return Promise.resolve();
    return htmx.ajax("GET", el.dataset.url, { target: "#" + id, swap: "outerHTML" });
  }

  // 422 errors carry paths like "body.email" or "body.permissions[2]": show each at its field.
  function fieldOf(err) {
    const path = String(err.path || (Array.isArray(err.loc) ? err.loc.join(".") : ""));
    return path.replace(/^body\./, "").replace(/\[\d+\]$/, "").split(".")[0];
  }
  function clearErrors(form) {
    $$("[data-error-for]", form).forEach((el) => { el.textContent = ""; });
    $$("[aria-invalid]", form).forEach((el) => el.removeAttribute("aria-invalid"));
  }
  function showErrors(form, error, fallback) {
    let shown = false;
    (error.errors || []).forEach((err) => {
      const name = fieldOf(err);
      const slot = $(`[data-error-for="${name}"]`, form);
      if (slot) {
        slot.textContent = err.message || err.msg || "Invalid";
        const input = form.elements[name];
        if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
        shown = true;
      }
    });
    if (!shown && fallback) fallback.textContent = error.message;
  }

  function copyFrom(selector) {
    const input = $(selector);
    if (!input) return;
    const done = () => pw.toast("Copied");
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(input.value).then(done, () => { input.select(); });
    } else {
      input.select();
      try { document.execCommand("copy"); done(); } catch (_) { /* selected for the user */ }
    }
  }

  function confirmDialog(title, text, okLabel) {
    const dialog = document.getElementById("confirm-dialog");
    if (!dialog || typeof dialog.showModal !== "function") return Promise.resolve(window.confirm(text));
    $("#confirm-title", dialog).textContent = title;
    $("#confirm-text", dialog).textContent = text;
    $("#confirm-ok", dialog).textContent = okLabel;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
      $("#confirm-ok", dialog).focus();
    });
  }

  // --- dead letters -------------------------------------------------------------------

  function selectedLetters() {
    return $$(".dl-select:checked").map((el) => Number(el.value));
  }
  function updateSelection() {
    const boxes = $$(".dl-select");
    const ids = selectedLetters();
    const all = $("#dl-select-all");
    if (all) {
      all.checked = boxes.length > 0 && ids.length === boxes.length;
      all.indeterminate = ids.length > 0 && ids.length < boxes.length;
      all.disabled = boxes.length === 0;
    }
    const button = $("#dl-replay");
    if (button) button.disabled = ids.length === 0;
    const label = $("#dl-selected");
    if (label) label.textContent = ids.length ? `${ids.length} selected` : "No letters selected";
  }

  const OUTCOME = {
    stored: ["replayed", "status-resolved"],
    partial: ["partly replayed", "status-warning"],
    rejected: ["still failing", "status-triggered"],
    unresolved: ["still failing", "status-triggered"],
  };
  function showOutcome(results, error) {
    const box = $("#dl-outcome");
    const list = $("#dl-outcome-list");
    if (!box || !list) return;
    list.replaceChildren();
    if (error) {
      const li = document.createElement("li");
      li.className = "error-text";
      li.textContent = "Replay failed: " + error.message;
      list.appendChild(li);
    }
    (results || []).forEach((r) => {
      const [label, cls] = OUTCOME[r.status] || [r.status, "status-disabled"];
      const li = document.createElement("li");
      li.dataset.id = r.id;
      li.dataset.status = r.status;
      const id = document.createElement("strong");
      id.textContent = `#${r.id} `;
      const pill = document.createElement("span");
      pill.className = "pill " + cls;
      pill.textContent = label;
      const detail = document.createElement("span");
      detail.className = "muted";
      detail.textContent = " — " + r.detail;
      li.append(id, pill, detail);
      list.appendChild(li);
    });
    box.hidden = false;
  }

  async function replaySelected(button) {
    const ids = selectedLetters();
    if (!ids.length) return;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    try {
      const out = await pw.api("POST", "/api/v1/dead-letters/replay", { ids });
      const results = out.data || [];
      showOutcome(results);
      const ok = results.filter((r) => r.status === "stored").length;
      pw.toast(`${ok} of ${results.length} replayed`, ok === results.length ? undefined : "error");
      await refresh("dl-table");
    } catch (e) {
      showOutcome([], e);
      pw.toast(e.message, "error");
    } finally {
      button.removeAttribute("aria-busy");
      updateSelection();
    }
  }

  // --- users: invite ------------------------------------------------------------------

  async function invite(form) {
    clearErrors(form);
    const general = $("#invite-error");
    general.textContent = "";
    const body = { email: form.elements.email.value.trim(), role: form.elements.role.value };
    const name = form.elements.full_name.value.trim();
    if (name) body.full_name = name;
    if (!body.email) {
      $('[data-error-for="email"]', form).textContent = "Enter an email address";
      form.elements.email.setAttribute("aria-invalid", "true");
      form.elements.email.focus();
      return;
    }
    const submit = $("button[type=submit]", form);
    submit.disabled = true;
    try {
      const out = await pw.api("POST", "/api/v1/users/invite", body);
      const data = out.data;
      $("#invite-result-who").textContent = data.user.email;
      $("#invite-link").value = data.accept_url;
      $("#invite-token").textContent = data.invite_token;
      $("#invite-expires").textContent = pw.fmtTime(data.expires_at);
      $("#invite-result").hidden = false;
      form.reset();
      pw.toast(`Invited ${data.user.email}`);
      await refresh("users-table");
      $("#invite-link").focus();
      $("#invite-link").select();
    } catch (e) {
      if (e.status === 409 && e.problem.code === "user_exists") {
        $('[data-error-for="email"]', form).textContent = e.message;
        form.elements.email.setAttribute("aria-invalid", "true");
      } else {
        showErrors(form, e, general);
      }
    } finally {
      submit.disabled = false;
    }
  }

  // --- user page: role, grants, status -------------------------------------------------

  function rolePermissions() {
    const el = document.getElementById("role-permissions");
    try { return el ? JSON.parse(el.textContent) : {}; } catch (_) { return {}; }
  }

  function syncGrants(form) {
    const perms = new Set(rolePermissions()[form.elements.role.value] || []);
    $$('input[name="grant"]', form).forEach((box) => {
      const inRole = perms.has(box.value);
      const note = box.closest("label").querySelector(".role-note");
      if (note) note.hidden = !inRole;
      if (inRole) {
        box.checked = true;
        box.disabled = true;
      } else {
        // The person's own choice for this grant if they made one, else what the user has.
        box.disabled = box.dataset.grantable !== "true";
        box.checked = (box.dataset.choice ?? box.dataset.granted) === "true";
      }
    });
  }

  async function saveAccess(form) {
    clearErrors(form);
    const general = $("#access-error");
    general.textContent = "";
    const detail = document.getElementById("user-detail");
    const id = detail.dataset.userId;
    const permissions = $$('input[name="grant"]', form).filter((b) => b.checked && !b.disabled).map((b) => b.value);
    const submit = $("button[type=submit]", form);
    submit.disabled = true;
    try {
      await pw.api("PATCH", `/api/v1/users/${id}`, { role: form.elements.role.value, permissions });
      pw.toast("Role and permissions saved");
      await refresh("user-detail");
      const saved = $("#access-saved");
      if (saved) saved.textContent = "Saved";
    } catch (e) {
      showErrors(form, e, general);
    } finally {
      if (document.body.contains(submit)) submit.disabled = false;
    }
  }

  const STATUS_ACTIONS = {
    deactivate: {
      title: "Deactivate this user?",
      text: (email) => `${email} is logged out at once and cannot log in until reactivated. Any open invite is withdrawn.`,
      ok: "Deactivate",
      run: (id) => pw.api("DELETE", `/api/v1/users/${id}`),
      done: "User deactivated",
    },
    reactivate: {
      title: "Reactivate this user?",
      text: (email) => `${email} can log in again with their role and permissions.`,
      ok: "Reactivate",
      run: (id) => pw.api("PATCH", `/api/v1/users/${id}`, { is_active: true }),
      done: "User reactivated",
    },
    reinvite: {
      title: "Make a new invite link?",
      text: (email) => `Earlier invite links for ${email} stop working.`,
      ok: "Make new link",
      run: (id) => pw.api("POST", `/api/v1/users/${id}/invite`),
      done: "New invite link made",
    },
  };

  async function statusAction(button) {
    const action = STATUS_ACTIONS[button.dataset.userAction];
    const detail = document.getElementById("user-detail");
    if (!action || !detail) return;
    const error = $("#status-error");
    if (error) error.textContent = "";
    if (!(await confirmDialog(action.title, action.text(detail.dataset.email), action.ok))) return;
    button.disabled = true;
    try {
      const out = await action.run(detail.dataset.userId);
      pw.toast(action.done);
      if (button.dataset.userAction === "reinvite" && out && out.data) {
        $("#reinvite-link").value = out.data.accept_url;
        $("#reinvite-expires").textContent = pw.fmtTime(out.data.expires_at);
        $("#reinvite-result").hidden = false;
        $("#reinvite-link").select();
        button.disabled = false;
        return;
      }
      await refresh("user-detail");
    } catch (e) {
      if (error) error.textContent = e.message;
      if (document.body.contains(button)) button.disabled = false;
    }
  }

  // --- wiring (delegated: fragments are swapped in and out) -----------------------------

  document.addEventListener("change", (e) => {
    const t = e.target;
    if (t.id === "dl-select-all") {
      $$(".dl-select").forEach((box) => { box.checked = t.checked; });
      updateSelection();
    } else if (t.classList && t.classList.contains("dl-select")) {
      updateSelection();
    } else if (t.id === "access-role") {
      syncGrants(t.form);
    } else if (t.name === "grant" && !t.disabled) {
      t.dataset.choice = t.checked ? "true" : "false";
    }
  });

  document.addEventListener("click", (e) => {
    const t = e.target.closest("button");
    if (!t) return;
    if (t.id === "dl-replay") replaySelected(t);
    else if (t.dataset.copy) copyFrom(t.dataset.copy);
    else if (t.dataset.userAction) statusAction(t);
  });

  document.addEventListener("submit", (e) => {
    const form = e.target;
    if (form.id === "invite-form") { e.preventDefault(); invite(form); }
    else if (form.id === "access-form") { e.preventDefault(); saveAccess(form); }
  });

  document.addEventListener("htmx:afterSwap", () => updateSelection());
  document.addEventListener("DOMContentLoaded", () => {
    updateSelection();
    const access = document.getElementById("access-form");
    if (access) syncGrants(access);
  });
})();
