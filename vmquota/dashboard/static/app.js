// vmquota's dashboard: one page over vmquota's own API, as the signed-in user.
//
// It lists what the user may list (the server's tenant views apply, as to kubectl), renders quotas, the VMs,
// the biggest VMs, history and events, then follows every list over the watch API (fetch streaming of
// ?watch=true, resumed from the last resourceVersion; 410 Gone means relist). Start and stop buttons show only
// where a SelfSubjectAccessReview says the user may press them. Nothing is written to the DOM as HTML: every
// value goes in through textContent, so no name or message from the API can become markup.
import * as quantity from "/ui/quantity.js";

const TOKEN_KEY = "vmquota.token"; // sessionStorage: gone when the tab closes, never in a URL or a cookie
const THRESHOLD_ANNOTATION = "vmquota.io/warning-threshold";
const ENFORCEMENT_ANNOTATION = "vmquota.io/enforcement";
const DEFAULT_THRESHOLD = 80;
const TOP_VMS = 10;
const EVENTS_SHOWN = 50;
const MAX_EVENTS = 500;
const TOP_RESOURCES = ["limits.cpu", "requests.cpu", "limits.memory", "requests.memory", "requests.storage"];

const PATHS = {
  namespaces: "/api/v1/namespaces",
  quotas: "/api/v1/resourcequotas",
  projects: "/apis/vmquota.io/v1/projects",
  vms: "/apis/kubevirt.io/v1/virtualmachines",
  events: "/api/v1/events",
};

const state = {
  user: "",
  namespaces: new Map(), // name -> Namespace
  quotas: new Map(), // "ns/name" -> ResourceQuota
  projects: new Map(), // name -> Project
  vms: new Map(), // "ns/name" -> VirtualMachine
  events: new Map(), // "ns/name" -> Event
  charges: new Map(), // namespace -> [{name, charge}]
  may: new Map(), // namespace -> {start, stop}
  projectsListed: false, // whether the user may list projects (else a member reads its own, one by one)
};

class ApiError extends Error {
  constructor(code, message, reason) {
    super(message);
    this.code = code;
    this.reason = reason || "";
  }
}

// -- the API ---------------------------------------------------------------------------------------------

function authHeaders() {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

// Kubernetes' warnings of an answer (`Warning: 299 - "text"`, one header each, joined by fetch): their texts.
function warningsOf(response) {
  const header = response.headers.get("Warning") || "";
  return [...header.matchAll(/299 - "((?:[^"\\]|\\.)*)"/g)].map((m) => m[1].replace(/\\(.)/g, "$1"));
}

async function api(path, { method = "GET", body, onWarnings } = {}) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin", cache: "no-store",
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) {
    throw new ApiError(response.status, (data && data.message) || text || response.statusText, data && data.reason);
  }
  if (onWarnings) {
    const warnings = warningsOf(response);
    if (warnings.length) onWarnings(warnings);
  }
  return data;
}

const key = (obj) => `${obj.metadata.namespace || ""}/${obj.metadata.name}`;
const vmPath = (ns, name, action) =>
  `/apis/subresources.kubevirt.io/v1/namespaces/${encodeURIComponent(ns)}/virtualmachines/${encodeURIComponent(name)}/${action}`;

async function mayDo(namespace, subresource) {
  const review = await api("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
    method: "POST",
    body: {
      apiVersion: "authorization.k8s.io/v1", kind: "SelfSubjectAccessReview",
      spec: { resourceAttributes: { verb: "update", group: "subresources.kubevirt.io", resource: "virtualmachines",
                                    subresource, namespace } },
    },
  });
  return Boolean(review && review.status && review.status.allowed);
}

async function loadPermissions(namespaces) {
  await Promise.all([...namespaces].filter((ns) => !state.may.has(ns)).map(async (ns) => {
    try {
      const [start, stop] = await Promise.all([mayDo(ns, "start"), mayDo(ns, "stop")]);
      state.may.set(ns, { start, stop });
    } catch {
      state.may.set(ns, { start: false, stop: false });
    }
  }));
}

