// The live page: one EventSource; `snapshot` on connect, then `state` and `telemetry` events.
// Every value is written with textContent (never as HTML). window.jetfedPage is for tests.
"use strict";
(function () {
  const WINDOW_S = 300;
  const COLORS = ["#1a5fb4", "#e66100", "#26a269", "#9141ac", "#c01c28", "#865e3c", "#63452c", "#3d3846"];
  const page = { state: null, telemetry: {}, charts: {}, events: 0 };
  window.jetfedPage = page;

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function bytes(v) {
    if (v === null || v === undefined) return "–";
    const units = ["B", "KB", "MB", "GB"];
    let i = 0;
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return i === 0 ? v.toFixed(0) + " B" : v.toFixed(1) + " " + units[i];
  }
  function num(v, digits) { return v === null || v === undefined ? "n/a" : Number(v).toFixed(digits); }
  function ago(t, now) { return t ? Math.max(0, now - t).toFixed(0) + " s ago" : "–"; }
  function row(cells) { const tr = el("tr"); cells.forEach((c) => tr.appendChild(c instanceof Node ? c : el("td", c))); return tr; }

  function renderFleet(state) {
    const body = document.querySelector("#fleet tbody");
    body.replaceChildren(...state.devices.map((d) => {
      const step = d.step === null || d.step === undefined ? "–" : d.step + "/" + d.total_steps;
      const status = el("td", d.status, "status-" + String(d.status).replace(" ", "."));
      const tr = row([el("td", d.device_id), status, step, bytes(d.bytes_received), bytes(d.bytes_sent),
        d.model || "–", d.backend || "–", d.jetpack || "–", d.power_mode || "–", ago(d.last_seen_unix_s, state.now_unix_s)]);
      tr.dataset.device = d.device_id;
      return tr;
    }));
    const r = state.round;
    const counter = document.getElementById("round-counter");
    const total = state.rounds_total ? " of " + state.rounds_total : "";
    const done = state.run.runs.length ? state.run.runs[0].rounds.length : 0;
    if (state.finished) counter.textContent = "finished: " + done + " rounds";
    else if (r) counter.textContent = "round " + r.round_index + total;
    counter.dataset.round = r ? r.round_index : "";
    counter.dataset.completed = done;
    const line = document.getElementById("round-line");
    line.textContent = r ? "round " + r.round_index + ": " + r.accepted.length + "/" + r.selected.length +
      " updates in, quorum " + r.min_clients + ", deadline in " +
      Math.max(0, r.deadline_unix_s - state.now_unix_s).toFixed(0) + " s" : "";
  }

  function runTable(run, metric) {
    const extras = new Set();
    run.rounds.forEach((r) => Object.keys(r.extra || {}).forEach((k) => { if (k !== "peak_rss_bytes") extras.add(k); }));
    const extraNames = [...extras].sort();
    const table = el("table");
    table.className = "run-table";
    table.dataset.label = run.label;
    const head = ["round", "status", "devices", metric, "train loss", "eval loss", ...extraNames, "up", "down", "s", "J"];
    table.appendChild(el("thead")).appendChild(row(head.map((h) => el("th", h))));
    const body = table.appendChild(el("tbody"));
    run.rounds.forEach((r) => {
      const tr = row([String(r.round_index), r.status, r.devices, num(r.accuracy, 4), num(r.train_loss, 4), num(r.eval_loss, 4),
        ...extraNames.map((k) => num(r.extra[k], 4)), bytes(r.bytes_up), bytes(r.bytes_down), num(r.round_s, 1), num(r.energy_j, 1)]);
      tr.dataset.round = r.round_index;
      tr.dataset.accuracy = r.accuracy === null ? "" : r.accuracy;
      body.appendChild(tr);
    });
    return table;
  }

  function phaseTable(run) {
    const phases = new Set();
    run.rounds.forEach((r) => Object.entries(r.energy_by_phase_j).forEach(([p, j]) => { if (j !== null) phases.add(p); }));
    if (!phases.size) return el("p", "no per-phase energy measured (no power sensor on the devices)", "muted");
    const names = [...phases];
    const table = el("table");
    table.appendChild(el("thead")).appendChild(row(["round", ...names.map((p) => p + " J")].map((h) => el("th", h))));
    const body = table.appendChild(el("tbody"));
    run.rounds.forEach((r) => body.appendChild(row([String(r.round_index), ...names.map((p) => num(r.energy_by_phase_j[p], 1))])));
    return table;
  }

  function renderRuns(state) {
    const box = document.getElementById("runs");
    const parts = [];
    const target = state.run.target_accuracy;
    const metric = state.run.metric;
    state.run.runs.forEach((run) => {
      parts.push(el("h3", run.label + " (" + run.name + ")"));
      parts.push(runTable(run, metric));
      parts.push(el("h3", "energy per phase, all devices"));
      parts.push(phaseTable(run));
      const t = run.to_target;
      if (t && target !== null) {
        parts.push(el("p", t.reached ? "to " + metric + " " + num(target, 3) + ": " + t.rounds + " rounds, " + num(t.time_s, 1) +
          " s, " + (t.energy_j === null ? "n/a" : num(t.energy_j, 1) + " J") + ", " + bytes(t.bytes_total)
          : metric + " " + num(target, 3) + " not reached", "muted"));
      }
    });
    box.replaceChildren(...parts);
    renderAccuracy(state);
  }

  function renderAccuracy(state) {
    const box = document.getElementById("accuracy-chart");
    const runs = state.run.runs.filter((r) => r.rounds.some((x) => x.accuracy !== null));
    if (!runs.length) { box.replaceChildren(); page.accuracyChart = null; return; }
    const xs = [...new Set(runs.flatMap((r) => r.rounds.map((x) => x.wall_clock_s)))].sort((a, b) => a - b);
    const data = [xs, ...runs.map((r) => xs.map((x) => { const m = r.rounds.find((q) => q.wall_clock_s === x); return m ? m.accuracy : null; }))];
    const series = [{ label: "s" }, ...runs.map((r, i) => ({ label: r.label, stroke: COLORS[i % COLORS.length], spanGaps: true, points: { show: true } }))];
    box.replaceChildren();
    page.accuracyChart = new uPlot({ title: state.run.metric + " vs wall-clock s", width: Math.min(900, box.clientWidth || 900), height: 220,
      scales: { x: { time: false } }, series, axes: [{ label: "s" }, { label: state.run.metric }] }, data, box);
  }

  function powerSeries(rows) {
    const rails = [...new Set(rows.flatMap((r) => Object.keys(r.rails_w)))].sort();
    const hasPower = rows.some((r) => r.total_w !== null || Object.values(r.rails_w).some((w) => w !== null));
    if (hasPower) {
      return { unit: "W", names: [...rails.map((r) => r + " W"), "module W"],
        values: (r) => [...rails.map((n) => (n in r.rails_w ? r.rails_w[n] : null)), r.total_w] };
    }
    return { unit: "MB", names: ["process RSS MB", "system used MB"],
      values: (r) => [r.rss_bytes === null ? null : r.rss_bytes / 1e6, r.system_used_bytes === null ? null : r.system_used_bytes / 1e6] };
  }

  function renderPower() {
    const box = document.getElementById("power");
    const devices = Object.keys(page.telemetry).sort();
    if (devices.length && box.querySelector("p")) box.replaceChildren();
    devices.forEach((id) => {
      const rows = page.telemetry[id];
      const last = rows.length ? rows[rows.length - 1].t : 0;
      while (rows.length && rows[0].t < last - WINDOW_S) rows.shift();
      const spec = powerSeries(rows);
      const data = [rows.map((r) => r.t)];
      spec.names.forEach(() => data.push([]));
      rows.forEach((r) => spec.values(r).forEach((v, i) => data[i + 1].push(v)));
      const key = spec.names.join("|");
      let chart = page.charts[id];
      if (!chart || chart.key !== key) {
        if (chart) chart.plot.destroy();
        let holder = box.querySelector('[data-device="' + CSS.escape(id) + '"]');
        if (!holder) { holder = el("div", null, "chart"); holder.dataset.device = id; box.appendChild(holder); }
        holder.replaceChildren(el("h3", id + (spec.unit === "W" ? " power" : " memory (no power sensor)")));
        const series = [{}, ...spec.names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length] }))];
        chart = { key, plot: new uPlot({ width: 430, height: 200, series, axes: [{}, { label: spec.unit }] }, data, holder) };
        page.charts[id] = chart;
      } else {
        chart.plot.setData(data);
      }
      chart.points = rows.length;
    });
  }

  function apply(state) {
    page.state = state;
    if (!state.live) document.getElementById("connection").textContent = "finished runs";
    document.getElementById("title").textContent = state.title;
    renderFleet(state);
    renderRuns(state);
  }

  function addTelemetry(fresh) {
    Object.entries(fresh).forEach(([id, rows]) => {
      const known = page.telemetry[id] || [];
      const last = known.length ? known[known.length - 1].t : -Infinity;
      page.telemetry[id] = known.concat(rows.filter((r) => r.t > last));  // a snapshot may overlap
    });
    renderPower();
  }

  const events = new EventSource("/api/events");
  const connection = document.getElementById("connection");
  events.onopen = () => { connection.textContent = "live"; };
  events.onerror = () => { connection.textContent = "reconnecting"; };
  events.addEventListener("snapshot", (e) => {
    const state = JSON.parse(e.data);
    page.telemetry = {};
    addTelemetry(state.telemetry);
    apply(state);
    page.events++;
  });
  events.addEventListener("state", (e) => { apply(JSON.parse(e.data)); page.events++; });
  events.addEventListener("telemetry", (e) => { addTelemetry(JSON.parse(e.data)); page.events++; });
})();
