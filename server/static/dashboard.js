// The Achilles dashboard: live over Server-Sent Events (/api/events), polling
// /api/dashboard when EventSource is missing or keeps failing (or with ?poll in the URL).
// All text goes into the page through textContent: nothing from the cluster is parsed as HTML.
"use strict";

const HISTORY = 300;          // seconds of throughput shown
const POLL_EVERY = 2000;      // ms between polls in the fallback
const COLORS = ["#3874d8", "#e08a1e", "#8e44ad", "#16a085", "#c0392b", "#7f8c8d", "#2c3e50",
                "#d35400", "#27ae60", "#b03a7a"];

const model = { seq: 0, events: [], failures: [], cluster: [], nodes: {}, now: 0, mode: "" };
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmtNum(n, digits) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits || 0 });
}

function fmtDur(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, s);
  if (s < 10) return s.toFixed(1) + " s";
  if (s < 60) return Math.round(s) + " s";
  const m = Math.floor(s / 60), sec = Math.round(s % 60);
  if (m < 60) return m + "m " + String(sec).padStart(2, "0") + "s";
  return Math.floor(m / 60) + "h " + String(m % 60).padStart(2, "0") + "m";
}

function fmtBytes(b) {
  if (!b) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return b.toFixed(i ? 1 : 0) + " " + units[i];
}

function setMode(mode) {
  model.mode = mode;
  const c = $("conn");
  c.textContent = mode;
  c.className = "conn " + mode.split(" ")[0];
}

// --- data in ---------------------------------------------------------------------------
function applyHistory(h) {
  model.now = h.now;
  model.cluster = h.cluster || [];
  model.nodes = h.nodes || {};
  drawChart();
}

function applyUpdate(view) {
  if (view.seq < model.seq) {   // a restarted server numbers from 0 again
    model.events = []; model.failures = [];
  }
  const known = model.seq;
  for (const e of view.events) if (e.seq > known) model.events.push(e);
  for (const f of view.failures) if (f.seq > known) model.failures.push(f);
  model.events = model.events.slice(-200);
  model.failures = model.failures.slice(-50);
  model.seq = view.seq;
  const s = view.state.sample;
  if (s && (!model.cluster.length || model.cluster[model.cluster.length - 1][0] < s.t)) {
    model.now = s.t;
    model.cluster.push([s.t, s.cluster]);
    for (const [name, rate] of Object.entries(s.nodes)) {
      (model.nodes[name] = model.nodes[name] || []).push([s.t, rate]);
    }
    trimHistory();
  }
  render(view.state);
}

function trimHistory() {
  const from = model.now - HISTORY;
  model.cluster = model.cluster.filter((p) => p[0] >= from);
  for (const name of Object.keys(model.nodes)) {
    model.nodes[name] = model.nodes[name].filter((p) => p[0] >= from);
    if (!model.nodes[name].length) delete model.nodes[name];
  }
}

// --- rendering -------------------------------------------------------------------------
function render(state) {
  const s = state.summary;
  $("s-nodes").textContent = s.nodes;
  $("s-busy").textContent = s.busy;
  $("s-procs").textContent = s.processes;
  $("s-jobs").textContent = s.jobs;
  $("s-rate").textContent = fmtNum(s.rate, 1);
  $("s-done").textContent = fmtNum(s.done);
  $("s-failed").textContent = fmtNum(s.failed);
  renderNodes(state.nodes);
  renderJobs(state.jobs);
  renderFinished(state.finished);
  renderFailures();
  renderEvents();
  drawChart();
}

function renderNodes(nodes) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren(...nodes.map((n) => {
    const tr = el("tr", "node");
    tr.dataset.name = n.name;
    const load = n.load || {};
    const mem = load.mem_total ? (1 - load.mem_available / load.mem_total) * 100 : null;
    const res = Object.keys(n.resources).map((k) =>
      k + " " + fmtNum((n.used || {})[k] || 0, 2) + "/" + fmtNum(n.resources[k], 2)).join(", ");
    const cells = [
      [n.name, "n-name"], [n.host, "n-host"],
      [n.busy + " / " + n.processes + (n.inflight > n.busy ? " (+" + (n.inflight - n.busy) + " queued)" : ""), "n-busy num"],
      [fmtNum(n.done), "n-done num"], [fmtNum(n.rate, 1), "n-rate num"],
      [n.heard === null ? "–" : fmtDur(n.heard) + " ago", "n-heard num"],
      [load.load1 === undefined ? "–" : load.load1.toFixed(2) + " on " + load.cpus + " CPUs", "n-load num"],
      [mem === null ? "–" : mem.toFixed(0) + " % of " + fmtBytes(load.mem_total), "n-mem num"],
      [res || "–", "n-res"],
    ];
    for (const [text, cls] of cells) tr.append(el("td", cls, text));
    return tr;
  }));
  $("no-nodes").classList.toggle("hidden", nodes.length > 0);
}

