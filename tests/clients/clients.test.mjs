// The SSE client libraries people use, against the real gateway (embedded broker): the npm
// `eventsource` package (2.0.2, 4.1.1 and 5.1.5) and `@microsoft/fetch-event-source` (2.0.1, used as
// the README's "Clients" section shows). For each: a plain stream; a drain (the client is
// told with a named `reconnect` event, never an empty `message`, and comes back by itself,
// without `Last-Event-Id`, to the next gateway on the same port); a resumable stream cut by
// the network (it resumes, nothing lost, nothing twice); a resumable stream sent to another
// gateway (the `gap` event reaches the program).
//
// Environment: GATEWAY_BIN (default: ../../target/debug/events-gateway).

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import EventSource2 from 'eventsource2';
import { EventSource as EventSource4 } from 'eventsource4';
// 5.x asks for Node 22.12 or later (`engines`); it runs on Node 20, which this suite uses.
import { EventSource as EventSource5 } from 'eventsource5';
import { fetchEventSource } from '@microsoft/fetch-event-source';
import {
  startGateway, waitHealthy, stopGateway, freePort, publish, metric, startProxy, logsOf, killAll,
} from '../js/gateway.mjs';

// fetch-event-source is a browser library: it takes `window.setTimeout` and watches
// `document.visibilityState`. In Node, this much of a browser is enough for it.
globalThis.window ??= globalThis;
globalThis.document ??= {hidden: false, addEventListener() {}, removeEventListener() {}};

const EXCHANGE = 'exchange/clients/v1/x';
const GATEWAY_ARGS = ['--demo', 'false', '--shutdown-grace', '5s'];
after(killAll);

const connectUrl = (origin, resumable) => {
  const bindings = JSON.stringify({bindings: [{exchange: EXCHANGE, routingKeyPattern: '#'}]});
  return `${origin}/api/events/v1/connect/?bindings=${encodeURIComponent(bindings)}${resumable ? '&resume=1' : ''}`;
};

/** Collects what a client sees: named events in order, and whether an empty message came. */
class Seen {
  constructor() { this.events = []; this.waiters = []; }
  push(type, data, id) {
    this.events.push({type, data, id});
    for (const w of this.waiters.splice(0)) w();
  }
  async waitFor(pred, what, timeoutMs = 20_000) {
    const end = Date.now() + timeoutMs;
    while (!this.events.some(pred)) {
      if (Date.now() > end) throw new Error(`no ${what} within ${timeoutMs} ms; saw ${JSON.stringify(this.events.map(e => e.type))}`);
      await Promise.race([new Promise(r => this.waiters.push(r)), sleep(200)]);
    }
    return this.events.find(pred);
  }
  count(type) { return this.events.filter(e => e.type === type).length; }
  numbers() {
    return this.events.filter(e => e.type === 'message').map(e => JSON.parse(e.data).payload.n);
  }
}

const TYPES = ['ready', 'message', 'reconnect', 'gap', 'error'];

/** The npm `eventsource` package (either version), as a program uses it. */
function withEventSource(EventSourceClass) {
  return url => {
    const seen = new Seen();
    const es = new EventSourceClass(url);
    for (const type of TYPES) {
      es.addEventListener(type, e => {
        // The `error` listener also hears connection errors (no data): only server events count.
        if (type === 'error' && e.data === undefined) return;
        // (Not `onmessage`: eventsource 2.x's setter removes every other `message` listener.)
        seen.push(type === 'message' && !e.data ? 'empty-message' : type, e.data, e.lastEventId);
      });
    }
    return {seen, close: () => es.close()};
  };
}

/** fetch-event-source as the README shows it: 204 is final (thrown from `onopen`), a stream
 * that ends is retried (thrown from `onclose`), events are told apart by name. */
function withFetchEventSource(url) {
  class FatalError extends Error {}
  class RetriableError extends Error {}
  const seen = new Seen();
  const ctrl = new AbortController();
  fetchEventSource(url, {
    signal: ctrl.signal,
    openWhenHidden: true,
    async onopen(response) {
      seen.push('open', String(response.status), response.headers.get('content-type'));
      if (response.status === 204) throw new FatalError('the server says: do not come back');
      if (!response.ok) throw new FatalError(`HTTP ${response.status}`);
    },
    onmessage(ev) {
      if (ev.event === '' || ev.event === 'message') {
        if (!ev.data) seen.push('empty-message', ev.data, ev.id);
        else seen.push('message', ev.data, ev.id);
      } else {
        seen.push(ev.event, ev.data, ev.id);
      }
    },
    onclose() { throw new RetriableError('the stream ended'); },
    onerror(err) {
      if (err instanceof FatalError) throw err;
      // Anything else (a cut, a refused connection, the stream's end): retry after `retry:`.
    },
  }).catch(() => {});
  return {seen, close: () => ctrl.abort()};
}

const CLIENTS = [
  ['eventsource 2.0.2', withEventSource(EventSource2)],
  ['eventsource 4.1.1', withEventSource(EventSource4)],
  ['eventsource 5.1.5', withEventSource(EventSource5)],
  ['fetch-event-source 2.0.1', withFetchEventSource],
];

