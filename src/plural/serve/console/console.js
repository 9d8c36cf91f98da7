// plural console: plain JavaScript, no build step, no library. Every request goes to this page's
// own origin with the key the user typed (kept in sessionStorage, i.e. this tab only).
// Views follow location.hash (#/compare, #/adapters, #/runs/<id>, #/reports/<id>), so a reload
// shows the same view; what a view shows is read from the server each time.
"use strict";

const KEY = "plural.console.key";
const SETTINGS = "plural.console.compare";
let me = null;          // /console/api/whoami
let models = [];        // /v1/models data
let timer = null;       // the current view's refresh
let compareRun = 0;     // bumps on each Compare click; stale streams stop writing
const shown = {};       // view -> the JSON it last drew: a refresh that changes nothing redraws nothing
                        // (so an open <details> or a scrolled config stays as the user left it)

function unchanged(view, data) {
  const text = JSON.stringify(data);
  if (shown[view] === text) return true;
  shown[view] = text;
  return false;
}

// ------------------------------------------------------------------ small helpers

function $(id) { return document.getElementById(id); }

// el("td", {class: "num", title: "x"}, "text", childNode...): DOM built with textContent only,
// so nothing a server file holds is ever parsed as HTML.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "onclick") e.addEventListener("click", v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const r = await fetch(path, opts);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!r.ok) {
    const msg = body && body.error ? body.error.message : (text || r.statusText);
    throw new ApiError(r.status, msg);
  }
  return body === null ? text : body;
}

function fmtNum(v, digits) {
  if (v === null || v === undefined || typeof v !== "number") return "–";
  return Number.isInteger(v) && digits === undefined ? String(v) : v.toFixed(digits === undefined ? 4 : digits);
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + u[i];
}

function fmtTime(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "–";
}

function short(s, n) { s = String(s || ""); return s.length > n ? s.slice(0, n) + "…" : s; }

function notice(text, kind) {
  const n = $("notice");
  n.textContent = text || "";
  n.className = "notice " + (kind || "");
  n.hidden = !text;
}

function problemList(problems) {
  if (!problems || !problems.length) return null;
  return el("ul", {class: "problems"}, problems.map(p =>
    el("li", {}, typeof p === "string" ? p : (p.file + (p.line ? ":" + p.line : "") + ": " + p.message))));
}

// ------------------------------------------------------------------ start, key, routing

async function start() {
  $("change-key").addEventListener("click", () => askKey(""));
  $("key-form").addEventListener("submit", ev => { ev.preventDefault(); useKey($("key-input").value.trim()); });
  $("run").addEventListener("click", compare);
  $("suite-prompt").addEventListener("change", () => { if ($("suite-prompt").value) $("prompt").value = $("suite-prompt").value; });
  $("load-form").addEventListener("submit", loadAdapter);
  window.addEventListener("hashchange", route);
  const auth = await api("/console/api/auth");
  if (auth.keys_required && !sessionStorage.getItem(KEY)) return askKey("");
  await signIn();
}

function askKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  document.querySelector("main").hidden = true;
  $("key-input").focus();
}

async function useKey(key) {
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
  await signIn();
}

async function signIn() {
  try {
    me = await api("/console/api/whoami");
    models = (await api("/v1/models")).data;
  } catch (e) {
    if (e.status === 401) { sessionStorage.removeItem(KEY); return askKey("That key was refused: " + e.message); }
    throw e;
  }
  $("key-form").hidden = true;
  document.querySelector("main").hidden = false;
  $("who-text").textContent = "tenant " + me.tenant + (me.admin ? " (admin)" : "");
  document.body.classList.toggle("is-admin", me.admin);
  for (const a of document.querySelectorAll("#tabs a")) {
    if (a.dataset.view === "runs" || a.dataset.view === "reports") a.hidden = !me.runs;
  }
  fillVariants();
  route();
}