function bar(done, failed, total) {
  const b = el("div", "bar" + (total === null ? " unknown" : ""));
  const d = el("div", "done"), f = el("div", "failed");
  const denom = total === null ? Math.max(1, done + failed) * 1.25 : Math.max(1, total);
  d.style.width = (100 * done / denom) + "%";
  f.style.left = (100 * done / denom) + "%";
  f.style.width = (100 * failed / denom) + "%";
  b.append(d, f);
  return b;
}

function renderJobs(jobs) {
  $("jobs").replaceChildren(...jobs.map((j) => {
    const card = el("div", "job");
    card.dataset.id = j.id;
    const title = el("div", "title");
    title.append(el("span", "fn", j.function), el("span", "meta",
      j.kind + " " + j.id + " · from " + j.owner));
    card.append(title, bar(j.done, j.failed, j.total));
    const figs = el("div", "figures");
    figs.append(
      el("span", "j-progress", fmtNum(j.done) + " done / " + fmtNum(j.failed) + " failed / " +
        (j.total === null ? "≥ " + fmtNum(j.sent) : fmtNum(j.total)) + " total"),
      el("span", "j-rate", fmtNum(j.rate, 1) + " items/s"),
      el("span", "j-eta", "ETA " + fmtDur(j.eta)),
      el("span", "j-elapsed", "elapsed " + fmtDur(j.elapsed)),
      el("span", "j-flight", j.inflight + " chunks at nodes, " + j.queued + " queued"));
    card.append(figs);
    if (j.graph) card.append(...graphView(j.graph));
    return card;
  }));
  $("no-jobs").classList.toggle("hidden", jobs.length > 0);
}

function graphView(g) {
  const states = el("div", "states");
  for (const [name, count] of Object.entries(g.states)) states.append(el("span", "state " + name, name + " " + count));
  if (!g.tasks) return [states];
  const byId = {}, depth = {}, column = {};
  for (const t of g.tasks) byId[t.id] = t;
  const depthOf = (t) => {
    if (depth[t.id] !== undefined) return depth[t.id];
    depth[t.id] = 0;  // guards against a cycle
    let d = 0;
    for (const p of t.deps) if (byId[p]) d = Math.max(d, depthOf(byId[p]) + 1);
    return (depth[t.id] = d);
  };
  const pos = {};
  for (const t of g.tasks) {
    const d = depthOf(t);
    column[d] = (column[d] || 0) + 1;
    pos[t.id] = [d, column[d] - 1];
  }
  const cols = Object.keys(column).length, rows = Math.max(...Object.values(column));
  const NS = "http://www.w3.org/2000/svg", dx = 46, dy = 18;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", "graph");
  svg.setAttribute("width", cols * dx + 20);
  svg.setAttribute("height", rows * dy + 10);
  const xy = (id) => [14 + pos[id][0] * dx, 10 + pos[id][1] * dy];
  for (const t of g.tasks) for (const p of t.deps) {
    if (!pos[p]) continue;
    const line = document.createElementNS(NS, "line");
    const [x1, y1] = xy(p), [x2, y2] = xy(t.id);
    line.setAttribute("x1", x1); line.setAttribute("y1", y1);
    line.setAttribute("x2", x2); line.setAttribute("y2", y2);
    svg.append(line);
  }
  for (const t of g.tasks) {
    const c = document.createElementNS(NS, "circle");
    const [x, y] = xy(t.id);
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", 6);
    c.setAttribute("class", t.state);
    const title = document.createElementNS(NS, "title");
    title.textContent = t.name + "#" + t.id + ": " + t.state + (t.node ? " on " + t.node : "");
    c.append(title);
    svg.append(c);
  }
  return [states, svg];
}

function renderFinished(finished) {
  $("finished").replaceChildren(...finished.map((j) => {
    const row = el("div", "finished-job " + j.state);
    row.append(el("span", "what", j.state + " "), el("span", "", j.function + " (" + j.kind + " " +
      j.id + "): " + fmtNum(j.done) + " done, " + fmtNum(j.failed) + " failed in " + fmtDur(j.elapsed)));
    return row;
  }));
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString();
}

