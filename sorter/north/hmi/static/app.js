// The operator's panel: one WebSocket for live state (JSON) and camera images (binary), REST for commands.
// No framework, no build step. Server data goes into the page as text only (textContent), never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
// only touch the page where something changed: every write costs the panel a style/layout/paint pass
const setText = (node, text) => { if (node.textContent !== text) node.textContent = text; };
const setData = (node, key, value) => { if (node.dataset[key] !== value) node.dataset[key] = value; };
const el = (tag, attrs = {}, text) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};

let session = null;
let ws = null;
let reconnectTimer = null;
let reconnectDelay = 500;
let lastActivitySent = 0;
let pendingThresholds = {};
let chosenModel = null;
let toastTimer = null;
// what arrived, for people and tests: state messages, images per camera, the last state
const hmiStats = { states: 0, frames: {}, last: null };
window.hmiStats = hmiStats;

// --- REST ---

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (session) opts.headers["X-CSRF-Token"] = session.csrf;
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, opts);
  } catch (e) {
    toast("The line service does not answer", "error");
    return { ok: false, status: 0, data: null };
  }
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (r.status === 401 && session) logoutLocally(goneMessage(data && data.detail));
  return { ok: r.ok, status: r.status, data };
}

function toast(text, kind = "info") {
  const t = $("#toast");
  t.textContent = text;
  t.dataset.kind = kind;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, kind === "error" ? 6000 : 2500);
}

// --- login ---

// why the session is gone, as the server says it (401 detail, WebSocket close reason): expired, or the line
// service was restarted (sessions do not outlive the service: docs/hmi.md)
const SESSION_EXPIRED = "Session expired - please log in again";
function goneMessage(reason) {
  if (!reason || reason === "not logged in") return SESSION_EXPIRED;
  return reason.charAt(0).toUpperCase() + reason.slice(1).replace(", log in", " - please log in");
}

function showLogin(message) {
  $("#main").hidden = true;
  $("#login").hidden = false;
  $("#login-message").textContent = message || "";
  $("#login-password").value = "";
}

function logoutLocally(message) {
  session = null;
  if (ws) { ws.onclose = null; ws.close(); ws = null; }
  clearTimeout(reconnectTimer);
  closeLabelling();
  showLogin(message);
}

async function login(ev) {
  ev.preventDefault();
  const user = $("#login-user").value.trim();
  const password = $("#login-password").value;
  $("#login-submit").disabled = true;
  const r = await api("POST", "/api/login", { user, password });
  $("#login-submit").disabled = false;
  $("#login-password").value = "";
  if (!r.ok) {
    $("#login-message").textContent = (r.data && r.data.detail) || `login failed (${r.status})`;
    return;
  }
  session = r.data;
  showMain();
}

async function logout() {
  await api("POST", "/api/logout");
  logoutLocally("");
}

// --- main screen ---

function showMain() {
  $("#login").hidden = true;
  $("#main").hidden = false;
  $("#line-name").textContent = session.line;
  $("#who").textContent = `${session.user} (${session.role})`;
  buildCameras();
  buildControls();
  $("#technician").hidden = !session.may_configure;
  if (session.may_configure) loadModels();
  alarmItems.clear(); // the buttons depend on the role: build the list anew for this session
  $("#alarms").replaceChildren();
  connect();
}

function buildCameras() {
  const box = $("#cameras");
  box.replaceChildren();
  for (const name of session.cameras) {
    const fig = el("figure", { class: "camera", id: `cam-${name}`, "data-online": "true" });
    const img = el("img", { alt: `camera ${name}`, "data-frames": "0", "data-seq": "", decoding: "async" });
    fig.append(img, el("figcaption", {}, name));
    box.append(fig);
    hmiStats.frames[name] = 0;
  }
}

function buildControls() {
  const box = $("#controls");
  box.replaceChildren();
  if (!session.may_operate) return; // a viewer gets no control buttons at all
  for (const cmd of session.commands) {
    const b = el("button", { type: "button", id: `btn-${cmd}`, "data-cmd": cmd }, cmd);
    b.disabled = true;
    b.addEventListener("click", () => command(cmd, b));
    box.append(b);
  }
}

async function command(cmd, button) {
  button.disabled = true;
  const r = await api("POST", `/api/command/${cmd}`);
  if (r.ok) toast(`${cmd}: ${r.data.state}`);
  else if (r.status !== 401) toast(`${cmd} refused: ${(r.data && r.data.detail) || r.status}`, "error");
}

