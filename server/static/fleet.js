// The fleet page: machines, ingest sources, and per machine one plot per
// series, downsampled by the server (GET /api/v1/readings/aggregate) to about
// one bucket per pixel of the plot. Every name from the API goes into the
// page through textContent, never as HTML. The token lives in sessionStorage.
"use strict";

const TOKEN_KEY = "haltless.token";
const REFRESH_MS = 10000;
const state = { machine: null, range: 900, timer: null, plots: [], expiry: null };

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

// When the token stops working (ms since the epoch), from its exp claim;
// null when it has none we can read. Only to say why the page asks for a
// new one: the server is what checks the token.
function expiresAt(t) {
  try {
    const claims = JSON.parse(atob(t.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch (_) {
    return null;
  }
}

function expired(t) {
  const at = expiresAt(t);
  return at !== null && at <= Date.now();
}

function expiredMessage(t) {
  return "Session expired at " + new Date(expiresAt(t)).toLocaleTimeString("en-GB")
    + ": management tokens last 1 h unless made with --ttl. Sign in again with a new"
    + " token from haltless token create.";
}

// Back to the login form, saying why, the moment the token expires (not at
// the next refresh, up to 10 s later, with whatever the page showed).
function watchExpiry() {
  clearTimeout(state.expiry);
  const t = token(), at = t && expiresAt(t);
  if (!at) return;
  // setTimeout fires at once past 2^31-1 ms (24.8 days); look again then.
  state.expiry = setTimeout(() => {
    if (token() !== t) return;
    if (!expired(t)) return watchExpiry();
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(expiredMessage(t));
  }, Math.min(at - Date.now() + 50, 2147483647));
}

function status(text) { $("status").textContent = text; }

async function api(path, params) {
  const url = params ? path + "?" + new URLSearchParams(params).toString() : path;
  const r = await fetch(url, { headers: { "Authorization": "Bearer " + token() },
                               cache: "no-store", credentials: "omit" });
  if (r.status === 401) {
    const t = token();
    if (t !== null) {  // the first 401 of parallel requests says why; the rest are the same
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(expired(t) ? expiredMessage(t) : "The token was refused ("
                + (await r.json()).detail + "). Paste another.");
    }
    throw new Error("unauthorized");
  }
  if (!r.ok) {
    let detail = await r.text();
    try { detail = JSON.parse(detail).detail || detail; } catch (_) { /* not JSON */ }
    const err = new Error(path + ": " + r.status + " " + detail);
    err.status = r.status;
    throw err;
  }
  return r.json();
}

function ago(iso) {
  if (!iso) return "never";
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(iso).toISOString().replace(".000Z", "Z");
}

// ------------------------------------------------------------------ views

function showLogin(message) {
  stopRefresh();
  clearTimeout(state.expiry);
  clearPlots();  // nothing read with the old token stays behind the form
  $("fleet").hidden = true; $("machine").hidden = true; $("forget").hidden = true;
  $("login").hidden = false;
  $("login-message").textContent = message || "";
  $("login-message").hidden = !message;
  status("");
}

function stopRefresh() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
}

function every(fn) {
  stopRefresh();
  fn();
  state.timer = setInterval(fn, REFRESH_MS);
}

function route() {
  const t = token();
  if (!t) return showLogin($("login-message").textContent);
  if (expired(t)) {
    sessionStorage.removeItem(TOKEN_KEY);
    return showLogin(expiredMessage(t));
  }
  watchExpiry();
  $("login").hidden = true; $("forget").hidden = false;
  const m = location.hash.match(/^#machine=(.*)$/);
  if (m) {
    state.machine = decodeURIComponent(m[1]);
    clearPlots();  // the previous machine's plots never stand under this name
    $("fleet").hidden = true; $("machine").hidden = false;
    every(loadMachine);
  } else {
    state.machine = null;
    $("machine").hidden = true; $("fleet").hidden = false;
    every(loadFleet);
  }
}

// ------------------------------------------------------------------ fleet

async function loadFleet() {
  try {
    const [machines, latest, sources] = await Promise.all([
      api("/api/v1/machines"), api("/api/v1/readings/latest"), api("/api/v1/ingest-sources")]);
    // Each machine's newest reading over its series (ISO UTC strings sort by time).
    const last = new Map();
    for (const s of latest.series) {
      const t = last.get(s.machine_identifier);
      if (!t || s.timestamp > t.timestamp) last.set(s.machine_identifier, s);
    }
    // Readings per machine in the last minute: one fleet aggregate (no
    // machine_identifier) instead of a request per machine.
    const to = new Date(), from = new Date(to.getTime() - 60000);
    const perMachine = new Map();
    if (last.size) {
      const fleet = await api("/api/v1/readings/aggregate", {
        from: from.toISOString(), to: to.toISOString(), interval: "60s", agg: "count" });
      for (const s of fleet.series) {
        perMachine.set(s.machine_identifier, (perMachine.get(s.machine_identifier) || 0)
                       + s.count.reduce((x, y) => x + y, 0));
      }
    }
    const counts = machines.map((m) => perMachine.get(m.machine_identifier) || 0);
    const body = $("machines").tBodies[0];
    body.replaceChildren();
    if (!machines.length) body.append(emptyRow(4, "No machines yet: POST /api/v1/machines."));
    machines.forEach((m, i) => {
      const tr = el("tr");
      const td = el("td");
      const a = el("a", m.machine_identifier, "machine-link");
      a.href = "#machine=" + encodeURIComponent(m.machine_identifier);
      td.append(a);
      tr.append(td, el("td", m.name || ""), lastReading(last.get(m.machine_identifier)),
                el("td", counts[i].toLocaleString("en"), "num"));
      body.append(tr);
    });
    const names = new Map(machines.map((m) => [m.id, m.machine_identifier]));
    const sb = $("sources").tBodies[0];
    sb.replaceChildren();
    if (!sources.length) sb.append(emptyRow(7, "No ingest sources: readings arrive by HTTP only."));
    for (const s of sources) {
      const st = s.status;
      const failing = st.last_error_at && (!st.last_success_at || st.last_error_at > st.last_success_at);
      const stateText = !s.is_active ? "inactive" : failing ? "failing" : st.last_success_at ? "ok" : "waiting";
      const tr = el("tr");
      tr.append(el("td", s.name), el("td", names.get(s.machine_id) || s.machine_id),
                el("td", s.protocol), el("td", s.host + ":" + s.port),
                el("td", stateText, !s.is_active ? "state-off" : failing ? "state-error" : "state-ok"),
                el("td", ago(st.last_success_at)), el("td", st.last_error || "", "error"));
      sb.append(tr);
    }
    status("updated " + new Date().toLocaleTimeString("en-GB"));
  } catch (e) {
    if (e.message !== "unauthorized") status("refresh failed: " + e.message);
  }
}

// "motor_current = 12.3 A · 5 s ago": the value of the machine's newest
// reading, which series it is, and when (the exact time in the tooltip).
function lastReading(s) {
  const td = el("td", null, "last-reading");
  if (!s) {
    td.textContent = "never";
    return td;
  }
  const when = el("time", ago(s.timestamp));
  when.dateTime = s.timestamp;
  when.title = s.timestamp;
  td.append(el("span", s.metric_name + " = ", "metric"),
            el("span", formatValue(s.value) + (s.unit ? " " + s.unit : ""), "value"),
            " · ", when);
  return td;
}

function formatValue(v) {
  return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)));
}

