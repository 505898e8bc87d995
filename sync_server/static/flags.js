// Tether dashboard, flags card: lists GET /v1/flags with the admin token and shows a
// switch per boolean flag. Flipping it PUTs /v1/flags/{name} {"value": …} (the server
// checks the admin role and the tenant, and writes the change to the audit log).
// Uses el(), $() and token() from dashboard.js; server data is inserted as text only.
"use strict";

const FLAGS_POLL_MS = 2000;
let flagsTimer = null;

function tokenTenant() {
  try {
    const part = token().split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).tenant;
  } catch (e) { return null; }
}

async function putFlag(flag, value) {
  const query = flag.scope === "*" ? "" : "?tenant=" + encodeURIComponent(flag.scope);
  const response = await fetch("/v1/flags/" + encodeURIComponent(flag.name) + query, {
    method: "PUT",
    headers: { Authorization: "Bearer " + token(), "Content-Type": "application/json" },
    body: JSON.stringify({ value }),
    cache: "no-store",
  });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error && body.error.message) || ("HTTP " + response.status));
  }
  return body;
}

function renderFlags(flags) {
  const tenant = tokenTenant();
  const rows = flags.map((flag) => {
    const editable = !flag.overridden && (tenant === "*" || flag.scope === tenant);
    let control;
    if (typeof flag.default === "boolean") {
      control = el("input", { type: "checkbox", role: "switch", class: "flag-switch",
        "aria-label": flag.name });
      control.checked = flag.default;
      control.disabled = !editable;
      control.addEventListener("change", async () => {
        control.disabled = true;
        try {
          const answer = await putFlag(flag, control.checked);
          $("flags-message").textContent = flag.name + " is now " +
            JSON.stringify(answer.after.default) + " (version " + answer.after.version + ")";
        } catch (error) {
          control.checked = !control.checked;
          $("flags-message").textContent = "Not changed: " + error.message;
        }
        refreshFlags();
      });
    } else {
      control = el("code", {}, JSON.stringify(flag.default));
    }
    const rules = flag.rules.length ? flag.rules.length + " rules" : "";
    return el("tr", { "data-flag": flag.name, "data-scope": flag.scope },
      el("td", {}, flag.name), el("td", {}, flag.scope + (flag.overridden ? " (overridden)" : "")),
      el("td", {}, control), el("td", {}, rules), el("td", {}, String(flag.version)),
      el("td", {}, flag.updated_by));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "muted" }, "no flags")));
  $("flags").tBodies[0].replaceChildren(...rows);
}

async function refreshFlags() {
  if (flagsTimer) { clearTimeout(flagsTimer); flagsTimer = null; }
  if (!token() || $("app").hidden) {
    flagsTimer = setTimeout(refreshFlags, FLAGS_POLL_MS);
    return;
  }
  try {
    const response = await fetch("/v1/flags", {
      headers: { Authorization: "Bearer " + token() }, cache: "no-store" });
    if (response.ok) renderFlags((await response.json()).flags);
  } catch (e) { /* the overview poll shows the connection state */ }
  flagsTimer = setTimeout(refreshFlags, FLAGS_POLL_MS);
}

refreshFlags();