function route() {
  if (!me) return;
  for (const k of Object.keys(shown)) delete shown[k];
  clearInterval(timer);
  timer = null;
  notice("");
  const parts = (location.hash.replace(/^#\/?/, "") || "compare").split("/");
  let view = parts[0];
  const arg = decodeURIComponent(parts.slice(1).join("/"));
  if (!["compare", "adapters", "runs", "reports"].includes(view)) view = "compare";
  if ((view === "runs" || view === "reports") && !me.runs) {
    notice("Runs and reports are shown to the admin key only (this server has API keys).", "warn");
    view = "compare";
  }
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== "view-" + view;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === view);
  const show = {compare: showCompare, adapters: showAdapters, runs: showRuns, reports: showReports}[view];
  const refresh = () => show(arg).catch(err => notice(String(err.message || err), "error"));
  refresh();
  // Runs change while they train, adapters move in and out of the LRU: re-read every few seconds.
  if (view === "runs" || view === "adapters") timer = setInterval(refresh, view === "runs" ? 2000 : 4000);
}

// ------------------------------------------------------------------ compare

function fillVariants() {
  const box = $("variants");
  for (const c of [...box.querySelectorAll("label")]) c.remove();
  const saved = JSON.parse(sessionStorage.getItem(SETTINGS) || "{}");
  const chosen = saved.variants || models.slice(0, 2).map(m => m.id);
  for (const m of models) {
    box.append(el("label", {class: "variant"},
      el("input", {type: "checkbox", value: m.id, checked: chosen.includes(m.id)}), " ", m.id,
      m.parent ? el("span", {class: "meta"}, " (adapter)") : el("span", {class: "meta"}, " (base)")));
  }
  for (const [id, key] of [["seed", "seed"], ["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"]]) {
    if (saved[key] !== undefined) $(id).value = saved[key];
  }
  if (saved.prompt) $("prompt").value = saved.prompt;
}

const LAST = "plural.console.last";  // the last comparison's answers: a reload shows them again

async function showCompare() {
  const last = JSON.parse(sessionStorage.getItem(LAST) || "null");
  if (last && !$("columns").children.length) {
    // only the models this key still sees
    const cols = makeColumns(last.columns.filter(c => models.some(m => m.id === c.id)).map(c => c.id), last.systems);
    cols.forEach(c => {
      const was = last.columns.find(x => x.id === c.id);
      Object.assign(c, {text: was.text, done: was.done});
      c.answer.textContent = was.text;
      c.stats.textContent = was.stats;
    });
    highlight(cols);
    $("compare-status").textContent = "last comparison (" + last.when + ")";
  }
  const sel = $("suite-prompt");
  if (sel.options.length > 1 || !me.runs) return;
  const prompts = await api("/console/api/prompts");
  for (const p of prompts) sel.append(el("option", {value: p.prompt}, "[" + p.suite + "] " + short(p.prompt, 80)));
}

function systemPrompts() {
  // The adapters endpoint carries each model's system prompt (value profile), tenant-filtered.
  return api("/console/api/adapters").then(rows => Object.fromEntries(rows.map(r => [r.id, r.system_prompt])));
}

function makeColumns(ids, systems) {
  const cols = $("columns");
  cols.replaceChildren();
  return ids.map(id => {
    const answer = el("div", {class: "answer", "data-model": id});
    const stats = el("div", {class: "stats"}, "waiting…");
    const sys = systems[id];
    cols.append(el("div", {class: "column", "data-model": id},
      el("h3", {}, id),
      sys ? el("details", {class: "system", open: true}, el("summary", {}, "system prompt (value profile)"), el("pre", {}, sys))
          : el("div", {class: "meta"}, "no system prompt"),
      answer, stats));
    return {id, answer, stats, text: "", done: false};
  });
}

async function compare() {
  const ids = [...document.querySelectorAll("#variants input:checked")].map(i => i.value);
  const prompt = $("prompt").value.trim();
  if (ids.length < 2 || ids.length > 4) return notice("Pick 2 to 4 variants.", "warn");
  if (!prompt) return notice("Type a prompt (or pick one from a suite).", "warn");
  notice("");
  const sampling = {seed: parseInt($("seed").value || "0", 10), temperature: parseFloat($("temperature").value || "0"),
                    top_p: parseFloat($("top-p").value || "1"), max_tokens: parseInt($("max-tokens").value || "64", 10)};
  sessionStorage.setItem(SETTINGS, JSON.stringify(Object.assign({variants: ids, prompt}, sampling)));
  const run = ++compareRun;
  const systems = await systemPrompts();
  const columns = makeColumns(ids, systems);
  $("compare-status").textContent = "streaming…";
  $("run").disabled = true;
  await Promise.all(columns.map(c => streamColumn(c, prompt, sampling, run)));
  if (run !== compareRun) return;
  $("run").disabled = false;
  $("compare-status").textContent = "done";
  sessionStorage.setItem(LAST, JSON.stringify({when: new Date().toISOString().slice(0, 19) + "Z", systems,
    columns: columns.map(c => ({id: c.id, text: c.text, done: c.done, stats: c.stats.textContent}))}));
  highlight(columns);
}

// One column: POST with stream=true and read the SSE body as it arrives (EventSource cannot POST).
async function streamColumn(col, prompt, sampling, run) {
  const t0 = performance.now();
  let tFirst = null, chunks = 0, usage = null;
  const body = Object.assign({model: col.id, messages: [{role: "user", content: prompt}], stream: true,
                              stream_options: {include_usage: true}}, sampling);
  const show = () => {
    const secs = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : chunks;
    col.stats.textContent = n + " tokens · " + (secs > 0 ? (n / secs).toFixed(1) : "–") + " tok/s" +
      (tFirst ? " · first token " + ((tFirst - t0) / 1000).toFixed(2) + " s" : "");
  };
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify(body)});
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || r.statusText);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          if (msg.usage) usage = msg.usage;
          const delta = msg.choices && msg.choices[0] && msg.choices[0].delta;
          if (delta && delta.content) {
            if (tFirst === null) tFirst = performance.now();
            chunks++;
            col.text += delta.content;
            if (run === compareRun) col.answer.textContent = col.text;
          }
        }
      }
      if (run === compareRun) show();
    }
    col.done = true;
    if (run === compareRun) show();
  } catch (e) {
    col.stats.textContent = "error: " + e.message;
    col.stats.classList.add("error");
  }
}

