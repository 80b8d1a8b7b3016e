// Real-browser test of the live page: Debian's Chromium (/usr/bin/chromium) driven by
// playwright-core loads the page from a running gateway (embedded broker), connects,
// receives published messages, shows a server `error` without reconnecting in a loop,
// reconnects by itself when the gateway drains and a new one starts on the same port, and
// resumes after a network cut (a proxy in this process) with every message exactly once.
//
// Environment:
//   GATEWAY_BIN      gateway binary (default: ../../target/debug/events-gateway)
//   CHROMIUM_BIN     browser (default: /usr/bin/chromium)
//   PAGE_URL         where the page is loaded from. Unset: http://127.0.0.1:<gateway port>/,
//                    the page served by the gateway itself. Set (e.g. a static server serving
//                    web/): the test opens PAGE_URL with `?gateway=http://127.0.0.1:<port>`
//                    added, so the page talks to the gateway under test.
//   SCREENSHOT_PATH  where the screenshot goes (default: ../../target/screenshot.png; set it to
//                    "$PWD/docs/screenshot.png" from the repository root to refresh the README's picture)

import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import {
  GATEWAY_BIN, deadline, startGateway, logsOf, waitHealthy, stopGateway, freePort, publish, startProxy, runShell, killAll,
} from '../js/gateway.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM_BIN = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const PAGE_URL = process.env.PAGE_URL || '';
const SCREENSHOT_PATH = path.resolve(HERE, process.env.SCREENSHOT_PATH || '../../target/screenshot.png');

const CONNECT_PATH = '/api/events/v1/connect/';
const EXCHANGE = kind => `exchange/taskcluster-queue/v1/${kind}`;
const KINDS = ['task-defined', 'task-pending', 'task-running', 'task-completed', 'task-failed', 'task-exception'];
// What the page's editor holds at first (a Treeherder-style example).
const EXAMPLE = {bindings: KINDS.map(k => ({exchange: EXCHANGE(k), routingKeyPattern: 'route.tc-treeherder.v2.#'}))};
const RUN = Math.random().toString(36).slice(2, 8);

function taskMessage(i, {kind = 'task-completed', project = 'try'} = {}) {
  const taskId = `bt${RUN}task${i}`.padEnd(22, 'x');
  const taskGroupId = `bt${RUN}group`.padEnd(22, 'x');
  const revision = `${RUN}${i}`.padEnd(40, '0');
  const marker = `browser-test-${RUN}-${i}`;
  return {
    marker,
    route: `tc-treeherder.v2.${project}.${revision}.${1000 + i}`,
    message: {
      exchange: EXCHANGE(kind),
      routingKey: `primary.${taskId}.0.us-east-1.i-0browsertest.proj-gecko.b-linux.gecko-level-1.${taskGroupId}.`,
      cc: [`route.tc-treeherder.v2.${project}.${revision}.${1000 + i}`],
      payload: {marker, runId: 0, status: {taskId, taskGroupId, state: kind.replace('task-', ''), provisionerId: 'proj-gecko'}},
    },
  };
}

// ---- browser -------------------------------------------------------------------------------

let browser;
let pageErrors = [];
const contexts = new Set();

function pageUrl(gw) {
  if (!PAGE_URL) return `${gw.origin}/`;
  const u = new URL(PAGE_URL);
  u.searchParams.set('gateway', gw.origin);
  return u.href;
}

async function openPage(gw, viewport = {width: 1280, height: 900}) {
  const context = await browser.newContext({viewport});
  contexts.add(context);
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.on('pageerror', e => pageErrors.push(`uncaught: ${e.message}`));
  page.on('console', m => {
    if (m.type() === 'error' && /Content Security Policy|Refused to/i.test(m.text())) pageErrors.push(`console: ${m.text()}`);
  });
  const response = await page.goto(pageUrl(gw));
  assert.ok(response && response.ok(), `GET ${pageUrl(gw)} answered ${response && response.status()}`);
  assert.equal(await page.title(), 'events-gateway live');
  // The page marks <html data-app="ready"> once its script has run (a Content-Security-Policy
  // that blocks the inline script or style shows up here, in pageErrors).
  await page.waitForSelector('html[data-app="ready"]', {state: 'attached', timeout: 5000})
    .catch(e => { throw new Error(`the page script did not start: ${JSON.stringify(pageErrors)}`, {cause: e}); });
  return page;
}

