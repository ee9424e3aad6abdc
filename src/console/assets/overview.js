// Overview: this node and the cluster it knows, requests per second and error share per
// route (busbar_requests_total, diffed between two refreshes), the config it runs and how
// its reloads went.

import { get, el, table, parseMetrics, samples, fmtTime, pct } from './api.js';

// The previous refresh's totals per route, to turn counters into rates.
let last = null;

function perRoute(metrics) {
  const routes = new Map();
  for (const s of samples(metrics, 'busbar_requests_total')) {
    const r = routes.get(s.labels.route) || { service: s.labels.service, total: 0, errors: 0 };
    r.total += s.value;
    if (s.labels.class === '5xx') r.errors += s.value;
    routes.set(s.labels.route, r);
  }
  return routes;
}

export async function render() {
  const [o, text] = await Promise.all([get('/console/api/overview'), get('/metrics')]);
  const metrics = parseMetrics(text);
  const now = Date.now();
  const routes = perRoute(metrics);
  const prev = last;
  last = { at: now, routes };

  const one = (name, labels) => {
    const s = samples(metrics, name).find((x) =>
      Object.entries(labels || {}).every(([k, v]) => x.labels[k] === v));
    return s ? s.value : null;
  };
  const liveNodes = one('busbar_cluster_live_nodes');
  const reloadSamples = samples(metrics, 'busbar_config_reloads_total');
  const lastOk = one('busbar_config_last_reload_success_timestamp_seconds');

  const node = el('section', { class: 'card', id: 'node' },
    el('h3', {}, 'This node'),
    el('dl', { class: 'facts' },
      el('dt', {}, 'Node'), el('dd', { id: 'node-id' }, o.node.id),
      el('dt', {}, 'State'), el('dd', { id: 'node-phase', class: o.node.phase === 'ready' ? 'ok' : 'warn' }, o.node.phase),
      el('dt', {}, 'Version'), el('dd', {}, `${o.node.version} (${o.node.commit})`),
      el('dt', {}, 'Process'), el('dd', {}, `pid ${o.node.pid}, admin ${o.node.admin}`)));

  const cluster = el('section', { class: 'card', id: 'cluster' },
    el('h3', {}, 'Cluster'),
    el('dl', { class: 'facts' },
      el('dt', {}, 'Registry'), el('dd', { id: 'cluster-registry' }, o.cluster.registry,
        o.cluster.degraded ? el('span', { class: 'bad' }, ' (degraded: serving from memory and snapshot)') : ''),
      el('dt', {}, 'Live nodes'), el('dd', { id: 'cluster-nodes' },
        liveNodes !== null ? String(liveNodes) + ' (from Redis)' : '1 (this node; no [cluster] configured)')));

  const reloads = reloadSamples.length
    ? reloadSamples.map((s) => `${s.labels.result} ${s.value}`).join(', ')
    : 'none since start';
  const cfg = el('section', { class: 'card', id: 'config-card' },
    el('h3', {}, 'Configuration'),
    el('dl', { class: 'facts' },
      el('dt', {}, 'File'), el('dd', {}, o.config.file),
      el('dt', {}, 'Generation'), el('dd', { id: 'config-generation' }, String(o.config.generation)),
      el('dt', {}, 'Hash'), el('dd', {}, o.config.hash),
      el('dt', {}, 'Loaded'), el('dd', {}, fmtTime(o.config.loaded_at_ms)),
      el('dt', {}, 'Reloads'), el('dd', { id: 'config-reloads' }, reloads),
      el('dt', {}, 'Last good load'), el('dd', {}, lastOk ? fmtTime(lastOk * 1000) : '—'),
      el('dt', {}, 'Routes, services'), el('dd', {}, `${o.config.routes}, ${o.config.services}`)));

  const rows = [...routes.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([name, r]) => {
    const p = prev && prev.routes.get(name);
    const dt = prev ? (now - prev.at) / 1000 : 0;
    const dTotal = p ? r.total - p.total : null;
    const dErr = p ? r.errors - p.errors : null;
    const rate = dTotal !== null && dt > 0 ? (dTotal / dt).toFixed(1) : '…';
    const share = dTotal ? pct(dErr / dTotal) : (r.total ? pct(r.errors / r.total) + ' (all time)' : '—');
    return el('tr', { 'data-route': name },
      el('td', {}, name), el('td', {}, r.service || '—'),
      el('td', { class: 'rate' }, rate), el('td', { class: (dErr || 0) > 0 ? 'bad' : '' }, share),
      el('td', { class: 'total' }, String(r.total)));
  });
  const traffic = el('section', { class: 'card' },
    el('h3', {}, 'Traffic per route'),
    rows.length
      ? table(['Route', 'Service', 'Requests/s', '5xx share', 'Requests since start'], rows, { id: 'route-rates' })
      : el('p', { class: 'muted' }, 'No requests yet.'));

  return el('div', { id: 'overview' }, el('h2', {}, 'Overview'),
    el('div', { class: 'cards' }, node, cluster, cfg), traffic);
}