// Words (with their trailing space) of each column that are not in its longest common
// subsequence with the first column are marked; the first column is marked against the second.
function words(s) { return s.match(/\S+\s*|\s+/g) || []; }

function commonMask(a, b) {
  // LCS table over words; answers are at most a few hundred words, so O(n·m) is fine.
  const n = a.length, m = b.length;
  const L = Array.from({length: n + 1}, () => new Uint16Array(m + 1));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      L[i][j] = a[i].trim() === b[j].trim() ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const same = new Array(n).fill(false);
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (a[i].trim() === b[j].trim()) { same[i] = true; i++; j++; }
    else if (L[i + 1][j] >= L[i][j + 1]) i++;
    else j++;
  }
  return same;
}

function highlight(columns) {
  const ok = columns.filter(c => c.done);
  if (ok.length < 2) return;
  const ref = words(ok[0].text);
  ok.forEach((c, k) => {
    const w = words(c.text);
    const same = commonMask(w, k === 0 ? words(ok[1].text) : ref);
    // whitespace-only runs (an answer of newlines) are left unmarked and uncounted
    const differs = w.map((t, i) => !same[i] && t.trim() !== "");
    c.answer.replaceChildren(...w.map((t, i) => differs[i] ? el("mark", {}, t) : document.createTextNode(t)));
    const differ = differs.filter(Boolean).length;
    c.stats.append(el("span", {class: "diffcount"}, " · " + (differ ? differ + " word(s) differ from " + (k === 0 ? ok[1].id : ok[0].id) : "same as " + (k === 0 ? ok[1].id : ok[0].id))));
  });
}