// --- live updates ---

function connect() {
  clearTimeout(reconnectTimer);
  const proto = location.protocol === "https:" ? "wss://" : "ws://";
  const sock = new WebSocket(proto + location.host + "/ws");
  sock.binaryType = "arraybuffer";
  ws = sock;
  // a new connection may reach a restarted service, whose count of clip changes starts again
  sock.onopen = () => { reconnectDelay = 500; clipChange = -1; setLink(true); };
  sock.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (msg.type === "state") render(msg);
    } else {
      showFrame(ev.data);
    }
  };
  sock.onclose = (ev) => {
    if (ws !== sock) return;
    ws = null;
    setLink(false);
    if (ev.code === 4401) { logoutLocally(goneMessage(ev.reason)); return; }
    reconnectTimer = setTimeout(connect, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 5000);
  };
}

function setLink(ok) {
  const l = $("#link");
  l.dataset.ok = String(ok);
  l.textContent = ok ? "live" : "no connection";
}

const decoder = new TextDecoder();

function showFrame(buf) {
  const n = new DataView(buf).getUint16(0);
  let head;
  try { head = JSON.parse(decoder.decode(new Uint8Array(buf, 2, n))); } catch (e) { return; }
  const fig = document.getElementById(`cam-${head.camera}`);
  if (!fig) return;
  const img = fig.querySelector("img");
  const url = URL.createObjectURL(new Blob([new Uint8Array(buf, 2 + n)], { type: "image/jpeg" }));
  const old = img.dataset.url;
  img.onload = () => { if (old) URL.revokeObjectURL(old); };
  img.dataset.url = url;
  img.src = url;
  img.dataset.seq = String(head.seq);
  hmiStats.frames[head.camera] = (hmiStats.frames[head.camera] || 0) + 1;
  img.dataset.frames = String(hmiStats.frames[head.camera]);
  setText(fig.querySelector("figcaption"),
    `${head.camera} - ${head.age_s.toFixed(1)} s ago - ${head.decided}/${head.pieces} decided`);
}

function fmt(v, digits = 0) {
  return v === null || v === undefined ? "-" : Number(v).toFixed(digits);
}

function render(s) {
  hmiStats.states += 1;
  hmiStats.last = s;
  const st = $("#state");
  setText(st, s.state);
  setData(st, "state", s.state);
  setText($("#belt"), `belt ${fmt(s.belt_mm_s / 1000, 2)} m/s`);
  setText($("#throughput"), `${fmt(s.pieces_per_minute)} pieces/min`);
  for (const b of document.querySelectorAll("#controls button")) {
    const off = !s.allowed.includes(b.dataset.cmd);
    if (b.disabled !== off) b.disabled = off;
  }
  renderFractions(s.fractions);
  renderStatus(s);
  renderAlarms(s.alarms);
  renderThresholds(s.routing);
  renderClip(s.clip);
  for (const cam of s.cameras) {
    const fig = document.getElementById(`cam-${cam.name}`);
    if (fig) setData(fig, "online", String(cam.online));
  }
}

function renderFractions(fractions) {
  const body = $("#fractions tbody");
  if (body.children.length !== fractions.length) {
    body.replaceChildren();
    for (const f of fractions) {
      const tr = el("tr", { id: `fraction-${f.name}` });
      const name = el("td");
      const sw = el("span", { class: "swatch" });
      sw.style.background = f.colour;
      name.append(sw, document.createTextNode(f.name));
      tr.append(name, el("td", { class: "count", id: `count-${f.name}` }), el("td", { class: "rate" }),
        el("td", { class: "purity" }));
      body.append(tr);
    }
  }
  fractions.forEach((f, i) => {
    const tr = body.children[i];
    setText(tr.querySelector(".count"), String(f.count));
    setText(tr.querySelector(".rate"), fmt(f.rate_per_min));
    setText(tr.querySelector(".purity"), f.purity === null ? "-" : `${(100 * f.purity).toFixed(1)} %`);
  });
}

function tile(id, title, value, ok) {
  let t = document.getElementById(id);
  if (!t) {
    t = el("div", { class: "tile", id });
    t.append(el("div", { class: "t" }, title), el("div", { class: "v" }));
    $("#status").append(t);
  }
  setData(t, "ok", String(ok));
  setText(t.querySelector(".v"), value);
}