async function loadCharges(namespace) {
  try {
    const list = await api(`/apis/vmquota.io/v1/namespaces/${encodeURIComponent(namespace)}/charges`);
    state.charges.set(namespace, list.items || []);
  } catch {
    state.charges.delete(namespace); // not allowed to read charges there: the top list leaves it out
  }
}

// A list into its map; its resourceVersion, where a watch then starts.
async function relist(what) {
  const list = await api(PATHS[what]);
  const map = state[what];
  map.clear();
  for (const item of list.items || []) map.set(what === "projects" || what === "namespaces" ? item.metadata.name : key(item), item);
  return list.metadata.resourceVersion;
}

// Projects: the whole list for whoever may list it (true), else false: then `memberProjects` reads them.
async function listProjects() {
  try {
    await relist("projects");
    return true;
  } catch (e) {
    if (e.code !== 403) throw e;
    return false;
  }
}

// A member reads each project its namespaces belong to.
async function memberProjects() {
  const names = new Set([...state.namespaces.values()]
    .map((ns) => (ns.metadata.labels || {})["vmquota.io/project"]).filter(Boolean));
  const found = new Map();
  await Promise.all([...names].map(async (name) => {
    try { found.set(name, await api(`${PATHS.projects}/${encodeURIComponent(name)}`)); } catch { /* not a member */ }
  }));
  state.projects = found;
}

async function relistProjects() {
  state.projectsListed = await listProjects();
  if (!state.projectsListed) await memberProjects();
}

// -- the watch API -----------------------------------------------------------------------------------------

// Follow one list for as long as the page lives: each event goes to `apply`; a closed stream resumes from the
// last resourceVersion seen; 410 Gone (the log moved past it) relists and starts again from the new list.
async function follow(what, resourceVersion, apply, onRelist) {
  let rv = resourceVersion;
  let delay = 500;
  for (;;) {
    try {
      if (rv === null) { rv = await relist(what); onRelist(); }
      const url = `${PATHS[what]}?watch=true&allowWatchBookmarks=true&resourceVersion=${encodeURIComponent(rv)}`;
      const response = await fetch(url, { headers: authHeaders(), credentials: "same-origin", cache: "no-store" });
      if (response.status === 410) { rv = null; continue; }
      if (response.status === 401) { needSignIn("Your credentials were refused; sign in again."); return; }
      if (!response.ok) throw new ApiError(response.status, response.statusText);
      setLive(true);
      delay = 500;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).trim();
          buffer = buffer.slice(newline + 1);
          if (!line) continue;
          const event = JSON.parse(line);
          if (event.type === "ERROR") {
            if (event.object && event.object.code === 410) { rv = null; throw new ApiError(410, "expired"); }
            throw new ApiError(event.object && event.object.code, event.object && event.object.message);
          }
          if (event.object && event.object.metadata && event.object.metadata.resourceVersion) {
            rv = event.object.metadata.resourceVersion;
          }
          if (event.type !== "BOOKMARK") apply(event.type, event.object);
        }
      }
    } catch (e) {
      if (e instanceof ApiError && e.code === 410) continue; // relist at once
      setLive(false);
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 5000); // a server back from a restart is followed within 5 s
    }
  }
}

function applyTo(map, keyOf) {
  return (type, obj) => {
    if (type === "DELETED") map.delete(keyOf(obj));
    else map.set(keyOf(obj), obj);
  };
}

// -- rendering ---------------------------------------------------------------------------------------------

