/* tuneadvisor page: plain JS (no framework, no build step), talks to the app's own /v1 API only.
 *
 * The whole question lives in the URL's query string (STATE_KEYS): submitting pushes a history entry,
 * reload and back/forward read the URL back into the form and ask again (answers are cached per request,
 * so going back is instant). The API key for jobs stays in sessionStorage, never in the URL.
 */
"use strict";

const $ = (sel) => document.querySelector(sel);
const API = { catalogModels: ["/v1/catalog/models"], gpus: "/v1/gpus" };
const KEY_STORE = "tuneadvisor.apiKey";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const METHODS = ["full", "lora", "qlora"];
// the breakdown's parts in the order they are stacked, with colour-blind-safe colours (Okabe-Ito + greys)
const PARTS = [
  ["weights", "weights", "#0072B2"],
  ["adapters", "adapters", "#E69F00"],
  ["gradients", "gradients", "#009E73"],
  ["optimizer_states", "optimiser states", "#CC79A7"],
  ["activations", "activations", "#56B4E9"],
  ["logits", "logits", "#D55E00"],
  ["quant_temporaries", "quantisation temporaries", "#F0E442"],
  ["adapter_temporaries", "adapter temporaries", "#7f7f7f"],
  ["runtime_overhead", "runtime overhead", "#3d3d6b"],
];
const EXTRA_COLOURS = ["#8c564b", "#17becf", "#bcbd22", "#9467bd"];
// URL key -> form element id
const STATE_KEYS = {
  model: "model", config: "config", tokens: "tokens", examples: "examples", avg: "avg", epochs: "epochs",
  seq: "seq_len", objective: "objective", budget: "budget", deadline: "deadline", maxgpus: "max_gpus",
};

const ui = { gpus: [], models: [], cache: new Map(), last: null, selected: null, job: null, deployment: null };

/* ---------- small helpers ---------- */
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid.nodeType ? kid : String(kid));
  return e;
}
const svgEl = (tag, attrs = {}) => {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
};
const num = (x, d = 1) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d));
const money = (x) => (x === null || x === undefined ? "no price" : "$" + (x >= 100 ? Math.round(x).toLocaleString() : Number(x).toFixed(2)));
const hours = (h) => (h === null || h === undefined ? "–" : h < 1 ? `${Math.round(h * 60)} min` : `${num(h, h < 10 ? 2 : 1)} h`);
const intOrNull = (s) => (s.trim() === "" ? null : Number(s.replace(/[_,\s]/g, "")));

async function api(method, path, body, opts = {}) {
  const headers = { Accept: "application/json", ...(opts.headers || {}) };
  let payload;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload });
  } catch (e) {
    return { ok: false, status: 0, body: { code: "network", detail: `the server did not answer (${e.message})` } };
  }
  let data = null;
  const text = await res.text();
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  return { ok: res.ok, status: res.status, body: data };
}
const authHeaders = () => {
  const k = sessionStorage.getItem(KEY_STORE);
  return k ? { Authorization: `Bearer ${k}` } : {};
};