function renderStatus(s) {
  const p = s.plc;
  tile("tile-plc", `PLC (${p.protocol})`, p.online ? `online, ${fmt(p.rtt_ms, 1)} ms` : `offline: ${p.last_error || "no answer"}`,
    p.online && p.alarms.length === 0);
  tile("tile-belt", "Belt", p.belt_running ? `running ${fmt(s.belt_mm_s)} mm/s` : "stopped", p.online);
  const off = s.cameras.filter((c) => !c.online);
  tile("tile-cameras", "Cameras", off.length ? `offline: ${off.map((c) => c.name).join(", ")}` :
    `${s.cameras.length} online`, off.length === 0);
  const m = s.magnetometer;
  tile("tile-mag", "Magnetometer", m === null ? "none on this line" : (m.online ? "online" : `offline: ${m.reason || ""}`),
    m === null || m.online);
  tile("tile-model", "Model", `${s.model.version} (${s.model.provider.replace("ExecutionProvider", "")})`, true);
  tile("tile-latency", "Decision latency p99", s.latency_ms_p99 === null ? "-" : `${fmt(s.latency_ms_p99)} ms`, true);
}

function timeOf(t) {
  return new Date(t * 1000).toLocaleTimeString();
}

// one list item per alarm, rebuilt only when that alarm changes: another alarm raised or cleared beside it must
// not replace the Acknowledge button under the operator's finger
const alarmItems = new Map(); // name -> {key, li}

function alarmItem(a) {
  const li = el("li", { "data-alarm": a.name, "data-active": String(a.active), "data-acked": String(!!a.acked_by) });
  const head = el("div", { class: "head" });
  head.append(el("span", { class: "name" }, a.name), el("span", { class: "time" }, timeOf(a.raised_at)));
  li.append(head, el("div", { class: "cause" }, a.cause), el("div", { class: "action" }, a.action));
  const row = el("div", { class: "row" });
  const status = a.active ? (a.acked_by ? `active, acknowledged by ${a.acked_by}` : "active") :
    `cleared ${timeOf(a.cleared_at)}`;
  row.append(el("span", { class: "status" }, status));
  if (session && session.may_operate && !a.acked_by) {
    const b = el("button", { type: "button", class: "ack" }, "Acknowledge");
    b.addEventListener("click", async () => {
      b.disabled = true;
      const r = await api("POST", `/api/alarms/${encodeURIComponent(a.name)}/ack`);
      if (!r.ok && r.status !== 401) toast(`acknowledge refused: ${(r.data && r.data.detail) || r.status}`, "error");
    });
    row.append(b);
  }
  li.append(row);
  return li;
}

function renderAlarms(alarms) {
  setText($("#alarm-count"), alarms.length ? `(${alarms.filter((a) => a.active).length} active)` : "");
  const list = $("#alarms");
  const names = new Set(alarms.map((a) => a.name));
  for (const [name, item] of alarmItems) {
    if (!names.has(name)) {
      item.li.remove();
      alarmItems.delete(name);
    }
  }
  let prev = null;
  for (const a of alarms) {
    const key = JSON.stringify([a.raised_at, a.cleared_at, a.acked_by, a.cause, a.action]);
    let item = alarmItems.get(a.name);
    if (!item || item.key !== key) {
      const li = alarmItem(a);
      if (item) item.li.replaceWith(li);
      item = { key, li };
      alarmItems.set(a.name, item);
    }
    const want = prev ? prev.nextSibling : list.firstChild;
    if (item.li !== want) list.insertBefore(item.li, want); // moved only when the order changed
    prev = item.li;
  }
}

// --- technician ---

function renderThresholds(routing) {
  if (!session || !session.may_configure) return;
  for (const key of ["min_confidence", "fallback_min_confidence"]) {
    const v = key in pendingThresholds ? pendingThresholds[key] : routing[key];
    const span = document.getElementById(`thr-${key}`);
    setText(span, v.toFixed(2));
    setData(span, "changed", String(key in pendingThresholds));
    setData(span, "current", String(routing[key]));
  }
}

function step(ev) {
  const box = ev.target.closest(".stepper");
  const key = box.dataset.key;
  const span = document.getElementById(`thr-${key}`);
  const base = key in pendingThresholds ? pendingThresholds[key] : Number(span.dataset.current);
  const v = Math.min(1, Math.max(0, Math.round((base + Number(ev.target.dataset.delta)) * 100) / 100));
  pendingThresholds[key] = v;
  span.textContent = v.toFixed(2);
  span.dataset.changed = "true";
}

