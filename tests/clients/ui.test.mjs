// Taskcluster's WebSocket protocol as its UI's listener uses it (ui-listener.mjs, the
// platform's WebSocket), against the real gateway (embedded broker): raw and named
// subscriptions receive their messages; a drain (close 1012) and a connection's lifetime
// (close 4408) bring it back by itself, subscribed again; teardown releases the
// subscription at once.
//
// Environment: GATEWAY_BIN (default: ../../target/debug/events-gateway).

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { pulseListener } from './ui-listener.mjs';
import { startGateway, waitHealthy, stopGateway, freePort, publish, metric, logsOf, killAll } from '../js/gateway.mjs';

const GATEWAY_ARGS = ['--demo', 'false', '--shutdown-grace', '5s'];
after(killAll);

/**
 * The platform's WebSocket as a browser behaves: a handshake refused (a draining gateway's
 * 503) fires `error` and then `close` (code 1006), which the listener reconnects on. Node
 * 20's WebSocket fires the `error` only and stays CONNECTING; this supplies the `close`
 * when (and only when) it is missing.
 */
class BrowserWebSocket extends WebSocket {
  constructor(url) {
    super(url);
    this.addEventListener('error', () => setTimeout(() => {
      if (this.readyState !== WebSocket.CONNECTING) return;
      const close = new Event('close');
      Object.defineProperties(close, {code: {value: 1006}, wasClean: {value: false}, reason: {value: ''}});
      this.dispatchEvent(close);
    }, 0));
  }
}

/** What a listener saw, with a way to wait for it. */
function recorder() {
  const seen = {messages: [], errors: [], closes: []};
  seen.until = async (pred, what, timeoutMs = 20_000) => {
    const end = Date.now() + timeoutMs;
    while (!pred()) {
      if (Date.now() > end) throw new Error(`no ${what} within ${timeoutMs} ms; saw ${JSON.stringify(seen)}`);
      await sleep(50);
    }
  };
  return seen;
}

/** Publishes `payload` until the listener has a message from it (its subscribe frame
 * follows the ack, so the first ones may come before the subscription is there). */
async function publishUntilSeen(gw, seen, message, pred) {
  for (let i = 0; i < 100 && !seen.messages.some(pred); i++) {
    await publish(gw, message);
    await sleep(100);
  }
  assert.ok(seen.messages.some(pred), `no message matching ${pred} from ${gw.origin}; saw ${JSON.stringify(seen)}`);
}

test('raw: messages arrive; a drain brings the listener back, subscribed, with nothing to do', {timeout: 60_000}, async t => {
  const port = await freePort();
  const a = startGateway(port, GATEWAY_ARGS);
  let b;
  let stop;
  try {
    await waitHealthy(a);
    const seen = recorder();
    const exchange = 'exchange/ui/v1/raw';
    stop = pulseListener({
      endpoint: `${a.origin}/subscription`, kind: 'raw',
      bindings: [{exchange, routingKeyPattern: '#.a.#', __typename: 'Binding'}],
      onMessage: m => seen.messages.push(m), onError: e => seen.errors.push(e.message),
      onClose: c => seen.closes.push(c), WebSocketImpl: BrowserWebSocket,
    });
    await publishUntilSeen(a, seen, {exchange, routingKey: 'x.a.y', cc: ['route.r'], payload: {from: 'a'}}, m => m.payload.from === 'a');
    const first = seen.messages[0];
    assert.deepEqual(first, {payload: {from: 'a'}, exchange, routingKey: 'x.a.y', redelivered: false, cc: ['route.r']});

    a.child.kill('SIGTERM');
    await a.exited;
    b = startGateway(port, GATEWAY_ARGS);
    await waitHealthy(b);
    await seen.until(() => seen.closes.includes(1012), 'close 1012');
    await publishUntilSeen(b, seen, {exchange, routingKey: 'a', payload: {from: 'b'}}, m => m.payload.from === 'b');
    // The close was clean; a reconnect that reached the draining gateway was refused
    // (503: a connection error to the listener, as in a browser). No error frame came.
    const frames = seen.errors.filter(e => !e.startsWith('WebSocket'));
    assert.deepEqual(frames, [], 'no error frame');
    t.diagnostic(`closes ${JSON.stringify(seen.closes)}, errors ${JSON.stringify(seen.errors)}, messages ${seen.messages.length}`);

    stop();
    stop = null;
    await seen.until(() => true, '');
    for (let i = 0; i < 50 && await metric(b, 'events_gateway_websocket_subscriptions') !== 0; i++) await sleep(100);
    assert.equal(await metric(b, 'events_gateway_websocket_subscriptions'), 0, 'teardown released the subscription');
  } catch (e) {
    e.message += `\n${logsOf(a, b)}`;
    throw e;
  } finally {
    stop?.();
    await stopGateway(a, 'SIGKILL');
    await stopGateway(b);
  }
});

test('named: taskDefined for one taskId, across a connection lifetime (4408)', {timeout: 60_000}, async t => {
  const port = await freePort();
  const gw = startGateway(port, [...GATEWAY_ARGS, '--ws-lifetime', '2s']);
  let stop;
  try {
    await waitHealthy(gw);
    const seen = recorder();
    const exchange = 'exchange/taskcluster-queue/v1/task-defined';
    stop = pulseListener({
      endpoint: `${gw.origin}/subscription/`, kind: 'named', service: 'queue',
      subscriptions: ['taskDefined'], routingKey: {taskId: 'T1'},
      onMessage: m => seen.messages.push(m), onError: e => seen.errors.push(e.message),
      onClose: c => seen.closes.push(c), WebSocketImpl: BrowserWebSocket,
    });
    const key = task => `primary.${task}.0.wg.wi.prov.wt.sched.group`;
    await publishUntilSeen(gw, seen, {exchange, routingKey: key('T1'), payload: {n: 1}}, m => m.payload.n === 1);
    await publish(gw, {exchange, routingKey: key('T2'), payload: {n: 2}});
    await seen.until(() => seen.closes.includes(4408), 'close 4408', 10_000);
    await publishUntilSeen(gw, seen, {exchange, routingKey: key('T1'), payload: {n: 3}}, m => m.payload.n === 3);
    assert.ok(seen.messages.every(m => m.routingKey === key('T1')), 'only T1');
    assert.deepEqual(seen.errors, []);
    t.diagnostic(`closes ${JSON.stringify(seen.closes)}, messages ${seen.messages.length}`);
  } catch (e) {
    e.message += `\n${logsOf(gw)}`;
    throw e;
  } finally {
    stop?.();
    await stopGateway(gw);
  }
});