function emptyRow(columns, text) {
  const tr = el("tr");
  const td = el("td", text, "empty");
  td.colSpan = columns;
  tr.append(td);
  return tr;
}

// ------------------------------------------------------------------ one machine

function seriesLabel(s) {
  let label = s.metric_name;
  if (s.unit) label += " (" + s.unit + ")";
  if (s.raw_tag) label += " [" + s.raw_tag + "]";
  return label;
}

async function loadMachine() {
  const machine = state.machine;
  $("machine-title").textContent = machine;
  for (const b of $("ranges").querySelectorAll("button")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.range) === state.range));
  }
  try {
    const latest = await api("/api/v1/readings/latest", { machine_identifier: machine });
    const metrics = [...new Set(latest.series.map((s) => s.metric_name))];
    const plots = $("plots");
    const width = Math.max(300, plots.clientWidth - 20);
    const to = new Date(), from = new Date(to.getTime() - state.range * 1000);
    // About one bucket per pixel; whole minutes from a minute up, so that the
    // server answers compacted hours from their per-minute summaries.
    let interval = Math.max(1, Math.ceil(state.range / width));
    if (interval > 60) interval = Math.ceil(interval / 60) * 60;
    const results = await Promise.all(metrics.map((metric) => api("/api/v1/readings/aggregate", {
      machine_identifier: machine, metric_name: metric, from: from.toISOString(),
      to: to.toISOString(), interval: interval + "s", agg: "avg,min,max,count" })));
    for (const p of state.plots) p.destroy();
    state.plots = [];
    plots.replaceChildren();
    if (!metrics.length) plots.append(el("p", "No readings from this machine yet.", "empty"));
    for (const agg of results) {
      for (const s of agg.series) plots.append(plot(s, width, from, to, interval));
    }
    status("updated " + new Date().toLocaleTimeString("en-GB") + " · " + interval + " s per point");
  } catch (e) {
    if (e.message === "unauthorized") return;
    if (state.machine !== machine) return;  // another machine was opened meanwhile
    // Never leave plots under a heading they may not belong to: what is
    // shown is cleared and the page says why.
    clearPlots();
    $("plots").append(el("p", e.status === 404 ? "No machine " + JSON.stringify(machine)
      + " in your organization." : "Could not load " + machine + ": " + e.message, "error"));
    status("refresh failed: " + e.message);
  }
}

