// A listener that behaves as the Taskcluster UI's `ui/src/utils/pulseListener.js` does
// (written here from its behaviour and its tests, not copied): the endpoint derived from
// GRAPHQL_SUBSCRIPTION_ENDPOINT + `/raw` or `/named` (http → ws, https → wss); one
// subscription per socket; `connection_init` on open, `subscribe` after `connection_ack`;
// `data` → onMessage(message), `error` → onError; after any close it did not ask for,
// except 4401 and 4403, a new socket after min(1 s × 2^n, 30 s), n reset by an ack, which
// subscribes again; teardown sends `unsubscribe` and closes. It uses the platform's
// WebSocket (a browser's, or Node's, which follows the same standard).

const PROTOCOLS = {'https:': 'wss:', 'http:': 'ws:', 'wss:': 'wss:', 'ws:': 'ws:'};

export function pulseListener({endpoint, kind, bindings, service, subscriptions, routingKey,
  onMessage, onError = () => {}, onClose = () => {}, base = 'http://localhost/',
  WebSocketImpl = globalThis.WebSocket}) {
  const url = new URL(`${endpoint.replace(/\/$/, '')}/${kind}`, base);
  url.protocol = PROTOCOLS[url.protocol] ?? url.protocol;
  const subscribe = kind === 'raw'
    ? {type: 'subscribe', bindings: bindings.map(b => ({exchange: b.exchange, pattern: b.pattern ?? b.routingKeyPattern}))}
    : {type: 'subscribe', service, subscriptions, routingKey};
  let ws;
  let torn = false;
  let attempts = 0;
  let timer;
  let subscriptionId;

  const connect = () => {
    subscriptionId = undefined;
    const socket = new WebSocketImpl(url);
    ws = socket;
    let failureReported = false;
    const fail = error => {
      if (!failureReported && !torn) {
        failureReported = true;
        onError(error);
      }
    };
    socket.onopen = () => socket.send(JSON.stringify({type: 'connection_init'}));
    socket.onmessage = event => {
      let frame;
      try { frame = JSON.parse(event.data); } catch (_) { return; }
      switch (frame.type) {
        case 'connection_ack':
          attempts = 0;
          socket.send(JSON.stringify(subscribe));
          break;
        case 'subscribe_ack':
          subscriptionId = frame.subscriptionId;
          break;
        case 'data':
          onMessage(frame.message);
          break;
        case 'error':
          onError(new Error(frame.message ?? 'Pulse subscription error'));
          break;
        default:
      }
    };
    socket.onerror = () => fail(new Error('WebSocket connection error'));
    socket.onclose = event => {
      if (torn || socket !== ws) return;
      if (!event.wasClean) fail(new Error(`WebSocket closed unexpectedly (code ${event.code})`));
      onClose(event.code);
      if (event.code === 4401 || event.code === 4403) return;
      const delay = Math.min(1000 * 2 ** attempts, 30_000);
      attempts += 1;
      timer = setTimeout(connect, delay);
    };
  };
  connect();
  return () => {
    torn = true;
    clearTimeout(timer);
    if (subscriptionId && ws.readyState === WebSocketImpl.OPEN) {
      ws.send(JSON.stringify({type: 'unsubscribe', subscriptionId}));
    }
    ws.close();
  };
}
