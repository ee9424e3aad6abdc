// Releases: each split route's stable version, weights and rules, the override in force
// and its history, with Roll back and Set weights. Both call the admin API's release
// calls (PUT /v1/releases/{route}, POST /v1/releases/{route}/rollback) after a
// confirmation that shows what will change; the page then shows the state busbar reports.

import { get, call, el, table, fmtTime, pct } from './api.js';

/** [[version, percent]] of a split, stable first; no weights means all to stable. */
function shares(split) {
  const w = split.weights || {};
  const entries = Object.entries(w);
  if (!entries.length) return [[split.stable, 100]];
  const stable = w[split.stable] ?? 100 - entries.reduce((a, [, n]) => a + n, 0);
  return [[split.stable, stable], ...entries.filter(([v]) => v !== split.stable)];
}

function describe(split) {
  const s = shares(split).map(([v, n]) => `${v} ${n}%`).join(' · ');
  const rules = (split.rules || []).length;
  return rules ? `${s}; ${rules} rule${rules > 1 ? 's' : ''} first` : s;
}

function rule(r) {
  const when = r.header ? `header ${r.header.name} = ${r.header.value}`
    : r.cookie ? `cookie ${r.cookie.name} = ${r.cookie.value}`
    : r.users ? `users ${r.users.length > 5 ? r.users.length + ' listed' : r.users.join(', ')}`
    : r.user_hash ? `user hash ${r.user_hash.from}–${r.user_hash.to}`
    : r.client_cidr ? `client in ${[].concat(r.client_cidr).join(', ')}` : 'always';
  return el('li', {}, `${when} → ${r.version}`);
}

function change(before, after) {
  return el('div', { class: 'change' },
    el('p', {}, 'Now: ', el('del', { id: 'change-before' }, describe(before))),
    el('p', {}, 'After: ', el('ins', { id: 'change-after' }, describe(after))));
}

/** The history of one route's override, newest first, from the config history. */
function history(route, entries) {
  const rows = [];
  for (let i = 0; i < entries.length; i++) {
    const e = entries[i];
    const mine = e.releases[route];
    const older = entries[i + 1] ? entries[i + 1].releases[route] : undefined;
    if (JSON.stringify(mine) === JSON.stringify(older)) continue;
    rows.push(el('tr', {}, el('td', {}, e.at), el('td', {}, e.source),
      el('td', {}, mine ? describe(mine) : 'override dropped: the file\'s split')));
  }
  return rows.length ? table(['When', 'By', 'Split'], rows, { class: 'history' })
    : el('p', { class: 'muted' }, 'No override changes in the kept history.');
}

function weightsForm(r, known, ui) {
  const split = r.split;
  const versions = new Set([...Object.keys(split.weights || {}), ...known]);
  for (const v of Object.keys(r.served || {})) if (!v.startsWith('*')) versions.add(v);
  for (const rl of split.rules || []) versions.add(rl.version);
  versions.delete(split.stable);
  versions.delete('');
  const current = Object.fromEntries(shares(split));
  const inputs = [...versions].sort().map((v) => el('label', {}, `${v} `,
    el('input', { type: 'number', min: 0, max: 100, step: 1, name: v, value: current[v] ?? 0, 'data-version': v }), '%'));
  const form = el('form', { class: 'weights-form', 'data-route': r.route },
    ...inputs,
    el('span', { class: 'muted' }, `${split.stable} (stable) gets the rest`),
    el('button', { type: 'submit', class: 'primary apply-weights' }, 'Apply'),
    el('button', { type: 'button', class: 'cancel-weights' }, 'Cancel'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const weights = {};
    for (const i of form.querySelectorAll('input[data-version]')) {
      const n = Number(i.value);
      if (n > 0) weights[i.dataset.version] = n;
    }
    const next = { stable: split.stable, weights, rules: split.rules || [] };
    const ok = await ui.confirm(`Set weights on ${r.route}?`, change(split, next), 'Set weights');
    if (!ok) return;
    try {
      await call('PUT', `/v1/releases/${encodeURIComponent(r.route)}`, next);
      ui.banner(`Weights on ${r.route} set.`, 'info');
      ui.hold(false);
      form.remove();
    } catch (e) {
      ui.fail(`Setting weights on ${r.route} failed`, e);
    }
    ui.refresh();
  });
  form.querySelector('.cancel-weights').addEventListener('click', () => {
    ui.hold(false);
    form.remove();
    ui.refresh();
  });
  return form;
}

