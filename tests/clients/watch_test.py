"""The README's Python client (watch.py: httpx + httpx-sse), the same rules written with
sseclient-py (watch_sseclient.py), and requests-sse's own reconnecting EventSource
(watch_requests_sse.py), against the real gateway on its embedded broker: a plain stream and a drain (a named `reconnect` event, never an empty
message; back by itself without Last-Event-Id on the next gateway on the same port), a
resumable stream cut by the network (nothing lost, nothing twice) and sent to another
gateway (the `gap` event reaches the program).

    GATEWAY_BIN=target/debug/events-gateway tests/clients/.venv/bin/python -m unittest tests/clients/watch_test.py
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time
import unittest
import urllib.parse
import urllib.request
from pathlib import Path

import watch
import watch_requests_sse
import watch_sseclient

HERE = Path(__file__).resolve().parent
GATEWAY_BIN = os.environ.get("GATEWAY_BIN", str(HERE / "../../target/debug/events-gateway"))
EXCHANGE = "exchange/clients/v1/py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """A gateway process on the embedded broker, on `port`."""

    def __init__(self, port):
        env = {k: v for k, v in os.environ.items() if k != "AMQP_URL" and not k.startswith("PULSE_")}
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [GATEWAY_BIN, "--listen-address", "127.0.0.1", "--port", str(port), "--demo", "false",
             "--shutdown-grace", "5s"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.origin}/__lbheartbeat__", timeout=1).read()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the gateway did not start")

    def publish(self, n):
        body = json.dumps({"exchange": EXCHANGE, "routingKey": "k", "payload": {"n": n}}).encode()
        req = urllib.request.Request(f"{self.origin}/api/events/v1/publish", data=body,
                                     headers={"content-type": "application/json"})
        assert urllib.request.urlopen(req, timeout=5).status == 200

    def metric(self, series):
        text = urllib.request.urlopen(f"{self.origin}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def drain(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=15)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Proxy:
    """A TCP proxy to `port` that can cut every connection."""

    def __init__(self, port):
        self.upstream = port
        self.sockets = set()
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.origin = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                # Nothing listens yet (a drained gateway's successor is starting): close,
                # as a refused connection would be, and let the client try again.
                client.close()
                continue
            with self.lock:
                self.sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def close(self):
        self.cut()
        self.server.close()


class Client:
    """watch() on a thread, recording what the program sees."""

    def __init__(self, url, watch_fn):
        self.events = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        threading.Thread(target=watch_fn, args=(url, self._on_event, self.stop), daemon=True).start()

    def _on_event(self, sse):
        with self.cond:
            kind = "empty-message" if sse.event == "message" and not sse.data else sse.event
            self.events.append((kind, sse.data))
            self.cond.notify_all()

    def wait_for(self, pred, what, timeout=20):
        with self.cond:
            if not self.cond.wait_for(lambda: any(pred(e) for e in self.events), timeout):
                raise AssertionError(f"no {what} within {timeout} s; saw {[e[0] for e in self.events]}")

    def numbers(self):
        with self.cond:
            return [json.loads(d)["payload"]["n"] for k, d in self.events if k == "message"]

    def kinds(self):
        with self.cond:
            return [k for k, _ in self.events]


def connect_url(origin, resumable):
    bindings = json.dumps({"bindings": [{"exchange": EXCHANGE, "routingKeyPattern": "#"}]})
    return f"{origin}/api/events/v1/connect/?bindings={urllib.parse.quote(bindings)}" + (
        "&resume=1" if resumable else "")


def is_message(n):
    return lambda e: e[0] == "message" and json.loads(e[1])["payload"]["n"] == n


class HttpxSseTest(unittest.TestCase):
    """watch.py: httpx-sse 0.4.3."""

    name = "httpx-sse"
    watch = staticmethod(watch.watch)

    def client(self, url):
        return Client(url, self.watch)

    def test_a_plain_stream_then_a_drain_comes_back_without_last_event_id(self):
        port = free_port()
        a = Gateway(port)
        b = None
        client = self.client(connect_url(a.origin, False))
        try:
            client.wait_for(lambda e: e[0] == "ready", "ready")
            for n in (1, 2):
                a.publish(n)
            client.wait_for(is_message(2), "message 2")

            a.drain()
            b = Gateway(port)

            client.wait_for(lambda e: e[0] == "reconnect", "the reconnect event")
            client.wait_for(lambda e: client.kinds().count("ready") == 2, "ready on B", 30)
            b.publish(3)
            client.wait_for(is_message(3), "message 3 from B")
            self.assertNotIn("empty-message", client.kinds())
            self.assertEqual(b.metric('events_gateway_connections_total{outcome="no_content"}'), 0)
            self.assertEqual(client.numbers(), [1, 2, 3])
            print(f"{self.name}, drain:", " ".join(client.kinds()))
        finally:
            client.stop.set()
            a.kill()
            if b:
                b.kill()

    def test_a_plain_stream_cut_comes_back_once_gets_204_and_stops(self):
        port = free_port()
        gw = Gateway(port)
        proxy = Proxy(port)
        client = self.client(connect_url(proxy.origin, False))
        no_content = 'events_gateway_connections_total{outcome="no_content"}'
        try:
            client.wait_for(lambda e: e[0] == "ready", "ready")
            proxy.cut()
            deadline = time.time() + 20
            while gw.metric(no_content) < 1:
                self.assertLess(time.time(), deadline, "no reconnect with Last-Event-Id: -")
                time.sleep(0.1)
            time.sleep(5)
            self.assertEqual(gw.metric(no_content), 1, "it stopped")
            self.assertEqual(gw.metric('events_gateway_connections_total{outcome="ready"}'), 1)
        finally:
            client.stop.set()
            proxy.close()
            gw.kill()

    def test_a_resumable_stream_resumes_after_a_cut_and_a_gap_reaches_the_program(self):
        port = free_port()
        a = Gateway(port)
        b = None
        proxy = Proxy(port)
        client = self.client(connect_url(proxy.origin, True))
        try:
            client.wait_for(lambda e: e[0] == "ready", "ready")
            for n in range(5):
                a.publish(n)
            client.wait_for(is_message(4), "message 4")

            proxy.cut()
            for n in range(5, 10):
                a.publish(n)
            client.wait_for(is_message(9), "message 9", 30)
            self.assertEqual(client.numbers(), list(range(10)), "nothing lost, nothing twice")
            self.assertNotIn("gap", client.kinds())

            a.drain()
            b = Gateway(port)
            client.wait_for(lambda e: e[0] == "gap", "the gap event", 30)
            gap = next(d for k, d in client.events if k == "gap")
            self.assertEqual(json.loads(gap)["reason"], "other-epoch")
            self.assertNotIn("empty-message", client.kinds())
            print(f"{self.name}, cut and gap:", " ".join(client.kinds()))
        finally:
            client.stop.set()
            proxy.close()
            a.kill()
            if b:
                b.kill()


class SseclientPyTest(HttpxSseTest):
    """watch_sseclient.py: sseclient-py 1.9.0 with a reconnect loop of its program's."""

    name = "sseclient-py"
    watch = staticmethod(watch_sseclient.watch)


class RequestsSseTest(HttpxSseTest):
    """watch_requests_sse.py: requests-sse 0.5.3, reconnecting by itself."""

    name = "requests-sse"
    watch = staticmethod(watch_requests_sse.watch)


if __name__ == "__main__":
    unittest.main()