// Draw `render` once in the next frame, however many watch events asked for it meanwhile (a burst of a hundred
// new VMs sorts and draws the table once, not a hundred times).
const pendingRenders = new Set();
function soon(render) {
  if (pendingRenders.has(render)) return;
  pendingRenders.add(render);
  requestAnimationFrame(() => { pendingRenders.delete(render); render(); });
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.dataset[name.slice(5).replace(/-([a-z])/g, (_, c) => c.toUpperCase())] = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function settingsOf(obj) {
  const annotations = obj.metadata.annotations || {};
  const threshold = Number(String(annotations[THRESHOLD_ANNOTATION] ?? DEFAULT_THRESHOLD).replace(/%$/, ""));
  const mode = (obj.status && obj.status.enforcement) || annotations[ENFORCEMENT_ANNOTATION] || "enforce";
  return { threshold: Number.isFinite(threshold) ? threshold : DEFAULT_THRESHOLD, mode };
}

// ok below the warning threshold, warn from it, full at 100 %, over past it (only audit mode gets there).
function level(pct, threshold) {
  if (pct > 100) return "over";
  if (pct >= 100) return "full";
  if (pct >= threshold) return "warn";
  return "ok";
}

function quotaCard(kind, id, title, obj) {
  const status = obj.status || {};
  const hard = status.hard || {}, used = status.used || {};
  const { threshold, mode } = settingsOf(obj);
  const card = el("article", { class: `quota mode-${mode}`, "data-quota": id, "data-kind": kind, "data-mode": mode });
  const heading = el("h3", {}, title);
  if (mode === "audit") heading.append(" ", el("span", { class: "badge audit", title: "admits past hard: records and warns instead of refusing" }, "audit"));
  heading.append(el("span", { class: "threshold" }, `warns at ${threshold}%`));
  card.append(heading);
  const rows = el("div", { class: "bars" });
  for (const resource of Object.keys(hard).sort()) {
    const u = used[resource] ?? "0";
    const pct = quantity.percent(u, hard[resource]);
    const shown = quantity.percentText(pct);
    const fill = el("div", { class: "fill" });
    fill.style.width = `${Math.min(Number.isFinite(pct) ? pct : 100, 100)}%`;
    const marker = el("div", { class: "marker" });
    marker.style.left = `${threshold}%`;
    rows.append(el("div", { class: `bar level-${level(pct, threshold)}`, "data-resource": resource },
      el("span", { class: "resource" }, resource),
      el("span", { class: "track" }, fill, marker),
      el("span", { class: "numbers" }, el("span", { class: "used" }, u), " / ", el("span", { class: "hard" }, hard[resource])),
      el("span", { class: "pct" }, shown)));
  }
  if (!rows.childElementCount) rows.append(el("p", { class: "empty" }, "no limits"));
  card.append(rows);
  return card;
}

function renderQuotas() {
  const projects = el("div", { class: "cards" });
  for (const [name, project] of [...state.projects].sort()) {
    projects.append(quotaCard("project", name, `project ${name}`, project));
  }
  const quotas = el("div", { class: "cards" });
  for (const [id, quota] of [...state.quotas].sort()) {
    const project = (state.namespaces.get(quota.metadata.namespace)?.metadata.labels || {})["vmquota.io/project"];
    quotas.append(quotaCard("quota", id, `${quota.metadata.namespace} / ${quota.metadata.name}${project ? `  (project ${project})` : ""}`, quota));
  }
  document.getElementById("project-list").replaceChildren(projects.childElementCount ? projects : el("p", { class: "empty" }, "No projects you may read."));
  document.getElementById("quota-list").replaceChildren(quotas.childElementCount ? quotas : el("p", { class: "empty" }, "No quotas you may read."));
  renderHistoryChoices();
}

// One row, cloned for each VM: a thousand rows of createElement and setAttribute took most of the first paint.
const VM_ROW = el("tr", {}, el("td"), el("td", { class: "name" }), el("td"), el("td", { class: "num" }),
  el("td", { class: "num" }), el("td"), el("td", { class: "actions" }));
const BUTTONS = {
  start: el("button", { class: "start", "data-action": "start", type: "button" }, "Start"),
  stop: el("button", { class: "stop", "data-action": "stop", type: "button" }, "Stop"),
};

function vmRow(vm) {
  const ns = vm.metadata.namespace, name = vm.metadata.name;
  const phase = (vm.status && vm.status.printableStatus) || "Stopped";
  const may = state.may.get(ns) || { start: false, stop: false };
  const spec = (vm.spec && vm.spec.template && vm.spec.template.spec && vm.spec.template.spec.domain) || {};
  const cpu = spec.cpu || {};
  const vcpus = (cpu.sockets || 1) * (cpu.cores || 1) * (cpu.threads || 1);
  const row = VM_ROW.cloneNode(true);
  row.dataset.vm = `${ns}/${name}`;
  row.dataset.phase = phase;
  const cells = row.children;
  cells[0].textContent = ns;
  cells[1].textContent = name;
  cells[2].textContent = phase;
  cells[2].className = `phase phase-${phase.toLowerCase()}`;
  cells[3].textContent = String(vcpus);
  cells[4].textContent = (spec.memory && spec.memory.guest) || "";
  cells[5].textContent = (vm.spec && (vm.spec.runStrategy || (vm.spec.running ? "Always" : "Halted"))) || "";
  if (may.start) cells[6].append(BUTTONS.start.cloneNode(true));
  if (may.stop) cells[6].append(BUTTONS.stop.cloneNode(true));
  return row;
}

const vmRows = new Map(); // "ns/name" -> <tr>, so that a watch event replaces one row, not the table

function renderVms() {
  const body = document.getElementById("vm-rows");
  const fragment = document.createDocumentFragment();
  vmRows.clear();
  for (const id of [...state.vms.keys()].sort()) {
    const row = vmRow(state.vms.get(id));
    vmRows.set(id, row);
    fragment.append(row);
  }
  body.replaceChildren(fragment);
  document.getElementById("vm-count").textContent = String(state.vms.size);
  filterVms();
}

function updateVm(type, vm) {
  const id = key(vm);
  const old = vmRows.get(id);
  if (type === "DELETED") {
    if (old) old.remove();
    vmRows.delete(id);
  } else if (old) {
    const row = vmRow(vm);
    old.replaceWith(row);
    vmRows.set(id, row);
    filterRow(row);
  } else {
    soon(renderVms); // a new VM: the table stays sorted, drawn once for a burst of them
  }
  document.getElementById("vm-count").textContent = String(state.vms.size);
}

function filterRow(row) {
  const wanted = document.getElementById("vm-filter").value.trim().toLowerCase();
  row.hidden = Boolean(wanted) && !row.dataset.vm.toLowerCase().includes(wanted);
}

function filterVms() { for (const row of vmRows.values()) filterRow(row); }

function renderTop() {
  const amount = (charge, name) => { const v = quantity.parse(charge[name] ?? "0"); return Number.isNaN(v) ? 0 : v; };
  const all = [];
  for (const [namespace, items] of state.charges) for (const item of items) all.push({ namespace, ...item });
  all.sort((a, b) => amount(b.charge, "limits.cpu") - amount(a.charge, "limits.cpu")
    || amount(b.charge, "limits.memory") - amount(a.charge, "limits.memory")
    || a.namespace.localeCompare(b.namespace) || a.name.localeCompare(b.name));
  const running = all.filter((c) => amount(c.charge, "limits.cpu") > 0 || amount(c.charge, "limits.memory") > 0);
  const rows = running.slice(0, TOP_VMS).map((c) => el("tr", { "data-vm": `${c.namespace}/${c.name}` },
    el("td", {}, c.namespace), el("td", {}, c.name),
    ...TOP_RESOURCES.map((r) => el("td", { class: "num", "data-resource": r }, c.charge[r] ?? "0"))));
  document.getElementById("top-rows").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: String(2 + TOP_RESOURCES.length), class: "empty" }, "No VM charges compute now."))]));
}