// ------------------------------------------------------------------ adapters

async function showAdapters() {
  const rows = await api("/console/api/adapters");
  if (unchanged("adapters", rows)) return;
  const tbody = document.querySelector("#adapters-table tbody");
  tbody.replaceChildren(...rows.map(r => el("tr", {"data-model": r.id},
    el("td", {title: r.path || null}, r.id),
    el("td", {}, r.base || "–"),
    el("td", {}, r.method || "–"),
    el("td", {class: "mono"}, r.data.length ? r.data.map(d => el("div", {title: (d.path || "") + " " + (d.sha256 || "")}, short(d.sha256, 19))) : "–"),
    el("td", {}, r.created || "–"),
    el("td", {class: "mono"}, Object.keys(r.metrics).length ? Object.entries(r.metrics).map(([k, v]) =>
      el("div", {}, k + " = " + (typeof v === "number" ? fmtNum(v) : short(JSON.stringify(v), 40)))) : "–"),
    el("td", {class: "num"}, r.size === null ? "–" : fmtBytes(r.size)),
    el("td", {class: "num"}, r.rank === null ? "–" : r.rank),
    el("td", {class: "resident"}, r.trust === "base model" ? "always" : r.resident === null ? "–" : (r.resident ? "yes" : "no") + (r.running ? " (" + r.running + " running)" : "")),
    el("td", {class: "trust " + r.trust.replace(/[^a-z]+/g, "-")}, r.signer ? r.signer + " (" + r.trust + ")" : r.trust, r.digest ? el("div", {class: "mono meta", title: r.digest}, short(r.digest, 19)) : null),
    el("td", {}, r.system_prompt ? el("details", {}, el("summary", {}, short(r.system_prompt, 30)), el("pre", {}, r.system_prompt)) : "–",
      problemList(r.problems)),
    el("td", {class: "admin-only"}, me.admin && r.trust !== "base model" ? el("button", {type: "button", onclick: () => unload(r.id)}, "unload") : null))));
  $("load-form").hidden = !me.admin;
}

async function unload(id) {
  if (!confirm("Unload " + id + "? Requests for it will answer 404.")) return;
  try {
    await api("/admin/adapters/" + encodeURIComponent(id), {method: "DELETE"});
    models = (await api("/v1/models")).data;
    fillVariants();
    await showAdapters();
  } catch (e) { notice(e.message, "error"); }
}

async function loadAdapter(ev) {
  ev.preventDefault();
  $("load-status").textContent = "loading…";
  try {
    await api("/admin/adapters", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({name: $("load-name").value.trim(), path: $("load-path").value.trim()})});
    $("load-status").textContent = "loaded";
    models = (await api("/v1/models")).data;
    fillVariants();
    await showAdapters();
  } catch (e) { $("load-status").textContent = "refused: " + e.message; }
}

// ------------------------------------------------------------------ runs

