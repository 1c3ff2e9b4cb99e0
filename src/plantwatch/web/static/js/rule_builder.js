// The rule builder: a visual, nested condition editor that builds the exact JSON the
// rules API takes, live validation against POST /api/v1/rules/validate (each error
// marked at its node), save, and the backtest panel (uPlot chart of the parameters
// the rule reads, with the moments it would have fired shaded).
(function () {
  "use strict";
  const form = document.getElementById("rule-form");
  const dataEl = document.getElementById("rule-data");
  if (!form || !dataEl) return;
  const data = JSON.parse(dataEl.textContent);
  const ruleId = data.rule_id;
  const factoryTz = data.timezone || "UTC";

  const COMPARISONS = ["gt", "gte", "lt", "lte", "eq", "neq"];
  const RANGES = ["between", "outside"];
  const LEAF_OPS = [
    ["gt", "> greater than"], ["gte", "≥ at least"], ["lt", "< less than"], ["lte", "≤ at most"],
    ["eq", "= equal to"], ["neq", "≠ not equal to"], ["between", "between (low–high)"],
    ["outside", "outside (low–high)"], ["change", "changes by"], ["rate", "changes per minute by"],
    ["anomaly", "is anomalous"], ["no_data", "sends no data"],
  ];
  const GROUP_OPS = [["AND", "all of (AND)"], ["OR", "any of (OR)"], ["NOT", "not (NOT)"]];
  const AGGREGATES = [["", "latest value"], ["avg", "average"], ["min", "minimum"], ["max", "maximum"], ["sum", "sum"], ["count", "count"]];
  const DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
  const MAX_DEPTH = 8;

  let seq = 0;
  const uid = () => "n" + (++seq);
  const str = (v) => (v === undefined || v === null ? "" : String(v));

  // --- the model: what the editor shows; toJson() is what the API gets -----------------
  function isGroup(raw) {
    return !!raw && typeof raw === "object" && typeof raw.operator === "string"
      && ["AND", "OR", "NOT"].includes(raw.operator.toUpperCase()) && !("parameter" in raw);
  }
  function fromJson(raw) {
    if (isGroup(raw)) {
      return {
        uid: uid(), kind: "group", operator: raw.operator.toUpperCase(), for: str(raw.for),
        children: (Array.isArray(raw.conditions) ? raw.conditions : []).map(fromJson),
      };
    }
    const r = raw && typeof raw === "object" ? raw : {};
    return {
      uid: uid(), kind: "leaf", parameter: str(r.parameter), operator: r.operator || "gt",
      threshold: str(r.threshold), low: str(r.low), high: str(r.high), for: str(r.for),
      aggregate: str(r.aggregate), window: str(r.window), direction: r.direction || "any",
      detector: r.detector || "zscore", size: str(r.size), alpha: str(r.alpha), duration: str(r.duration),
    };
  }
  const newLeaf = () => fromJson({ parameter: "", operator: "gt" });
  const newGroup = (op) => ({ uid: uid(), kind: "group", operator: op || "OR", for: "", children: [newLeaf(), newLeaf()] });
  let root = data.conditions
    ? fromJson(data.conditions)
    : { uid: uid(), kind: "group", operator: "AND", for: "", children: [newLeaf()] };

  // Numbers and durations go out as numbers when they are; anything else as typed, so
  // the API names the bad field rather than the editor silently dropping it.
  function num(text) {
    const t = String(text).trim();
    if (t === "") return undefined;
    const n = Number(t);
    return Number.isFinite(n) ? n : t;
  }
  function dur(text) {
    const t = String(text).trim();
    if (t === "") return undefined;
    return /^\d+(\.\d+)?$/.test(t) ? Number(t) : t;
  }
  function put(obj, key, value) { if (value !== undefined) obj[key] = value; }

  function toJson(node) {
    if (node.kind === "group") {
      const g = { operator: node.operator, conditions: node.children.map(toJson) };
      put(g, "for", dur(node.for));
      return g;
    }
    const op = node.operator;
    const o = { parameter: node.parameter.trim(), operator: op };
    if (COMPARISONS.includes(op)) put(o, "threshold", num(node.threshold));
    else if (RANGES.includes(op)) { put(o, "low", num(node.low)); put(o, "high", num(node.high)); }
    else if (op === "change" || op === "rate") {
      put(o, "threshold", num(node.threshold));
      if (node.direction !== "any") o.direction = node.direction;
      put(o, "window", dur(node.window));
    } else if (op === "anomaly") {
      put(o, "threshold", num(node.threshold));
      o.detector = node.detector;
      if (node.detector === "ewma") put(o, "alpha", num(node.alpha));
      else put(o, "size", num(node.size));
    } else if (op === "no_data") put(o, "duration", dur(node.duration));
    if ((COMPARISONS.includes(op) || RANGES.includes(op)) && node.aggregate) {
      o.aggregate = node.aggregate;
      put(o, "window", dur(node.window));
    }
    put(o, "for", dur(node.for));
    return o;
  }

  // --- small DOM helpers ----------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") el.textContent = v;
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c);
    return el;
  }
  function selectEl(options, value, attrs) {
    const s = h("select", attrs);
    for (const [v, label] of options) s.append(h("option", { value: v, selected: v === value, text: label }));
    return s;
  }
  // A labelled field of a node: label, control, hint, and the place for its error.
  function field(node, name, labelText, path, control, hint) {
    const id = `${node.uid}-${name}`;
    control.id = id;
    control.dataset.field = name;
    control.dataset.path = path;
    control.dataset.focus = id;
    const errId = id + "-err";
    const hintId = hint ? id + "-hint" : null;
    control.setAttribute("aria-describedby", [hintId, errId].filter(Boolean).join(" "));
    return h("div", { class: "cfield cfield-" + name },
      h("label", { for: id, text: labelText }), control,
      hint ? h("span", { id: hintId, class: "muted small", text: hint }) : null,
      h("span", { class: "error-text", id: errId }));
  }
  const textInput = (value, attrs) => h("input", Object.assign({ type: "text", value, autocomplete: "off", spellcheck: "false" }, attrs));

  // --- the tree editor --------------------------------------------------------------------
  const condRoot = document.getElementById("cond-root");
  let index = new Map(); // uid -> {node, parent, path, label}

  function numbering(label, i) { return label ? `${label}.${i + 1}` : String(i + 1); }

  function renderTree() {
    index = new Map();
    condRoot.replaceChildren(renderNode(root, null, "conditions", "", 1));
  }

  function actionButtons(node, parent, i, label, kind) {
    const name = kind === "group" ? `group ${label}` : `condition ${label}`;
    const buttons = h("div", { class: "row cnode-actions" });
    if (parent) {
      buttons.append(
        h("button", { type: "button", class: "btn", dataset: { act: "up", uid: node.uid, focus: node.uid + "-up" },
          "aria-label": `Move ${name} up`, disabled: i === 0, text: "↑ Up" }),
        h("button", { type: "button", class: "btn", dataset: { act: "down", uid: node.uid, focus: node.uid + "-down" },
          "aria-label": `Move ${name} down`, disabled: i === parent.children.length - 1, text: "↓ Down" }));
    }
    if (kind === "leaf") {
      buttons.append(h("button", { type: "button", class: "btn", dataset: { act: "wrap", uid: node.uid, focus: node.uid + "-wrap" },
        "aria-label": `Put ${name} in a new group`, text: "Group it" }));
    }
    if (parent) {
      buttons.append(h("button", { type: "button", class: "btn danger", dataset: { act: "remove", uid: node.uid },
        "aria-label": `Remove ${name}`, text: "Remove" }));
    } else if (kind === "group" && node.children.length === 1) {
      buttons.append(h("button", { type: "button", class: "btn", dataset: { act: "unwrap", uid: node.uid },
        "aria-label": "Remove the outer group, keep its condition", text: "Ungroup" }));
    }
    return buttons;
  }

  function renderNode(node, parent, path, label, depth) {
    const i = parent ? parent.children.indexOf(node) : 0;
    index.set(node.uid, { node, parent, path, label });
    return node.kind === "group" ? renderGroup(node, parent, path, label, depth, i) : renderLeaf(node, parent, path, label, i);
  }

  function renderGroup(node, parent, path, label, depth, i) {
    const title = parent ? `Group ${label}` : "Rule fires when";
    const box = h("fieldset", { class: "cnode cgroup", dataset: { uid: node.uid, path, depth: String(depth) } });
    box.append(h("legend", { text: title }));
    const head = h("div", { class: "row cnode-head" },
      field(node, "operator", "Match", `${path}.operator`, selectEl(GROUP_OPS, node.operator)),
      field(node, "for", "Holds for (optional)", `${path}.for`, textInput(node.for, { size: "7", placeholder: "e.g. 5m" })),
      actionButtons(node, parent, i, label, "group"));
    box.append(head, h("p", { class: "node-msg" }));
    const list = h("ol", { class: "cnode-children", dataset: { path: `${path}.conditions` } });
    node.children.forEach((child, ci) => {
      list.append(h("li", {}, renderNode(child, node, `${path}.conditions[${ci}]`, numbering(label, ci), depth + 1)));
    });
    box.append(list, h("p", { class: "node-msg list-msg", dataset: { for: `${path}.conditions` } }));
    const adds = h("div", { class: "row cnode-adds" },
      h("button", { type: "button", class: "btn", dataset: { act: "add-leaf", uid: node.uid, focus: node.uid + "-add-leaf" },
        text: "+ Condition", "aria-label": parent ? `Add a condition to group ${label}` : "Add a condition" }));
    if (depth < MAX_DEPTH) {
      adds.append(h("button", { type: "button", class: "btn", dataset: { act: "add-group", uid: node.uid, focus: node.uid + "-add-group" },
        text: "+ Group", "aria-label": parent ? `Add a group to group ${label}` : "Add a group" }));
    }
    box.append(adds);
    return box;
  }

  function renderLeaf(node, parent, path, label, i) {
    const op = node.operator;
    const box = h("fieldset", { class: "cnode cleaf", dataset: { uid: node.uid, path } });
    box.append(h("legend", { text: parent ? `Condition ${label}` : "Rule fires when" }));
    const fields = h("div", { class: "row cleaf-fields" },
      field(node, "parameter", "Parameter", `${path}.parameter`,
        textInput(node.parameter, { list: "param-keys", size: "16", placeholder: "e.g. spindle_temp" })),
      field(node, "operator", "Operator", `${path}.operator`, selectEl(LEAF_OPS, op)));
    const numInput = (v) => textInput(v, { inputmode: "decimal", size: "8" });
    if (COMPARISONS.includes(op)) {
      fields.append(field(node, "threshold", "Threshold", `${path}.threshold`, numInput(node.threshold)));
    } else if (RANGES.includes(op)) {
      fields.append(field(node, "low", "Low", `${path}.low`, numInput(node.low)),
        field(node, "high", "High", `${path}.high`, numInput(node.high)));
    } else if (op === "change" || op === "rate") {
      fields.append(
        field(node, "threshold", op === "rate" ? "By more than (per min)" : "By more than", `${path}.threshold`, numInput(node.threshold)),
        field(node, "direction", "Direction", `${path}.direction`,
          selectEl([["any", "up or down"], ["up", "up"], ["down", "down"]], node.direction)),
        field(node, "window", "Compared with (optional)", `${path}.window`,
          textInput(node.window, { size: "7", placeholder: "previous" }), "value this long ago"));
    } else if (op === "anomaly") {
      fields.append(
        field(node, "detector", "Detector", `${path}.detector`,
          selectEl([["zscore", "rolling z-score"], ["ewma", "EWMA"]], node.detector)),
        field(node, "threshold", "Score above", `${path}.threshold`, textInput(node.threshold, { inputmode: "decimal", size: "5", placeholder: "3" })));
      if (node.detector === "ewma") {
        fields.append(field(node, "alpha", "Alpha (0–1)", `${path}.alpha`, textInput(node.alpha, { inputmode: "decimal", size: "5", placeholder: "0.1" })));
      } else {
        fields.append(field(node, "size", "Window size (points)", `${path}.size`, textInput(node.size, { inputmode: "numeric", size: "6", placeholder: "100" })));
      }
    } else if (op === "no_data") {
      fields.append(field(node, "duration", "For at least", `${path}.duration`, textInput(node.duration, { size: "7", placeholder: "e.g. 5m" })));
    }
    if (COMPARISONS.includes(op) || RANGES.includes(op)) {
      fields.append(field(node, "aggregate", "Reads", `${path}.aggregate`, selectEl(AGGREGATES, node.aggregate)));
      if (node.aggregate) {
        fields.append(field(node, "window", "Over window", `${path}.window`, textInput(node.window, { size: "7", placeholder: "e.g. 10m" })));
      }
    }
    fields.append(field(node, "for", "Holds for (optional)", `${path}.for`, textInput(node.for, { size: "7", placeholder: "e.g. 5m" })));
    box.append(fields, h("p", { class: "node-msg" }), actionButtons(node, parent, i, label, "leaf"));
    return box;
  }

  function afterStructureChange(focusKey) {
    renderTree();
    changed();
    if (focusKey) {
      const el = condRoot.querySelector(`[data-focus="${CSS.escape(focusKey)}"]`);
      if (el && !el.disabled) el.focus();
      else condRoot.querySelector("select, input, button")?.focus();
    }
  }

  condRoot.addEventListener("input", (e) => {
    const el = e.target;
    const box = el.closest("[data-uid]");
    if (!box || !el.dataset.field) return;
    const entry = index.get(box.dataset.uid);
    if (!entry) return;
    entry.node[el.dataset.field] = el.value;
    if (["operator", "aggregate", "detector"].includes(el.dataset.field)) afterStructureChange(el.dataset.focus);
    else changed();
  });
  condRoot.addEventListener("change", (e) => {
    // selects fire "input" too; this covers browsers that only fire "change"
    const el = e.target;
    const box = el.closest("[data-uid]");
    if (!box || !el.dataset.field) return;
    const entry = index.get(box.dataset.uid);
    if (entry && entry.node[el.dataset.field] !== el.value) {
      entry.node[el.dataset.field] = el.value;
      afterStructureChange(el.dataset.focus);
    }
  });

  condRoot.addEventListener("click", (e) => {
    const button = e.target.closest("button[data-act]");
    if (!button) return;
    const entry = index.get(button.dataset.uid);
    if (!entry) return;
    const { node, parent } = entry;
    const siblings = parent ? parent.children : null;
    const i = siblings ? siblings.indexOf(node) : -1;
    let focus = button.dataset.focus;
    switch (button.dataset.act) {
      case "add-leaf": {
        const leaf = newLeaf();
        node.children.push(leaf);
        focus = `${leaf.uid}-parameter`;
        break;
      }
      case "add-group": {
        const group = newGroup("OR");
        node.children.push(group);
        focus = `${group.uid}-operator`;
        break;
      }
      case "up":
        if (i > 0) [siblings[i - 1], siblings[i]] = [siblings[i], siblings[i - 1]];
        if (i - 1 === 0) focus = `${node.uid}-down`;
        break;
      case "down":
        if (i < siblings.length - 1) [siblings[i + 1], siblings[i]] = [siblings[i], siblings[i + 1]];
        if (i + 1 === siblings.length - 1) focus = `${node.uid}-up`;
        break;
      case "remove":
        siblings.splice(i, 1);
        focus = siblings.length ? `${siblings[Math.min(i, siblings.length - 1)].uid}-${siblings[Math.min(i, siblings.length - 1)].kind === "group" ? "operator" : "parameter"}` : `${parent.uid}-add-leaf`;
        break;
      case "wrap": {
        const group = { uid: uid(), kind: "group", operator: "AND", for: "", children: [node] };
        if (parent) siblings[i] = group;
        else root = group;
        focus = `${group.uid}-operator`;
        break;
      }
      case "unwrap":
        if (!parent && node.children.length === 1) {
          root = node.children[0];
          focus = `${root.uid}-${root.kind === "group" ? "operator" : "parameter"}`;
        }
        break;
      default:
        return;
    }
    afterStructureChange(focus);
  });

  // --- scope: all devices / listed devices / a group ----------------------------------
  const selected = new Map((data.devices || []).map((d) => [d.id, d]));
  const selectedList = document.getElementById("device-selected");
  const resultsList = document.getElementById("device-results");
  const searchInput = document.getElementById("device-search");
  let lastResults = [];

  function deviceItem(d, checked) {
    const id = `dev-${checked ? "sel" : "res"}-${d.id}`;
    return h("li", {}, h("label", { class: "inline", for: id },
      h("input", { type: "checkbox", id, checked, dataset: { deviceId: String(d.id) } }),
      h("span", { text: d.name }), h("span", { class: "muted small", text: ` ${d.key}` })));
  }
  function renderSelected() {
    selectedList.replaceChildren(...[...selected.values()].map((d) => deviceItem(d, true)));
    if (!selected.size) selectedList.append(h("li", { class: "muted small", text: "None yet: find and tick devices." }));
    document.getElementById("device-count").textContent = String(selected.size);
  }
  function renderDevices() {
    renderSelected();
    resultsList.replaceChildren(...lastResults.map((d) => deviceItem(d, selected.has(d.id))));
    if (!lastResults.length) resultsList.append(h("li", { class: "muted small", text: "No matching devices." }));
  }
  let searchTimer = null;
  async function searchDevices() {
    const q = searchInput.value.trim();
    const params = new URLSearchParams({ per_page: "25", sort: "name" });
    if (q) params.set("search", q);
    try {
      const res = await pw.api("GET", "/api/v1/devices?" + params);
      lastResults = res.data.map((d) => ({ id: d.id, key: d.device_key, name: d.name }));
    } catch (err) {
      lastResults = [];
      pw.toast("Could not search devices: " + err.message, "error");
    }
    renderDevices();
  }
  searchInput.addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(searchDevices, 250); });
  searchInput.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); searchDevices(); } });
  for (const list of [selectedList, resultsList]) {
    list.addEventListener("change", (e) => {
      const box = e.target.closest("input[data-device-id]");
      if (!box) return;
      const id = Number(box.dataset.deviceId);
      if (box.checked) {
        const d = lastResults.find((x) => x.id === id) || selected.get(id);
        if (d) selected.set(id, d);
      } else selected.delete(id);
      if (list === selectedList) {
        // the unticked device leaves the list: keep the focus nearby
        const next = box.closest("li").nextElementSibling || box.closest("li").previousElementSibling;
        const nextId = next?.querySelector("input")?.id;
        const result = document.getElementById(`dev-res-${id}`);
        if (result) result.checked = false;
        renderSelected();
        (nextId && document.getElementById(nextId) || searchInput).focus();
      } else renderSelected();
      changed();
      loadBacktestDevices();
    });
  }
  const scopeType = () => form.querySelector('input[name="scope"]:checked')?.value || "factory";
  let searched = false;
  function showScope() {
    const type = scopeType();
    document.getElementById("scope-devices-panel").hidden = type !== "devices";
    document.getElementById("scope-group-panel").hidden = type !== "group";
    if (type === "devices" && !searched) { searched = true; searchDevices(); }
  }
  form.querySelectorAll('input[name="scope"]').forEach((r) => r.addEventListener("change", () => {
    showScope(); changed(); loadBacktestDevices();
  }));
  document.getElementById("f-group").addEventListener("change", () => loadBacktestDevices());

  function scopeJson() {
    const type = scopeType();
    if (type === "devices") return { type, device_ids: [...selected.keys()] };
    if (type === "group") return { type, group_id: num(document.getElementById("f-group").value) };
    return { type: "factory" };
  }

  // --- schedule --------------------------------------------------------------------------
  const schedule = data.schedule || null;
  const scheduleZone = schedule && schedule.timezone ? schedule.timezone : null;
  let windows = (schedule && schedule.type === "time_window" && Array.isArray(schedule.windows) ? schedule.windows : [])
    .map((w) => ({ uid: uid(), days: new Set(Array.isArray(w.days) ? w.days : [1, 2, 3, 4, 5, 6, 7]), start: str(w.start), end: str(w.end) }));
  if (!windows.length) windows = [{ uid: uid(), days: new Set([1, 2, 3, 4, 5]), start: "06:00", end: "22:00" }];
  const windowsList = document.getElementById("windows-list");
  if (schedule && schedule.type === "date_range") {
    document.getElementById("f-start-date").value = str(schedule.start_date);
    document.getElementById("f-end-date").value = str(schedule.end_date);
  }
  function renderWindows() {
    windowsList.replaceChildren(...windows.map((w, i) => {
      const path = `schedule.windows[${i}]`;
      const days = h("fieldset", { class: "days", dataset: { path: `${path}.days` } }, h("legend", { text: "Days" }),
        ...DAYS.map((name, d) => h("label", { class: "inline day" },
          h("input", { type: "checkbox", checked: w.days.has(d + 1), dataset: { win: w.uid, day: String(d + 1) } }), name)),
        h("p", { class: "node-msg" }));
      const time = (key, text) => {
        const id = `${w.uid}-${key}`;
        return h("label", { for: id }, text,
          h("input", { type: "time", id, value: w[key], dataset: { win: w.uid, key, path: `${path}.${key}`, focus: id },
            "aria-describedby": id + "-err" }),
          h("span", { class: "error-text", id: id + "-err" }));
      };
      return h("li", {}, h("fieldset", { class: "window", dataset: { path } },
        h("legend", { text: `Window ${i + 1}` }),
        h("div", { class: "row" }, days, time("start", "From"), time("end", "To"),
          h("button", { type: "button", class: "btn danger", dataset: { removeWin: w.uid }, "aria-label": `Remove window ${i + 1}`,
            disabled: windows.length === 1, text: "Remove" })),
        h("p", { class: "node-msg" })));
    }));
  }
  windowsList.addEventListener("change", (e) => {
    const el = e.target;
    const w = windows.find((x) => x.uid === el.dataset.win);
    if (!w) return;
    if (el.dataset.day) {
      if (el.checked) w.days.add(Number(el.dataset.day));
      else w.days.delete(Number(el.dataset.day));
    } else if (el.dataset.key) w[el.dataset.key] = el.value;
    changed();
  });
  windowsList.addEventListener("click", (e) => {
    const b = e.target.closest("button[data-remove-win]");
    if (!b) return;
    windows = windows.filter((w) => w.uid !== b.dataset.removeWin);
    renderWindows();
    changed();
    document.getElementById("window-add").focus();
  });
  document.getElementById("window-add").addEventListener("click", () => {
    const w = { uid: uid(), days: new Set([1, 2, 3, 4, 5]), start: "06:00", end: "14:00" };
    windows.push(w);
    renderWindows();
    changed();
    document.getElementById(`${w.uid}-start`)?.focus();
  });
  const scheduleType = () => form.querySelector('input[name="schedule"]:checked')?.value || "always";
  function showSchedule() {
    const type = scheduleType();
    document.getElementById("schedule-windows-panel").hidden = type !== "time_window";
    document.getElementById("schedule-dates-panel").hidden = type !== "date_range";
  }
  form.querySelectorAll('input[name="schedule"]').forEach((r) => r.addEventListener("change", () => { showSchedule(); changed(); }));
  function scheduleJson() {
    const type = scheduleType();
    let out = null;
    if (type === "time_window") {
      out = { type, windows: windows.map((w) => ({ days: [...w.days].sort((a, b) => a - b), start: w.start, end: w.end })) };
    } else if (type === "date_range") {
      out = { type, start_date: document.getElementById("f-start-date").value, end_date: document.getElementById("f-end-date").value };
    }
    if (out && scheduleZone) out.timezone = scheduleZone;
    return out;
  }

  // --- the whole body ---------------------------------------------------------------------
  const val = (id) => document.getElementById(id).value;
  const checked = (id) => document.getElementById(id).checked;
  function buildBody() {
    const description = val("f-description").trim();
    const cooldown = dur(val("f-cooldown"));
    return {
      name: val("f-name").trim(),
      description: description || null,
      severity: val("f-severity"),
      conditions: toJson(root),
      scope: scopeJson(),
      schedule: scheduleJson(),
      cooldown: cooldown === undefined ? "" : cooldown,
      auto_resolve: checked("f-auto-resolve"),
      actions: {
        alert: checked("f-alert"),
        event: checked("f-event"),
        work_order: checked("f-work-order"),
        notify: [...form.querySelectorAll('input[name="notify"]:checked')].map((c) => Number(c.value)),
      },
      is_active: checked("f-active"),
    };
  }

  const jsonView = document.getElementById("rule-json");
  function updateJson() { jsonView.textContent = JSON.stringify(buildBody(), null, 2); }

  // --- live validation: errors and warnings at their nodes ----------------------------------
  const problemsBox = document.getElementById("rule-problems");
  const checkStatus = document.getElementById("rule-check");
  let dirty = false;
  let validateTimer = null;
  let validateSeq = 0;

  function changed() {
    dirty = true;
    updateJson();
    clearTimeout(validateTimer);
    validateTimer = setTimeout(validate, 400);
  }
  form.addEventListener("input", (e) => {
    if (condRoot.contains(e.target) || windowsList.contains(e.target) || e.target === searchInput) return;
    changed();
  });
  form.addEventListener("change", (e) => {
    if (condRoot.contains(e.target) || windowsList.contains(e.target)) return;
    if (e.target.type === "checkbox" && !e.target.dataset.deviceId) changed();
  });

  function announce(text) { checkStatus.textContent = text; }

  function clearMarks() {
    form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
    form.querySelectorAll("[data-invalid]").forEach((el) => delete el.dataset.invalid);
    form.querySelectorAll(".error-text, .node-msg").forEach((el) => {
      el.textContent = "";
      el.classList.remove("warn-text");
    });
    problemsBox.hidden = true;
    problemsBox.replaceChildren();
  }

  // The API's path ("body.conditions.conditions[1].low") -> the element that shows it:
  // the field itself, or the nearest enclosing node.
  const SCOPE_MEMBERS = { DevicesScope: "devices", GroupScope: "group", FactoryScope: "factory" };
  function normalise(path) {
    let p = String(path || "").replace(/^body\./, "").replace(/^body$/, "");
    const m = p.match(/^scope\.(DevicesScope|GroupScope|FactoryScope)(.*)$/);
    if (m) {
      if (SCOPE_MEMBERS[m[1]] !== scopeType()) return null; // the union's other members
      p = "scope" + m[2];
    }
    return p;
  }
  function targetFor(path) {
    let p = path;
    while (p) {
      const el = form.querySelector(`[data-path="${CSS.escape(p)}"]`);
      if (el) return el;
      const shorter = p.replace(/(\[\d+\]|\.[^.[\]]+)$/, "");
      if (shorter === p) break;
      p = shorter;
    }
    return null;
  }
  function holderFor(el, path) {
    if (el.matches("input, select, textarea")) {
      let span = el.id ? document.getElementById(`${el.id}-err`) : null;
      if (!span) {
        span = h("span", { class: "error-text", id: el.id ? `${el.id}-err` : null });
        (el.closest("label") || el).after(span);
        if (el.id) el.setAttribute("aria-describedby", `${el.id}-err`);
      }
      return span;
    }
    if (el.matches("ol, ul")) {
      let holder = el.parentElement.querySelector(`:scope > .list-msg[data-for="${CSS.escape(el.dataset.path || path)}"]`);
      if (!holder) {
        holder = h("p", { class: "node-msg list-msg", dataset: { for: el.dataset.path || path } });
        el.after(holder);
      }
      return holder;
    }
    let holder = el.querySelector(":scope > .node-msg");
    if (!holder) {
      holder = h("p", { class: "node-msg" });
      const legend = el.querySelector(":scope > legend");
      if (legend) legend.after(holder);
      else el.prepend(holder);
    }
    return holder;
  }
  function describe(path) {
    const m = path.match(/^conditions((?:\.conditions\[\d+\])*)(?:\.(\w+))?$/);
    if (m) {
      const nums = [...m[1].matchAll(/\[(\d+)\]/g)].map((x) => Number(x[1]) + 1);
      const where = nums.length ? `Condition ${nums.join(".")}` : "Conditions";
      return m[2] ? `${where}, ${m[2]}` : where;
    }
    return path.replace(/_/g, " ");
  }
  function mark(path, message, kind) {
    const el = targetFor(path);
    if (el) {
      const holder = holderFor(el, path);
      if (holder) {
        holder.textContent = holder.textContent ? `${holder.textContent} ${message}` : message;
        if (kind === "warning") holder.classList.add("warn-text");
        else holder.classList.remove("warn-text");
      }
      if (kind !== "warning") {
        el.setAttribute("aria-invalid", "true");
        el.dataset.invalid = "true";
      }
    }
    return el;
  }
  function showErrors(errors, warnings) {
    clearMarks();
    const listed = [];
    for (const e of errors || []) {
      const path = normalise(e.path || (Array.isArray(e.loc) ? e.loc.join(".") : ""));
      if (path === null) continue;
      const el = mark(path, e.message || e.msg || "invalid", "error");
      listed.push({ path, message: e.message || e.msg || "invalid", el });
    }
    for (const w of warnings || []) mark(normalise(w.path) || "", w.message, "warning");
    if (listed.length) {
      const items = listed.map(({ path, message, el }) => {
        const li = h("li", {});
        if (el) {
          const b = h("button", { type: "button", class: "linklike", text: `${describe(path)}: ${message}` });
          b.addEventListener("click", () => (el.matches("input, select, textarea") ? el : el.querySelector("input, select, button") || el).focus());
          li.append(b);
        } else li.textContent = `${describe(path)}: ${message}`;
        return li;
      });
      problemsBox.replaceChildren(
        h("strong", { text: listed.length === 1 ? "1 problem to fix:" : `${listed.length} problems to fix:` }),
        h("ul", {}, ...items));
      problemsBox.hidden = false;
    }
    return listed;
  }

  async function validate() {
    const mine = ++validateSeq;
    announce("Checking…");
    try {
      const res = await pw.api("POST", "/api/v1/rules/validate", buildBody());
      if (mine !== validateSeq) return;
      const warnings = res.data.warnings || [];
      showErrors([], warnings);
      announce(warnings.length ? `Valid, with ${warnings.length} warning${warnings.length > 1 ? "s" : ""}` : "Valid");
      checkStatus.dataset.state = "valid";
    } catch (err) {
      if (mine !== validateSeq) return;
      if (err.status === 422) {
        const listed = showErrors(err.errors, []);
        const n = listed.length || 1;
        announce(`${n} problem${n > 1 ? "s" : ""}`);
        checkStatus.dataset.state = "invalid";
      } else {
        announce("Could not check the rule: " + err.message);
        checkStatus.dataset.state = "unknown";
      }
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearTimeout(validateTimer);
    validateSeq++;
    const save = document.getElementById("rule-save");
    save.disabled = true;
    announce("Saving…");
    try {
      const body = buildBody();
      const res = ruleId
        ? await pw.api("PATCH", `/api/v1/rules/${ruleId}`, body)
        : await pw.api("POST", "/api/v1/rules", body);
      dirty = false;
      sessionStorage.setItem("pw-rules-flash", ruleId ? "Rule saved." : `Rule “${res.data.name}” created.`);
      location.assign(`/rules/${res.data.id}`);
    } catch (err) {
      save.disabled = false;
      if (err.status === 422) {
        const listed = showErrors(err.errors, []);
        announce("Not saved: fix the marked fields.");
        const first = listed.find((x) => x.el);
        if (first) (first.el.matches("input, select, textarea") ? first.el : first.el.querySelector("input, select") || first.el).focus();
        else problemsBox.focus?.();
      } else {
        announce("Not saved.");
        pw.toast("Could not save: " + err.message, "error");
      }
    }
  });

  // --- backtest ------------------------------------------------------------------------------
  const btForm = document.getElementById("backtest-form");
  const btDevice = document.getElementById("bt-device");
  const btStart = document.getElementById("bt-start");
  const btEnd = document.getElementById("bt-end");
  const btStatus = document.getElementById("bt-status");
  const btChart = document.getElementById("bt-chart");
  const btLegend = document.getElementById("bt-legend");
  const btTableWrap = document.getElementById("bt-firings-wrap");
  const btBody = document.querySelector("#bt-firings tbody");
  let plot = null;
  let lastPlot = null;

  // Wall-clock <-> instant in the factory's zone (datetime-local has no zone).
  const partsFmt = new Intl.DateTimeFormat("en-US", {
    timeZone: factoryTz, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
  function zoneParts(ms) {
    const p = {};
    for (const { type, value } of partsFmt.formatToParts(new Date(ms))) p[type] = value;
    return p;
  }
  function zoneOffset(ms) {
    const p = zoneParts(ms);
    const asUtc = Date.UTC(+p.year, +p.month - 1, +p.day, +p.hour % 24, +p.minute, +p.second);
    return asUtc - Math.floor(ms / 1000) * 1000;
  }
  function toLocalInput(ms) {
    const p = zoneParts(ms);
    return `${p.year}-${p.month}-${p.day}T${String(+p.hour % 24).padStart(2, "0")}:${p.minute}`;
  }
  function fromLocalInput(text) {
    const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})/.exec(text || "");
    if (!m) return null;
    const guess = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5]);
    let ms = guess - zoneOffset(guess);
    ms = guess - zoneOffset(ms);
    return ms;
  }
  function setRange(seconds) {
    const end = Date.now();
    btEnd.value = toLocalInput(end);
    btStart.value = toLocalInput(end - seconds * 1000);
  }
  setRange(86400);
  btForm.querySelectorAll("[data-bt-range]").forEach((b) => b.addEventListener("click", () => setRange(Number(b.dataset.btRange))));

  let deviceSeq = 0;
  async function loadBacktestDevices() {
    const mine = ++deviceSeq;
    const keep = btDevice.value;
    let devices = [];
    const type = scopeType();
    try {
      if (type === "devices") devices = [...selected.values()];
      else if (data.can_read_assets) {
        const url = type === "group"
          ? `/api/v1/groups/${encodeURIComponent(document.getElementById("f-group").value)}/devices?per_page=500&sort=name`
          : "/api/v1/devices?per_page=500&sort=name&is_active=true";
        if (type !== "group" || document.getElementById("f-group").value) {
          const res = await pw.api("GET", url);
          devices = res.data.map((d) => ({ id: d.id, key: d.device_key, name: d.name }));
        }
      }
    } catch (_) { devices = []; }
    if (mine !== deviceSeq) return;
    btDevice.replaceChildren(...devices.map((d) => h("option", { value: String(d.id), text: `${d.name} (${d.key})` })));
    if (!devices.length) btDevice.append(h("option", { value: "", text: "No devices in the rule's scope" }));
    if (devices.some((d) => String(d.id) === keep)) btDevice.value = keep;
  }

  function leavesOf(node) { return node.kind === "group" ? node.children.flatMap(leavesOf) : [node]; }

  btForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const deviceId = Number(btDevice.value);
    const startMs = fromLocalInput(btStart.value);
    const endMs = fromLocalInput(btEnd.value);
    if (!deviceId) { btStatus.textContent = "Pick a device."; btDevice.focus(); return; }
    if (startMs === null || endMs === null || endMs <= startMs) {
      btStatus.textContent = "Pick a range: “To” must be after “From”.";
      (startMs === null ? btStart : btEnd).focus();
      return;
    }
    const range = { start: new Date(startMs).toISOString(), end: new Date(endMs).toISOString(), device_ids: [deviceId] };
    const run = document.getElementById("bt-run");
    run.disabled = true;
    btStatus.textContent = "Replaying…";
    let result;
    try {
      const res = ruleId && !dirty
        ? await pw.api("POST", `/api/v1/rules/${ruleId}/backtest`, range)
        : await pw.api("POST", "/api/v1/rules/backtest", Object.assign({ rule: buildBody() }, range));
      result = res.data;
    } catch (err) {
      run.disabled = false;
      if (err.status === 422 && (err.errors || []).some((x) => String(x.path || "").startsWith("body.rule."))) {
        showErrors(err.errors.map((x) => Object.assign({}, x, { path: String(x.path || "").replace(/^body\.rule\./, "body.") })), []);
        btStatus.textContent = "The rule has problems: fix the marked fields, then run the backtest again.";
      } else {
        btStatus.textContent = "Backtest failed: " + err.message;
      }
      return;
    }
    run.disabled = false;
    const device = btDevice.selectedOptions[0]?.textContent || "";
    const n = result.firings.length;
    btStatus.textContent = `${n === 0 ? "Would not have fired" : `Would have fired ${n} time${n > 1 ? "s" : ""}`} on ${device}: ${result.points.toLocaleString()} stored points replayed.`;
    renderFirings(result.firings);
    await drawChart(deviceId, startMs, endMs, result.firings);
  });

  function renderFirings(firings) {
    btBody.replaceChildren(...firings.map((f) => h("tr", {},
      h("td", { text: f.device_key }),
      h("td", {}, h("time", { datetime: f.started_at, text: pw.fmtTime(f.started_at) })),
      h("td", {}, f.ended_at ? h("time", { datetime: f.ended_at, text: pw.fmtTime(f.ended_at) }) : h("span", { class: "muted", text: "still true at the end" })),
      h("td", { class: "num", text: String(f.occurrences) }),
      h("td", { class: "small", text: f.message }))));
    btTableWrap.hidden = firings.length === 0;
  }

  function cssVar(name, fallback) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
  }

  async function drawChart(deviceId, startMs, endMs, firings) {
    if (plot) { plot.destroy(); plot = null; }
    lastPlot = null;
    btChart.hidden = true;
    btLegend.hidden = true;
    if (!data.can_read_telemetry || typeof uPlot === "undefined") return;
    const wanted = [...new Set(leavesOf(root).map((l) => l.parameter.trim()).filter(Boolean))];
    let known;
    try {
      const res = await pw.api("GET", `/api/v1/devices/${deviceId}/parameters?per_page=500`);
      known = new Set(res.data.map((p) => p.key));
    } catch (_) { return; }
    const keys = wanted.filter((k) => known.has(k)).slice(0, 5);
    if (!keys.length) {
      btLegend.textContent = "This device has none of the rule's parameters: nothing to plot.";
      btLegend.hidden = false;
      return;
    }
    const params = new URLSearchParams({
      parameters: keys.join(","), start: new Date(startMs).toISOString(), end: new Date(endMs).toISOString(),
      interval: "auto", points: "1000",
    });
    let history;
    try {
      history = (await pw.api("GET", `/api/v1/devices/${deviceId}/kpis/history?${params}`)).data;
    } catch (err) {
      btLegend.textContent = "Could not load the history: " + err.message;
      btLegend.hidden = false;
      return;
    }
    lastPlot = { history, firings, startMs, endMs };
    renderPlot();
  }

  function renderPlot() {
    if (!lastPlot) return;
    const { history, firings, startMs, endMs } = lastPlot;
    if (plot) { plot.destroy(); plot = null; }
    const series = history.parameters;
    const xs = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const at = new Map(xs.map((x, i) => [x, i]));
    const columns = series.map((s) => {
      const col = new Array(xs.length).fill(null);
      for (const [t, v] of s.points) col[at.get(t)] = v;
      return col;
    });
    const colours = [1, 2, 3, 4, 5].map((i) => cssVar(`--chart-${i}`, "#1a73e8"));
    const text = cssVar("--text", "#17202a");
    const grid = cssVar("--border", "#d5dbe1");
    const crit = cssVar("--crit", "#b3261e");
    const bands = firings.map((f) => [Date.parse(f.started_at) / 1000, (f.ended_at ? Date.parse(f.ended_at) : endMs) / 1000]);
    // thresholds of the rule's comparisons and ranges, drawn as dashed lines on their series
    const lines = [];
    for (const leaf of leavesOf(root)) {
      const si = series.findIndex((s) => s.key === leaf.parameter.trim());
      if (si < 0) continue;
      for (const v of COMPARISONS.includes(leaf.operator) ? [leaf.threshold] : RANGES.includes(leaf.operator) ? [leaf.low, leaf.high] : []) {
        const n = Number(v);
        if (String(v).trim() !== "" && Number.isFinite(n)) lines.push([si, n]);
      }
    }
    const scales = { x: { time: true, range: [startMs / 1000, endMs / 1000] } };
    series.forEach((s, i) => {
      const values = columns[i].filter((v) => v !== null).concat(lines.filter(([si]) => si === i).map(([, v]) => v));
      const lo = Math.min(...values), hi = Math.max(...values);
      const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
      scales["y" + i] = { range: values.length ? [lo - pad, hi + pad] : [0, 1] };
    });
    const axes = [{ stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } }];
    series.slice(0, 2).forEach((s, i) => axes.push({
      scale: "y" + i, side: i === 0 ? 3 : 1, stroke: colours[i], grid: { show: i === 0, stroke: grid, width: 1 },
      ticks: { stroke: grid }, size: 60,
      label: s.key + (s.unit ? ` (${s.unit})` : ""), labelSize: 18,
    }));
    const opts = {
      width: Math.max(300, btChart.clientWidth || btChart.parentElement.clientWidth - 32),
      height: 320,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), factoryTz),
      scales,
      axes,
      cursor: { drag: { x: true, y: false } },
      legend: { show: true },
      series: [{ label: "Time", value: (u, v) => (v == null ? "—" : pw.fmtTime(v * 1000)) }].concat(series.map((s, i) => ({
        label: (s.display_name || s.key) + (s.unit ? ` (${s.unit})` : ""), scale: "y" + i, stroke: colours[i % 5],
        width: 1.5, spanGaps: true, points: { show: false },
        value: (u, v) => (v == null ? "—" : pw.fmtNumber(v)),
      }))),
      hooks: {
        drawClear: [(u) => {
          const ctx = u.ctx;
          ctx.save();
          ctx.fillStyle = crit;
          ctx.globalAlpha = 0.16;
          for (const [a, b] of bands) {
            const x0 = u.valToPos(Math.max(a, u.scales.x.min), "x", true);
            const x1 = u.valToPos(Math.min(b, u.scales.x.max), "x", true);
            if (x1 >= x0) ctx.fillRect(x0, u.bbox.top, Math.max(2, x1 - x0), u.bbox.height);
          }
          ctx.restore();
        }],
        draw: [(u) => {
          const ctx = u.ctx;
          ctx.save();
          // a marker line and triangle where each firing starts
          ctx.strokeStyle = crit;
          ctx.fillStyle = crit;
          ctx.lineWidth = 2 * devicePixelRatio;
          for (const [a] of bands) {
            if (a < u.scales.x.min || a > u.scales.x.max) continue;
            const x = u.valToPos(a, "x", true);
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
            const s = 6 * devicePixelRatio;
            ctx.beginPath();
            ctx.moveTo(x - s, u.bbox.top);
            ctx.lineTo(x + s, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + s * 1.5);
            ctx.fill();
          }
          ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
          ctx.lineWidth = 1 * devicePixelRatio;
          for (const [si, v] of lines) {
            const y = u.valToPos(v, "y" + si, true);
            if (!Number.isFinite(y)) continue;
            ctx.strokeStyle = colours[si % 5];
            ctx.beginPath();
            ctx.moveTo(u.bbox.left, y);
            ctx.lineTo(u.bbox.left + u.bbox.width, y);
            ctx.stroke();
          }
          ctx.restore();
        }],
      },
    };
    btChart.hidden = false;
    btChart.replaceChildren();
    btChart.setAttribute("role", "img");
    btChart.setAttribute("aria-label",
      `Chart of ${series.map((s) => s.key).join(", ")} with ${bands.length} firing period${bands.length === 1 ? "" : "s"} shaded; the table below lists them.`);
    plot = new uPlot(opts, [xs.map((x) => x / 1000), ...columns], btChart);
    btLegend.textContent = `Shaded with a marker at its start: when the rule would have fired (${bands.length}). Dashed: the rule's thresholds. Data in ${history.interval === "raw" ? "raw points" : history.interval + " " + (history.agg || "avg") + " buckets"}; drag to zoom, double-click to reset.`;
    btLegend.hidden = false;
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (plot) plot.setSize({ width: Math.max(300, btChart.clientWidth), height: 320 }); }, 150);
  });
  document.addEventListener("pw:theme", () => renderPlot());

  // --- start --------------------------------------------------------------------------------
  renderTree();
  renderDevices();
  renderWindows();
  showScope();
  showSchedule();
  updateJson();
  loadBacktestDevices();
  if (ruleId) validate(); // show the saved rule's warnings (unknown parameters)
})();