async function applyThresholds() {
  if (!Object.keys(pendingThresholds).length) { toast("no change"); return; }
  const r = await api("PUT", "/api/routing/thresholds", pendingThresholds);
  if (r.ok) {
    pendingThresholds = {};
    toast(`thresholds: ${r.data.min_confidence.toFixed(2)} / ${r.data.fallback_min_confidence.toFixed(2)}`);
  } else if (r.status !== 401) {
    toast(`thresholds refused: ${(r.data && r.data.detail) || r.status}`, "error");
  }
}

async function loadModels() {
  const r = await api("GET", "/api/models");
  const box = $("#models");
  box.replaceChildren();
  if (!r.ok) return;
  for (const path of r.data.models) {
    const b = el("button", { type: "button", "aria-pressed": "false", "data-path": path }, path.split("/").pop());
    b.addEventListener("click", () => {
      chosenModel = path;
      for (const o of box.children) o.setAttribute("aria-pressed", String(o === b));
      pollShadow();
    });
    box.append(b);
  }
}

async function swapModel() {
  if (!chosenModel) { toast("choose a model first"); return; }
  toast("checking the model ...");
  const r = await api("POST", "/api/model", { path: chosenModel });
  if (r.ok) {
    toast(`model ${r.data.version} running`);
    hideComparison();
  } else if (r.status !== 401) toast((r.data && r.data.detail) || `refused (${r.status})`, "error");
}

// a clip: every frame, poll, bar line and PLC status recorded while the line runs (docs/recording.md)
// the newest clip change shown (a start or a stop, counted by the service): a live push built before the answer
// to this panel's own start or stop must not show the clip as it was before
let clipChange = -1;
function renderClip(c) {
  if (!session || !session.may_configure) return;
  if ((c ? c.change : 0) < clipChange) return;
  clipChange = c ? c.change : 0;
  const p = $("#clip-status");
  let text = "no clip";
  if (c) {
    text = c.active
      ? `recording ${c.name}: ${c.frames} frames, ${c.mb} of ${c.max_mb} MB`
      : `${c.name}: ${c.frames} frames, ${c.mb} MB, stopped by ${c.stopped_by}`;
    if (c.stopped_early) text += ` (${c.stopped_early})`;
  }
  setText(p, text);
  setData(p, "active", String(Boolean(c && c.active)));
  $("#clip-start").disabled = Boolean(c && c.active);
  $("#clip-stop").disabled = !(c && c.active);
}

async function clip(action) {
  const r = await api("POST", `/api/clip/${action}`, action === "start" ? {} : undefined);
  if (r.ok) {
    toast(action === "start" ? `clip ${r.data.name} recording` : `clip ${r.data.name} complete`);
    renderClip({ ...r.data, mb: Math.round(r.data.bytes / 1048576), max_mb: Math.round(r.data.max_bytes / 1048576) });
  } else if (r.status !== 401) toast(`clip: ${(r.data && r.data.detail) || r.status}`, "error");
}

// a model swap offers the comparison first: the chosen model against the running one on the latest clip
let comparePoll = null;

function hideComparison() {
  clearTimeout(comparePoll);
  $("#compare").hidden = true;
  setData($("#compare"), "state", "none");
}

function renderComparison(c) {
  const box = $("#compare");
  box.hidden = false;
  setData(box, "state", c.state);
  const name = c.new ? c.new.split("/").pop() : "";
  const state = {
    running: `comparing ${name} with the running model on ${c.clip} ... (${c.elapsed_s} s)`,
    done: `${c.model_b} against ${c.model_a} on ${c.clip}:`,
    failed: `comparison failed: ${c.error}`,
    cancelled: "comparison cancelled",
  }[c.state] || c.state;
  setText($("#compare-state"), state);
  const body = $("#compare-table tbody");
  body.replaceChildren();
  const pct = (v) => (v === null || v === undefined ? "-" : `${(100 * v).toFixed(1)} %`);
  for (const [f, row] of Object.entries(c.fractions || {})) {
    const tr = el("tr", { "data-fraction": f });
    tr.append(el("td", {}, f));
    tr.append(el("td", {}, `${row.count_a} \u2192 ${row.count_b}`));
    tr.append(el("td", {}, `${pct(row.estimated_purity_a)} \u2192 ${pct(row.estimated_purity_b)}`));
    body.append(tr);
  }
  $("#compare-table").hidden = c.state !== "done";
  setText($("#compare-changed"), c.state === "done"
    ? `${c.changed} decisions change (${c.changed_fraction} to another fraction), of ${c.pieces_a} pieces`
    : "");
  $("#compare-page").hidden = c.state !== "done";
}