// A page left open for days must not keep every event it was told of: the newest MAX_EVENTS stay.
function forgetOldEvents() {
  if (state.events.size <= MAX_EVENTS) return;
  const oldest = [...state.events].sort(([, a], [, b]) => eventTime(a).localeCompare(eventTime(b)));
  for (const [id] of oldest.slice(0, state.events.size - MAX_EVENTS)) state.events.delete(id);
}

function eventTime(e) { return e.lastTimestamp || e.eventTime || e.metadata.creationTimestamp || ""; }

function renderEvents() {
  const events = [...state.events.values()].sort((a, b) =>
    eventTime(b).localeCompare(eventTime(a)) || Number(b.metadata.resourceVersion) - Number(a.metadata.resourceVersion));
  const row = (e) => el("tr", { class: `event type-${(e.type || "Normal").toLowerCase()}`, "data-reason": e.reason || "" },
    el("td", {}, eventTime(e).replace("T", " ").replace("Z", "")), el("td", {}, e.metadata.namespace || ""),
    el("td", {}, `${(e.involvedObject || {}).kind || ""}/${(e.involvedObject || {}).name || ""}`),
    el("td", { class: "reason" }, e.reason || ""), el("td", { class: "message" }, e.message || ""));
  const refusals = events.filter((e) => e.reason === "QuotaExceeded").slice(0, EVENTS_SHOWN);
  document.getElementById("refusal-rows").replaceChildren(...refusals.map(row));
  document.getElementById("refusal-count").textContent = String(refusals.length);
  document.getElementById("event-rows").replaceChildren(...events.slice(0, EVENTS_SHOWN).map(row));
}

