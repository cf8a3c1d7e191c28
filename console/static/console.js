"use strict";
// The console page: plain DOM, no framework, no third-party code. Cells are set with
// textContent, so nothing an event carries is ever parsed as HTML.
const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
const CSRF = meta("csrf");
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const options = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.headers["X-CSRF-Token"] = CSRF;
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.detail ? JSON.stringify(data.detail) : response.status);
  return data;
}

function table(id, headings, rows, onClick) {
  const t = $(id);
  t.replaceChildren();
  const head = t.insertRow();
  for (const h of headings) { const th = document.createElement("th"); th.textContent = h; head.appendChild(th); }
  if (!rows.length) { const c = t.insertRow().insertCell(); c.colSpan = headings.length; c.textContent = "none"; }
  for (const row of rows) {
    const tr = t.insertRow();
    for (const value of row.cells) {
      const td = tr.insertCell();
      if (value && value.cls) { td.className = value.cls; td.textContent = value.text; }
      else td.textContent = value === null || value === undefined ? "" : String(value);
    }
    if (onClick) { tr.className = "clickable"; tr.addEventListener("click", () => onClick(row.item)); }
  }
}

const status = (s) => ({ text: s, cls: s === "ready" || s === "ok" ? "ok" : s === "degraded" ? "warn" : "bad" });

// --- overview (live) -------------------------------------------------------------
let overviewSource = null;
function overview() {
  if (overviewSource) return;
  overviewSource = new EventSource("/api/live/overview");
  overviewSource.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.error) { $("overview-at").textContent = `error: ${data.error}`; return; }
    $("overview-at").textContent = `updated ${data.at}`;
    table("processes", ["process", "status", "dependencies", "stalled partitions"], data.processes.map((p) => ({
      cells: [p.name, status(p.status), Object.entries(p.dependencies).map(([k, v]) => `${k}: ${v}`).join(", "),
        p.stalled.length ? { text: p.stalled.join("; "), cls: "bad" } : ""] })));
    table("groups", ["consumer group", "lag", "oldest unprocessed (s)", "apply p50/p99 (ms)", "parked", "dead letters"],
      data.groups.map((g) => ({ cells: [g.group, g.lag ? { text: g.lag, cls: "warn" } : { text: 0, cls: "ok" },
        g.oldest_event_age_s === null ? "" : g.oldest_event_age_s.toFixed(1),
        g.apply_delay ? `${g.apply_delay.p50_ms ?? "–"} / ${g.apply_delay.p99_ms ?? "–"}` : "",
        g.parked ? { text: g.parked, cls: "bad" } : 0, g.dead_letters ?? ""] })));
    const o = data.outbox;
    $("outbox").textContent = `pending ${o.pending}, failed ${o.failed}` +
      (o.oldest_pending_s === null ? "" : `, oldest pending ${o.oldest_pending_s.toFixed(1)} s`);
    table("partitions", ["group", "topic", "partition", "lag", "event age (s)"], data.partitions.map((p) => ({
      cells: [p.group, p.topic, p.partition, p.lag, p.event_age_s === null ? "" : p.event_age_s.toFixed(1)] })));
  };
}

// --- dead letters ------------------------------------------------------------------
let selected = null;
async function deadLetters() {
  const query = new URLSearchParams([...new FormData($("dlq-filter"))].filter(([, v]) => v));
  const data = await api(`/api/dead-letters?${query}`);
  table("dlq-groups", ["group", "dead letters", "parked behind another", "of no aggregate", "oldest", "error classes"],
    data.groups.map((g) => ({ cells: [g.group, g.records, g.parked, g.without_aggregate, g.oldest,
      Object.entries(g.error_classes).map(([k, n]) => `${k} ×${n}`).join(", ")] })));
  table("dlq-parked", ["group", "tenant", "aggregate", "versions", "events", "error", "since"],
    data.parked.map((p) => ({ item: p, cells: [p.consumer_group, p.tenant_id, p.aggregate_id,
      `v${p.first_version}..v${p.last_version}`, p.parked_events, `${p.error_class}: ${p.error_message}`, p.parked_at] })),
    selectParked);
  table("dlq-records", ["group", "reason", "event type", "version", "aggregate", "error", "last failure"],
    data.records.map((r) => ({ item: r, cells: [r.group, r.reason, r.event_type, r.version, r.aggregate_id,
      `${r.error_class}: ${(r.error_message || "").slice(0, 120)}`, r.last_failure] })),
    (r) => { $("dlq-record").textContent = JSON.stringify(r, null, 2); });
}

async function selectParked(p) {
  selected = p;
  $("dlq-action").hidden = false;
  $("dlq-result").textContent = "";
  $("dlq-action-title").textContent = `${p.consumer_group}: ${p.aggregate_type} ${p.aggregate_id}`;
  const preview = await api("/api/dead-letters/retry", { group: p.consumer_group, aggregate_id: p.aggregate_id,
    tenant_id: p.tenant_id, dry_run: true });
  $("dlq-preview").textContent = "A retry would re-drive, in order:\n" + preview.would_redrive.map(
    (r) => `  v${r.version} ${r.event_type} (${r.error_class})`).join("\n");
}