/* ---------- errors next to their fields ---------- */
function clearErrors(scope) {
  for (const p of scope.querySelectorAll(".error")) p.textContent = "";
  for (const i of scope.querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
  const s = $("#sugg-model");
  if (scope.contains(s)) s.replaceChildren();
}
// the error slot for an API field name: the exact one, else its closest parent ("workload.x" -> "workload")
function errorSlot(field, prefix, fallback) {
  let f = field || "";
  while (f) {
    const p = document.getElementById(`err-${prefix}${f}`);
    if (p) return p;
    f = f.includes(".") ? f.slice(0, f.lastIndexOf(".")) : "";
  }
  return document.getElementById(fallback);
}
function showApiError(body, { prefix = "", fallback = "err-form", configMode = false } = {}) {
  const errs = body && body.errors && body.errors.length ? body.errors : [{ field: body && body.field, message: (body && body.detail) || "request failed" }];
  let first = null;
  for (const e of errs) {
    let field = e.field || "";
    if (!prefix && configMode && (field === "model" || field.startsWith("model."))) field = "config";
    const slot = errorSlot(field, prefix, fallback);
    const msg = errs.length === 1 && body.detail && body.errors && body.errors.length <= 1 && body.code !== "invalid_input" ? body.detail : e.message;
    slot.textContent = slot.textContent ? `${slot.textContent}; ${msg}` : msg;
    const box = slot.closest("[data-field]");
    const input = box && box.querySelector("input:not([type=radio]):not([type=checkbox]), select, textarea");
    if (input) { input.setAttribute("aria-invalid", "true"); first = first || input; }
  }
  if (!prefix && body && body.suggestions && body.suggestions.length && (body.field === "model" || body.field === "gpu")) {
    const box = $("#sugg-model");
    const target = body.field;
    box.replaceChildren(el("span", { class: "hint", text: "Did you mean: " }),
      ...body.suggestions.map((s) => el("button", { type: "button", text: s, onclick: () => {
        if (target === "model") $("#model").value = s; else $("#gpu-filter").value = s;
        if (target === "model") $("#plan-form").requestSubmit(); else filterGpus();
      } })));
    if (target === "gpu") errorSlot("gpu", "", "err-form").after(box);
  }
  if (first) first.focus();
}

/* ---------- catalog: models for the search box, GPUs for the multi-select ---------- */
async function loadCatalogs() {
  const gpuReq = api("GET", API.gpus);
  for (const path of API.catalogModels) {
    const r = await api("GET", path);
    if (r.ok && r.body && Array.isArray(r.body.models)) { ui.models = r.body.models; break; }
  }
  const dl = $("#model-list");
  dl.replaceChildren(...ui.models.map((m) => el("option", { value: m.name, label: `${m.hf_id || m.name} · ${num(m.params_b, 1)}B` })));
  const g = await gpuReq;
  if (g.ok) ui.gpus = g.body.gpus;
  renderGpuList();
  applyGpuState(new URLSearchParams(location.search).get("gpu"));
  describeModel();
}

function renderGpuList() {
  const list = $("#gpu-list");
  list.replaceChildren(...ui.gpus.map((g) => {
    const id = `gpu-${g.id}`;
    const count = el("select", { id: `count-${g.id}`, "aria-label": `How many ${g.name}`, onchange: gpuChanged },
      ...["any", "1", "2", "4", "8", "16"].map((c) => el("option", { value: c, text: c === "any" ? "any count" : `× ${c}` })));
    const meta = `${num(g.memory_gib, 0)} GiB · ${g.price_usd_per_hour ? "$" + g.price_usd_per_hour + "/h" : "no price"}`;
    return el("div", { class: "gpu-row", "data-gpu": g.id, "data-search": [g.id, g.name, ...(g.aliases || []), `${Math.round(g.memory_gb)}GB`].join(" ").toLowerCase() },
      el("input", { type: "checkbox", id, value: g.id, onchange: gpuChanged }),
      el("label", { for: id }, g.name, el("span", { class: "meta", text: ` ${meta}` })),
      count);
  }));
}
function filterGpus() {
  const q = $("#gpu-filter").value.trim().toLowerCase().replace(/\s+/g, "");
  for (const row of document.querySelectorAll(".gpu-row")) {
    const hay = row.dataset.search.replace(/\s+/g, "");
    const hit = !q || hay.includes(q) || row.querySelector("input").checked;
    row.hidden = !hit;
  }
}
function gpuSpecs() {
  return [...document.querySelectorAll(".gpu-row input:checked")].map((c) => {
    const n = $(`#count-${CSS.escape(c.value)}`).value;
    return n === "any" ? c.value : `${c.value}:${n}`;
  });
}
function gpuChanged() {
  const specs = gpuSpecs();
  $("#gpu-chosen").textContent = specs.length ? `Chosen: ${specs.join(", ")}` : "Any GPU";
}
function applyGpuState(value) {
  for (const c of document.querySelectorAll(".gpu-row input")) c.checked = false;
  for (const s of document.querySelectorAll(".gpu-row select")) s.value = "any";
  const unknown = [];
  for (const spec of (value || "").split(",").filter(Boolean)) {
    const [id, n] = spec.split(":");
    const box = document.getElementById(`gpu-${id}`);
    if (!box) { unknown.push(spec); continue; }
    box.checked = true;
    if (n) $(`#count-${CSS.escape(id)}`).value = n;
  }
  ui.unknownGpus = unknown; // kept so a shared URL naming an alias still asks the API about it
  filterGpus();
  gpuChanged();
}
function describeModel() {
  const v = $("#model").value.trim().toLowerCase();
  const m = ui.models.find((x) => x.name.toLowerCase() === v || (x.hf_id || "").toLowerCase() === v);
  $("#model-info").textContent = m ? `${m.hf_id || m.name}: ${num(m.params_b, 2)}B parameters (${m.family}).` : "";
}

/* ---------- state <-> form <-> URL ---------- */
function readForm() {
  const st = {};
  for (const [k, id] of Object.entries(STATE_KEYS)) {
    const v = document.getElementById(id).value.trim();
    if (v && !(k === "objective" && v === "cost")) st[k] = k === "config" ? compactJson(v) : v;
  }
  if (document.querySelector("input[name=size]:checked").value === "tokens") { delete st.examples; delete st.avg; }
  else delete st.tokens;
  const g = [...gpuSpecs(), ...(ui.unknownGpus || [])];
  if (g.length) st.gpu = g.join(",");
  return st;
}
function compactJson(text) {
  try { return JSON.stringify(JSON.parse(text)); } catch { return text; }
}
function writeForm(st) {
  for (const [k, id] of Object.entries(STATE_KEYS)) {
    const e = document.getElementById(id);
    let v = st.get(k) || "";
    if (k === "objective" && !v) v = "cost";
    if (k === "config" && v) { try { v = JSON.stringify(JSON.parse(v), null, 1); } catch { /* keep as typed */ } }
    e.value = v;
  }
  $("#config-box").open = Boolean(st.get("config"));
  const byExamples = st.has("examples") || st.has("avg");
  document.querySelector(`input[name=size][value=${byExamples ? "examples" : "tokens"}]`).checked = true;
  sizeMode();
  if (ui.gpus.length) applyGpuState(st.get("gpu"));
  describeModel();
}
function stateUrl(st, extra = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries({ ...st, ...extra })) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : location.pathname;
}
function sizeMode() {
  const ex = document.querySelector("input[name=size]:checked").value === "examples";
  $("#size-examples").hidden = !ex;
  $("#size-tokens").hidden = ex;
}

