// Config: the running configuration (secrets redacted), the history of applied
// configurations, and Reload (POST /v1/reload), which shows a refused file's errors
// with their file:line:col.

import { get, call, el, table } from './api.js';

// The outcome of the last reload clicked here, kept across redraws of the page.
let outcome = null;

function outcomeNode() {
  if (!outcome) return el('div', { id: 'reload-outcome' });
  if (outcome.ok) {
    const r = outcome.ok;
    return el('div', { id: 'reload-outcome' }, el('p', { id: 'reload-result', class: 'ok' },
      `Reloaded: generation ${r.generation}. Applied: ${(r.applied || []).join(', ') || 'nothing changed'}.`
      + ((r.not_applied || []).length ? ` Needs a restart: ${r.not_applied.join(', ')}.` : '')));
  }
  return el('div', { id: 'reload-outcome' },
    el('p', { class: 'bad' }, `Reload refused (${outcome.status} ${outcome.code}); the running configuration is unchanged:`),
    el('pre', { class: 'errors', id: 'reload-errors' }, outcome.message));
}

export async function render(ui) {
  const [c, h] = await Promise.all([get('/console/api/config'), get('/v1/config/history')]);
  const reload = el('button', { type: 'button', class: 'primary', id: 'reload' }, 'Reload from file');
  reload.addEventListener('click', async () => {
    reload.disabled = true;
    try {
      outcome = { ok: await call('POST', '/v1/reload') };
    } catch (e) {
      outcome = { status: e.status, code: e.code, message: e.message };
      if (e.status === 401 || e.status === 403) ui.fail('Reload refused', e);
    }
    ui.refresh();
  });
  const back = el('button', { type: 'button', id: 'config-rollback' }, 'Back to the previous configuration');
  back.addEventListener('click', async () => {
    const ok = await ui.confirm('Return to the previous configuration?',
      el('p', {}, 'The configuration before the newest applies again (validated like a reload); '
        + 'the file is not rewritten, so the next reload reads it again.'), 'Go back');
    if (!ok) return;
    try {
      const r = await call('POST', '/v1/config/rollback');
      ui.banner(`Configuration rolled back to ${r.digest} (generation ${r.generation}).`, 'info');
    } catch (e) {
      ui.fail('Config rollback failed', e);
    }
    ui.refresh();
  });
  const rows = (h.newest_first || []).map((e) => el('tr', {},
    el('td', {}, e.at), el('td', {}, e.source), el('td', { class: 'digest' }, e.digest),
    el('td', {}, String(e.bytes)), el('td', {}, Object.keys(e.releases || {}).join(', ') || '—')));
  return el('div', { id: 'config' }, el('h2', {}, 'Config'),
    el('section', { class: 'card' },
      el('p', {}, `Running ${c.file}, generation ${c.generation}, digest ${c.digest || '—'}.`),
      el('div', { class: 'actions' }, reload, back), outcomeNode()),
    el('section', { class: 'card' }, el('h3', {}, 'History (newest first)'),
      table(['Applied', 'By', 'Digest', 'Bytes', 'Overrides'], rows, { id: 'config-history' })),
    el('section', { class: 'card' }, el('h3', {}, 'Running configuration (secrets redacted)'),
      el('pre', { id: 'config-text' }, c.text
        ? c.text.replace(/\n$/, '').split('\n').map((l) => el('span', { class: 'line' }, l + '\n'))
        : '(not kept)')));
}