// -- history -----------------------------------------------------------------------------------------------

let chart = null;
let historyTimer = null;
const historyRefused = new Set(); // choices whose history the API refused this user

function renderHistoryChoices() {
  const select = document.getElementById("history-of");
  const current = select.value;
  const projects = [...state.projects.keys()].sort().map((name) => [`project:${name}`, `project ${name}`]);
  const quotas = [...state.quotas.keys()].sort().map((id) => [`quota:${id}`, `quota ${id.replace("/", " / ")}`]);
  const options = [...projects, ...quotas];
  if (options.map(([v]) => v).join() === [...select.options].map((o) => o.value).join()) return;
  select.replaceChildren(...options.map(([value, label]) => {
    const option = el("option", { value }, label);
    option.disabled = historyRefused.has(value);
    return option;
  }));
  if (options.some(([v]) => v === current)) select.value = current;
  else select.value = (options.find(([v]) => !historyRefused.has(v)) || [""])[0];
  scheduleHistory(0);
}

function scheduleHistory(delay = 1000) {
  clearTimeout(historyTimer);
  historyTimer = setTimeout(drawHistory, delay);
}

function historyPath(choice) {
  const [kind, id] = [choice.slice(0, choice.indexOf(":")), choice.slice(choice.indexOf(":") + 1)];
  if (kind === "project") return `/apis/vmquota.io/v1/projects/${encodeURIComponent(id)}/history?since=2d`;
  const [ns, name] = id.split("/");
  return `/apis/vmquota.io/v1/namespaces/${encodeURIComponent(ns)}/resourcequotas/${encodeURIComponent(name)}/history?since=2d`;
}