function renderFailures() {
  const box = $("failures");
  const shown = new Set([...box.children].map((c) => c.dataset.seq));
  for (const f of model.failures) {
    if (shown.has(String(f.seq))) continue;
    const d = el("details", "failure");
    d.dataset.seq = f.seq;
    d.open = true;
    const sum = el("summary");
    sum.append(el("span", "type", f.type), el("span", "", ": " + f.message + " — " + f.function +
      " (" + f.kind + " " + f.job + "), " + f.where + " on " + f.node + " at " + clock(f.time)));
    d.append(sum);
    if (f.traceback) d.append(el("pre", "traceback", f.traceback));
    if (f.output && f.output.length) {
      d.append(el("div", "meta", "last output lines:"), el("pre", "output", f.output.join("\n")));
    }
    box.prepend(d);
  }
  while (box.children.length > 50) box.lastChild.remove();
  $("no-failures").classList.toggle("hidden", model.failures.length > 0);
}

function renderEvents() {
  const list = $("events");
  const top = list.firstChild ? Number(list.firstChild.dataset.seq) : 0;
  for (const e of model.events) {
    if (e.seq <= top) continue;
    const li = el("li");
    li.dataset.seq = e.seq;
    const bad = /lost|failed|crashed|timeout|cancelled/.test(e.kind);
    li.append(el("span", "t", clock(e.time)), el("span", "k" + (bad ? " bad" : ""), e.kind),
      el("span", "", e.text));
    list.prepend(li);
  }
  while (list.children.length > 200) list.lastChild.remove();
}

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 900, h = canvas.clientHeight || 220;
  if (canvas.width !== w * ratio) { canvas.width = w * ratio; canvas.height = h * ratio; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const left = 48, bottom = h - 20, top = 8, right = w - 8;
  const series = [["cluster", model.cluster, "#1d2330", 2.5]];
  Object.keys(model.nodes).sort().forEach((name, i) =>
    series.push([name, model.nodes[name], COLORS[i % COLORS.length], 1.2]));
  let max = 1;
  for (const [, pts] of series) for (const p of pts) max = Math.max(max, p[1]);
  max *= 1.1;
  ctx.strokeStyle = "#e3e6ec"; ctx.fillStyle = "#687285"; ctx.font = "11px sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = bottom - (bottom - top) * i / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
    ctx.fillText(fmtNum(max * i / 4, max < 10 ? 1 : 0), 4, y + 4);
  }
  for (let m = 0; m <= 5; m++) {
    const x = right - (right - left) * m / 5;
    ctx.fillText(m ? "-" + m + " min" : "now", x - 14, h - 5);
  }
  const x = (t) => right - (right - left) * (model.now - t) / HISTORY;
  const y = (v) => bottom - (bottom - top) * v / max;
  for (const [, pts, color, width] of series) {
    if (pts.length < 2) continue;
    ctx.strokeStyle = color; ctx.lineWidth = width;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
    ctx.stroke();
  }
  $("legend").replaceChildren(...series.map(([name, , color]) => {
    const s = el("span");
    const sw = el("i");
    sw.style.background = color;
    s.append(sw, document.createTextNode(name));
    return s;
  }));
}

// --- transport -------------------------------------------------------------------------
let pollTimer = null;

async function poll() {
  try {
    if (!model.cluster.length) applyHistory(await (await fetch("/api/history")).json());
    const res = await fetch("/api/dashboard?since=" + model.seq);
    if (!res.ok) throw new Error(res.status);
    applyUpdate(await res.json());
    setMode("polling");
  } catch (err) {
    setMode("offline");
  }
  pollTimer = setTimeout(poll, POLL_EVERY);
}

function startPolling() {
  if (pollTimer === null) poll();
}

function connect() {
  if (!window.EventSource || new URLSearchParams(location.search).has("poll")) {
    startPolling();
    return;
  }
  let failures = 0;
  const es = new EventSource("/api/events");
  es.addEventListener("history", (e) => applyHistory(JSON.parse(e.data)));
  es.addEventListener("update", (e) => { failures = 0; setMode("live"); applyUpdate(JSON.parse(e.data)); });
  es.onerror = () => {
    failures += 1;
    if (es.readyState === EventSource.CLOSED || failures > 3) {
      es.close();
      startPolling();
    } else {
      setMode("reconnecting");
    }
  };
}

window.addEventListener("resize", drawChart);
connect();
