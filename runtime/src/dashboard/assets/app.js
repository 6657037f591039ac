// wasmq dashboard: polls /api/state and draws it. No library: tables are built with DOM
// calls (text only, never HTML from the data), charts are SVG paths.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function pill(text, kind) {
  return el("span", { class: "pill " + (kind || text) }, text);
}

function ago(seconds, now) {
  if (!seconds) return "";
  const d = Math.max(0, now - seconds);
  if (d < 1) return "just now";
  if (d < 90) return Math.round(d) + " s ago";
  if (d < 5400) return Math.round(d / 60) + " min ago";
  return new Date(seconds * 1000).toLocaleString();
}

function runtime(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 0.001) return (seconds * 1e6).toFixed(0) + " µs";
  if (seconds < 1) return (seconds * 1e3).toFixed(1) + " ms";
  return seconds.toFixed(2) + " s";
}

function fill(table, rows, columns, empty) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (rows.length === 0) {
    body.append(el("tr", { class: "empty" }, el("td", { colspan: columns }, empty)));
    return;
  }
  for (const cells of rows) body.append(el("tr", {}, ...cells));
}

function td(content, cls, title) {
  return el("td", { class: cls, title: title }, content);
}

function renderWorkers(state) {
  const rows = state.workers.map((w) => {
    const running = w.running.map((t) => (t.name || "?") + "[" + String(t.id).slice(0, 8) + "]");
    const hits = Object.entries(w.limit_hits || {}).map(([k, v]) => k + " " + v).join(", ");
    return [
      td(w.hostname, "mono"),
      td(pill(w.online ? "online" : "offline")),
      td((w.sw_ident || "?") + " " + (w.sw_ver || "")),
      td(w.active, "num"),
      td(w.concurrency === null || w.concurrency === undefined ? "–" : w.concurrency, "num",
        "task slots, from inspect stats (none on the embedded broker)"),
      td(w.processed, "num"),
      td((w.loadavg || []).map((x) => x.toFixed(2)).join(" "), "num"),
      td(running.length ? running.join(", ") : "idle", "mono clip", running.join("\n")),
      td(w.limit_hits_total ? el("span", { class: "err", title: hits }, w.limit_hits_total + " (" + hits + ")") : "0", "num"),
    ];
  });
  fill(document.getElementById("workers"), rows, 9, "No worker heard of yet.");
}

function renderQueues(state) {
  const rows = state.queues.map((q) => [
    td(q.name, "mono"),
    td(q.length === null || q.length === undefined ? "…" : q.length, "num"),
    td(q.dead === null || q.dead === undefined ? "…" : q.dead, q.dead ? "num err" : "num"),
    td(q.consumers.join(", "), "mono"),
  ]);
  fill(document.getElementById("queues"), rows, 4, "No queue known yet.");
}

function renderTasks(state) {
  const rows = state.tasks.map((t) => {
    const args = [t.args, t.kwargs && t.kwargs !== "{}" ? t.kwargs : null].filter(Boolean).join(" ");
    const outcome = t.exception ? el("span", { class: "err" }, t.exception) : (t.result ?? "");
    return [
      td(t.uuid, "mono"),
      td(t.name || "", "mono"),
      td(pill(t.state)),
      td(args, "mono clip", args),
      td(outcome, "mono clip", t.exception || t.result || ""),
      td(runtime(t.runtime), "num"),
      td(t.hostname || "", "mono"),
      td(ago(t.timestamp, state.now)),
    ];
  });
  fill(document.getElementById("tasks"), rows, 8, search.value ? "No task matches." :
    "No task events yet (workers send them with -E, or once the dashboard switched them on).");
}

function renderDead(state) {
  const rows = state.dead_letters.map((d) => [
    td(d.queue, "mono"),
    td(d.task_id || "", "mono"),
    td(d.task || "", "mono"),
    td(d.reason, "clip", d.reason),
    td(d.deliveries, "num"),
    td(ago(d.dead_at, state.now)),
  ]);
  fill(document.getElementById("dead"), rows, 6, "No dead letters.");
}