async function showRuns(id) {
  const list = await api("/console/api/runs");
  const r = id ? await api("/console/api/runs/" + id.split("/").map(encodeURIComponent).join("/")) : null;
  if (unchanged("runs", [list, r, id])) return;
  $("runs-dir").textContent = list.runs_dir ? "runs folder: " + list.runs_dir + (list.exists ? "" : " (does not exist yet)")
                                            : "No runs_dir is configured (serve.yaml: runs_dir, or `plural console --runs DIR`).";
  document.querySelector("#runs-table tbody").replaceChildren(...list.runs.map(r => el("tr", {"data-run": r.id, class: r.id === id ? "selected" : null},
    el("td", {}, el("a", {href: "#/runs/" + encodeURIComponent(r.id)}, r.id)),
    el("td", {}, r.kind),
    el("td", {class: "status " + r.status.replace(/ /g, "-")}, r.status),
    el("td", {}, r.method || "–"),
    el("td", {class: "num"}, r.steps + (r.total ? " / " + r.total : "")),
    el("td", {class: "num"}, fmtNum(r.last_loss, 4)),
    el("td", {class: "num"}, r.checkpoints || "none"),
    el("td", {}, r.problems ? r.problems + " note(s)" : ""))));
  if (!list.runs.length) document.querySelector("#runs-table tbody").append(el("tr", {}, el("td", {colspan: 8, class: "meta"}, "No runs found.")));
  const box = $("run-detail");
  if (!r) return box.replaceChildren();
  const parts = [el("h2", {}, r.id, " ", el("span", {class: "status " + r.status.replace(/ /g, "-")}, r.status))];
  parts.push(problemList(r.problems_list));
  if (r.kind === "train") {
    parts.push(el("h3", {}, "loss"));
    parts.push(r.log.length ? lossChart(r.log) : el("p", {class: "meta"}, "No steps logged yet."));
  } else {
    parts.push(el("h3", {}, "rounds"), roundsTable(r.rounds));
    if (r.final_eval) parts.push(el("p", {}, "held-out loss of the final global adapter: " + fmtNum(r.final_eval.eval_loss, 4)));
  }
  parts.push(el("h3", {}, "checkpoints"));
  parts.push(r.checkpoint_list.length ? el("ul", {class: "checkpoints"}, r.checkpoint_list.map(c => el("li", {}, c.name + " · " + fmtTime(c.modified))))
                                      : el("p", {class: "meta no-checkpoints"}, "No checkpoints in this run."));
  parts.push(el("h3", {}, "resolved config"), r.config ? el("pre", {class: "config"}, r.config) : el("p", {class: "meta"}, "No config.yaml."));
  box.replaceChildren(...parts.filter(Boolean));
}

function roundsTable(rounds) {
  if (!rounds.length) return el("p", {class: "meta"}, "No round finished yet.");
  const dp = rounds.some(r => r.epsilon !== null);
  return el("table", {class: "grid rounds"},
    el("tr", {}, ["round", "participants", "failed", "bytes sent", "bytes received", "train loss", "held-out loss (global)", dp ? "privacy ε (δ)" : null, "seconds"].filter(Boolean).map(h => el("th", {}, h))),
    rounds.map(r => el("tr", {},
      el("td", {class: "num"}, r.round), el("td", {}, r.participants.join(", ")), el("td", {}, r.failed.length ? r.failed.join(", ") : "–"),
      el("td", {class: "num"}, fmtBytes(r.bytes_sent)), el("td", {class: "num"}, fmtBytes(r.bytes_received)),
      el("td", {class: "num"}, fmtNum(r.train_loss, 4)), el("td", {class: "num"}, fmtNum(r.eval_loss, 4)),
      dp ? el("td", {class: "num"}, r.epsilon === null ? "–" : r.epsilon.toFixed(3) + " (" + r.delta + ")") : null,
      el("td", {class: "num"}, fmtNum(r.seconds, 1)))));
}