// the request body exactly as the API takes it; values the user typed are sent as typed numbers (the API validates)
function requestBody(st) {
  const body = {};
  if (st.config) {
    try { body.model = JSON.parse(st.config); } catch (e) { return { error: { field: "config", message: `not JSON: ${e.message}` } }; }
  } else if (st.model) body.model = st.model;
  else return { error: { field: "model", message: "type a model name or paste a config.json" } };
  if (st.gpu) { const g = st.gpu.split(","); body.gpu = g.length === 1 ? g[0] : g; }
  const w = {};
  const put = (obj, key, v, isInt) => {
    if (v === undefined) return;
    const n = isInt ? intOrNull(v) : Number(v);
    obj[key] = Number.isFinite(n) ? n : v; // a non-number goes as typed and the API names the field
  };
  put(w, "dataset_tokens", st.tokens, true);
  put(w, "examples", st.examples, true);
  put(w, "avg_example_tokens", st.avg, true);
  put(w, "epochs", st.epochs);
  put(w, "seq_len", st.seq, true);
  if (Object.keys(w).length) body.workload = w;
  if (st.objective) body.objective = st.objective;
  const c = {};
  put(c, "max_budget_usd", st.budget);
  put(c, "deadline_hours", st.deadline);
  put(c, "max_gpus", st.maxgpus, true);
  if (Object.keys(c).length) body.constraints = c;
  body.limit = 6;
  return { body };
}

/* ---------- asking ---------- */
async function recommend(st) {
  const form = $("#plan-form");
  clearErrors(form);
  const { body, error } = requestBody(st);
  if (error) { showApiError({ field: error.field, detail: error.message, errors: [error] }); return; }
  const key = JSON.stringify(body);
  const results = $("#results");
  results.setAttribute("aria-busy", "true");
  $("#go").disabled = true;
  $("#go").classList.add("loading");
  let r = ui.cache.get(key);
  if (!r) {
    r = await api("POST", "/v1/recommend", body);
    if (r.ok) ui.cache.set(key, r);
  }
  $("#go").disabled = false;
  $("#go").classList.remove("loading");
  results.setAttribute("aria-busy", "false");
  if (!r.ok) {
    showApiError(r.body || {}, { configMode: Boolean(st.config) });
    return;
  }
  ui.last = { st, body, res: r.body };
  renderAnswer(r.body, st);
  if (!window.__firstPlans) window.__firstPlans = performance.now();
}

function renderAnswer(res, st) {
  $("#intro").hidden = true;
  const plans = res.plans || [];
  $("#summary").replaceChildren(el("div", { class: "panel summary" },
    el("h2", { text: `Plans for ${res.model.name} (${num(res.model.params_b, 2)}B)` }),
    el("p", {}, `${plans.length} shown of ${res.candidates_feasible} feasible (${res.candidates_evaluated} evaluated` +
      `${res.candidates_risky ? `, ${res.candidates_risky} with a band over the memory` : ""}); ` +
      `${Number(res.workload.total_tokens).toLocaleString()} tokens to train, sequence ${res.workload.seq_len}.`),
    res.assumptions && res.assumptions.length ? el("details", { class: "assumptions" }, el("summary", { text: "Assumed" }),
      el("ul", {}, res.assumptions.map((a) => el("li", { text: a })))) : null));
  const box = $("#plans");
  if (!plans.length) box.replaceChildren(el("div", { class: "panel" }, el("p", { text: "No plan fits these GPUs and limits: see the rejected plans below for what to change." })));
  else box.replaceChildren(...plans.map((p, i) => planCard(p, i)));
  const sel = Number(st.sel || 0);
  renderRejected(res.rejected || []);
  renderClaims(res.notes || []);
  if (plans.length) selectPlan(Math.min(sel, plans.length - 1), false);
  else { $("#compare").hidden = true; $("#job").hidden = true; }
}