function formatSeconds(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

const COLOURS = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626"];

async function drawHistory() {
  const choice = document.getElementById("history-of").value;
  const box = document.getElementById("chart");
  const note = document.getElementById("history-note");
  if (!choice) { box.replaceChildren(); note.textContent = "No quota to show."; return; }
  let history;
  try {
    history = await api(historyPath(choice));
  } catch (e) {
    const select = document.getElementById("history-of");
    const next = [...select.options].find((o) => !o.disabled && o.value !== choice && !historyRefused.has(o.value));
    if (e.code === 403 && next) {
      // Not this user's to read (a project's history, for a member): offered no more, the next one shown.
      historyRefused.add(choice);
      select.querySelector(`option[value="${CSS.escape(choice)}"]`).disabled = true;
      select.value = next.value;
      scheduleHistory(0);
      return;
    }
    note.textContent = `History unavailable: ${e.message}`;
    return;
  }
  const resources = Object.keys(history.hard || {}).sort();
  // Each point is a change (or a minute or hour bucket); the last one holds until now.
  const points = [...(history.series || [])];
  points.push({ time: history.until, used: history.used, hard: history.hard });
  const xs = points.map((p) => Date.parse(p.time) / 1000);
  const data = [xs, ...resources.map((r) => points.map((p) => {
    const pct = quantity.percent((p.used || {})[r] ?? "0", (p.hard || {})[r] ?? history.hard[r]);
    return Number.isFinite(pct) ? Math.round(pct * 10) / 10 : null;
  }))];
  const peak = resources.map((r) => `${r} ${(history.peak || {})[r] ?? "0"}`).join(", ");
  const days = history.refusalsPerDay || [];
  const refused = days.reduce((n, d) => n + (d.refused || 0), 0);
  const audited = days.reduce((n, d) => n + (d.audited || 0), 0);
  const atLimit = Object.entries(history.secondsAtLimit || {}).map(([r, sec]) => `${r} ${formatSeconds(sec)}`);
  note.dataset.refused = String(refused);
  note.textContent = `peak: ${peak || "–"}; at the limit: ${atLimit.join(", ") || "never"}; ` +
    `refused: ${refused}${audited ? `, admitted past hard (audit): ${audited}` : ""}; ` +
    `mode: ${history.enforcement || "enforce"}`;
  const width = Math.max(box.clientWidth, 320);
  const options = {
    width, height: 220,
    scales: { y: { range: (u, min, max) => [0, Math.max(100, max || 0)] } },
    axes: [{}, { values: (u, ticks) => ticks.map((t) => `${t}%`) }],
    series: [{}, ...resources.map((r, i) => ({
      label: r, stroke: COLOURS[i % COLOURS.length], width: 2, paths: uPlot.paths.stepped({ align: 1 }),
      value: (u, v) => (v == null ? "–" : `${v}%`),
    }))],
  };
  if (chart) chart.destroy();
  chart = new uPlot(options, data, box);
  box.dataset.points = String(xs.length);
}

// -- actions -----------------------------------------------------------------------------------------------

function toast(message, kind = "error") {
  const box = document.getElementById("toast");
  box.replaceChildren(el("div", { class: `toast ${kind}` }, message));
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

async function press(button) {
  const row = button.closest("tr");
  const [ns, name] = row.dataset.vm.split("/");
  const action = button.dataset.action;
  button.disabled = true;
  try {
    let warned = [];
    await api(vmPath(ns, name, action), { method: "PUT", body: {}, onWarnings: (w) => { warned = w; } });
    // Admitted; near a quota's limit the server says so (a warning threshold, or audit mode past hard).
    if (warned.length) toast(`${action} of ${ns}/${name} admitted. Warning: ${warned.join("; ")}`, "warn");
    else toast(`${action} of ${ns}/${name} admitted`, "info");
  } catch (e) {
    if (e.code === 401) { needSignIn("Your credentials were refused; sign in again."); return; }
    // A refusal of the quota (403 with Kubernetes' "exceeded quota: ..." message) or of RBAC: said as it came.
    const shown = el("li", { class: "refused" }, `${action} ${ns}/${name}: ${e.message}`);
    document.getElementById("last-refusals").prepend(shown);
    toast(`${action} of ${ns}/${name} refused: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

// -- the page ------------------------------------------------------------------------------------------------

function setLive(live) {
  const badge = document.getElementById("live");
  badge.textContent = live ? "live" : "reconnecting…";
  badge.className = live ? "live on" : "live off";
}

function needSignIn(message = "") {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message;
  document.getElementById("signout").hidden = !sessionStorage.getItem(TOKEN_KEY);
}

const chargeTimers = new Map();
function refreshCharges(namespace) {
  clearTimeout(chargeTimers.get(namespace));
  chargeTimers.set(namespace, setTimeout(async () => { await loadCharges(namespace); renderTop(); }, 300));
}

async function whoami() {
  try {
    const review = await api("/apis/authentication.k8s.io/v1/selfsubjectreviews", {
      method: "POST", body: { apiVersion: "authentication.k8s.io/v1", kind: "SelfSubjectReview" } });
    return ((review.status || {}).userInfo || {}).username || "";
  } catch (e) {
    if (e.code === 401) throw e;
    return "";
  }
}

async function start() {
  const started = performance.now();
  // Everything the first paint needs in two round trips: who I am and every list at once, then who may press
  // what (and a member's projects, which need the namespaces).
  const rvs = {};
  const [user, projectsListed] = await Promise.all([whoami(), listProjects(),
    ...["namespaces", "quotas", "vms", "events"].map(async (what) => { rvs[what] = await relist(what); })]);
  state.user = user;
  state.projectsListed = projectsListed;
  const namespaces = new Set([...state.vms.values()].map((vm) => vm.metadata.namespace));
  await Promise.all([loadPermissions(namespaces), projectsListed ? null : memberProjects()]);
  document.getElementById("who").textContent = state.user ? `signed in as ${state.user}` : "";
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  document.getElementById("signout").hidden = !sessionStorage.getItem(TOKEN_KEY);
  renderQuotas();
  renderVms();
  renderEvents();
  // First paint: quotas and the VM table are in the DOM; the benchmark and the tests wait for this mark.
  requestAnimationFrame(() => {
    const firstPaint = performance.now() - started;
    performance.mark("vmquota-first-paint");
    document.body.dataset.ready = "true";
    document.body.dataset.firstPaintMs = firstPaint.toFixed(1);
  });
  await Promise.all([...state.namespaces.keys()].map(loadCharges));
  renderTop();

  // Three watches, no more: a browser keeps at most six HTTP/1.1 connections to one server, and each watch holds
  // one for good. Projects and namespaces change with what these show (a VM's charge moves its project's used;
  // a namespace joins a project rarely), so they are read again, shortly after any change of a VM or a quota.
  follow("vms", rvs.vms, (type, vm) => {
    applyTo(state.vms, key)(type, vm);
    const ns = vm.metadata.namespace;
    if (!state.may.has(ns)) loadPermissions([ns]).then(() => updateVm(type, vm));
    else updateVm(type, vm);
    refreshCharges(ns);
    refreshProjects();
  }, () => { renderVms(); refreshProjects(); });
  follow("quotas", rvs.quotas, (type, quota) => {
    applyTo(state.quotas, key)(type, quota);
    soon(renderQuotas);
    scheduleHistory();
    refreshProjects();
  }, renderQuotas);
  follow("events", rvs.events, (type, event) => {
    applyTo(state.events, key)(type, event);
    forgetOldEvents();
    soon(renderEvents);
  }, renderEvents);
}

let projectsTimer = null;
function refreshProjects() {
  clearTimeout(projectsTimer);
  projectsTimer = setTimeout(async () => {
    try {
      await relist("namespaces");
      await relistProjects();
      renderQuotas();
      scheduleHistory();
    } catch { /* the next change tries again */ }
  }, 200);
}

function boot() {
  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    const token = input.value.trim();
    input.value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    location.reload(); // a fresh start: no watch of the previous user's survives
  });
  document.getElementById("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  document.getElementById("vm-rows").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) press(button);
  });
  document.getElementById("vm-filter").addEventListener("input", filterVms);
  document.getElementById("history-of").addEventListener("change", () => scheduleHistory(0));
  window.addEventListener("resize", () => {
    if (chart) chart.setSize({ width: Math.max(document.getElementById("chart").clientWidth, 320), height: 220 });
  });
  start().catch((e) => {
    if (e instanceof ApiError && e.code === 401) needSignIn(sessionStorage.getItem(TOKEN_KEY) ? "That token was refused." : "");
    else toast(`The dashboard could not load: ${e.message}`);
  });
}

boot();
