// Machine page: live KPI cards (pw:kpi), status, health and alerts kept current, and a
// zoomable uPlot history chart that re-fetches at a finer resolution as you zoom.
(function () {
  "use strict";
  const dataEl = document.getElementById("machine-data");
  if (!dataEl) return;
  const M = JSON.parse(dataEl.textContent);
  const deviceId = Number(M.device_id);
  const offlineMs = Number(M.offline_after_s || 300) * 1000;
  // The server's clock, as far as stale markers go (the browser's may be off).
  const skewMs = M.server_now_ms ? Number(M.server_now_ms) - Date.now() : 0;
  const serverNow = () => Date.now() + skewMs;

  // --- KPI cards ---------------------------------------------------------------------------
  const ARROWS = { rising: "▲", falling: "▼", steady: "▶" };
  const LEVELS = { ok: "within limits", warning: "warning", critical: "critical" };
  const grid = document.getElementById("machine-kpis");
  const cardFor = (key) =>
    grid ? Array.from(grid.querySelectorAll(".kpi[data-key]")).find((c) => c.dataset.key === key) : null;

  function newCard(v) {
    const tpl = document.getElementById("kpi-template");
    if (!grid || !tpl) return null;
    const card = tpl.content.firstElementChild.cloneNode(true);
    card.dataset.key = v.key;
    card.querySelector(".kpi-name").textContent = v.display_name || v.key;
    card.querySelector(".unit").textContent = v.unit || "";
    grid.appendChild(card);
    document.getElementById("machine-kpis-empty")?.setAttribute("hidden", "");
    return card;
  }

  function setStale(card, now) {
    const ts = Number(card.dataset.ts || 0);
    const stale = !ts || now - ts >= offlineMs;
    card.dataset.stale = stale ? "true" : "false";
    const mark = card.querySelector(".kpi-stale");
    if (mark) mark.hidden = !stale;
  }

  function trendOf(value, previous) {
    if (typeof value !== "number" || typeof previous !== "number") return "";
    if (Math.abs(value - previous) <= 1e-9 * Math.max(1, Math.abs(previous))) return "steady";
    return value > previous ? "rising" : "falling";
  }

  let healthDue = false;
  function applyValue(v) {
    const card = cardFor(v.key) || newCard(v);
    if (!card) return;
    const ts = v.ts ? Date.parse(v.ts) : 0;
    const oldTs = Number(card.dataset.ts || 0);
    if (ts && oldTs && ts < oldTs) return; // an older value than the one shown
    const isNumber = typeof v.value === "number";
    if (isNumber && ts !== oldTs) {
      const previous = card.dataset.value === "" ? null : Number(card.dataset.value);
      const trend = trendOf(v.value, previous);
      if (trend) {
        const el = card.querySelector(".kpi-trend");
        el.dataset.trend = trend;
        el.querySelector(".arrow").textContent = ARROWS[trend];
        el.querySelector(".trend-text").textContent = trend;
        el.hidden = false;
      }
    }
    card.dataset.value = isNumber ? String(v.value) : "";
    card.dataset.ts = ts ? String(ts) : "";
    const number = card.querySelector(".kpi-number");
    number.textContent = isNumber ? pw.fmtNumber(v.value) : (v.text ?? "—");
    number.classList.remove("flash");
    void number.offsetWidth; // restart the animation
    number.classList.add("flash");
    if (v.unit !== undefined) card.querySelector(".unit").textContent = v.unit || "";
    const level = v.level || "";
    if ((card.dataset.level || "") !== level) healthDue = true;
    card.dataset.level = level;
    const pill = card.querySelector(".kpi-level");
    pill.className = "kpi-level pill status-" + (level || "ok");
    pill.textContent = LEVELS[level] || "";
    pill.hidden = !level;
    const time = card.querySelector(".kpi-time");
    time.textContent = "";
    if (ts) {
      const t = document.createElement("time");
      t.dateTime = new Date(ts).toISOString();
      t.textContent = pw.fmtTime(ts);
      time.appendChild(t);
    } else {
      time.textContent = "no value yet";
    }
    setStale(card, serverNow());
  }

  document.addEventListener("pw:kpi", (e) => {
    const values = (e.detail && e.detail.values) || [];
    healthDue = false;
    for (const v of values) if (Number(v.device_id) === deviceId) applyValue(v);
    if (healthDue) later("health", refreshHealth, 1000);
  });
  setInterval(() => {
    const now = serverNow();
    grid?.querySelectorAll(".kpi[data-key]").forEach((c) => setStale(c, now));
  }, 5000);

  // --- status, health, alerts ---------------------------------------------------------------
  const timers = {};
  function later(name, fn, delay) {
    if (timers[name]) return;
    timers[name] = setTimeout(() => { timers[name] = null; fn(); }, delay);
  }
  function swap(url, id) {
    if (!document.getElementById(id) || !window.htmx) return;
    htmx.ajax("GET", url, { target: "#" + id, swap: "outerHTML" }).catch(() => {});
  }
  const refreshHealth = () => swap("/machines/" + deviceId + "/health", "machine-health");
  const refreshAlerts = () => swap("/machines/" + deviceId + "/alerts", "alerts");

  function pill(status) {
    const label = status === "unknown" ? "never seen" : status;
    const el = document.createElement("span");
    el.className = "pill status-" + label.replace(" ", "-");
    el.textContent = label;
    return el;
  }

  document.addEventListener("pw:device", (e) => {
    const d = e.detail || {};
    if (Number(d.device_id) !== deviceId || (d.event !== "online" && d.event !== "offline")) return;
    const head = document.getElementById("machine-status");
    head?.querySelector(".pill")?.replaceWith(pill(d.event));
    const text = document.getElementById("machine-status-text");
    if (text) text.replaceChildren(pill(d.event));
    if (d.event === "online") {
      const seen = document.getElementById("machine-last-seen");
      const at = d.recorded_at ? Date.parse(d.recorded_at) : Date.now();
      if (seen) {
        const t = document.createElement("time");
        t.dateTime = new Date(at).toISOString();
        t.textContent = pw.fmtTime(at);
        seen.replaceChildren(t);
      }
    }
    later("health", refreshHealth, 500);
  });

  document.addEventListener("pw:alert", (e) => {
    const a = e.detail || {};
    if (Number(a.device_id) !== deviceId) return;
    later("alerts", refreshAlerts, 500);
    later("health", refreshHealth, 500);
  });
  document.addEventListener("pw:reset", () => {
    later("alerts", refreshAlerts, 100);
    later("health", refreshHealth, 100);
  });

  // --- history chart ------------------------------------------------------------------------
  const chartEl = document.getElementById("machine-chart");
  const form = document.getElementById("chart-controls");
  if (!chartEl || !form) return;
  const statusEl = document.getElementById("chart-status");
  const resolutionEl = document.getElementById("chart-resolution");
  const rangeEl = document.getElementById("chart-range");
  const resetBtn = document.getElementById("chart-reset");
  const customBox = document.getElementById("chart-custom");
  const names = new Map(M.parameters.map((p) => [p.key, p]));
  const SPANS = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };
  const HEIGHT = () => Math.max(240, Math.min(480, Math.round(window.innerHeight * 0.4)));
  const MAX_POINTS = 2000;

  let plot = null;
  let base = null; // the range picked (preset or custom): what "Reset zoom" returns to
  let shown = null; // the range the chart shows: {start, end} in ms
  let loaded = null; // the last response, to redraw on theme changes
  let seq = 0;
  let zoomTimer = null;
  let drawing = false; // our own setData/setScale: not a zoom

  const setStatus = (text) => { statusEl.textContent = text; };
  const selectedKeys = () =>
    Array.from(form.querySelectorAll('input[name="parameter"]:checked')).map((i) => i.value);
  const rangeChoice = () => form.querySelector('input[name="range"]:checked')?.value || "24h";

  // --- the factory's timezone for custom ranges (datetime-local is wall-clock time) ---
  const tz = pw.tz();
  const partsFmt = new Intl.DateTimeFormat("en-US", {
    timeZone: tz, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
  function offsetAt(ms) {
    const p = Object.fromEntries(partsFmt.formatToParts(new Date(ms)).map((x) => [x.type, x.value]));
    const asUtc = Date.UTC(+p.year, +p.month - 1, +p.day, +p.hour % 24, +p.minute, +p.second);
    return asUtc - Math.floor(ms / 1000) * 1000;
  }
  function wallToUtc(value) {
    const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})/.exec(value || "");
    if (!m) return null;
    const wall = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5]);
    let utc = wall - offsetAt(wall);
    utc = wall - offsetAt(utc); // once more, across a DST change
    return utc;
  }
  const utcToWall = (ms) => pw.fmtTime(ms).replace(" ", "T").slice(0, 16);

  // Axis labels in the factory's timezone, 24-hour, the date under the first tick of a day.
  function wall(ms) {
    return Object.fromEntries(partsFmt.formatToParts(new Date(ms)).map((x) => [x.type, x.value]));
  }
  function timeTicks(self, splits, axisIdx, space, incr) {
    let lastDay = null;
    return splits.map((s) => {
      const p = wall(s * 1000);
      const day = p.month + "-" + p.day;
      const hour = String(+p.hour % 24).padStart(2, "0");
      let label = incr >= 86400 ? p.year + "-" + day
        : incr >= 60 ? hour + ":" + p.minute : hour + ":" + p.minute + ":" + p.second;
      if (incr < 86400 && day !== lastDay) label += "\n" + day;
      lastDay = day;
      return label;
    });
  }

  function pickedRange() {
    const choice = rangeChoice();
    if (choice === "custom") {
      const start = wallToUtc(form.elements.from.value);
      const end = wallToUtc(form.elements.to.value);
      if (start === null || end === null || end <= start) return null;
      return { start, end };
    }
    const end = serverNow();
    return { start: end - SPANS[choice], end };
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // uPlot needs one x array shared by every series: merge the buckets of all series.
  function align(parameters) {
    const xs = new Set();
    parameters.forEach((p) => p.points.forEach((pt) => xs.add(pt[0])));
    const x = Array.from(xs).sort((a, b) => a - b);
    const index = new Map(x.map((t, i) => [t, i]));
    const ys = parameters.map((p) => {
      const y = new Array(x.length).fill(null);
      p.points.forEach(([t, v]) => { y[index.get(t)] = v; });
      return y;
    });
    return [x.map((t) => t / 1000), ...ys];
  }

  function options(parameters, width) {
    const text = cssVar("--muted") || "#666";
    const line = cssVar("--border") || "#ccc";
    const units = [];
    parameters.forEach((p) => { const u = p.unit || ""; if (!units.includes(u)) units.push(u); });
    const scaleOf = (p) => "u:" + (p.unit || "");
    const scales = { x: { time: true } };
    units.forEach((u) => { scales["u:" + u] = { auto: true }; });
    const axes = [{
      stroke: text, grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1 },
      values: timeTicks, space: 60,
    }];
    units.slice(0, 2).forEach((u, i) => {
      axes.push({
        scale: "u:" + u, side: i === 0 ? 3 : 1, label: u || undefined, stroke: text,
        grid: { show: i === 0, stroke: line, width: 1 }, ticks: { stroke: line, width: 1 },
        values: (self, ticks) => ticks.map((v) => pw.fmtNumber(v)),
      });
    });
    return {
      width,
      height: HEIGHT(),
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), tz),
      scales,
      axes,
      series: [
        { label: "Time", value: (self, v) => (v == null ? "—" : pw.fmtTime(v * 1000)) },
        ...parameters.map((p, i) => ({
          label: (names.get(p.key)?.name || p.key) + (p.unit ? " (" + p.unit + ")" : ""),
          scale: scaleOf(p),
          stroke: cssVar("--chart-" + ((i % 5) + 1)) || "#1a73e8",
          width: 2,
          spanGaps: false,
          points: { show: false },
          value: (self, v) => (v == null ? "—" : pw.fmtNumber(v) + (p.unit ? " " + p.unit : "")),
        })),
      ],
      cursor: { drag: { x: true, y: false, setScale: true }, bind: { dblclick: () => null } },
      legend: { live: true },
      hooks: { setScale: [onSetScale] },
    };
  }

  function draw(response) {
    const params = response.parameters;
    const data = align(params);
    const width = Math.max(200, chartEl.clientWidth);
    const keys = params.map((p) => p.key + "|" + (p.unit || "")).join(",");
    drawing = true;
    if (plot && plot.__keys === keys) {
      plot.setData(data, true);
    } else {
      if (plot) plot.destroy();
      chartEl.replaceChildren();
      plot = new uPlot(options(params, width), data, chartEl);
      plot.__keys = keys;
      window.pwMachineChart = plot; // for tests and the curious
    }
    plot.setScale("x", { min: shown.start / 1000, max: shown.end / 1000 });
    // uPlot applies scales in a microtask; ours runs after it.
    Promise.resolve().then(() => { drawing = false; });
    const points = params.reduce((n, p) => n + p.points.length, 0);
    chartEl.dataset.interval = response.interval;
    chartEl.dataset.points = String(points);
    resolutionEl.textContent = response.interval === "raw"
      ? "raw samples" : response.interval + (response.agg ? " " + response.agg : "");
    rangeEl.textContent = pw.fmtTime(shown.start) + " – " + pw.fmtTime(shown.end) + " (" + tz + ")";
    setStatus(points ? "" : "No data in this range.");
  }

  async function load(range) {
    const keys = selectedKeys();
    shown = range;
    if (!keys.length) {
      if (plot) { plot.destroy(); plot = null; }
      chartEl.replaceChildren();
      loaded = null;
      setStatus("Pick at least one parameter.");
      return;
    }
    const width = Math.max(200, chartEl.clientWidth);
    const query = new URLSearchParams({
      parameters: keys.join(","),
      start: new Date(range.start).toISOString(),
      end: new Date(range.end).toISOString(),
      interval: "auto",
      agg: "avg",
      points: String(Math.min(MAX_POINTS, Math.round(width))),
    });
    const mine = ++seq;
    setStatus("Loading…");
    chartEl.setAttribute("aria-busy", "true");
    try {
      const body = await pw.api("GET", "/api/v1/devices/" + deviceId + "/kpis/history?" + query);
      if (mine !== seq) return; // a newer request superseded this one
      loaded = body.data;
      draw(loaded);
    } catch (err) {
      if (mine !== seq) return;
      setStatus("Could not load the history: " + (err.message || err));
    } finally {
      if (mine === seq) chartEl.removeAttribute("aria-busy");
    }
  }

  // The user dragged a range (uPlot has already zoomed): fetch that range again, which
  // the server answers at a finer interval for the same number of points.
  function onSetScale(u, key) {
    if (key !== "x" || !shown || drawing) return;
    const min = u.scales.x.min * 1000;
    const max = u.scales.x.max * 1000;
    const tolerance = (shown.end - shown.start) * 0.001 + 1;
    if (Math.abs(min - shown.start) <= tolerance && Math.abs(max - shown.end) <= tolerance) return;
    if (!(max > min)) return;
    shown = { start: Math.round(min), end: Math.round(max) };
    resetBtn.disabled = false;
    clearTimeout(zoomTimer);
    const target = shown;
    zoomTimer = setTimeout(() => load(target), 200);
  }

  function reload() {
    const range = pickedRange();
    if (!range) { setStatus("Enter a start and an end after it."); return; }
    base = range;
    resetBtn.disabled = true;
    load(range);
  }

  form.addEventListener("change", (e) => {
    if (e.target.name === "range") {
      const custom = rangeChoice() === "custom";
      customBox.hidden = !custom;
      if (custom) {
        const r = shown || pickedRange();
        if (!form.elements.from.value) form.elements.from.value = utcToWall(r.start);
        if (!form.elements.to.value) form.elements.to.value = utcToWall(r.end);
        return; // wait for "Show range"
      }
      reload();
    } else if (e.target.name === "parameter") {
      load(shown || pickedRange()); // keep the zoom
    }
  });
  form.addEventListener("submit", (e) => { e.preventDefault(); reload(); });
  resetBtn.addEventListener("click", () => {
    if (rangeChoice() !== "custom") base = pickedRange(); // presets end "now"
    resetBtn.disabled = true;
    load(base);
  });

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (plot) plot.setSize({ width: Math.max(200, chartEl.clientWidth), height: HEIGHT() });
    }, 150);
  });
  // Colours come from CSS variables: rebuild the chart with the new theme's.
  document.addEventListener("pw:theme", () => {
    if (!plot || !loaded) return;
    plot.destroy();
    plot = null;
    draw(loaded);
  });

  function start() {
    if (!window.uPlot) { setStatus("The chart library did not load."); return; }
    reload();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