function release(r, entries, known, ui) {
  const split = r.split;
  const bar = el('div', { class: 'bar' },
    shares(split).map(([v, n]) => { const s = el('span', { title: `${v} ${n}%` }); s.style.width = n + '%'; return s; }));
  const served = Object.entries(r.served || {}).map(([v, s]) =>
    `${v || '(no version)'}: ${s.requests} (${pct(s.share)})`).join(', ') || 'nothing yet';
  const card = el('section', { class: 'card release', 'data-route': r.route },
    el('h3', {}, r.route, ' ', el('span', { class: 'muted' }, `→ ${r.service}`), ' ',
      el('span', { class: 'pill origin' }, r.origin === 'override' ? 'override in force' : 'from the file')),
    el('dl', { class: 'facts' },
      el('dt', {}, 'Stable'), el('dd', { class: 'stable' }, split.stable),
      el('dt', {}, 'Weights'), el('dd', { class: 'weights' }, shares(split).map(([v, n]) => `${v} ${n}%`).join(' · ')),
      el('dt', {}, 'Since'), el('dd', {}, fmtTime(r.since_ms)),
      el('dt', {}, 'Served'), el('dd', { class: 'served' }, served),
      el('dt', {}, 'Fell back to stable'), el('dd', {}, String(r.fallbacks ?? 0))),
    bar,
    (split.rules || []).length ? el('div', {}, el('span', { class: 'muted' }, 'Rules, in order:'),
      el('ol', { class: 'rules' }, split.rules.map(rule))) : el('p', { class: 'muted rules' }, 'No rules.'));
  const actions = el('div', { class: 'actions' });
  const rollback = el('button', { type: 'button', class: 'danger rollback' }, 'Roll back');
  rollback.addEventListener('click', async () => {
    const after = { stable: split.stable, weights: {}, rules: [] };
    const ok = await ui.confirm(`Roll back ${r.route}?`,
      el('div', {}, change(split, after),
        el('p', {}, `Every request on ${r.route} goes to ${split.stable} at once, on every node.`)),
      'Roll back');
    if (!ok) return;
    try {
      await call('POST', `/v1/releases/${encodeURIComponent(r.route)}/rollback`);
      ui.banner(`${r.route} rolled back: everything to ${split.stable}.`, 'info');
    } catch (e) {
      ui.fail(`Rolling back ${r.route} failed`, e);
    }
    ui.refresh();
  });
  const setWeights = el('button', { type: 'button', class: 'set-weights' }, 'Set weights');
  setWeights.addEventListener('click', () => {
    if (card.querySelector('.weights-form')) return;
    ui.hold(true);
    card.append(weightsForm(r, known, ui));
  });
  actions.append(rollback, setWeights);
  card.append(actions, el('details', {}, el('summary', {}, 'Override history'), history(r.route, entries)));
  return card;
}

export async function render(ui) {
  const [d, h, s] = await Promise.all([
    get('/v1/releases'), get('/v1/config/history'), get('/console/api/services')]);
  // The versions each service's instances run, offered in Set weights.
  const versions = new Map(s.services.map((x) =>
    [x.name, [...new Set(x.instances.map((i) => i.version).filter((v) => v))]]));
  const entries = h.newest_first || [];
  const out = el('div', { id: 'releases' }, el('h2', {}, 'Releases'),
    el('p', { class: 'muted' }, `As this node reports it (config generation ${d.generation}). `
      + 'With an etcd registry a change applies on every node.'));
  if (!d.releases.length) out.append(el('p', { class: 'muted', id: 'no-releases' }, 'No route has a split.'));
  for (const r of d.releases) out.append(release(r, entries, versions.get(r.service) || [], ui));
  return out;
}
