// The sitelink status page: the state over a WebSocket, then every change.
//
// Every piece of data (site names, messages, payload samples: anything a
// gateway or an operator wrote) becomes text through textContent; nothing
// from the server is ever parsed as HTML.
"use strict";

(() => {
  const PAGE_VERSION = 1;
  const RECONNECT_BASE = 500;    // ms; doubles each failed attempt ...
  const RECONNECT_CAP = 10000;   // ... up to this, with jitter
  const SILENT_AFTER = 15000;    // ms without a message (the server ticks every 5 s): the socket is dead
  const STATUSES = ["connected", "connecting", "error", "disconnected"];

  const rows = new Map();        // site id -> {data, tr, detail, panel}
  const tbody = document.querySelector("#sites tbody");
  const link = document.getElementById("link");
  let skew = 0;                  // the server's clock minus ours, ms
  let attempt = 0;
  let heardAt = 0;
  let socket = null;

  // ------------------------------------------------------------ helpers

  function node(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined && text !== null) el.textContent = String(text);
    return el;
  }

  function serverNow() { return Date.now() + skew; }

  function parseTime(iso) {
    if (typeof iso !== "string") return null;
    const ms = Date.parse(iso);
    return Number.isNaN(ms) ? null : ms;
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  function clock(iso) {
    const ms = parseTime(iso);
    if (ms === null) return iso ? String(iso) : "-";
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
           `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function span(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor(s % 86400 / 3600)} h`;
  }

  function ago(iso) {
    const ms = parseTime(iso);
    return ms === null ? "never" : `${span((serverNow() - ms) / 1000)} ago`;
  }

  function until(iso) {
    const ms = parseTime(iso);
    if (ms === null) return "-";
    const left = (ms - serverNow()) / 1000;
    return left > 0 ? `in ${span(left)}` : "due";
  }

  function setText(el, text, title) {
    if (el.textContent !== text) el.textContent = text;
    const t = title === undefined ? "" : String(title);
    if (el.title !== t) el.title = t;
  }

  // ------------------------------------------------------------ the rows

  function makeRow(siteId) {
    const tr = node("tr", "site");
    tr.dataset.siteId = String(siteId);
    const cells = {};
    for (const name of ["site", "status", "active", "connected", "errors", "retry", "data", "devices", "actions"]) {
      cells[name] = tr.appendChild(node("td", `c-${name}`));
    }
    cells.badge = cells.status.appendChild(node("span", "badge"));
    cells.paused = cells.status.appendChild(node("span", "badge paused", "paused"));
    cells.message = cells.status.appendChild(node("div", "message"));
    cells.deviceButton = cells.devices.appendChild(node("button", "devices", ""));
    cells.deviceButton.type = "button";
    cells.deviceButton.title = "list the devices";
    cells.errorButton = cells.actions.appendChild(node("button", "errors", "latest errors"));
    cells.errorButton.type = "button";
    const entry = {data: null, tr, cells, detail: null, panel: null};
    cells.deviceButton.addEventListener("click", () => toggle(siteId, "devices"));
    cells.errorButton.addEventListener("click", () => toggle(siteId, "errors"));
    return entry;
  }

  function render(entry) {
    const d = entry.data;
    const c = entry.cells;
    setText(c.site, d.site, `site ${d.site_id}`);
    const status = STATUSES.includes(d.status) ? d.status : "unknown";
    setText(c.badge, d.status === null || d.status === undefined ? "no connection" : String(d.status));
    c.badge.className = `badge status-${status}`;
    c.paused.hidden = !d.paused;
    c.paused.title = d.paused ? "connected, but not reading: the logger is behind" : "";
    const message = d.message ? String(d.message) : "";
    setText(c.message, message, message);
    setText(c.active, d.is_active === true ? "yes" : d.is_active === false ? "no" : "-");
    entry.tr.classList.toggle("inactive", d.is_active === false);
    entry.tr.dataset.status = status;
    setText(c.connected, clock(d.last_connected_at));
    const errors = d.connection_errors === null || d.connection_errors === undefined ? "-" : String(d.connection_errors);
    setText(c.errors, errors);
    c.errors.classList.toggle("bad", errors !== "-" && errors !== "0");
    const devices = d.devices || {};
    let online = 0, offline = 0;
    const parts = [];
    for (const kind of ["gateway", "datalogger", "sensor"]) {
      const k = devices[kind] || {online: 0, offline: 0};
      online += Number(k.online) || 0;
      offline += Number(k.offline) || 0;
      parts.push(`${kind}s: ${k.online} online, ${k.offline} offline`);
    }
    setText(c.deviceButton, offline ? `${online} online · ${offline} offline` : `${online} online`, parts.join("\n"));
    c.deviceButton.classList.toggle("bad", offline > 0);
    c.deviceButton.dataset.online = String(online);
    c.deviceButton.dataset.offline = String(offline);
    tickRow(entry);
  }

  function tickRow(entry) {
    const d = entry.data;
    setText(entry.cells.data, ago(d.last_data_at), d.last_data_at ? clock(d.last_data_at) : "");
    setText(entry.cells.retry, until(d.next_retry_at), d.next_retry_at ? clock(d.next_retry_at) : "");
  }

  function order(a, b) {
    const byName = String(a.site).localeCompare(String(b.site));
    return byName !== 0 ? byName : a.site_id - b.site_id;
  }

  function place(entry) {
    // Keep the rows sorted by name; a detail row follows its site's row.
    let before = null;
    for (const other of rows.values()) {
      if (other !== entry && order(entry.data, other.data) < 0 &&
          (before === null || order(other.data, before.data) < 0)) {
        before = other;
      }
    }
    const anchor = before ? before.tr : null;
    if (entry.tr.nextSibling !== anchor || entry.tr.parentNode !== tbody) {
      tbody.insertBefore(entry.tr, anchor);
      if (entry.detail) tbody.insertBefore(entry.detail, anchor);
    }
  }

  function upsert(site, placeIt) {
    if (typeof site !== "object" || site === null || !Number.isInteger(site.site_id)) return false;
    let entry = rows.get(site.site_id);
    const isNew = !entry;
    if (isNew) {
      entry = makeRow(site.site_id);
      rows.set(site.site_id, entry);
    }
    const renamed = isNew || entry.data.site !== site.site;
    entry.data = site;
    render(entry);
    if (renamed && placeIt) place(entry);
    if (entry.panel === "devices") loadDevices(site.site_id, false);
    return true;
  }

  function placeAll() {
    for (const entry of [...rows.values()].sort((a, b) => order(a.data, b.data))) {
      tbody.appendChild(entry.tr);
      if (entry.detail) tbody.appendChild(entry.detail);
    }
  }

  function removeMissing(ids) {
    for (const [id, entry] of rows) {
      if (!ids.has(id)) {
        entry.tr.remove();
        if (entry.detail) entry.detail.remove();
        rows.delete(id);
      }
    }
  }

  function summarize() {
    const counts = {};
    let inactive = 0;
    for (const entry of rows.values()) {
      if (entry.data.is_active === false) { inactive += 1; continue; }
      const s = entry.tr.dataset.status;
      counts[s] = (counts[s] || 0) + 1;
    }
    const parts = [`${rows.size} sites`];
    for (const s of [...STATUSES, "unknown"]) if (counts[s]) parts.push(`${counts[s]} ${s}`);
    if (inactive) parts.push(`${inactive} inactive`);
    document.getElementById("summary").textContent = parts.join(" · ");
    document.getElementById("empty").hidden = rows.size > 0;
  }

  // ------------------------------------------------------------ panels (on a click)

  function detailCell(entry) {
    if (!entry.detail) {
      entry.detail = node("tr", "detail");
      entry.detail.dataset.siteId = entry.tr.dataset.siteId;
      const td = entry.detail.appendChild(node("td"));
      td.colSpan = 9;
      entry.tr.after(entry.detail);
    }
    return entry.detail.firstChild;
  }

  function closePanel(entry) {
    if (entry.detail) entry.detail.remove();
    entry.detail = null;
    entry.panel = null;
  }

  function toggle(siteId, panel) {
    const entry = rows.get(siteId);
    if (!entry) return;
    if (entry.panel === panel) { closePanel(entry); return; }
    entry.panel = panel;
    const td = detailCell(entry);
    td.replaceChildren(node("p", "loading", "loading…"));
    if (panel === "errors") loadErrors(siteId); else loadDevices(siteId, true);
  }

  async function fetchJson(url) {
    const response = await fetch(url, {cache: "no-store"});
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      throw new Error(body && body.error ? String(body.error) : `HTTP ${response.status}`);
    }
    return body;
  }

  function table(className, headings, items, cellsOf) {
    const t = node("table", className);
    const head = t.createTHead().insertRow();
    for (const h of headings) head.appendChild(node("th", null, h));
    const body = t.createTBody();
    for (const item of items) {
      const tr = body.insertRow();
      for (const value of cellsOf(item)) {
        if (value instanceof Node) tr.insertCell().appendChild(value);
        else tr.appendChild(node("td", null, value === null || value === undefined || value === "" ? "-" : value));
      }
    }
    return t;
  }

  // A long text folded under one line of it: ``pick`` chooses which.
  function longText(text, className, pick) {
    if (!text) return "-";
    const lines = String(text).split("\n").filter((line) => line.trim() !== "");
    const details = node("details", className);
    details.appendChild(node("summary", null, (pick(lines) || "(show)").slice(0, 120)));
    details.appendChild(node("pre", null, text));
    return details;
  }
  const firstLine = (lines) => lines[0];
  const lastLine = (lines) => lines[lines.length - 1];

  async function loadErrors(siteId) {
    const entry = rows.get(siteId);
    let data;
    try {
      data = await fetchJson(`/api/sites/${siteId}/errors`);
    } catch (e) {
      if (entry.panel === "errors") detailCell(entry).replaceChildren(node("p", "failed", `could not read the errors: ${e.message}`));
      return;
    }
    if (entry.panel !== "errors") return;
    const td = detailCell(entry);
    const box = node("div", "errors-panel");
    const head = box.appendChild(node("p", "panel-head"));
    head.appendChild(node("strong", null, data.site));
    head.appendChild(document.createTextNode(` — latest errors, read at ${clock(data.read_at)} `));
    const refresh = head.appendChild(node("button", "refresh", "refresh"));
    refresh.type = "button";
    refresh.addEventListener("click", () => loadErrors(siteId));
    box.appendChild(node("h3", null, "connection log (WARNING and above)"));
    box.appendChild(data.connection_log.length === 0 ? node("p", "none", "none") :
      table("log connection-log", ["time", "level", "message", "exception", "attempt", "traceback"], data.connection_log,
            (r) => [clock(r.timestamp), r.level, r.message, r.exception_type, r.retry_attempt,
                    longText(r.exception_traceback, "traceback", lastLine)]));
    box.appendChild(node("h3", null, "parsing log"));
    box.appendChild(data.parsing_log.length === 0 ? node("p", "none", "none") :
      table("log parsing-log", ["time", "type", "topic", "message", "payload sample"], data.parsing_log,
            (r) => [clock(r.timestamp), r.error_type, r.topic, r.error_message, longText(r.payload_sample, "sample", firstLine)]));
    td.replaceChildren(box);
  }

  async function loadDevices(siteId, first) {
    const entry = rows.get(siteId);
    let data;
    try {
      data = await fetchJson(`/api/sites/${siteId}/devices`);
    } catch (e) {
      if (first && entry.panel === "devices") detailCell(entry).replaceChildren(node("p", "failed", `could not list the devices: ${e.message}`));
      return;
    }
    if (entry.panel !== "devices") return;
    const box = node("div", "devices-panel");
    box.appendChild(data.devices.length === 0 ? node("p", "none", "no device has reported yet") :
      table("device-list", ["kind", "name", "state"], data.devices, (r) => {
        // The feed says when a device went offline, not each time an online one reports.
        const text = r.is_online ? "online"
          : r.last_seen_at ? `offline, last seen ${clock(r.last_seen_at)}`
          : r.changed_at ? `offline since ${clock(r.changed_at)}` : "offline";
        return [r.kind, r.name, node("span", r.is_online ? "online" : "offline", text)];
      }));
    if (data.truncated) box.appendChild(node("p", "none", `the first ${data.devices.length} are listed`));
    detailCell(entry).replaceChildren(box);
  }

  // ------------------------------------------------------------ the socket

  function setLink(state, text) {
    link.dataset.state = state;
    link.textContent = text;
  }

  function showFeed(feed) {
    const banner = document.getElementById("feed");
    const errors = feed && feed.errors ? Object.entries(feed.errors) : [];
    if (feed && feed.live && errors.length === 0) { banner.hidden = true; return; }
    banner.hidden = false;
    banner.textContent = errors.length
      ? `The status feed is not reachable: ${errors.map(([ep, why]) => `${ep} (${why})`).join("; ")}. Showing the last state known; retrying.`
      : "Joining the status feed…";
  }

  function handle(message) {
    if (message.v !== PAGE_VERSION) {
      document.getElementById("version").hidden = false;
      return;
    }
    const now = parseTime(message.now);
    if (now !== null) skew = now - Date.now();
    if (message.type === "state" && Array.isArray(message.sites)) {
      const ids = new Set();
      for (const site of message.sites) if (upsert(site, false)) ids.add(site.site_id);
      removeMissing(ids);
      placeAll();
    } else if (message.type === "update" && Array.isArray(message.sites)) {
      for (const site of message.sites) upsert(site, true);
      if (Array.isArray(message.gone)) {
        const gone = new Set(message.gone);
        removeMissing(new Set([...rows.keys()].filter((id) => !gone.has(id))));
      }
    }
    if (message.feed) showFeed(message.feed);
    summarize();
  }

  function connect() {
    setLink("connecting", "connecting…");
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
    socket = ws;
    ws.onopen = () => {
      attempt = 0;
      heardAt = Date.now();
      setLink("open", "live");
    };
    ws.onmessage = (event) => {
      heardAt = Date.now();
      let message;
      try { message = JSON.parse(event.data); } catch (e) { return; }
      handle(message);
    };
    ws.onclose = () => lost(ws);
  }

  function lost(ws) {
    if (socket !== ws) return;  // already handled
    socket = null;
    attempt += 1;
    const delay = Math.min(RECONNECT_CAP, RECONNECT_BASE * 2 ** (attempt - 1)) * (0.5 + Math.random() / 2);
    setLink("closed", `reconnecting in ${Math.ceil(delay / 1000)} s…`);
    setTimeout(connect, delay);
  }

  setInterval(() => {
    for (const entry of rows.values()) tickRow(entry);
    if (socket && socket.readyState === WebSocket.OPEN && Date.now() - heardAt > SILENT_AFTER) {
      const dead = socket;  // nothing heard, not even a tick: do not wait for its closing handshake
      lost(dead);
      dead.close();
    }
  }, 1000);

  connect();
})();
