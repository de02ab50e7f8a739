// Shared by every page: JSON calls to the same server (the token rides in the
// HttpOnly cookie the page link set) and DOM helpers that only ever write text.
"use strict";

// POST (or GET when body is undefined) JSON; resolves to the parsed reply or throws
// an Error carrying the server's message (OpenAI's error shape).
async function api(path, body, method) {
  const init = { method: method || (body === undefined ? "GET" : "POST"), credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!res.ok) {
    const msg = data && data.error && data.error.message ? data.error.message : res.status + " " + text;
    const err = new Error(msg);
    err.status = res.status;
    throw err;
  }
  return data;
}

// An element with attributes and children; strings become text nodes, never HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

// A JSON value a template embedded in <script type="application/json" id=...>.
function pageData(id) {
  const node = document.getElementById(id || "page-data");
  return node ? JSON.parse(node.textContent) : {};
}

// A client-generated id, so that a retried submission is stored once.
function clientId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
