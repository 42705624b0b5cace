// celery-supervisor status page: polls /status and renders it. No framework, no build step, nothing
// fetched from elsewhere. Every value from the broker (hostnames, queue names, summaries) is data:
// it is escaped before it reaches the page.
"use strict";
(function () {
  const POLL_MS = 3000;
  const TREND_S = 15 * 60;        // the queue trend keeps the last 15 minutes...
  const TREND_MAX = 600;          // ...and at most this many points per queue
  const PROBLEMS = new Set(["lost", "dead", "unresponsive", "unknown"]);
  const trend = new Map();        // queue name -> [[t, length], ...]
  let lastDoc = null, lastNow = 0, lastOk = 0, failing = null;

  const $ = (id) => document.getElementById(id);
  const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
  const esc = (v) => (v === null || v === undefined) ? "-" : String(v).replace(/[&<>"']/g, (c) => ESC[c]);
  const num = (v, unit) => (v === null || v === undefined) ? "-" : (Math.round(v * 100) / 100) + (unit || "");
  function dur(s) {
    if (s === null || s === undefined || isNaN(s)) return "-";
    s = Math.max(0, s);
    if (s < 10) return s.toFixed(1) + "s";
    if (s < 120) return Math.round(s) + "s";
    if (s < 7200) return Math.round(s / 60) + "m";
    if (s < 172800) return Math.round(s / 3600) + "h";
    return Math.round(s / 86400) + "d";
  }
  const badge = (s) => `<span class="s s-${esc(s).replace(/[^a-z]/g, "")}">${esc(s)}</span>`;
  function table(head, rows) {
    if (!rows.length) return '<p class="muted">none</p>';
    return "<table><thead><tr>" + head.map((h) => `<th>${h}</th>`).join("") + "</tr></thead><tbody>" +
      rows.join("") + "</tbody></table>";
  }

  function recordTrend(doc) {
    const t = doc.time;
    if (typeof t !== "number") return;
    for (const q of doc.queues || []) {
      if (Array.isArray(q.trend) && q.trend.length) { trend.set(q.name, q.trend.slice(-TREND_MAX)); continue; }  // the daemon's 15 minutes
      if (typeof q.length !== "number") continue;
      let pts = trend.get(q.name);
      if (!pts) { pts = []; trend.set(q.name, pts); }
      if (pts.length && pts[pts.length - 1][0] >= t) continue;  // the same cycle polled twice
      pts.push([t, q.length]);
      while (pts.length && (pts[0][0] < t - TREND_S || pts.length > TREND_MAX)) pts.shift();
    }
  }
  function spark(name, now) {
    const pts = trend.get(name) || [];
    if (pts.length < 2) return '<span class="muted">collecting</span>';
    const w = 120, h = 22, top = Math.max(...pts.map((p) => p[1])), max = Math.max(1, top);
    const xy = pts.map((p) => [w - (now - p[0]) / TREND_S * w, h - 1 - p[1] / max * (h - 2)]);
    return `<svg class="spark" width="${w}" height="${h}" aria-label="max ${max}"><polyline points="` +
      xy.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ") + `"/></svg> <span class="muted">max ${top}</span>`;
  }

  function filters() {
    return {group: $("f-group").value, worker: $("f-worker").value.trim().toLowerCase(),
            state: $("f-state").value, retired: $("f-retired").checked};
  }
  function shown(w, f) {
    if (f.group && w.group !== f.group) return false;
    if (f.worker && !String(w.hostname).toLowerCase().includes(f.worker)) return false;
    if (f.state === "problem") return PROBLEMS.has(w.status);
    if (f.state) return w.status === f.state;
    return w.status !== "retired" || f.retired;  // retired workers of old deploys are not failures
  }

  function render(doc, now) {
    const t0 = performance.now();
    const f = filters();
    const age = typeof doc.time === "number" ? now - doc.time : null;
    const bound = Math.max(3 * (doc.loop_interval || 5), 30);
    const stale = age === null || age > bound;
    $("cycle").textContent = age === null ? "no cycle completed yet" : `last cycle ${dur(age)} ago`;
    $("cycle").className = "cycle" + (stale ? " stale" : "");
    $("stale").hidden = !stale;
    $("stale").textContent = age === null ? "The daemon has not completed a cycle yet." :
      `STALE: the daemon's last cycle is ${dur(age)} old (more than ${dur(bound)}): what follows may be out of date.`;
    const b = doc.broker || {};
    $("broker").innerHTML = doc.broker ? `broker ${esc(b.url)} ${b.ok ? badge("ok") : badge("critical") + " " + esc(b.error)}` : "";
    $("leader").innerHTML = doc.leader === false ? badge("standby") + ' <span class="muted">another replica acts</span>' : "";

    // budgets and restart counts by hostname and by target
    const budget = new Map();
    for (const x of doc.budgets || []) { budget.set("t:" + x.target, x); if (x.hostname) budget.set("h:" + x.hostname, x); }
    const workers = doc.workers || [];
    const groups = new Map();
    for (const w of workers) { if (!groups.has(w.group)) groups.set(w.group, []); groups.get(w.group).push(w); }
    syncGroupOptions([...groups.keys()]);
    let nShown = 0;
    const parts = [];
    for (const [g, ws] of groups) {
      const living = ws.filter((w) => w.alive).length;
      const counted = ws.filter((w) => w.status !== "retired").length;
      const bad = ws.filter((w) => PROBLEMS.has(w.status)).length;
      const rows = [];
      for (const w of ws) {
        if (!shown(w, f)) continue;
        nShown++;
        const bu = budget.get("h:" + w.hostname) || (w.target ? budget.get("t:" + w.target) : null);
        const slots = (w.active === null || w.active === undefined) && (w.concurrency === null || w.concurrency === undefined)
          ? "-" : `${w.active ?? "?"}/${w.concurrency ?? "?"}`;
        const hb = w.last_heartbeat_age ?? w.last_pong_age;
        rows.push(`<tr class="w ${esc(w.status)}" data-hostname="${esc(w.hostname)}" data-status="${esc(w.status)}">` +
          `<td>${esc(w.hostname)}</td><td>${badge(w.status)}${w.stall ? " " + esc(w.stall) : ""}</td>` +
          `<td>${hb === null || hb === undefined ? "-" : dur(hb) + " ago"}</td><td>${esc(w.pid)}</td>` +
          `<td>${esc(w.processed)}</td><td>${num(w.processed_rate, "/s")}</td><td>${slots}</td>` +
          `<td>${bu ? `${bu.used}/${bu.max}, ${bu.spent ? "SPENT" : bu.left + " left"}` : "-"}</td>` +
          `<td>${esc(w.target)}</td><td>${esc(w.platform_state)}</td><td class="wrap">${esc(w.reason)}</td></tr>`);
      }
      if (!rows.length && (f.group || f.worker || f.state)) continue;
      // content-visibility: a group off screen costs no layout (1,000 workers stay fast)
      parts.push('<div class="group">' +
        `<h3 data-group="${esc(g)}">${esc(g)} <span class="muted">${living}/${counted} alive` +
        (bad ? `, <b class="bad">${bad} need attention</b>` : "") + "</span></h3>" +
        table(["HOSTNAME", "STATUS", "HEARTBEAT", "PID", "PROCESSED", "RATE", "ACTIVE/CONC", "RESTARTS (BUDGET)",
               "TARGET", "PLATFORM", "WHY"], rows) + "</div>");
    }
    $("groups").innerHTML = parts.join("") || '<p class="muted">no workers</p>';
    $("counts").textContent = `${nShown} of ${workers.length} workers shown`;

    $("queues").innerHTML = table(["NAME", "LENGTH", "READY", "UNACKED", "CONSUMERS", "DRAINS", "TREND"],
      (doc.queues || []).map((q) => `<tr data-queue="${esc(q.name)}"><td>${esc(q.name)}</td><td>${esc(q.length)}</td>` +
        `<td>${esc(q.ready)}</td><td>${esc(q.unacked)}</td><td>${esc(q.consumers)}</td>` +
        `<td>${num(q.drain_rate, "/s")}${q.saturated ? " " + badge("saturated") : ""}${q.error ? " " + esc(q.error) : ""}</td>` +
        `<td>${spark(q.name, doc.time)}</td></tr>`));
    $("findings").innerHTML = table(["SEVERITY", "STATE", "RULE", "SUBJECT", "FOR", "SUMMARY"],
      (doc.findings || []).filter((x) => !f.group || !x.group || x.group === f.group).map((x) =>
        `<tr data-rule="${esc(x.rule)}"><td>${badge(x.severity)}</td><td>${esc(x.state)}</td><td>${esc(x.rule)}</td>` +
        `<td>${esc(x.subject)}</td><td>${typeof x.since === "number" ? dur(now - x.since) : "-"}</td>` +
        `<td class="wrap">${esc(x.summary)}</td></tr>`));
    $("restarts").innerHTML = table(["WHEN", "GROUP", "HOSTNAME", "TARGET", "OUTCOME", "REASON"],
      (doc.recent_restarts || []).filter((r) => !f.group || r.group === f.group).map((r) =>
        `<tr data-restart="${esc(r.hostname)}"><td>${dur(now - r.at)} ago</td><td>${esc(r.group)}</td><td>${esc(r.hostname)}</td>` +
        `<td>${esc(r.target)}</td><td>${esc(r.outcome)}</td><td class="wrap">${esc(r.reason)}` +
        `${r.message ? ": " + esc(r.message) : ""}</td></tr>`));
    $("silences").innerHTML = table(["ID", "MATCH", "ENDS IN", "REASON", "BY"],
      (doc.silences || []).map((s) => `<tr><td>${esc(s.id)}</td><td>${esc(s.match)}</td><td>${dur(s.until - now)}</td>` +
        `<td class="wrap">${esc(s.reason)}</td><td>${esc(s.author)}</td></tr>`));
    const ms = performance.now() - t0;
    window.lastRenderMs = ms;
    if (window.firstRenderAt === undefined) window.firstRenderAt = performance.now();  // since navigation
    $("render-ms").textContent = ms.toFixed(1);
    return ms;
  }

  let groupKey = "";
  function syncGroupOptions(names) {
    const key = names.join("\u0000");
    if (key === groupKey) return;
    groupKey = key;
    const sel = $("f-group"), cur = sel.value;
    sel.innerHTML = '<option value="">all</option>' + names.map((n) => `<option>${esc(n)}</option>`).join("");
    sel.value = names.includes(cur) ? cur : "";
  }

  async function poll() {
    const t0 = performance.now();
    try {
      const r = await fetch("/status", {cache: "no-store", credentials: "same-origin"});
      if (!r.ok) throw new Error(`/status answered ${r.status}`);
      const doc = await r.json();
      // ages on the daemon's clock (its Date header), not this browser's
      const date = Date.parse(r.headers.get("Date") || "");
      const now = isNaN(date) ? Date.now() / 1000 : Math.max(date / 1000, doc.time || 0);
      recordTrend(doc);
      lastDoc = doc; lastNow = now; lastOk = Date.now(); failing = null;
      window.polls = (window.polls || 0) + 1;
    } catch (e) {
      failing = String(e.message || e);
    }
    $("error").hidden = !failing;
    $("error").textContent = failing ? `cannot read /status: ${failing} (showing what was read ${dur((Date.now() - lastOk) / 1000)} ago)` : "";
    if (lastDoc && !document.hidden) render(lastDoc, lastNow + (Date.now() - lastOk) / 1000);
    window.lastPollMs = performance.now() - t0;  // fetch + parse + render: what one refresh costs
    setTimeout(poll, POLL_MS);
  }

  for (const id of ["f-group", "f-worker", "f-state", "f-retired"]) {
    $(id).addEventListener("input", () => { if (lastDoc) render(lastDoc, lastNow + (Date.now() - lastOk) / 1000); });
  }
  // for measurements: render a document (e.g. 1,000 synthetic workers) and return the milliseconds
  window.renderStatus = (doc, now) => render(doc, now === undefined ? doc.time : now);
  poll();
})();
