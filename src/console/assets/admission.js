// Admission: per route, who it admits and how (identity, rate limit, queue), the queue
// now (busbar_queue_waiting, busbar_service_in_flight) and the refusals by reason
// (busbar_admission_decisions_total); the users refused most (a bounded top list).

import { get, el, table, parseMetrics, samples, fmtMs } from './api.js';

const ADMITTED = new Set(['admitted', 'queued']);

function rate(l) {
  if (!l) return 'none';
  const per = l.per_ms === 1000 ? 's' : l.per_ms === 60000 ? 'min' : l.per_ms === 3600000 ? 'h' : fmtMs(l.per_ms);
  let s = `${l.count}/${per} per user, burst ${l.burst}, ${l.scope}`;
  if (l.global) s += `; route ${l.global.count} per ${fmtMs(l.global.per_ms)}`;
  return s;
}

export async function render() {
  const [d, text] = await Promise.all([get('/console/api/admission'), get('/metrics')]);
  const metrics = parseMetrics(text);
  const gauge = (name, service) => {
    const s = samples(metrics, name).find((x) => x.labels.service === service);
    return s ? s.value : 0;
  };
  const refusals = new Map();
  for (const s of samples(metrics, 'busbar_admission_decisions_total')) {
    if (ADMITTED.has(s.labels.decision) || !s.value) continue;
    const m = refusals.get(s.labels.route) || [];
    m.push(`${s.labels.decision}${s.labels.reason ? ' (' + s.labels.reason + ')' : ''}: ${s.value}`);
    refusals.set(s.labels.route, m);
  }
  const rows = d.routes.map((r) => {
    const q = r.queue;
    const queue = q.max_in_flight
      ? `${gauge('busbar_service_in_flight', r.service)}/${q.max_in_flight} in flight, `
        + `${gauge('busbar_queue_waiting', r.service)} waiting`
      : 'no max_in_flight';
    return el('tr', { 'data-route': r.route },
      el('td', {}, r.route), el('td', {}, r.service),
      el('td', {}, r.identity.join(', ') + (r.require_auth ? ' (auth required)' : '')),
      el('td', { class: 'rate-limit' }, rate(r.rate_limit)),
      el('td', {}, `depth ${q.max_depth} per user, wait ${fmtMs(q.max_wait_ms)}`),
      el('td', { class: 'queue' }, queue),
      el('td', { class: 'refusals' }, (refusals.get(r.route) || ['none']).join('; ')));
  });
  const top = (d.top_refused || []).map((u) => el('tr', { 'data-user': u.user },
    el('td', { class: 'user' }, u.user),
    el('td', { class: 'refusals' }, String(u.refusals) + (u.overcount ? ` (at most ${u.overcount} of them others')` : '')),
    el('td', {}, u.route), el('td', {}, u.reason)));
  return el('div', { id: 'admission' }, el('h2', {}, 'Admission'),
    el('section', { class: 'card' },
      table(['Route', 'Service', 'Identity', 'Rate limit', 'Queue policy', 'Queue now', 'Refusals by reason'], rows)),
    el('section', { class: 'card' }, el('h3', {}, 'Users refused most (rate limit and queue; approximate, at most 20)'),
      top.length ? table(['User', 'Refusals', 'Latest route', 'Latest reason'], top, { id: 'top-refused' })
        : el('p', { class: 'muted' }, 'Nobody refused since start.')));
}
