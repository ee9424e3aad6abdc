// Services: each service's instances (address, version, zone, weight, health, ejection,
// sidecar or direct path, where it came from, lease time left) and the registry's
// self-preservation and degraded banners.

import { get, el, table, fmtMs } from './api.js';

function health(i) {
  const cls = i.health === 'healthy' ? 'ok' : i.health === 'ejected' ? 'bad' : 'warn';
  return el('td', { class: 'health' },
    el('span', { class: 'pill ' + cls }, i.health),
    i.ejected_for_ms ? el('span', { class: 'muted' }, ` back in ${fmtMs(i.ejected_for_ms)}`) : '');
}

function path(i) {
  if (!i.sidecar) return el('td', {}, 'direct');
  const s = i.sidecar;
  return el('td', {}, `${s.path || (s.up ? 'sidecar' : 'direct')} `,
    el('span', { class: 'muted' }, `(sidecar ${s.addr} ${s.up ? 'up' : 'down'})`));
}

function lease(i) {
  if (i.source !== 'registered') return '—';
  if (i.ttl_left_ms === null || i.ttl_left_ms === undefined) return `ttl ${i.ttl_secs} s (lease in etcd)`;
  return `${fmtMs(i.ttl_left_ms)} of ${i.ttl_secs} s`;
}

export async function render() {
  const d = await get('/console/api/services');
  const out = el('div', { id: 'services' }, el('h2', {}, 'Services'));
  const sp = d.self_preservation || {};
  if (sp.active) {
    out.append(el('div', { class: 'notice warn', id: 'self-preservation' },
      `Self-preservation: ${sp.missing_renewals} of ${sp.expected_renewals} expected renewals are missing, `
      + 'so instances are not expired (health checks still apply).'));
  }
  if (d.degraded) {
    out.append(el('div', { class: 'notice bad', id: 'registry-degraded' },
      'Registry degraded: etcd is unreachable; this node routes from memory and its snapshot.'));
  }
  for (const s of d.services) {
    const rows = s.instances.map((i) => el('tr', { 'data-instance': i.id },
      el('td', { class: 'id' }, i.id), el('td', { class: 'addr' }, i.addr),
      el('td', { class: 'version' }, i.version || '—'), el('td', { class: 'zone' }, i.zone || '—'),
      el('td', {}, String(i.weight)), health(i), el('td', {}, String(i.in_flight)), path(i),
      el('td', { class: 'source' }, i.source), el('td', { class: 'ttl' }, lease(i))));
    out.append(el('section', { class: 'card', 'data-service': s.name },
      el('h3', {}, s.name, ' ',
        el('span', { class: 'muted' }, `${s.protocol}, ${s.balance}${s.registration ? ', takes registrations' : ''}`),
        s.panic_mode ? el('span', { class: 'pill bad' }, 'panic mode') : ''),
      rows.length
        ? table(['Instance', 'Address', 'Version', 'Zone', 'Weight', 'Health', 'In flight', 'Path', 'Source', 'Lease left'], rows)
        : el('p', { class: 'muted' }, 'No instances.')));
  }
  return out;
}