// An SVG line chart of train loss (and held-out loss where logged) against the step.
function lossChart(log) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 640, H = 240, P = {l: 52, r: 12, t: 12, b: 28};
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.setAttribute("class", "chart");
  const mk = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  const series = [["loss", "train loss", "#1f5fbf"], ["eval_loss", "held-out loss", "#d2691e"]]
    .map(([k, label, color]) => ({label, color, pts: log.filter(r => typeof r[k] === "number").map(r => [r.step, r[k]])}))
    .filter(s => s.pts.length);
  const xs = log.map(r => r.step), ys = series.flatMap(s => s.pts.map(p => p[1]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const X = x => P.l + (x - x0) / (x1 - x0) * (W - P.l - P.r);
  const Y = y => H - P.b - (y - y0) / (y1 - y0) * (H - P.t - P.b);
  mk("line", {x1: P.l, y1: H - P.b, x2: W - P.r, y2: H - P.b, class: "axis"});
  mk("line", {x1: P.l, y1: P.t, x2: P.l, y2: H - P.b, class: "axis"});
  mk("text", {x: P.l - 4, y: Y(y1) + 4, "text-anchor": "end"}, y1.toFixed(3));
  mk("text", {x: P.l - 4, y: Y(y0) + 4, "text-anchor": "end"}, y0.toFixed(3));
  mk("text", {x: X(x0), y: H - 8, "text-anchor": "start"}, "step " + x0);
  mk("text", {x: X(x1), y: H - 8, "text-anchor": "end"}, "step " + x1);
  series.forEach((s, i) => {
    mk("polyline", {points: s.pts.map(p => X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join(" "), fill: "none", stroke: s.color, "stroke-width": 1.6, class: "series", "data-series": s.label});
    if (s.pts.length === 1) mk("circle", {cx: X(s.pts[0][0]), cy: Y(s.pts[0][1]), r: 3, fill: s.color});
    mk("text", {x: W - P.r - 4, y: P.t + 12 + 14 * i, "text-anchor": "end", fill: s.color}, s.label + " " + s.pts[s.pts.length - 1][1].toFixed(4));
  });
  return svg;
}

// ------------------------------------------------------------------ reports

async function showReports(id) {
  const list = await api("/console/api/reports");
  $("reports-dir").textContent = list.runs_dir ? "reports under " + list.runs_dir : "No runs_dir is configured.";
  const box = $("reports-list");
  box.replaceChildren(...list.reports.map(r => el("div", {class: "report" + (r.id === id ? " selected" : ""), "data-report": r.id},
    el("h3", {}, el("a", {href: "#/reports/" + encodeURIComponent(r.id)}, r.id), " ",
      r.old_format ? el("span", {class: "badge old"}, "older format") : null),
    el("p", {class: "meta"}, [r.model, r.created, r.plural_version ? "plural " + r.plural_version : null, r.variants.length ? "variants: " + r.variants.join(", ") : null].filter(Boolean).join(" · ")),
    summary(r), problemList(r.problems))));
  if (!list.reports.length) box.append(el("p", {class: "meta"}, "No eval reports found."));
  const detail = $("report-detail");
  const r = list.reports.find(x => x.id === id);
  if (!r) return detail.replaceChildren();
  if (!r.has_html) return detail.replaceChildren(el("p", {class: "meta"}, "This report has no report.html."));
  const html = await api("/console/api/report-html/" + id.split("/").map(encodeURIComponent).join("/"));
  // sandbox="": the report's HTML runs no script and cannot reach this page or its key.
  const frame = el("iframe", {class: "report-frame", sandbox: "", title: "report " + id});
  frame.srcdoc = html;
  detail.replaceChildren(el("h2", {}, "report.html — " + id), frame);
}

function summary(r) {
  if (!r.suites.length) return el("p", {class: "meta"}, "No suites in this report.");
  const lines = r.findings.map(f => el("li", {class: f.verdict},
    (f.verdict === "better" ? "▲ " : "▼ ") + f.variant + " is significantly " + f.verdict + " than " + (r.reference || "the reference") +
    " on " + f.suite + " (" + f.metric + (f.difference !== null ? " " + (f.difference >= 0 ? "+" : "") + f.difference.toFixed(4) : "") + ")"));
  const quiet = r.compared.filter(s => !r.findings.some(f => f.suite === s));
  if (quiet.length) lines.push(el("li", {class: "meta"}, "no significant difference on " + quiet.join(", ")));
  const unknown = r.suites.filter(s => !r.compared.includes(s));
  if (unknown.length) lines.push(el("li", {class: "meta"}, "not compared with the reference (no differences in the report): " + unknown.join(", ")));
  return el("ul", {class: "findings"}, lines);
}

document.addEventListener("DOMContentLoaded", () => start().catch(e => notice(String(e.message || e), "error")));
