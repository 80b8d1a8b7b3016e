#!/usr/bin/env python3
"""The worst hostile-client attacks of tests/gateway/abuse.rs, run against any gateway
binary with its default settings, for before/after figures: the gateway's RSS, its broker
bindings, queues and AMQP channels, its log volume, and whether an honest client on
another address is still served.

    python3 scripts/attack-before-after.py GATEWAY_BIN [ATTACK ...]

ATTACK: bindings (60 connections of 100 distinct patterns), subscriptions (2,000 idle
distinct subscriptions), exchanges (100 existing exchanges, one connection each),
connections (3,000 connections that never read), logs (300 large binding sets).
Needs RabbitMQ at 127.0.0.1:5672 (guest/guest), rabbitmqctl, and pika (pip install pika).
The attacker connects from 127.0.0.2, the honest client from 127.0.0.3.
"""

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

import pika

PREFIX = f"queue/guest/attack-{random.randrange(1 << 32):08x}"


def start(binary):
    port = random.randrange(20000, 30000)
    env = dict(os.environ, NO_COLOR="1")
    # The log goes to a file, not a pipe: a gateway that logs much (the old one logged
    # whole binding sets) would block on a full pipe that nobody reads during the attack.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [binary, "--listen-address=127.0.0.1", f"--port={port}",
         "--amqp-url=amqp://guest:guest@127.0.0.1:5672/%2f", f"--queue-prefix={PREFIX}",
         "--allowed-exchange-prefixes=", "--log-level=events_gateway=info"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port, log
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the gateway did not listen")


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def connect(port, source, bindings, timeout=10.0):
    """Opens a stream; returns (socket, first event name or status)."""
    query = urllib.parse.quote(json.dumps({"bindings": [
        {"exchange": e, "routingKeyPattern": p} for e, p in bindings]}), safe="")
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET /api/events/v1/connect/?bindings={query} HTTP/1.0\r\n\r\n".encode())
    buf = b""
    try:
        while b"\n\n" not in buf.split(b"\r\n\r\n", 1)[-1] or b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        return s, "timeout"
    head, _, body = buf.partition(b"\r\n\r\n")
    status = head.split(b" ")[1].decode() if b" " in head else "?"
    if status != "200":
        return s, status
    event = body.split(b"\n")[0].decode().removeprefix("event: ")
    return s, event


def broker_objects():
    out = subprocess.run(["rabbitmqctl", "list_bindings", "destination_name", "-q", "--formatter", "json"],
                         capture_output=True, text=True).stdout
    bindings = sum(1 for b in json.loads(out) if b["destination_name"].startswith(PREFIX))
    out = subprocess.run(["rabbitmqctl", "list_queues", "name", "-q", "--formatter", "json"],
                         capture_output=True, text=True).stdout
    queues = sum(1 for q in json.loads(out) if q["name"].startswith(PREFIX))
    out = subprocess.run(["rabbitmqctl", "list_connections", "name", "channels", "client_properties", "-q",
                          "--formatter", "json"], capture_output=True, text=True).stdout
    channels = sum(c["channels"] for c in json.loads(out)
                   if "events-gateway" in json.dumps(c.get("client_properties", "")))
    return bindings, queues, channels


def honest(port, exchange):
    s, event = connect(port, "127.0.0.3", [(exchange, "honest.#")], timeout=10)
    s.close()
    return event


def main():
    binary = sys.argv[1]
    attacks = sys.argv[2:] or ["bindings", "subscriptions", "exchanges", "connections", "logs"]
    amqp = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    ch = amqp.channel()
    ex = f"attack-{random.randrange(1 << 32):08x}"
    ch.exchange_declare(ex, "topic")
    for attack in attacks:
        proc, port, logfile = start(binary)
        time.sleep(1)
        base = rss_kib(proc.pid)
        held, outcomes = [], {}
        started = time.time()
        if attack == "bindings":
            for c in range(60):
                s, e = connect(port, "127.0.0.2", [(ex, f"a{c}.p{i}.#") for i in range(100)])
                held.append(s)
                outcomes[e] = outcomes.get(e, 0) + 1
        elif attack == "subscriptions":
            for c in range(2000):
                s, e = connect(port, "127.0.0.2", [(ex, f"idle.{c}")])
                held.append(s)
                outcomes[e] = outcomes.get(e, 0) + 1
        elif attack == "exchanges":
            names = [f"{ex}-x{i}" for i in range(100)]
            for n in names:
                ch.exchange_declare(n, "topic")
            for n in names:
                s, e = connect(port, "127.0.0.2", [(n, "#")])
                held.append(s)
                outcomes[e] = outcomes.get(e, 0) + 1
        elif attack == "connections":
            for c in range(3000):
                try:
                    s, e = connect(port, "127.0.0.2", [(ex, "#")], timeout=5)
                except OSError:
                    e, s = "refused", None
                if s:
                    held.append(s)
                outcomes[e] = outcomes.get(e, 0) + 1
        elif attack == "logs":
            for c in range(300):
                s, e = connect(port, "127.0.0.2", [(ex, "p" * 200 + f".{c}.{i}") for i in range(20)])
                s.close()
                outcomes[e] = outcomes.get(e, 0) + 1
        took = time.time() - started
        time.sleep(1)
        rss = rss_kib(proc.pid)
        bindings, queues, channels = broker_objects()
        served = honest(port, ex)
        for s in held:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)
        logfile.seek(0)
        log = logfile.read()
        logfile.close()
        print(json.dumps({
            "binary": binary, "attack": attack, "seconds": round(took, 1),
            "outcomes": outcomes, "rss_kib_before": base, "rss_kib_during": rss,
            "broker_bindings": bindings, "broker_queues": queues, "amqp_channels": channels,
            "log_lines": log.count(b"\n"), "log_bytes": len(log), "honest_client": served,
        }))
        time.sleep(3)
    for i in range(100):
        ch.exchange_delete(f"{ex}-x{i}")
    ch.exchange_delete(ex)
    amqp.close()


if __name__ == "__main__":
    main()