function planCard(p, i) {
  const plan = p.plan;
  const risky = p.verdict === "band_crosses_limit";
  const title = `${i + 1}. ${plan.method.toUpperCase()} on ${plan.num_gpus} × ${p.gpu.name}`;
  const card = el("article", { class: `plan${risky ? " risky" : ""}`, id: `plan-${i}`, "aria-labelledby": `plan-${i}-title`, "data-plan": plan.id },
    el("header", {}, el("h3", { id: `plan-${i}-title`, text: title }), el("span", { class: `badge ${p.verdict}`, text: verdictText(p.verdict) })),
    el("dl", { class: "stats" },
      stat("hours", hours(p.hours)), stat("cost", money(p.cost_usd)), stat("tokens/s", Math.round(p.tokens_per_s).toLocaleString()),
      stat("peak / GPU", `${num(p.peak_memory_gib)} of ${num(p.device_memory_gib)} GiB`),
      stat("settings", `mb ${plan.micro_batch}${plan.grad_checkpointing ? ", ckpt" : ""}, ${plan.optimizer}${plan.method !== "full" ? `, r ${plan.lora_r}` : ""}${plan.num_gpus > 1 ? `, ${plan.sharding}` : ""}`)),
    memoryBar(p.breakdown_gib, p.device_memory_gib, p.peak_memory_band_gib, p.peak_memory_gib, `${title} memory`),
    el("p", { class: "why", text: p.why }),
    p.launchable === false ? el("p", { class: "hint", text: `Not launchable here: ${p.not_launchable_reason}` }) : null,
    el("div", { class: "actions" },
      el("button", { type: "button", class: "pick", onclick: () => selectPlan(i, true) , text: "Compare methods on this GPU" }),
      el("button", { type: "button", class: "launch-btn", onclick: () => { selectPlan(i, true); openJob(); }, text: "Launch as a job…" })));
  return card;
}
const stat = (k, v) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }));
const verdictText = (v) => ({ fits: "fits", band_crosses_limit: "may run out of memory", does_not_fit: "does not fit" })[v] || v;

