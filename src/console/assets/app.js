// The console's shell: the token form, the page router (#overview, #services, …), the
// refresh every few seconds, the error banner and the confirmation dialog.

import { ApiError, setToken, token, el } from './api.js';
import * as overview from './overview.js';
import * as services from './services.js';
import * as admission from './admission.js';
import * as releases from './releases.js';
import * as config from './config.js';

const PAGES = { overview, services, admission, releases, config };
const REFRESH_MS = 3000;

const ui = {
  /** Shows an error (or a notice) above the page; null clears it. */
  banner(message, kind = 'error') {
    const b = document.getElementById('banner');
    if (kind !== 'error' || !message) actionFailed = false;
    if (!message) {
      b.hidden = true;
      b.textContent = '';
      b.removeAttribute('class');
      return;
    }
    b.className = kind;
    b.textContent = message;
    b.hidden = false;
  },
  /** Shows an API failure in the banner, worded for an operator. An action's failure
   * stays until the operator moves on; a refresh's failure does not cover it. */
  fail(what, e, fromLoad = false) {
    if (fromLoad && actionFailed) return;
    actionFailed = !fromLoad;
    if (e instanceof ApiError) {
      const hint = e.status === 401 || e.status === 403 ? ' (check the admin token)' : '';
      ui.banner(`${what}: ${e.status} ${e.code}: ${e.message}${hint}`);
    } else {
      ui.banner(`${what}: ${e.message || e}`);
    }
  },
  /** Asks before an action; resolves true on Confirm. */
  confirm(title, body, confirmLabel) {
    const d = document.getElementById('dialog');
    document.getElementById('dialog-title').textContent = title;
    document.getElementById('dialog-body').replaceChildren(body);
    const ok = document.getElementById('dialog-confirm');
    const cancel = document.getElementById('dialog-cancel');
    ok.textContent = confirmLabel || 'Confirm';
    d.hidden = false;
    paused += 1;
    return new Promise((resolve) => {
      const done = (answer) => {
        d.hidden = true;
        paused -= 1;
        ok.removeEventListener('click', yes);
        cancel.removeEventListener('click', no);
        resolve(answer);
      };
      const yes = () => done(true);
      const no = () => done(false);
      ok.addEventListener('click', yes);
      cancel.addEventListener('click', no);
    });
  },
  /** While > 0 (a form is open), the page is not redrawn by the refresh. */
  hold(on) { paused += on ? 1 : -1; },
  /** Redraws the current page now (after an action). */
  refresh() { return draw(true); },
};

let paused = 0;
let drawing = false;
let again = false;
// The banner shows a page's load failure: cleared when a later load works.
let loadFailed = false;
// The banner shows an action's failure (kept until the token or the page changes).
let actionFailed = false;

function current() {
  const name = location.hash.replace(/^#/, '');
  return PAGES[name] ? name : 'overview';
}

async function draw(force) {
  if (paused > 0 && !force) return;
  if (drawing) {
    again = again || force;
    return;
  }
  drawing = true;
  const name = current();
  for (const a of document.querySelectorAll('#nav a')) {
    a.classList.toggle('active', a.dataset.page === name);
  }
  try {
    const node = await PAGES[name].render(ui);
    // The page may have changed while its data was on the way.
    if (name === current() && (paused === 0 || force)) {
      document.getElementById('page').replaceChildren(node);
      document.body.dataset.page = name;
      document.getElementById('refreshed').textContent =
        'refreshed ' + new Date().toLocaleTimeString();
      if (loadFailed && !actionFailed) ui.banner(null);
      loadFailed = false;
    }
  } catch (e) {
    ui.fail('Could not load the ' + name + ' page', e, true);
    loadFailed = true;
  } finally {
    drawing = false;
    if (again) {
      again = false;
      draw(true);
    }
  }
}

function showTokenState() {
  document.getElementById('token-state').textContent = token() ? 'token set' : 'no token';
}

function init() {
  const form = document.getElementById('token-form');
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = document.getElementById('token');
    setToken(input.value.trim());
    input.value = '';
    showTokenState();
    ui.banner(null);
    draw(true);
  });
  document.getElementById('token-forget').addEventListener('click', () => {
    setToken('');
    showTokenState();
    draw(true);
  });
  window.addEventListener('hashchange', () => { ui.banner(null); draw(true); });
  showTokenState();
  if (!token()) ui.banner('Enter the admin token (BUSBAR_ADMIN_TOKEN) to use the console.', 'info');
  draw(true);
  setInterval(() => draw(false), REFRESH_MS);
}

init();
export { el };
