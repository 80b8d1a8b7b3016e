// Helpers shared by the JavaScript tests (tests/browser, tests/clients): gateway processes
// on the embedded broker, their health and logs, publishing, and a TCP proxy that can cut
// every connection. Node's built-ins only, so that each test package can import it.
//
// Environment: GATEWAY_BIN, the gateway binary (default: ../../target/debug/events-gateway,
// from the test's own directory).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const GATEWAY_BIN = path.resolve(HERE, process.env.GATEWAY_BIN || '../../target/debug/events-gateway');
// For Promise.race: a timer that resolves to null and does not keep the process alive.
export const deadline = ms => sleep(ms, null, {ref: false});

// ---- gateway processes ---------------------------------------------------------------------

const children = new Set();

function gatewayEnv() {
  const env = {...process.env, NO_COLOR: '1', LOG_LEVEL: 'info', LOG_FORMAT: 'text'};
  // No broker settings: the gateway runs on its embedded broker.
  for (const k of Object.keys(env)) if (k === 'AMQP_URL' || k.startsWith('PULSE_')) delete env[k];
  return env;
}

export function startGateway(port, args = []) {
  const child = spawn(GATEWAY_BIN, ['--listen-address', '127.0.0.1', '--port', String(port), ...args], {
    env: gatewayEnv(),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const gw = {port, child, lines: [], exited: null, origin: `http://127.0.0.1:${port}`};
  children.add(child);
  gw.exited = new Promise(resolve => child.once('exit', (code, signal) => {
    children.delete(child);
    resolve({code, signal});
  }));
  child.once('error', e => gw.lines.push(`spawn error: ${e.message}`));
  for (const s of [child.stdout, child.stderr]) {
    s.setEncoding('utf8');
    s.on('data', d => {
      for (const line of d.split('\n')) if (line) gw.lines.push(line.replace(/\x1b\[[0-9;]*m/g, ''));
      if (gw.lines.length > 300) gw.lines.splice(0, gw.lines.length - 300);
    });
  }
  return gw;
}

export function logsOf(...gws) {
  return gws.filter(Boolean).map(g => `--- gateway on port ${g.port} (last lines) ---\n${g.lines.slice(-40).join('\n')}`).join('\n');
}

export async function waitHealthy(gw, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  let exited = false;
  gw.exited.then(() => { exited = true; });
  while (Date.now() < deadline) {
    if (exited) throw new Error(`gateway exited before serving\n${logsOf(gw)}`);
    try {
      const r = await fetch(`${gw.origin}/__lbheartbeat__`, {signal: AbortSignal.timeout(1000)});
      if (r.ok) return;
    } catch (_) { /* not listening yet */ }
    await sleep(50);
  }
  throw new Error(`gateway did not answer /__lbheartbeat__ within ${timeoutMs} ms\n${logsOf(gw)}`);
}

export async function stopGateway(gw, signal = 'SIGTERM', timeoutMs = 10_000) {
  if (!gw || !children.has(gw.child)) return gw && gw.exited;
  gw.child.kill(signal);
  const done = await Promise.race([gw.exited, deadline(timeoutMs)]);
  if (done) return done;
  gw.child.kill('SIGKILL');
  return gw.exited;
}

export function killAll() {
  for (const child of children) {
    try { child.kill('SIGKILL'); } catch (_) { /* already gone */ }
  }
}
process.on('exit', killAll);

export async function freePort() {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const {port} = server.address();
  server.close();
  await once(server, 'close');
  return port;
}

export async function publish(gw, message) {
  const r = await fetch(`${gw.origin}/api/events/v1/publish`, {
    method: 'POST',
    headers: {'content-type': 'application/json'},
    body: JSON.stringify(message),
    signal: AbortSignal.timeout(5000),
  });
  const text = await r.text();
  assert.equal(r.status, 200, `publish answered ${r.status}: ${text}`);
  return JSON.parse(text);
}

/** The value of one metric series in the gateway's /metrics (0 if absent). */
export async function metric(gw, series) {
  const text = await (await fetch(`${gw.origin}/metrics`)).text();
  const line = text.split('\n').find(l => l.startsWith(series + ' '));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** A TCP proxy to `port` that can cut every connection and refuse new ones. */
export async function startProxy(port) {
  const sockets = new Set();
  let refusing = false;
  let refused = 0;
  const server = net.createServer(client => {
    if (refusing) { refused += 1; client.destroy(); return; }
    const upstream = net.connect(port, '127.0.0.1');
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => { sockets.delete(s); client.destroy(); upstream.destroy(); });
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const proxyPort = server.address().port;
  return {
    port: proxyPort,
    origin: `http://127.0.0.1:${proxyPort}`,
    cut() { for (const s of sockets) s.destroy(); },
    refuse(on) { refusing = on; },
    /** Connections refused so far. */
    refused() { return refused; },
    close() { this.cut(); server.close(); },
  };
}

/** Runs `command` in bash (killed after `timeoutMs`); returns what it printed. */
export async function runShell(command, timeoutMs) {
  const child = spawn('bash', ['-c', command], {stdio: ['ignore', 'pipe', 'pipe']});
  children.add(child);
  let out = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', d => { out += d; });
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  await once(child, 'exit');
  clearTimeout(timer);
  children.delete(child);
  return out;
}
