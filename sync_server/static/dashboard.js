// Tether dashboard: polls GET /v1/admin/overview with the admin token (kept in this
// tab's sessionStorage) and redraws; the requeue button POSTs /v1/dlq/{id}/requeue.
// Everything from the server is inserted as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const KEY = "tether.adminToken";
let timer = null;

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bar(fraction, status) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  const outer = el("div", { class: "bar", title: pct + "%" });
  outer.setAttribute("role", "progressbar");
  outer.setAttribute("aria-valuenow", String(pct));
  outer.append(el("div", { class: "fill " + (status || "") }));
  outer.firstChild.style.width = pct + "%";
  return outer;
}

function badge(status) { return el("span", { class: "badge " + status }, status); }

function token() { return sessionStorage.getItem(KEY); }

function showLogin(message) {
  sessionStorage.removeItem(KEY);
  if (timer) { clearTimeout(timer); timer = null; }
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("live").textContent = "signed out";
  $("live").className = "pill";
  if (message) {
    let notice = $("login-error");
    if (!notice) {
      notice = el("p", { class: "error", id: "login-error" });
      $("login-form").before(notice);
    }
    notice.textContent = message;
  }
}

async function api(method, path) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: "Bearer " + token() },
    cache: "no-store",
  });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401 || response.status === 403) {
    showLogin((body && body.error && body.error.message) || "token refused");
    throw new Error("unauthorized");
  }
  if (!response.ok) {
    const message = (body && body.error && body.error.message) || ("HTTP " + response.status);
    throw new Error(message);
  }
  return body;
}

function seconds(value) {
  return value === undefined ? undefined : value.toFixed(1) + " s";
}

function renderMetrics(data) {
  const m = data.metrics;
  const counts = data.counts;
  const cards = [
    ["workflows", data.total],
    ["running", (counts.running || 0) + (counts.compensating || 0)],
    ["completed", counts.completed || 0],
    ["compensated", counts.compensated || 0],
    ["parked", counts.parked || 0],
    ["failed", counts.failed || 0],
    ["cancelled", counts.cancelled || 0],
    ["DLQ depth", m.dlq_depth],
    ["step attempts", m.step_attempts],
    ["retries", m.step_retries],
    ["clients", m.connected_clients],
    ["outbox lag", seconds(m.outbox_lag_seconds)],
    ["saga lag", seconds(m.saga_lag_seconds)],
    ["alerts", m.alerts],
  ].filter(([, value]) => value !== undefined);  // a tenant admin gets no instance figures
  $("metrics").replaceChildren(...cards.map(([label, value]) =>
    el("div", { class: "metric", "data-metric": label },
      el("div", { class: "value" }, value), el("div", { class: "label" }, label))));
}

function renderWorkflows(data) {
  const rows = data.workflows.map((w) => {
    const steps = el("div", { class: "steps" });
    for (const [name, s] of Object.entries(w.steps)) {
      const fraction = s.status === "succeeded" ? 1 : s.progress;
      steps.append(el("div", { class: "step", title: s.error || "" },
        el("span", { class: "step-name" }, name),
        bar(fraction, s.status),
        el("span", { class: "step-status " + s.status },
          s.status + (s.attempts > 1 ? " ×" + s.attempts : ""))));
    }
    return el("tr", { "data-workflow": w.id, "data-status": w.status },
      el("td", {}, el("div", { class: "name" }, w.name),
        el("div", { class: "id muted" }, w.id)),
      el("td", { class: "status" }, badge(w.status)),
      el("td", {}, bar(w.progress, w.status),
        el("span", { class: "pct" }, Math.round(w.progress * 100) + "%")),
      el("td", {}, steps));
  });
  $("workflows").tBodies[0].replaceChildren(...rows);
}

async function requeue(entry, button) {
  button.disabled = true;
  button.textContent = "requeuing…";
  try {
    const view = await api("POST", "/v1/dlq/" + entry.id + "/requeue");
    $("dlq-message").textContent =
      "Requeued dead letter " + entry.id + ": workflow " + view.id + " will run again.";
  } catch (error) {
    $("dlq-message").textContent = "Requeue of " + entry.id + " failed: " + error.message;
    button.disabled = false;
    button.textContent = "Requeue";
  }
  refresh();
}