async function pollComparison() {
  const r = await api("GET", "/api/model/compare");
  if (!r.ok || r.data.state === "none") return;
  renderComparison(r.data);
  if (r.data.state === "running") comparePoll = setTimeout(pollComparison, 1000);
}

async function compareModel() {
  if (!chosenModel) { toast("choose a model first"); return; }
  clearTimeout(comparePoll);
  const r = await api("POST", "/api/model/compare", { path: chosenModel });
  if (r.ok) {
    renderComparison(r.data);
    comparePoll = setTimeout(pollComparison, 1000);
  } else if (r.status !== 401) toast(`comparison: ${(r.data && r.data.detail) || r.status}`, "error");
}

// shadow mode (docs/shadow.md): a candidate running beside the live model, never acted on; when the chosen model
// is the running shadow, its agreement by class and the pieces it decides otherwise show before the swap
let shadowPoll = null;

function renderShadow(data) {
  const box = $("#shadow");
  const s = data && data.shadow;
  const mine = s && chosenModel && s.path === chosenModel;
  box.hidden = !mine;
  setData(box, "state", mine ? "running" : "none");
  if (!mine) return;
  const pct = (v) => (v === null || v === undefined ? "-" : `${(100 * v).toFixed(1)} %`);
  setText($("#shadow-state"), `shadow ${s.model}: ${s.compared} pieces compared, ${s.skipped} skipped, `
    + `agreement ${pct(s.agreement)}`);
  const body = $("#shadow-table tbody");
  body.replaceChildren();
  for (const [c, row] of Object.entries(s.by_class || {})) {
    const tr = el("tr", { "data-class": c });
    tr.append(el("td", {}, c));
    tr.append(el("td", {}, String(row.pieces)));
    tr.append(el("td", {}, pct(row.agreement)));
    body.append(tr);
  }
  const crops = $("#shadow-crops");
  crops.replaceChildren();
  for (const d of (data.differing || []).slice(0, 24)) {
    const fig = el("figure", { "data-piece": String(d.piece_id) });
    if (d.has_crop) fig.append(el("img", { src: `/api/shadow/crop/${d.piece_id}`, alt: `piece ${d.piece_id}` }));
    fig.append(el("figcaption", {}, `${d.live_cls} \u2192 ${d.cls}`));
    crops.append(fig);
  }
}

async function pollShadow() {
  clearTimeout(shadowPoll);
  const r = await api("GET", "/api/shadow");
  if (!r.ok) return;
  renderShadow(r.data);
  if (r.data.shadow && chosenModel && r.data.shadow.path === chosenModel) shadowPoll = setTimeout(pollShadow, 2000);
}

async function shadow(action) {
  if (action === "start" && !chosenModel) { toast("choose a model first"); return; }
  if (action === "start") toast("checking the model ...");
  const r = await api("POST", `/api/shadow/${action}`, action === "start" ? { path: chosenModel } : undefined);
  if (r.ok) {
    toast(action === "start" ? `shadow ${r.data.version} running beside the live model` : "shadow stopped");
    pollShadow();
  } else if (r.status !== 401) toast(`shadow: ${(r.data && r.data.detail) || r.status}`, "error");
}

async function cancelSwap() {
  if ($("#compare").dataset.state === "running") await api("POST", "/api/model/compare/cancel");
  hideComparison();
  chosenModel = null;
  clearTimeout(shadowPoll);
  renderShadow(null);
  for (const o of $("#models").children) o.setAttribute("aria-pressed", "false");
}

// --- labelling (technician): one tap labels the crop shown and shows the next ---

let labels = null; // the server's last answer: queue head, counts, classes
let labelBusy = false;
let labelPoll = null;

async function openLabelling() {
  $("#labelling").hidden = false;
  setData($("#labelling"), "state", "loading");
  await loadLabels();
}

function closeLabelling() {
  clearTimeout(labelPoll);
  $("#labelling").hidden = true;
  setData($("#labelling"), "state", "closed");
}

async function loadLabels() {
  clearTimeout(labelPoll);
  const r = await api("GET", "/api/labels");
  if (r.ok) renderLabels(r.data);
  else if (r.status) { toast((r.data && r.data.detail) || `Labelling refused (${r.status})`, "error"); closeLabelling(); }
}