/* ---------- the stacked memory bar (SVG) ---------- */
function memoryBar(breakdown, capacity, band, peak, label, W = 640) {
  const H = 76, X0 = 4, BAR_Y = 14, BAR_H = 24;
  const parts = [];
  const known = new Set(PARTS.map((p) => p[0]));
  for (const [key, name, colour] of PARTS) if (breakdown && breakdown[key] > 0) parts.push([key, name, colour, breakdown[key]]);
  let extra = 0;
  for (const [key, v] of Object.entries(breakdown || {})) if (!known.has(key) && v > 0) parts.push([key, key.replace(/_/g, " "), EXTRA_COLOURS[extra++ % EXTRA_COLOURS.length], v]);
  const total = parts.reduce((s, p) => s + p[3], 0) || peak || 0;
  const hi = band && band.high ? band.high : peak;
  const max = Math.max(capacity || 0, hi || 0, total) * 1.08 || 1;
  const sx = (v) => X0 + (v / max) * (W - 2 * X0);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${label}: ${parts.map((p) => `${p[1]} ${num(p[3], 2)} GiB`).join(", ")}; peak ${num(peak, 2)} GiB` +
    (band && band.low !== band.high ? `, band ${num(band.low, 1)} to ${num(band.high, 1)} GiB` : "") + (capacity ? `; GPU memory ${num(capacity, 1)} GiB` : "") });
  svg.append(svgEl("rect", { x: X0, y: BAR_Y, width: W - 2 * X0, height: BAR_H, fill: "#eef0f3" }));
  let x = 0;
  for (const [, name, colour, v] of parts) {
    const r = svgEl("rect", { x: sx(x), y: BAR_Y, width: Math.max(0.5, sx(x + v) - sx(x)), height: BAR_H, fill: colour, class: "seg" });
    const t = svgEl("title", {}); t.textContent = `${name}: ${num(v, 2)} GiB`; r.append(t);
    svg.append(r);
    x += v;
  }
  if (band && band.low !== undefined && band.high > band.low) {
    const r = svgEl("rect", { x: sx(band.low), y: BAR_Y + BAR_H + 4, width: sx(band.high) - sx(band.low), height: 6, fill: "#4a4f57", opacity: "0.55", class: "band" });
    const t = svgEl("title", {}); t.textContent = `error band ${num(band.low, 2)}-${num(band.high, 2)} GiB (p90 ${band.p90_pct}%, n=${band.n})`; r.append(t);
    svg.append(r);
    svg.append(Object.assign(svgEl("text", { x: Math.min(sx(band.low), W - (W < 500 ? 80 : 150)), y: BAR_Y + BAR_H + 22, "font-size": 10, fill: "#4a4f57" }), { textContent: `${W < 500 ? "band" : "error band"} ${num(band.low, 1)}–${num(band.high, 1)}${W < 500 ? "" : " GiB"}` }));
  }
  if (capacity) {
    const cx = sx(capacity);
    svg.append(svgEl("line", { x1: cx, x2: cx, y1: 4, y2: BAR_Y + BAR_H + 11, stroke: "#b3261e", "stroke-width": 2.5, "stroke-dasharray": "5 3", class: "capacity" }));
    const anchor = cx > W - 130 ? "end" : "start";
    const capText = W < 500 ? `GPU ${num(capacity, 1)} GiB` : `GPU memory ${num(capacity, 1)} GiB`;
    svg.append(Object.assign(svgEl("text", { x: anchor === "end" ? cx - 4 : cx + 4, y: 10, "font-size": 11, fill: "#b3261e", "text-anchor": anchor }), { textContent: capText }));
  }
  // the peak's label sits on the side away from the capacity line's label, so the two never overlap
  const left = !capacity || sx(capacity) > W / 2;
  svg.append(Object.assign(svgEl("text", { x: left ? X0 : W - X0, y: 10, "font-size": 11, fill: "#1a1a1a", "text-anchor": left ? "start" : "end" }), { textContent: `peak ${num(peak, 2)} GiB` }));
  const legend = el("ul", { class: "legend" }, parts.map(([, name, colour, v]) => el("li", {}, el("i", { style: `background:${colour}` }), `${name} ${num(v, 2)}`)));
  return el("div", { class: "bar" }, svg, legend);
}

/* ---------- selection: method comparison + launch target ---------- */
function selectPlan(i, userAction) {
  const res = ui.last && ui.last.res;
  if (!res || !res.plans[i]) return;
  ui.selected = res.plans[i];
  document.querySelectorAll(".plan").forEach((c, j) => c.classList.toggle("selected", j === i));
  if (userAction) {
    const url = stateUrl(ui.last.st, { sel: i || null, job: ui.job });
    history.replaceState(history.state, "", url);
    ui.last.st.sel = i;
  }
  compareMethods(ui.selected);
  if (!$("#job").hidden || ui.job) openJob(false);
}

async function compareMethods(p) {
  const box = $("#compare");
  box.hidden = false;
  const gpu = p.plan.gpu_id, n = p.plan.num_gpus;
  box.replaceChildren(el("h2", { id: "compare-title", text: `Full vs LoRA vs QLoRA on ${n} × ${p.gpu.name}` }), el("p", { class: "hint loading", text: "Asking" }));
  const base = ui.last.body;
  const cards = await Promise.all(METHODS.map(async (m) => {
    const body = { ...base, gpu: `${gpu}:${n}`, constraints: { ...(base.constraints || {}), methods: [m], max_gpus: Math.max(n, (base.constraints || {}).max_gpus || 1) }, limit: 1 };
    const key = JSON.stringify(body);
    let r = ui.cache.get(key);
    if (!r) { r = await api("POST", "/v1/recommend", body); if (r.ok) ui.cache.set(key, r); }
    if (!r.ok) return methodCard(m, null, (r.body && r.body.detail) || "no answer");
    if (r.body.plans && r.body.plans.length) return methodCard(m, r.body.plans[0]);
    // nothing fits: the closest rejected plan, estimated for its breakdown, with the reason and the fix
    const rej = (r.body.rejected || []).filter((g) => g.closest_plan).sort((a, b) => a.closest_peak_memory_gib - b.closest_peak_memory_gib)[0];
    if (!rej) return methodCard(m, null, (r.body.rejected && r.body.rejected[0] && r.body.rejected[0].reason) || "no candidate");
    const est = { model: base.model, plan: rej.closest_plan };
    if (base.workload) est.workload = base.workload;
    const ekey = JSON.stringify(est);
    let e = ui.cache.get(ekey);
    if (!e) { e = await api("POST", "/v1/estimate", est); if (e.ok) ui.cache.set(ekey, e); }
    return methodCard(m, e.ok ? { ...e.body, gpu: p.gpu } : null, rej.reason, rej.to_fix);
  }));
  if (ui.selected !== p) return; // another plan was picked meanwhile
  box.replaceChildren(el("h2", { id: "compare-title", text: `Full vs LoRA vs QLoRA on ${n} × ${p.gpu.name}` }),
    el("div", { class: "compare-grid" }, cards));
}
function methodCard(m, e, reason, toFix) {
  const head = el("header", {}, el("h3", { text: m.toUpperCase() }), e ? el("span", { class: `badge ${e.verdict}`, text: verdictText(e.verdict) }) : null);
  if (!e) return el("article", { "data-method": m }, head, el("p", { text: reason }));
  return el("article", { "data-method": m }, head,
    el("dl", { class: "stats" }, stat("peak", `${num(e.peak_memory_gib)} GiB`), stat("hours", hours(e.hours)), stat("cost", money(e.cost_usd)),
      stat("tokens/s", e.tokens_per_s ? Math.round(e.tokens_per_s).toLocaleString() : "–")),
    memoryBar(e.breakdown_gib, e.device_memory_gib, e.peak_memory_band_gib, e.peak_memory_gib, `${m} memory`, 340),
    reason ? el("p", { class: "hint", text: reason }) : null,
    toFix ? el("p", { class: "tofix", text: toFix }) : null);
}

function renderRejected(groups) {
  const box = $("#rejected");
  box.hidden = !groups.length;
  box.replaceChildren(el("h2", { id: "rejected-title", text: `Rejected (${groups.length})` }),
    el("ul", { class: "rejected-list" }, groups.map((g) => el("li", {},
      el("strong", { text: g.group }), ` · ${g.candidates} candidates`,
      g.closest_peak_memory_gib ? ` · closest needs ${num(g.closest_peak_memory_gib)} GiB per GPU` : "",
      el("div", { text: g.reason }),
      g.to_fix ? el("div", { class: "tofix", text: g.to_fix }) : null))));
}

function renderClaims(notes) {
  const box = $("#claims");
  const claims = notes.filter((n) => / claims '/.test(n));
  const rest = notes.filter((n) => !claims.includes(n));
  box.hidden = !notes.length;
  box.replaceChildren(...[
    claims.length ? el("h2", { id: "claims-title", text: "Published claims, checked" }) : el("h2", { id: "claims-title", text: "Notes" }),
    claims.length ? el("ul", { class: "notes" }, claims.map((c) => {
      const bad = /physically impossible/.test(c);
      return el("li", {}, el("span", { class: `badge ${bad ? "impossible" : "agrees"}`, text: bad ? "impossible" : "agrees" }), " ", c);
    })) : null,
    claims.length && rest.length ? el("h3", { text: "Notes" }) : null,
    rest.length ? el("ul", { class: "notes" }, rest.map((n) => el("li", { text: n }))) : null].filter(Boolean));
}

/* ---------- jobs: launch the selected plan, follow it live ---------- */
async function openJob(focus = true) {
  const box = $("#job");
  box.hidden = false;
  const p = ui.selected;
  if (p) {
    $("#job-plan").textContent = `Plan: ${p.plan.method} on ${p.plan.num_gpus} × ${p.gpu.name}, sequence ${p.plan.seq_len}, micro-batch ${p.plan.micro_batch}.`;
    const jm = $("#job-model");
    if (!jm.value && ui.last && !ui.last.st.config) jm.value = ui.last.res.model.hf_id || ui.last.res.model.name;
  }
  const k = sessionStorage.getItem(KEY_STORE);
  if (k && !$("#api-key").value) $("#api-key").value = k;
  if (k) loadDeployment();
  if (focus) ($("#api-key").value ? $("#job-model") : $("#api-key")).focus();
}
async function loadDeployment() {
  const r = await api("GET", "/web/deployment", undefined, { headers: authHeaders() });
  if (!r.ok) { ui.deployment = null; return null; }
  ui.deployment = r.body;
  const d = r.body;
  $("#job-model-hint").textContent = `This server trains on ${d.devices} × ${d.gpu.name}` +
    (d.model_roots.length ? `; local models under ${d.model_roots.join(", ")}` : "") + ".";
  return d;
}

function jobBody(p, d, model, fileId) {
  const body = { model, training_file: fileId };
  const hp = {};
  const ep = $("#job-epochs").value.trim(), bs = $("#job-batch").value.trim();
  if (ep) hp.n_epochs = Number.isFinite(Number(ep)) ? Number(ep) : ep;
  if (bs) hp.batch_size = Number.isFinite(Number(bs)) ? Number(bs) : bs;
  const lr = $("#job-lr").value.trim();
  if (lr) hp.learning_rate_multiplier = Number.isFinite(Number(lr)) ? Number(lr) : lr;
  if (Object.keys(hp).length) body.hyperparameters = hp;
  if ($("#job-force").checked) body.force = true;
  const plan = p.plan;
  if (d && plan.gpu_id === d.gpu.id && plan.num_gpus <= d.devices) {
    body.plan_id = plan.id; // this server's device: the plan runs exactly
    return { body, note: `plan ${plan.id.slice(0, 24)}… as recommended` };
  }
  // another device: send the plan's settings; the server picks the rest for its device and re-checks the fit
  const method = { type: plan.method, seq_len: plan.seq_len, gradient_checkpointing: plan.grad_checkpointing };
  if (plan.method !== "full") method.lora = { r: plan.lora_r, alpha: plan.lora_alpha, dropout: plan.lora_dropout, target_modules: plan.lora_targets };
  body.method = method;
  return { body, note: `the plan is for ${plan.gpu_id}; this server trains on ${d ? d.gpu.id : "another device"}: its method, sequence length and LoRA settings are sent, and the server checks the fit on its device` };
}

async function launch(ev) {
  ev.preventDefault();
  const form = $("#job-form");
  clearErrors(form);
  const key = $("#api-key").value.trim();
  if (!key) { showApiError({ field: "key", detail: "type the API key the server was started with" }, { prefix: "job.", fallback: "err-job" }); return; }
  sessionStorage.setItem(KEY_STORE, key);
  const p = ui.selected;
  if (!p) return;
  $("#launch").disabled = true;
  try {
    const d = await loadDeployment();
    if (!d) {
      const r = await api("GET", "/web/deployment", undefined, { headers: authHeaders() });
      showApiError(r.body || {}, { prefix: "job.", fallback: r.status === 401 ? "err-job.key" : "err-job" });
      return;
    }
    let fileId = $("#train-file-id").value.trim();
    const f = $("#train-file").files[0];
    if (f) {
      const fd = new FormData();
      fd.append("purpose", "fine-tune");
      fd.append("file", f, f.name);
      const up = await api("POST", "/v1/files", fd, { headers: authHeaders() });
      if (!up.ok) { showApiError(up.body || {}, { prefix: "job.", fallback: "err-job.training_file" }); return; }
      fileId = up.body.id;
      $("#train-file-id").value = fileId;
    }
    if (!fileId) { showApiError({ field: "training_file", detail: "choose a JSONL file or give an uploaded file id" }, { prefix: "job.", fallback: "err-job" }); return; }
    const model = $("#job-model").value.trim();
    const { body, note } = jobBody(p, d, model, fileId);
    const r = await api("POST", "/v1/fine_tuning/jobs", body, { headers: authHeaders() });
    if (!r.ok) { showApiError(r.body || {}, { prefix: "job.", fallback: "err-job" }); return; }
    $("#job-detail").textContent = note;
    followJob(r.body.id, true);
  } finally {
    $("#launch").disabled = false;
  }
}

async function followJob(id, push) {
  ui.job = id;
  if (push && ui.last) history.pushState(null, "", stateUrl(ui.last.st, { sel: ui.last.st.sel || null, job: id }));
  $("#job").hidden = false;
  $("#job-live").hidden = false;
  $("#job-id").textContent = id;
  const token = (ui.followToken = {});
  while (ui.followToken === token) {
    const [j, ev] = await Promise.all([
      api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, undefined, { headers: authHeaders() }),
      api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?order=asc&limit=1000`, undefined, { headers: authHeaders() }),
    ]);
    if (ui.followToken !== token) return;
    if (!j.ok) { $("#job-status").textContent = "unknown"; $("#err-job").textContent = (j.body && j.body.detail) || "could not read the job"; return; }
    renderJob(j.body, ev.ok ? ev.body.data || [] : []);
    if (TERMINAL.includes(j.body.status)) return;
    await new Promise((res) => setTimeout(res, 700));
  }
}
function renderJob(job, events) {
  const s = $("#job-status");
  s.textContent = job.status;
  s.className = `badge ${job.status}`;
  const metrics = events.filter((e) => e.type === "metrics" && e.data);
  const last = metrics[metrics.length - 1];
  const prog = $("#job-progress");
  if (job.status === "succeeded") { prog.value = 1; }
  else if (last && last.data.total_steps) prog.value = last.data.step / last.data.total_steps;
  const bits = [];
  if (last) bits.push(`step ${last.data.step}/${last.data.total_steps || "?"}`, `loss ${num(last.data.train_loss, 4)}`, last.data.tokens_per_s ? `${Math.round(last.data.tokens_per_s).toLocaleString()} tokens/s` : "");
  const tt = job.trained_tokens ?? (last && last.data.trained_tokens);
  if (tt) bits.push(`${Number(tt).toLocaleString()} tokens trained`);
  if (job.error && job.error.message) bits.push(`error: ${job.error.message}`);
  if (job.fine_tuned_model) bits.push(`model: ${job.fine_tuned_model}`);
  $("#job-progress-text").textContent = bits.filter(Boolean).join(" · ");
  $("#cancel").hidden = TERMINAL.includes(job.status);
  $("#pause").hidden = job.status !== "running";
  $("#resume").hidden = job.status !== "paused";
  lossChart(metrics.map((e) => [e.data.step, e.data.train_loss]).filter((x) => Number.isFinite(x[1])));
  const ol = $("#events");
  ol.replaceChildren(...events.slice(-200).map((e) => el("li", { class: e.type || "message", text: e.message })));
  ol.scrollTop = ol.scrollHeight;
}
function lossChart(points) {
  const box = $("#loss-chart");
  const W = 600, H = 200, L = 46, B = 22, T = 8, R = 8;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": points.length ? `training loss from ${num(points[0][1], 3)} to ${num(points[points.length - 1][1], 3)} over ${points.length} steps` : "no training step yet" });
  svg.append(svgEl("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#8a9099" }), svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#8a9099" }));
  if (points.length) {
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
    const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    svg.append(svgEl("polyline", { points: points.map((p) => `${px(p[0])},${py(p[1])}`).join(" "), fill: "none", stroke: "#1d4ed8", "stroke-width": 2, class: "loss" }));
    const label = (x, y, t, anchor = "end") => svg.append(Object.assign(svgEl("text", { x, y, "font-size": 11, fill: "#4a4f57", "text-anchor": anchor }), { textContent: t }));
    label(L - 4, T + 10, num(y1, 2)); label(L - 4, H - B, num(y0, 2));
    label(L, H - 6, `step ${x0}`, "start"); label(W - R, H - 6, `step ${x1}`);
  }
  box.replaceChildren(svg);
}
// cancel, pause, resume: POST /v1/fine_tuning/jobs/{id}/<action>; the poll loop shows the new status
async function jobAction(action) {
  if (!ui.job) return;
  const r = await api("POST", `/v1/fine_tuning/jobs/${encodeURIComponent(ui.job)}/${action}`, undefined, { headers: authHeaders() });
  if (!r.ok) $("#err-job").textContent = (r.body && r.body.detail) || `${action} failed`;
  else followJob(ui.job, false); // restart the poll loop (it had ended if the job looked finished)
}