async function act(path, extra) {
  try {
    const result = await api(path, { group: selected.consumer_group, aggregate_id: selected.aggregate_id,
      tenant_id: selected.tenant_id, ...extra });
    $("dlq-result").textContent = JSON.stringify(result);
    await deadLetters();
    await audit();
  } catch (error) { $("dlq-result").textContent = `refused: ${error.message}`; }
}

// --- events --------------------------------------------------------------------------
async function events() {
  const query = new URLSearchParams([...new FormData($("event-filter"))].filter(([, v]) => v));
  try {
    const data = await api(`/api/events?${query}`);
    const copies = Object.entries(data.read_models || {}).map(([store, c]) =>
      `${store}: v${c.version ?? "–"}${c.behind ? " (behind)" : ""}${c.error ? ` (${c.error})` : ""}`);
    $("event-read-models").textContent = copies.length ? `Read models: ${copies.join(" · ")}` : "";
    table("event-list", ["version", "event", "occurred at", "aggregate", "correlation", "causation", "trace"],
      data.events.map((e) => ({ item: e, cells: [e.version, e.event_type, e.occurred_at, e.aggregate_id,
        e.metadata.correlation_id, e.metadata.causation_id, e.metadata.trace_id] })),
      (e) => { $("event-detail").textContent = JSON.stringify({ payload: e.payload, snapshot_after: e.aggregate,
        metadata: e.metadata }, null, 2); });
  } catch (error) { $("event-read-models").textContent = `refused: ${error.message}`; }
}

// --- rebuild and verify -----------------------------------------------------------
async function verify(repair) {
  $("rebuild-output").textContent = "verifying…";
  try {
    const result = await api("/api/verify", { projector: $("projector").value, repair });
    $("rebuild-output").textContent = (result.differences.length
      ? JSON.stringify(result.differences, null, 2) : `${result.projector}: no differences`) +
      (result.repaired.length ? `\nrepaired: ${result.repaired.join(", ")}` : "");
  } catch (error) { $("rebuild-output").textContent = `refused: ${error.message}`; }
}

async function rebuild(abandon) {
  const projector = $("projector").value;
  try { await api("/api/rebuilds", { projector, abandon }); } catch (error) {
    $("rebuild-output").textContent = `refused: ${error.message}`; return; }
  const poll = setInterval(async () => {
    const job = (await api("/api/rebuilds"))[projector];
    $("rebuild-output").textContent = `${projector}: ${job.state}\n${job.lines.join("\n")}` +
      (job.state !== "running" ? `\n${JSON.stringify(job.result, null, 2)}` : "");
    if (job.state !== "running") clearInterval(poll);
  }, 1000);
}

// --- live tail -------------------------------------------------------------------
let tailSource = null;
function tail() {
  if (tailSource) tailSource.close();
  const query = new URLSearchParams([...new FormData($("tail-filter"))].filter(([, v]) => v));
  table("tail-list", ["topic", "offset", "event", "tenant", "aggregate", "version"], []);
  tailSource = new EventSource(`/api/live/tail?${query}`);
  tailSource.onmessage = (message) => {
    const e = JSON.parse(message.data);
    const row = $("tail-list").insertRow(1);
    for (const v of [e.topic, `${e.partition}@${e.offset}`, e.event_type, e.tenant_id, e.aggregate_id, e.version])
      row.insertCell().textContent = v ?? "";
  };
}

// --- audit trail -------------------------------------------------------------------
async function audit() {
  const rows = await api("/api/audit");
  table("audit-list", ["at", "who", "action", "group", "aggregate", "reason", "outcome"],
    rows.map((a) => ({ cells: [a.at, a.operator, a.action, a.consumer_group, a.aggregate_id, a.reason, a.outcome] })));
}

// --- navigation ------------------------------------------------------------------
const loaders = { overview, "dead-letters": deadLetters, events: () => {}, rebuilds: () => {}, tail: () => {}, audit };
function show() {
  const page = (location.hash || "#overview").slice(1);
  for (const s of document.querySelectorAll(".page")) s.classList.toggle("active", s.id === page);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  (loaders[page] || overview)();
}
window.addEventListener("hashchange", show);
$("dlq-filter").addEventListener("submit", (e) => { e.preventDefault(); deadLetters(); });
$("event-filter").addEventListener("submit", (e) => { e.preventDefault(); events(); });
$("tail-filter").addEventListener("submit", (e) => { e.preventDefault(); tail(); });
$("dlq-retry").addEventListener("click", () => act("/api/dead-letters/retry", { dry_run: false }));
$("dlq-discard").addEventListener("click", () => act("/api/dead-letters/discard", { reason: $("dlq-reason").value }));
$("verify").addEventListener("click", () => verify(false));
$("repair").addEventListener("click", () => verify(true));
$("rebuild").addEventListener("click", () => rebuild(false));
$("abandon").addEventListener("click", () => rebuild(true));
$("sign-out").addEventListener("click", async () => { await api("/logout", {}); location.href = "/login"; });
if (meta("tenant")) $("event-filter").elements.tenant.value = meta("tenant");
show();