function renderDlq(data) {
  const byId = new Map(data.workflows.map((w) => [w.id, w]));
  const rows = data.dlq.map((entry) => {
    const button = el("button", { class: "requeue", "data-entry": String(entry.id) }, "Requeue");
    button.addEventListener("click", () => requeue(entry, button));
    const workflow = byId.get(entry.workflow_id);
    return el("tr", { "data-entry": String(entry.id), "data-workflow": entry.workflow_id },
      el("td", {}, entry.id),
      el("td", {}, el("div", { class: "id" }, entry.workflow_id),
        workflow ? badge(workflow.status) : null),
      el("td", {}, entry.step || ""),
      el("td", {}, entry.reason),
      el("td", {}, entry.attempts),
      el("td", { class: "error-text" }, entry.last_error || ""),
      el("td", {}, button));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 7, class: "muted" }, "empty")));
  $("dlq").tBodies[0].replaceChildren(...rows);
}

function renderBreakers(data) {
  const rows = data.breakers.map((b) =>
    el("tr", { "data-breaker": b.name },
      el("td", {}, b.name), el("td", {}, badge(b.state)), el("td", {}, b.failures ?? "")));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 3, class: "muted" }, "none yet")));
  $("breakers").tBodies[0].replaceChildren(...rows);
  const alerts = data.alerts.map((a) =>
    el("li", {}, el("span", { class: "badge alert" }, a.kind), " ",
      new Date(a.at * 1000).toLocaleTimeString(), " — ", a.message));
  if (!alerts.length) alerts.push(el("li", { class: "muted" }, "no alerts"));
  $("alerts").replaceChildren(...alerts);
}

const SECONDS_SLOS = ["mttr", "p95_completion"];
const AT_LEAST_SLOS = ["completion_24h"];

function renderSlos(data) {
  const shown = (name, v) => v === null ? "—"
    : SECONDS_SLOS.includes(name) ? v.toFixed(1) + " s" : (100 * v).toFixed(2) + " %";
  const rows = (data.slos || []).map((s) =>
    el("tr", { "data-slo": s.name, class: s.budget_left < 0 ? "error-text" : "" },
      el("td", {}, s.name),
      el("td", {}, (AT_LEAST_SLOS.includes(s.name) ? "≥ " : "≤ ") + shown(s.name, s.objective)),
      el("td", {}, shown(s.name, s.value)),
      el("td", {}, (100 * s.budget_left).toFixed(0) + " %")));
  $("slos").tBodies[0].replaceChildren(...rows);
}

function renderVersions(data) {
  const rows = (data.versions || []).map((v) =>
    el("tr", { "data-version": v.version },
      el("td", {}, v.workflow), el("td", {}, v.version), el("td", {}, badge(v.status)),
      el("td", {}, v.count)));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 4, class: "muted" }, "none")));
  $("versions").tBodies[0].replaceChildren(...rows);
}

async function refresh() {
  if (timer) { clearTimeout(timer); timer = null; }
  if (!token()) return;
  try {
    const data = await api("GET", "/v1/admin/overview?limit=50");
    $("server").textContent = data.server_id + " · log head " + data.head;
    $("live").textContent = "live";
    $("live").className = "pill live";
    renderMetrics(data);
    renderWorkflows(data);
    renderDlq(data);
    renderBreakers(data);
    renderSlos(data);
    renderVersions(data);
  } catch (error) {
    if (error.message === "unauthorized") return;
    $("live").textContent = "reconnecting";
    $("live").className = "pill stale";
  }
  if (token()) timer = setTimeout(refresh, POLL_MS);
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  refresh();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("token").value.trim());
  $("token").value = "";
  start();
});
$("logout").addEventListener("click", () => showLogin(null));

(function boot() {
  const url = new URL(window.location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl !== null) {
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
    // The server already refused a bad token (401 with the form); keep a good one.
    if (!$("login-error")) sessionStorage.setItem(KEY, fromUrl);
  }
  if (token()) start(); else showLogin(null);
})();