function renderCards(state) {
  const counts = state.task_counts || {};
  const online = state.workers.filter((w) => w.online).length;
  const waiting = state.queues.reduce((sum, q) => sum + (q.length || 0), 0);
  const last = state.series.throughput.slice(-10);
  const rate = last.reduce((a, b) => a + b, 0) / last.length;
  const hits = state.workers.reduce((sum, w) => sum + (w.limit_hits_total || 0), 0);
  const cards = [
    [online + " / " + state.workers.length, "workers online"],
    [waiting, "messages waiting"],
    [rate.toFixed(1) + "/s", "throughput, last 10 s"],
    [(counts.SUCCESS || 0) + " / " + (counts.FAILURE || 0), "succeeded / failed, latest " + state.tasks_kept],
    [hits, "sandbox limit hits"],
    [state.dead_letters.length, "dead letters"],
  ];
  document.getElementById("cards").replaceChildren(
    ...cards.map(([value, label]) => el("div", { class: "card" }, el("b", {}, value), el("span", {}, label))));
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

// Draws `lines` ({values, color}) over the last len(values) seconds, y from 0 to the max.
function chart(id, lines, unit) {
  const box = document.getElementById(id);
  const width = Math.max(200, box.clientWidth || 560), height = 140;
  const left = 40, right = 8, top = 8, bottom = 18;
  box.setAttribute("viewBox", "0 0 " + width + " " + height);
  box.replaceChildren();
  const all = lines.flatMap((l) => l.values.filter((v) => v !== null));
  const max = Math.max(1e-9, ...all) * 1.1 || 1;
  const n = lines[0].values.length;
  const x = (i) => left + (i / (n - 1)) * (width - left - right);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  for (const f of [0, 0.5, 1]) {
    box.append(svg("line", { class: "grid", x1: left, x2: width - right, y1: y(max * f), y2: y(max * f) }));
    const label = svg("text", { x: left - 4, y: y(max * f) + 3, "text-anchor": "end" });
    const value = max * f / 1.1;
    label.textContent = (value >= 10 ? value.toFixed(0) : value.toFixed(value >= 1 ? 1 : 2)) + (f === 1 ? " " + unit : "");
    box.append(label);
  }
  for (const [i, text] of [[0, "-2 min"], [(n - 1) / 2, "-1 min"], [n - 1, "now"]]) {
    const label = svg("text", { x: x(i), y: height - 4, "text-anchor": i === 0 ? "start" : i === n - 1 ? "end" : "middle" });
    label.textContent = text;
    box.append(label);
  }
  for (const line of lines) {
    let d = "", pen = false;
    line.values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      d += (pen ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1);
      pen = true;
    });
    if (d) box.append(svg("path", { class: "line", d: d, stroke: line.color }));
  }
}

function render(state) {
  document.getElementById("broker").textContent = state.broker + " · wasmq " + state.version;
  renderCards(state);
  chart("chart-throughput", [
    { values: state.series.throughput, color: "#6d28d9" },
    { values: state.series.failed, color: "#b91c1c" },
  ], "/s");
  chart("chart-runtime", [
    { values: state.series.runtime_max_ms, color: "#f59e0b" },
    { values: state.series.runtime_mean_ms, color: "#1d4ed8" },
  ], "ms");
  renderWorkers(state);
  renderQueues(state);
  renderTasks(state);
  renderDead(state);
  const errors = Object.entries(state.errors || {}).map(([k, v]) => k + ": " + v);
  document.getElementById("errors").textContent = errors.join(" · ");
  document.getElementById("updated").textContent =
    "updated " + new Date(state.now * 1000).toLocaleTimeString() + " · " + state.events_seen + " events";
  document.body.dataset.rendered = "1";
}

// The search box filters the tasks; `/?search=TEXT` opens the page with it filled in.
const search = document.getElementById("search");
search.value = new URLSearchParams(location.search).get("search") || "";
search.addEventListener("change", () => {
  const url = new URL(location.href);
  if (search.value) url.searchParams.set("search", search.value); else url.searchParams.delete("search");
  history.replaceState(null, "", url);
});

async function refresh() {
  try {
    const query = "tasks=100" + (search.value ? "&search=" + encodeURIComponent(search.value) : "");
    const response = await fetch("/api/state?" + query, { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (error) {
    document.getElementById("updated").textContent = "cannot reach the dashboard: " + error.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