const message = n => ({exchange: EXCHANGE, routingKey: 'k', payload: {n}});
for (const [name, open] of CLIENTS) {
  test(`${name}: a plain stream, then a drain: a named reconnect event, back without Last-Event-Id`, {timeout: 90_000}, async t => {
    const port = await freePort();
    const a = startGateway(port, GATEWAY_ARGS);
    let b;
    let client;
    try {
      await waitHealthy(a);
      client = open(connectUrl(a.origin, false));
      await client.seen.waitFor(e => e.type === 'ready', 'ready');
      for (const n of [1, 2]) await publish(a, message(n));
      await client.seen.waitFor(e => e.type === 'message' && JSON.parse(e.data).payload.n === 2, 'message 2');

      // Act: gateway A drains; gateway B takes the same port.
      a.child.kill('SIGTERM');
      await a.exited;
      b = startGateway(port, GATEWAY_ARGS);
      await waitHealthy(b);

      // Assert: told by name, back by itself on B without Last-Event-Id, streaming.
      await client.seen.waitFor(e => e.type === 'reconnect', 'the reconnect event');
      await client.seen.waitFor((e, i) => e.type === 'ready' && client.seen.events.indexOf(e) > client.seen.events.findIndex(x => x.type === 'reconnect'), 'ready on B', 30_000);
      await publish(b, message(3));
      await client.seen.waitFor(e => e.type === 'message' && JSON.parse(e.data).payload.n === 3, 'message 3 from B');
      assert.equal(client.seen.count('empty-message'), 0, 'no empty message');
      assert.equal(await metric(b, 'events_gateway_connections_total{outcome="no_content"}'), 0, 'B never saw Last-Event-Id');
      assert.deepEqual(client.seen.numbers(), [1, 2, 3]);
      t.diagnostic(`events: ${client.seen.events.map(e => e.type).join(' ')}`);
    } catch (e) {
      e.message += `\n${logsOf(a, b)}`;
      throw e;
    } finally {
      client?.close();
      await stopGateway(a, 'SIGKILL');
      await stopGateway(b);
    }
  });

  test(`${name}: a plain stream cut by the network comes back once with Last-Event-Id: -, gets 204 and stops`, {timeout: 60_000}, async t => {
    const port = await freePort();
    const gw = startGateway(port, GATEWAY_ARGS);
    let proxy;
    let client;
    try {
      await waitHealthy(gw);
      proxy = await startProxy(port);
      client = open(connectUrl(proxy.origin, false));
      await client.seen.waitFor(e => e.type === 'ready', 'ready');
      proxy.cut();
      // The original protocol's rule: every event has `id: -`, a client that comes back
      // with it gets 204, and stops for good.
      const start = Date.now();
      while (await metric(gw, 'events_gateway_connections_total{outcome="no_content"}') < 1) {
        assert.ok(Date.now() - start < 20_000, 'no reconnect with Last-Event-Id: - within 20 s');
        await sleep(100);
      }
      await sleep(5000);
      assert.equal(await metric(gw, 'events_gateway_connections_total{outcome="no_content"}'), 1, 'it stopped');
      assert.equal(await metric(gw, 'events_gateway_connections_total{outcome="ready"}'), 1);
    } catch (e) {
      e.message += `\n${logsOf(gw)}`;
      throw e;
    } finally {
      client?.close();
      proxy?.close();
      await stopGateway(gw);
    }
  });

  test(`${name}: a resumable stream cut by the network resumes with nothing lost, and a gap reaches the program`, {timeout: 90_000}, async t => {
    const port = await freePort();
    const a = startGateway(port, GATEWAY_ARGS);
    let b;
    let proxy;
    let client;
    try {
      await waitHealthy(a);
      proxy = await startProxy(port);
      client = open(connectUrl(proxy.origin, true));
      await client.seen.waitFor(e => e.type === 'ready', 'ready');
      for (let n = 0; n < 5; n++) await publish(a, message(n));
      await client.seen.waitFor(e => e.type === 'message' && JSON.parse(e.data).payload.n === 4, 'message 4');

      // Act: the network cuts the stream; messages go on meanwhile.
      proxy.cut();
      for (let n = 5; n < 10; n++) await publish(a, message(n));

      // Assert: it comes back with its id and gets the rest, each once, with no gap.
      await client.seen.waitFor(e => e.type === 'message' && JSON.parse(e.data).payload.n === 9, 'message 9', 30_000);
      assert.deepEqual(client.seen.numbers(), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 'nothing lost, nothing twice');
      assert.equal(client.seen.count('gap'), 0);

      // Then gateway A drains and B (another process) takes the port: the client comes
      // back with its id, and B says it cannot replay A's history: a `gap`.
      a.child.kill('SIGTERM');
      await a.exited;
      b = startGateway(port, GATEWAY_ARGS);
      await waitHealthy(b);
      const gap = await client.seen.waitFor(e => e.type === 'gap', 'the gap event', 30_000);
      assert.equal(JSON.parse(gap.data).reason, 'other-epoch');
      assert.equal(client.seen.count('empty-message'), 0, 'no empty message');
      t.diagnostic(`events: ${client.seen.events.map(e => e.type).join(' ')}`);
    } catch (e) {
      e.message += `\n${logsOf(a, b)}`;
      throw e;
    } finally {
      client?.close();
      proxy?.close();
      await stopGateway(a, 'SIGKILL');
      await stopGateway(b);
    }
  });
}