function recordConnects(page) {
  const requests = [];
  page.on('request', r => {
    if (new URL(r.url()).pathname !== CONNECT_PATH) return;
    // `answered`: the request reached a gateway. One the network stack failed (connection
    // refused while no gateway listens) may show only the headers known before sending.
    requests.push(Promise.all([r.allHeaders(), r.response().catch(() => null)])
      .then(([h, response]) => ({url: r.url(), lastEventId: h['last-event-id'], answered: response !== null})));
  });
  return () => Promise.all(requests);
}

const byId = (page, id) => page.locator(`[data-testid="${id}"]`);
const statusAttr = (page, name) => byId(page, 'status').getAttribute(name);
const waitForStatus = (page, selector, timeout = 15_000) =>
  page.waitForSelector(`[data-testid="status"]${selector}`, {state: 'attached', timeout});
const visibleMessages = page => page.locator('[data-testid="message"]:visible');

before(async () => {
  assert.ok(fs.existsSync(GATEWAY_BIN), `gateway binary ${GATEWAY_BIN} not found (build it, or set GATEWAY_BIN)`);
  assert.ok(fs.existsSync(CHROMIUM_BIN), `${CHROMIUM_BIN} not found (apt-get install chromium, or set CHROMIUM_BIN)`);
  // playwright gives the browser a fresh, temporary --user-data-dir of its own.
  browser = await chromium.launch({
    executablePath: CHROMIUM_BIN,
    headless: true,
    chromiumSandbox: false,
    timeout: 30_000,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
});

afterEach(async () => {
  for (const c of contexts) await c.close().catch(() => {});
  contexts.clear();
  const errors = pageErrors;
  pageErrors = [];
  assert.deepEqual(errors, [], 'the page logged errors');
});

after(async () => {
  killAll();
  if (browser) await Promise.race([browser.close(), deadline(10_000)]);
});

// ---- tests ---------------------------------------------------------------------------------

test('connect, receive published messages, filter them, and show the curl command', {timeout: 60_000}, async () => {
  const gw = startGateway(await freePort(), ['--demo', 'false', '--ping-interval', '1s']);
  try {
    await waitHealthy(gw);
    const page = await openPage(gw);
    assert.deepEqual(JSON.parse(await byId(page, 'bindings').inputValue()), EXAMPLE, 'the editor holds the example bindings');
    assert.equal(await statusAttr(page, 'data-state'), 'idle');

    await byId(page, 'connect').click();
    await waitForStatus(page, '[data-state="ready"]');
    assert.match(await byId(page, 'status').innerText(), /ready/);

    const sent = [
      taskMessage(1, {kind: 'task-completed', project: 'try'}),
      taskMessage(2, {kind: 'task-failed', project: 'autoland'}),
      taskMessage(3, {kind: 'task-pending', project: 'mozilla-central'}),
    ];
    for (const s of sent) {
      const {routed} = await publish(gw, s.message);
      assert.ok(routed >= 1, `the message reached no subscription (routed ${routed})`);
    }

    await page.waitForFunction(() => document.querySelectorAll('[data-testid="message"]').length === 3);
    assert.equal(await byId(page, 'message-count').innerText(), '3');
    const items = page.locator('[data-testid="message"]');
    for (let i = 0; i < 3; i++) {
      const s = sent[2 - i]; // newest first
      const item = items.nth(i);
      assert.equal(await item.locator('[data-testid="message-exchange"]').textContent(), s.message.exchange);
      assert.equal(await item.locator('[data-testid="message-routing-key"]').textContent(), s.message.routingKey);
      assert.match(await item.locator('[data-testid="message-routes"]').textContent(), new RegExp(s.route.replace(/\./g, '\\.')));
      assert.deepEqual(JSON.parse(await item.locator('[data-testid="message-payload"]').textContent()), s.message.payload);
    }
    // The payload is collapsible: open it and it shows the pretty-printed JSON.
    const payload = items.nth(0).locator('[data-testid="message-payload"]');
    assert.equal(await payload.isVisible(), false);
    await items.nth(0).locator('summary').click();
    assert.equal(await payload.isVisible(), true);
    assert.match(await payload.innerText(), /\n {2}"marker": "browser-test-/);

    // The filter narrows the list (routing key, exchange, routes, payload).
    const filter = byId(page, 'filter');
    const cases = [
      ['autoland', [sent[1].marker]],
      [sent[0].marker, [sent[0].marker]],
      ['TASK-PENDING', [sent[2].marker]],
      [`primary.bt${RUN}task3`, [sent[2].marker]],
      ['nothing matches this', []],
      ['', sent.map(s => s.marker).reverse()],
    ];
    for (const [text, markers] of cases) {
      await filter.fill(text);
      const shown = await visibleMessages(page).allTextContents();
      assert.equal(shown.length, markers.length, `filter ${JSON.stringify(text)} shows ${shown.length} messages`);
      markers.forEach((m, i) => assert.ok(shown[i].includes(m), `filter ${JSON.stringify(text)}: item ${i} holds ${m}`));
    }

    // The messages-per-second counter and the ping time.
    await page.waitForFunction(() => parseFloat(document.querySelector('[data-testid="rate"]').textContent) > 0, null, {timeout: 5000});
    await page.waitForFunction(() => /^\d\d:\d\d:\d\dZ$/.test(document.querySelector('[data-testid="last-ping"]').textContent), null, {timeout: 5000});

    // The curl command is the same stream, with the bindings encoded as the README does,
    // in their canonical form (sorted by exchange, then pattern), as the page sends them.
    const curl = await byId(page, 'curl').textContent();
    const cmp = (x, y) => x < y ? -1 : x > y ? 1 : 0;
    const canonical = {bindings: [...EXAMPLE.bindings].sort((x, y) =>
      cmp(x.exchange, y.exchange) || cmp(x.routingKeyPattern, y.routingKeyPattern))};
    const url = `${gw.origin}${CONNECT_PATH}?bindings=${encodeURIComponent(JSON.stringify(canonical))}&resume=1`;
    assert.equal(curl, `curl -N '${url}'`);
    const out = await runShell(`${curl} -s --max-time 2`, 5000);
    assert.match(out, /^event: ready\ndata: \{\}\nid: [0-9a-f]{16}-[0-9a-f]{16}-\d+\n/,
      'running the curl command prints the ready event, with its position (resumable)');

    await byId(page, 'disconnect').click();
    await waitForStatus(page, '[data-state="closed"][data-ready-state="2"]');
  } catch (e) {
    e.message += `\n${logsOf(gw)}`;
    throw e;
  } finally {
    await stopGateway(gw);
  }
});

test('bad bindings: the page shows the server error and does not reconnect in a loop', {timeout: 60_000}, async t => {
  const gw = startGateway(await freePort(), ['--demo', 'false']);
  try {
    await waitHealthy(gw);
    const page = await openPage(gw);
    await byId(page, 'bindings').fill('{"bindings": 42}');
    const connects = recordConnects(page);
    await byId(page, 'connect').click();

    const error = byId(page, 'error');
    await error.waitFor({state: 'visible'});
    assert.match(await error.innerText(), /Bindings must be an array of \{exchange, routingKeyPattern\}/);

    // Once its EventSource is CLOSED (after the error, or after one retry got 204) the
    // browser never reconnects: that is the condition to wait for.
    await waitForStatus(page, '[data-ready-state="2"]');
    const requests = await connects();
    assert.ok(requests.length >= 1 && requests.length <= 2,
      `expected the connect and at most one retry, saw ${requests.length} requests to ${CONNECT_PATH}`);
    assert.equal(requests[0].lastEventId, undefined);
    if (requests[1]) assert.equal(requests[1].lastEventId, '-', 'the retry carries Last-Event-Id: - (and gets 204)');
    assert.equal(await statusAttr(page, 'data-ready-state'), '2', 'the EventSource is CLOSED');
    assert.match(await byId(page, 'status').innerText(), /closed/);
    assert.match(await error.innerText(), /Bindings must be an array/, 'the error text stays visible');
    assert.equal(await page.locator('[data-testid="message"]').count(), 0);
    t.diagnostic(`${requests.length} connect requests: ${requests.map(r => `Last-Event-Id ${r.lastEventId ?? '(none)'}`).join(', ')}`);
  } catch (e) {
    e.message += `\n${logsOf(gw)}`;
    throw e;
  } finally {
    await stopGateway(gw);
  }
});

test('drain and reconnect: the page reconnects by itself to the next gateway on the same port', {timeout: 90_000}, async t => {
  const port = await freePort();
  const args = ['--demo', 'false', '--shutdown-grace', '5s'];
  const a = startGateway(port, args);
  let b;
  try {
    await waitHealthy(a);
    const page = await openPage(a);
    const connects = recordConnects(page);
    await byId(page, 'connect').click();
    await waitForStatus(page, '[data-state="ready"][data-ready-count="1"]');

    // Gateway A drains: every stream gets a `reconnect` event with a `retry:` (the page is
    // resumable: its id is kept), then ends.
    const t0 = Date.now();
    a.child.kill('SIGTERM');
    const exit = await Promise.race([a.exited, deadline(15_000)]);
    assert.ok(exit, 'gateway A did not exit within 15 s of SIGTERM');
    assert.equal(exit.code, 0, `gateway A exited with ${JSON.stringify(exit)}`);
    const exitMs = Date.now() - t0;

    // Gateway B takes over the same address; the page's EventSource URL now reaches B.
    b = startGateway(port, args);
    await waitHealthy(b);
    await waitForStatus(page, '[data-state="ready"][data-ready-count="2"]', 30_000);
    const reconnectMs = Date.now() - t0;

    const s = taskMessage(7, {kind: 'task-running', project: 'mozilla-beta'});
    const {routed} = await publish(b, s.message);
    assert.equal(routed, 1, 'the page has a subscription on gateway B');
    await page.locator('[data-testid="message"]', {hasText: s.marker}).waitFor();

    const requests = await connects();
    assert.ok(requests.length >= 2, `expected a reconnect, saw ${requests.length} connect requests`);
    // The page is resumable: the drain kept its id, so it comes back with it; gateway B (another
    // epoch) cannot replay A's history and says so with a gap, then streams live.
    assert.equal(requests[0].lastEventId, undefined, 'the first request has no Last-Event-Id');
    const answered = requests.slice(1).filter(r => r.answered);
    assert.ok(answered.length >= 1, `no reconnect reached a gateway: ${JSON.stringify(requests)}`);
    for (const r of answered) {
      assert.match(r.lastEventId || '', /^[0-9a-f]{16}-[0-9a-f]{16}-\d+$/,
        `a reconnect carries the position the drain kept: ${JSON.stringify(requests)}`);
    }
    assert.match(await byId(page, 'gap').textContent(), /Gap \(other-epoch\)/);
    const log = await byId(page, 'log').textContent();
    assert.match(log, /ready \(reconnected by the browser\)/);
    t.diagnostic(`gateway A exited ${exitMs} ms after SIGTERM; the page was ready on gateway B after ${reconnectMs} ms; connect requests: ${JSON.stringify(requests.map(r => [r.lastEventId ?? null, r.answered]))}`);
  } catch (e) {
    e.message += `\n${logsOf(a, b)}`;
    throw e;
  } finally {
    await stopGateway(a, 'SIGKILL');
    await stopGateway(b);
  }
});

test('resume after a network cut: Chromium shows every message exactly once', {timeout: 90_000}, async t => {
  const gw = startGateway(await freePort(), ['--demo', 'false']);
  let proxy;
  try {
    await waitHealthy(gw);
    proxy = await startProxy(gw.port);
    // The page, and so its EventSource, reaches the gateway through the proxy.
    const page = await openPage({...gw, origin: proxy.origin});
    const connects = recordConnects(page);
    await byId(page, 'connect').click();
    await waitForStatus(page, '[data-state="ready"][data-ready-count="1"]');
    const sent = [];
    const send = async i => { const m = taskMessage(100 + i); sent.push(m); await publish(gw, m.message); };
    for (let i = 0; i < 5; i++) await send(i);
    await page.locator('[data-testid="message"]', {hasText: sent[4].marker}).waitFor();

    // Act: the network goes away for 2 s; 20 messages are published meanwhile.
    proxy.refuse(true);
    proxy.cut();
    for (let i = 5; i < 25; i++) await send(i);
    // The cut lasts until the browser has tried to come back and been refused.
    const refusedAt = Date.now();
    while (proxy.refused() < 1) {
      assert.ok(Date.now() - refusedAt < 20_000, 'the browser did not try to reconnect');
      await sleep(50);
    }
    proxy.refuse(false);
    await waitForStatus(page, '[data-state="ready"][data-ready-count="2"]', 30_000);
    for (let i = 25; i < 30; i++) await send(i);
    await page.locator('[data-testid="message"]', {hasText: sent[29].marker}).waitFor();

    // Assert: every message once, and no gap.
    const shown = await page.locator('[data-testid="message"]').allTextContents();
    for (const m of sent) {
      const times = shown.filter(text => text.includes(m.marker)).length;
      assert.equal(times, 1, `${m.marker} shown ${times} times`);
    }
    assert.equal(shown.length, sent.length);
    assert.equal(await byId(page, 'gap').isHidden(), true, 'no gap');
    const requests = await connects();
    const resumed = requests.filter(r => r.lastEventId);
    assert.ok(resumed.length >= 1, 'the browser came back with Last-Event-Id');
    t.diagnostic(`${requests.length} connect requests, ${resumed.length} with Last-Event-Id; ${sent.length} messages, each shown once`);
  } catch (e) {
    e.message += `\n${logsOf(gw)}`;
    throw e;
  } finally {
    if (proxy) proxy.close();
    await stopGateway(gw);
  }
});

test('screenshot with demo traffic, and the page fits a narrow window', {timeout: 60_000}, async () => {
  const gw = startGateway(await freePort(), ['--demo-rate', '20', '--ping-interval', '2s']);
  let frozen = false;
  try {
    await waitHealthy(gw);
    const page = await openPage(gw, {width: 1280, height: 1000});
    await byId(page, 'connect').click();
    await waitForStatus(page, '[data-state="ready"]');
    // Demo messages at 20/s, and a ping every 2 s: wait for ten of the one and one of the other.
    await page.locator('[data-testid="message"]').nth(9).waitFor({timeout: 10_000});
    await page.waitForFunction(() =>
      /^\d\d:\d\d:\d\dZ$/.test(document.querySelector('[data-testid="last-ping"]')?.textContent || ''),
      null, {timeout: 10_000});
    assert.ok(parseFloat(await byId(page, 'rate').textContent()) > 0);
    assert.match(await byId(page, 'last-ping').textContent(), /^\d\d:\d\d:\d\dZ$/);

    // Hold the gateway still (SIGSTOP) so the list does not move while one payload is opened
    // and the picture is taken; the stream stays open and the page stays `ready`.
    gw.child.kill('SIGSTOP');
    frozen = true;
    // What was in flight has arrived once the list stays the same for 100 ms.
    await page.waitForFunction(() => new Promise(resolve => {
      const count = () => document.querySelectorAll('[data-testid="message"]').length;
      const before = count();
      setTimeout(() => resolve(count() === before), 100);
    }));
    await page.locator('[data-testid="message"] summary').nth(2).click();
    fs.mkdirSync(path.dirname(SCREENSHOT_PATH), {recursive: true});
    await page.screenshot({path: SCREENSHOT_PATH});
    assert.ok(fs.statSync(SCREENSHOT_PATH).size > 10_000);
    gw.child.kill('SIGCONT');
    frozen = false;

    // A phone-sized window: nothing wider than the viewport.
    await page.setViewportSize({width: 390, height: 844});
    await page.waitForFunction(() => window.innerWidth === 390);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than a 390px window`);
    await byId(page, 'disconnect').click();
    await waitForStatus(page, '[data-state="closed"]');
  } catch (e) {
    e.message += `\n${logsOf(gw)}`;
    throw e;
  } finally {
    if (frozen) gw.child.kill('SIGCONT');
    await stopGateway(gw);
  }
});

// ---- helpers -------------------------------------------------------------------------------

