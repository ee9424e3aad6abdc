// Calls to busbar's admin API, the token, DOM building and /metrics parsing.
// Every call carries the admin token typed once into the page (kept in sessionStorage:
// gone with the tab, never in a cookie or a URL).

const KEY = 'busbar.adminToken';

export function token() {
  return sessionStorage.getItem(KEY) || '';
}

export function setToken(t) {
  if (t) sessionStorage.setItem(KEY, t);
  else sessionStorage.removeItem(KEY);
}

/** A refusal or failure of the admin API, with its JSON error code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** One call to the admin API; the parsed JSON (or text) or an ApiError. */
export async function call(method, path, body) {
  const headers = { Accept: 'application/json' };
  const t = token();
  if (t) headers.Authorization = 'Bearer ' + t;
  const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'unreachable', 'busbar did not answer: ' + e.message);
  }
  const text = await resp.text();
  let data = null;
  try { data = JSON.parse(text); } catch { /* /metrics is text */ }
  if (!resp.ok) {
    const code = (data && data.error) || 'http_' + resp.status;
    const message = (data && data.message) || text.slice(0, 500);
    throw new ApiError(resp.status, code, message);
  }
  return data === null ? text : data;
}

export const get = (path) => call('GET', path);

/** Builds an element; children are nodes or text (never parsed as HTML). */
export function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/** A table from a header row and rows of cells. */
export function table(head, rows, attrs) {
  return el('table', attrs,
    el('thead', {}, el('tr', {}, head.map((h) => el('th', {}, h)))),
    el('tbody', {}, rows));
}

/** Prometheus text → [{name, labels, value}]; comments and malformed lines skipped. */
export function parseMetrics(text) {
  const out = [];
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const l of text.split('\n')) {
    if (!l || l.startsWith('#')) continue;
    const m = line.exec(l);
    if (!m) continue;
    const labels = {};
    for (const lm of (m[2] || '').matchAll(label)) labels[lm[1]] = lm[2].replace(/\\(.)/g, '$1');
    const value = Number(m[3]);
    if (!Number.isNaN(value)) out.push({ name: m[1], labels, value });
  }
  return out;
}

/** The samples of one metric. */
export function samples(metrics, name) {
  return metrics.filter((s) => s.name === name);
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms < 1000) return ms + ' ms';
  const s = ms / 1000;
  return s < 120 ? s.toFixed(s < 10 ? 1 : 0) + ' s' : Math.round(s / 60) + ' min';
}

export function fmtTime(ms) {
  return ms ? new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z') : '—';
}

export function pct(x) {
  return (Math.round(x * 1000) / 10).toFixed(1) + '%';
}