/* ---------- wiring ---------- */
async function fromUrl() {
  const q = new URLSearchParams(location.search);
  writeForm(q);
  // the question as the URL states it (the GPU list may not be drawn yet: read it from the URL, not the boxes)
  const st = {};
  for (const k of [...Object.keys(STATE_KEYS), "gpu", "sel"]) if (q.get(k)) st[k] = q.get(k);
  if (st.model || st.config) await recommend(st);
  const job = q.get("job");
  if (job && sessionStorage.getItem(KEY_STORE)) { openJob(false); followJob(job, false); }
  else if (!job) { ui.job = null; ui.followToken = null; $("#job-live").hidden = true; }
}

function init() {
  $("#plan-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const st = readForm();
    ui.job = null; ui.followToken = null; $("#job-live").hidden = true;
    history.pushState(null, "", stateUrl(st));
    recommend(st);
  });
  $("#gpu-filter").addEventListener("input", filterGpus);
  $("#gpu-filter").addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter") return;
    ev.preventDefault(); // Enter in the search box ticks the first GPU it shows
    const row = [...document.querySelectorAll(".gpu-row")].find((r) => !r.hidden && !r.querySelector("input").checked);
    if (row) { row.querySelector("input").checked = true; gpuChanged(); row.querySelector("input").focus(); }
  });
  $("#model").addEventListener("input", describeModel);
  document.querySelectorAll("input[name=size]").forEach((r) => r.addEventListener("change", sizeMode));
  $("#job-form").addEventListener("submit", launch);
  $("#cancel").addEventListener("click", () => jobAction("cancel"));
  $("#pause").addEventListener("click", () => jobAction("pause"));
  $("#resume").addEventListener("click", () => jobAction("resume"));
  window.addEventListener("popstate", fromUrl);
  loadCatalogs();
  fromUrl();
}
document.addEventListener("DOMContentLoaded", init);