function clearPlots() {
  for (const p of state.plots) p.destroy();
  state.plots = [];
  $("plots").replaceChildren();
}

function stamp(t, what) {
  const d = new Date(t * 1000), p = (n) => String(n).padStart(2, "0");
  const date = d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate());
  const time = p(d.getHours()) + ":" + p(d.getMinutes());
  if (what === "date") return date.slice(5) + " " + time;
  if (what === "time") return time;
  return date + " " + time + ":" + p(d.getSeconds());
}

function plot(s, width, from, to, interval) {
  const box = el("div", null, "plot");
  box.dataset.metric = s.metric_name;
  box.dataset.points = String(s.buckets.length);
  box.dataset.interval = String(interval);
  box.append(el("h3", seriesLabel(s)));
  if (!s.buckets.length) {
    box.append(el("p", "No readings in this range.", "empty"));
    return box;
  }
  const xs = s.buckets.map((b) => Date.parse(b) / 1000);
  // The band shows where a bucket holds several readings; one reading is its own avg.
  const lo = s.min.map((v, i) => (s.count[i] > 1 ? v : null));
  const hi = s.max.map((v, i) => (s.count[i] > 1 ? v : null));
  const long = to - from > 86400000;
  const opts = {
    width, height: 220,
    scales: { x: { time: true, min: from.getTime() / 1000, max: to.getTime() / 1000 } },
    // 24-hour clock and ISO dates (local time, as the status bar)
    axes: [{ values: (u, splits) => splits.map((t) => stamp(t, long ? "date" : "time")) }, {}],
    series: [
      { label: "time", value: (u, t) => (t == null ? "" : stamp(t, "full")) },
      { label: "avg", stroke: "#0b5cad", width: 1.5, points: { show: s.buckets.length < 60 } },
      { label: "min", stroke: "rgba(11,92,173,0.25)", width: 1 },
      { label: "max", stroke: "rgba(11,92,173,0.25)", width: 1 },
    ],
    bands: [{ series: [3, 2], fill: "rgba(11,92,173,0.12)" }],
    legend: { show: true },
  };
  state.plots.push(new uPlot(opts, [xs, s.avg, lo, hi], box));
  return box;
}

// ------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("login-message").textContent = "";
    route();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("Token forgotten.");
  });
  $("back").addEventListener("click", (ev) => { ev.preventDefault(); location.hash = ""; });
  $("ranges").addEventListener("click", (ev) => {
    const r = ev.target.dataset && ev.target.dataset.range;
    if (r) { state.range = Number(r); every(loadMachine); }
  });
  window.addEventListener("hashchange", route);
  route();
});
