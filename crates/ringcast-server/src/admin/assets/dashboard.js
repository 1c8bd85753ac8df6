// The ringcast admin dashboard: reads one JSON snapshot a second from /admin/ws and draws it.
// No library: the charts are a few lines of canvas. window.ringcast exposes what the page holds
// (snapshot count, chart series) for the end-to-end test.
"use strict";

const POINTS = 120;
const CHARTS = [
  { id: "c_connections", title: "connections", unit: "", series: [["websocket", "#58a6ff", (s) => s.connections.websocket], ["tcp", "#d2a8ff", (s) => s.connections.tcp]] },
  { id: "c_messages", title: "messages /s", unit: "", series: [["in", "#3fb950", (s) => s.rates.messages_in], ["out", "#58a6ff", (s) => s.rates.messages_out], ["deliveries", "#f0883e", (s) => s.rates.deliveries]] },
  { id: "c_latency", title: "publish → delivery ms", unit: " ms", series: [["p50", "#3fb950", (s) => s.latency_ms.p50], ["p99", "#ff7b72", (s) => s.latency_ms.p99]] },
  { id: "c_bytes", title: "bytes /s", unit: "", series: [["in", "#3fb950", (s) => s.rates.bytes_in], ["out", "#58a6ff", (s) => s.rates.bytes_out]] },
  { id: "c_rss", title: "memory (RSS) MiB", unit: " MiB", series: [["rss", "#d2a8ff", (s) => s.process.rss_bytes == null ? null : s.process.rss_bytes / 1048576]] },
  { id: "c_cpu", title: "CPU % (of one core)", unit: "%", series: [["cpu", "#f0883e", (s) => s.process.cpu_percent]] },
];

const state = { snapshots: 0, series: {}, last: null };
window.ringcast = state;

function fmt(v, digits) {
  if (v == null || Number.isNaN(v)) return "–";
  if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + "k";
  return v.toFixed(digits == null ? 0 : digits);
}

function bytes(v) {
  if (v == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return v.toFixed(i ? 1 : 0) + " " + units[i];
}

function buildCharts() {
  const root = document.getElementById("charts");
  for (const c of CHARTS) {
    const div = document.createElement("div");
    div.className = "chart";
    const keys = c.series.map(([name, color]) => `<span><span class="key" style="background:${color}"></span>${name}</span>`).join("");
    div.innerHTML = `<div class="label"><span>${c.title}</span>${keys}<span class="max" id="${c.id}_max"></span></div><canvas id="${c.id}"></canvas>`;
    root.appendChild(div);
    state.series[c.id] = c.series.map(() => []);
  }
}

function draw(c) {
  const canvas = document.getElementById(c.id);
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio); }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  const all = state.series[c.id];
  let max = 0;
  for (const points of all) for (const v of points) if (v != null && v > max) max = v;
  const top = max > 0 ? max * 1.15 : 1;
  g.strokeStyle = "#2a3442";
  g.lineWidth = 1;
  for (let i = 1; i < 4; i++) { const y = Math.round((h * i) / 4) + 0.5; g.beginPath(); g.moveTo(0, y); g.lineTo(w, y); g.stroke(); }
  // The x scale widens with the history, from 30 points to POINTS, so a fresh page is readable.
  const span = Math.min(POINTS, Math.max(30, ...all.map((p) => p.length)));
  const step = w / (span - 1);
  c.series.forEach(([, color], k) => {
    const points = all[k];
    g.strokeStyle = color;
    g.lineWidth = 1.6;
    g.beginPath();
    let pen = false;
    points.forEach((v, i) => {
      const x = w - (points.length - 1 - i) * step;
      if (v == null) { pen = false; return; }
      const y = h - 2 - (v / top) * (h - 4);
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true;
    });
    g.stroke();
  });
  document.getElementById(c.id + "_max").textContent = "max " + fmt(max, max < 10 ? 2 : 0) + c.unit;
}

function row(cells) {
  const tr = document.createElement("tr");
  cells.forEach(([text, numeric]) => { const td = document.createElement("td"); td.textContent = text; if (numeric) td.className = "n"; tr.appendChild(td); });
  return tr;
}

function show(s) {
  state.snapshots++;
  state.last = s;
  const set = (id, text) => { document.getElementById(id).textContent = text; };
  set("node", `${s.node.name} · up ${s.node.uptime_s}s`);
  set("connections", fmt(s.connections.websocket));
  set("tcp_connections", fmt(s.connections.tcp));
  set("subscriptions", fmt(s.subscriptions));
  set("channels", fmt(s.channels.total) + (s.channels.truncated ? "+" : ""));
  set("messages_in", fmt(s.rates.messages_in));
  set("messages_out", fmt(s.rates.messages_out));
  set("deliveries", fmt(s.rates.deliveries));
  set("latency", `${fmt(s.latency_ms.p50, 2)} / ${fmt(s.latency_ms.p99, 2)}`);
  set("slow", fmt(s.totals.slow_disconnects));
  set("engine", `${s.engine.kind}: ${s.engine.state}`);
  document.getElementById("engine").title = s.engine.detail;
  set("rss", bytes(s.process.rss_bytes));
  set("cpu", s.process.cpu_percent == null ? "–" : fmt(s.process.cpu_percent, 1) + "%");
  for (const c of CHARTS) {
    c.series.forEach(([, , get], k) => {
      const points = state.series[c.id][k];
      points.push(get(s));
      if (points.length > POINTS) points.shift();
    });
    draw(c);
  }
  const top = document.getElementById("top");
  top.replaceChildren(...s.channels.top.map((t) => row([[t.channel], [fmt(t.subscribers), true]])));
  const refusals = document.getElementById("refusals");
  const rows = [];
  for (const [kind, reasons] of Object.entries(s.refusals)) {
    for (const [reason, n] of Object.entries(reasons)) rows.push(row([[kind], [reason || "–"], [fmt(n), true]]));
  }
  if (!rows.length) rows.push(row([["none"], [""], [""]]));
  refusals.replaceChildren(...rows);
}

function connect() {
  const status = document.getElementById("status");
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/admin/ws");
  ws.onopen = () => { status.textContent = "live"; status.className = "live"; };
  ws.onmessage = (e) => { try { show(JSON.parse(e.data)); } catch (err) { console.error(err); } };
  ws.onclose = (e) => {
    status.textContent = "disconnected"; status.className = "down";
    if (e.code === 1008) { location.reload(); return; } // session expired: back to the login form
    setTimeout(connect, 2000);
  };
}

buildCharts();
window.addEventListener("resize", () => CHARTS.forEach(draw));
connect();