function renderLabels(d) {
  labels = d;
  const box = $("#label-classes");
  if (box.dataset.classes !== d.classes.join(",")) { // the model's classes: a swap may change them
    box.dataset.classes = d.classes.join(",");
    box.replaceChildren(...d.classes.map((cls) => {
      const b = el("button", { type: "button", "data-cls": cls }, cls);
      b.append(el("span", { class: "n" }));
      b.addEventListener("click", () => giveLabel(cls));
      return b;
    }));
  }
  const c = d.queue[0];
  for (const b of box.children) {
    setText(b.querySelector(".n"), `${d.labelled[b.dataset.cls] || 0} labelled`);
    setData(b, "guess", String(!!c && c.guess === b.dataset.cls));
    b.disabled = !c;
  }
  $("#label-discard").disabled = !c;
  $("#label-undo").disabled = !d.undo;
  setText($("#label-pending"), `${d.pending} waiting` + (d.dropped ? ` (${d.dropped} dropped: disk slow)` : ""));
  $("#label-empty").hidden = !!c;
  $("#label-info").hidden = !c;
  if (!c) {
    setData($("#labelling"), "id", "");
    setData($("#labelling"), "state", "empty");
    if (!$("#labelling").hidden) labelPoll = setTimeout(loadLabels, 2000); // crops come as the line sorts
    return;
  }
  $("#label-crop").src = c.crop;
  setText($("#label-guess"), c.guess);
  setText($("#label-conf"), `${Math.round(c.confidence * 100)} %`);
  setText($("#label-image"), `${c.image_guess} ${Math.round(c.image_confidence * 100)} %`);
  setText($("#label-field"), c.field_mT === null ? "no reading" : `${fmt(c.field_mT, 1)} mT`);
  setText($("#label-area"), `${fmt(c.area_mm2)} mm²`);
  const why = { disagree: "camera and field disagree", uncertain: "low confidence", sample: "random check",
    shadow: `shadow model says ${c.shadow}` };
  setText($("#label-reason"), why[c.reason] || c.reason);
  for (const n of d.queue.slice(1)) new Image().src = n.crop; // the next ones show at once
  setData($("#labelling"), "id", c.id);
  setData($("#labelling"), "state", "ready");
}

async function labelRequest(method, path, body) {
  if (labelBusy) return;
  labelBusy = true;
  setData($("#labelling"), "state", "busy");
  const r = await api(method, path, body);
  labelBusy = false;
  if (r.ok) renderLabels(r.data);
  else {
    toast((r.data && r.data.detail) || `Refused (${r.status})`, "error");
    await loadLabels(); // labelled meanwhile elsewhere, or nothing to undo: show what is there now
  }
}

function giveLabel(cls) {
  const c = labels && labels.queue[0];
  if (c) labelRequest("POST", `/api/labels/${encodeURIComponent(c.id)}`, { class: cls });
}

function discardLabel() {
  const c = labels && labels.queue[0];
  if (c) labelRequest("POST", `/api/labels/${encodeURIComponent(c.id)}/discard`);
}

// --- start ---

document.addEventListener("pointerdown", () => {
  // a touch on the panel is activity: it keeps the session from expiring while someone is there
  const now = Date.now();
  if (ws && ws.readyState === WebSocket.OPEN && now - lastActivitySent > 5000) {
    lastActivitySent = now;
    ws.send(JSON.stringify({ type: "activity" }));
  }
}, { passive: true });

window.addEventListener("DOMContentLoaded", async () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  for (const b of document.querySelectorAll(".stepper .step")) b.addEventListener("click", step);
  $("#thr-apply").addEventListener("click", applyThresholds);
  $("#model-swap").addEventListener("click", swapModel);
  $("#model-compare").addEventListener("click", compareModel);
  $("#model-cancel").addEventListener("click", cancelSwap);
  $("#shadow-start").addEventListener("click", () => shadow("start"));
  $("#shadow-stop").addEventListener("click", () => shadow("stop"));
  $("#clip-start").addEventListener("click", () => clip("start"));
  $("#clip-stop").addEventListener("click", () => clip("stop"));
  $("#labels-open").addEventListener("click", openLabelling);
  $("#label-close").addEventListener("click", closeLabelling);
  $("#label-discard").addEventListener("click", discardLabel);
  $("#label-undo").addEventListener("click", () => labelRequest("POST", "/api/labels/undo"));
  const r = await api("GET", "/api/session");
  if (r.ok) { session = r.data; showMain(); }
  else showLogin(r.status === 401 && r.data && r.data.detail !== "not logged in" ? goneMessage(r.data.detail) : "");
});
