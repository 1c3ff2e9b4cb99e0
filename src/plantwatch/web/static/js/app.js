// plantwatch UI runtime: theme, CSRF, API calls with session refresh, the live stream.
// Pages use window.pw; each page's own script listens for "pw:alert", "pw:device",
// "pw:kpi" and "pw:reset" events on document (detail = the stream event's data).
(function () {
  "use strict";
  // The cookie, not the page: a session refresh rotates it while the page stays.
  const csrf = () => {
    const m = document.cookie.match(/(?:^|;\s*)pw_csrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : document.querySelector('meta[name="csrf-token"]')?.content || "";
  };
  const tz = () => document.body.dataset.tz || "UTC";
  const here = () => location.pathname + location.search;

  function goLogin() {
    location.assign("/login?next=" + encodeURIComponent(here()));
  }

  let refreshing = null;
  // One refresh at a time, however many requests hit a 401 together. Resolves false
  // only when the server says the login has ended (401); a network error or a busy
  // server (5xx) is no reason to send anyone to the login page: true, try again.
  function refreshSession() {
    if (!refreshing) {
      refreshing = fetch("/session/refresh", {
        method: "POST", headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin",
      }).then((r) => r.ok || r.status !== 401, () => true)
        .finally(() => { setTimeout(() => { refreshing = null; }, 1000); });
    }
    return refreshing;
  }

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || "HTTP " + status);
      this.status = status;
      this.problem = problem || {};
      this.errors = (problem && problem.errors) || [];
    }
  }

  // fetch the JSON API with the session cookie; on 401 refresh once, then log in again.
  async function api(method, path, body, retried) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET" && method !== "HEAD") init.headers["X-CSRF-Token"] = csrf();
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401 && !retried) {
      if (await refreshSession()) return api(method, path, body, true);
      goLogin();
      throw new ApiError(401, { detail: "Session ended" });
    }
    if (response.status === 204) return null;
    const type = response.headers.get("content-type") || "";
    const data = type.includes("json") ? await response.json() : await response.text();
    if (!response.ok) throw new ApiError(response.status, typeof data === "object" ? data : { detail: data });
    return data;
  }

  const formatters = new Map();
  function fmtTime(value, opts) {
    if (value === null || value === undefined || value === "") return "—";
    const d = value instanceof Date ? value : new Date(typeof value === "number" ? value : String(value));
    const key = JSON.stringify(opts || {});
    if (!formatters.has(key)) {
      formatters.set(key, new Intl.DateTimeFormat("sv-SE", Object.assign({
        timeZone: tz(), year: "numeric", month: "2-digit", day: "2-digit",
        hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
      }, opts || {})));
    }
    return formatters.get(key).format(d);
  }

  function fmtNumber(value, digits) {
    if (value === null || value === undefined) return "—";
    if (typeof value !== "number") return String(value);
    const abs = Math.abs(value);
    const d = digits ?? (abs >= 1000 ? 0 : abs >= 100 ? 1 : 2);
    return value.toLocaleString(undefined, { maximumFractionDigits: d, minimumFractionDigits: 0 });
  }

  function toast(message, kind) {
    const box = document.getElementById("toasts");
    if (!box) return;
    const el = document.createElement("div");
    el.className = "toast" + (kind ? " " + kind : "");
    el.textContent = message;
    box.appendChild(el);
    setTimeout(() => el.remove(), 6000);
  }

  // --- the live stream: one EventSource per page, resumed with Last-Event-ID ---
  let source = null;
  // Leaving the page aborts the stream: that is no reason to refresh the session (a refresh
  // whose answer is dropped with the page leaves a spent refresh cookie: reuse -> logged out).
  let leaving = false;
  addEventListener("beforeunload", () => { leaving = true; });
  addEventListener("pageshow", () => { leaving = false; });
  let lastId = sessionStorage.getItem("pw-last-event-id");
  function setLive(state, label) {
    const el = document.getElementById("live-status");
    if (!el) return;
    el.dataset.state = state;
    el.querySelector(".label").textContent = label;
  }
  function openStream(params) {
    if (source) source.close();
    const url = new URL("/api/v1/stream", location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (Array.isArray(v)) v.forEach((x) => url.searchParams.append(k, x));
      else if (v !== undefined && v !== null) url.searchParams.set(k, v);
    }
    if (lastId) url.searchParams.set("last_event_id", lastId);
    source = new EventSource(url);
    const remember = (e) => {
      if (e.lastEventId) { lastId = e.lastEventId; sessionStorage.setItem("pw-last-event-id", lastId); }
    };
    const relay = (name) => (e) => {
      remember(e);
      let data = null;
      try { data = JSON.parse(e.data); } catch (_) { data = e.data; }
      document.dispatchEvent(new CustomEvent("pw:" + name, { detail: data }));
    };
    source.onopen = () => setLive("live", "live");
    source.onerror = () => {
      if (leaving) return;
      setLive("error", "reconnecting");
      // A 401 before the stream starts closes the EventSource for good: refresh and reopen.
      if (source.readyState === EventSource.CLOSED) {
        refreshSession().then((ok) => (ok ? setTimeout(() => openStream(params), 1000) : goLogin()));
      }
    };
    ["alert", "device", "kpi", "reset"].forEach((n) => source.addEventListener(n, relay(n)));
    source.addEventListener("close", () => {  // the token expired or the login ended
      source.close();
      refreshSession().then((ok) => (ok ? openStream(params) : goLogin()));
    });
    return source;
  }

  function applyTheme(theme) {
    document.documentElement.dataset.theme = theme;
    localStorage.setItem("pw-theme", theme);
    document.dispatchEvent(new CustomEvent("pw:theme", { detail: theme }));
  }
  function currentTheme() {
    const t = document.documentElement.dataset.theme;
    if (t !== "auto") return t;
    return matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("theme-toggle")?.addEventListener("click", () => {
      applyTheme(currentTheme() === "dark" ? "light" : "dark");
    });
    // The page's live stream: <body data-stream="alert,device" data-stream-devices="1,2">.
    const types = document.body.dataset.stream;
    if (types) {
      const params = { types };
      if (document.body.dataset.streamDevices) params.device = document.body.dataset.streamDevices.split(",");
      if (document.body.dataset.streamKpiOnly) params.kpi_only = "true";
      openStream(params);
    }
    // Times rendered by scripts or the server in UTC: show them in the factory's zone.
    document.querySelectorAll("time[data-local]").forEach((el) => { el.textContent = fmtTime(el.dateTime); });
  });

  // htmx: send the CSRF header; on 401 refresh the session and retry, else log in again.
  document.addEventListener("htmx:configRequest", (e) => { e.detail.headers["X-CSRF-Token"] = csrf(); });
  document.addEventListener("htmx:responseError", async (e) => {
    const xhr = e.detail.xhr;
    if (xhr.status === 401 && !xhr.getResponseHeader("HX-Redirect")) {
      if (await refreshSession()) htmx.ajax(e.detail.requestConfig.verb.toUpperCase(), e.detail.requestConfig.path, { source: e.detail.elt });
      else goLogin();
    } else if (xhr.status >= 400 && xhr.status !== 401) {
      let message = "Request failed (" + xhr.status + ")";
      try { const p = JSON.parse(xhr.responseText); message = p.detail || p.title || message; } catch (_) { /* HTML */ }
      toast(message, "error");
    }
  });

  window.pw = { api, ApiError, fmtTime, fmtNumber, toast, openStream, csrf, tz, currentTheme, refreshSession, goLogin };
})();
