#!/usr/bin/env python3
"""Offline checks of the deployment material in deploy/, without a cluster or a container
engine.

1. Render: `kubectl kustomize` renders deploy/k8s/base, every deploy/k8s/overlays/* and
   deploy/grafana.
2. Schemas: every rendered object, and every *.example.yaml, validates against the
   Kubernetes OpenAPI schemas of KUBERNETES_VERSION with kubernetes-validate in strict mode
   (unknown fields are errors). CRD kinds without a bundled schema (ServiceMonitor,
   PrometheusRule) are skipped there, said so, and get structural checks of their own.
3. Against the binary: what the binary reads and serves comes from the binary itself
   (`events-gateway --print-manifest`, GATEWAY_BIN or target/debug/events-gateway), never
   from reading the Rust source. Env names the manifests set are settings (or other
   variables) the binary reads; the binary accepts each value and the whole configuration
   (it is run with them and must not refuse them); probe, preStop and scrape paths are its
   routes; the container port is the port it listens on; the drain budget fits
   terminationGracePeriodSeconds; Service, ServiceMonitor, NetworkPolicy, Ingress, HPA and
   PDB point at what exists; the Dockerfile agrees (port, user, binary, build args).
4. The affinity tier (k8s/components/affinity, in the production overlay): HAProxy hashes
   on `bindings` consistently, checks the gateways on /__heartbeat__, finds them through a
   headless Service that selects them on their port, has a slot per replica the autoscaler
   may run, and is what the Ingress sends to; `haproxy -c` passes on haproxy.cfg as shipped
   (forky's HAProxy 3.2, from the root of scripts/rabbitmq-4.3.sh) and as the loopback test
   runs it (Debian's HAProxy 2.6, on PATH).
5. Monitoring: the dashboard's and the alert rules' PromQL is parsed with Prometheus's own
   grammar (deploy/promql, @prometheus-io/lezer-promql); every metric it names is one the
   binary registers (histogram series _bucket/_sum/_count map to their base name), and
   every label value it matches is one the binary uses.

Prints one line per check (failures, notes and the summary only with -q) and a summary;
exits 1 on any failure, 2 if a tool is missing.
Needs Python 3.11, PyYAML, kubernetes-validate, kubectl (with kustomize) and Node.js on PATH,
the binary built, and deploy/promql's packages installed (deploy/check.sh does both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

try:
    import yaml
    import kubernetes_validate
except ImportError as err:  # pragma: no cover - depends on the caller's environment
    print(f"FATAL missing Python package: {err.name}; run deploy/check.sh "
          "(pip install kubernetes-validate pyyaml)")
    sys.exit(2)

# The Kubernetes version the manifests are validated against. kubectl on the build image is
# 1.32; the manifests use nothing newer.
KUBERNETES_VERSION = "1.32"

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent

# Kinds from CustomResourceDefinitions: kubernetes-validate has no schema for them.
CRD_KINDS = {
    ("monitoring.coreos.com", "ServiceMonitor"),
    ("monitoring.coreos.com", "PrometheusRule"),
}

GATEWAY = "events-gateway"  # Deployment and container name
CONFIGMAP = "events-gateway-config"
SECRET = "events-gateway-pulse"
AFFINITY = "events-gateway-affinity"  # the HAProxy tier's Deployment, Service and ConfigMap

# Metric families the prometheus crate's process collector exports.
PROCESS_METRIC = re.compile(r"^process_[a-z_]+$")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --------------------------------------------------------------------------------------
# Reporting


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    passes: int = 0
    notes: list[str] = field(default_factory=list)
    quiet: bool = False

    def ok(self, what: str) -> None:
        self.passes += 1
        if not self.quiet:
            print(f"  ok    {what}")

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"  FAIL  {what}")

    def check(self, cond: bool, what: str, why: str = "") -> bool:
        if cond:
            self.ok(what)
        else:
            self.fail(f"{what}{': ' + why if why else ''}")
        return cond

    def note(self, what: str) -> None:
        self.notes.append(what)
        print(f"  note  {what}")


def section(title: str) -> None:
    print(f"\n== {title}")


# --------------------------------------------------------------------------------------
# What the source says


@dataclass
class Setting:
    env: str
    default: str | None
    secret: bool


@dataclass
class Source:
    """What the binary says it reads and serves (`--print-manifest`)."""
    bin: str
    settings: dict[str, Setting]
    other_env: set[str]  # read besides the settings (e.g. HOSTNAME)
    default_port: int
    default_grace: float
    routes: set[str]
    metrics: set[str]
    labels: dict[str, set[str]]  # label name -> values the binary uses
    version_env: set[str]  # compiled into /__version__ at build time
    binary: str
    rust_version: str


def gateway_bin() -> str:
    return os.environ.get("GATEWAY_BIN", str(REPO / "target" / "debug" / GATEWAY))


def run_gateway(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Runs `events-gateway --print-manifest` with only `env` (and PATH) set."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run([gateway_bin(), "--print-manifest"], env=clean,
                          capture_output=True, text=True, timeout=30)


def read_source() -> Source:
    proc = run_gateway({})
    if proc.returncode != 0:
        print(f"FATAL {gateway_bin()} --print-manifest failed: {proc.stderr.strip()}")
        sys.exit(2)
    m = json.loads(proc.stdout)
    settings = {s["env"]: Setting(s["env"], s.get("default"), bool(s.get("secret")))
                for s in m["settings"]}
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    return Source(
        bin=gateway_bin(),
        settings=settings,
        other_env=set(m["other_env"]),
        default_port=int(m["config"]["port"]),
        default_grace=float(m["config"]["shutdown_grace_seconds"]),
        routes=set(m["routes"]),
        metrics={f["name"] for f in m["metrics"]["families"]},
        labels={k: set(v) for k, v in m["metrics"]["labels"].items()},
        version_env=set(m["build_env"]),
        binary=m["binary"],
        rust_version=str(cargo["package"].get("rust-version", "")),
    )


def config_refusal(config: dict[str, str]) -> str | None:
    """None if the binary accepts `config` as its environment, else its one-line refusal."""
    proc = run_gateway(config)
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0]


# --------------------------------------------------------------------------------------
# Rendering and schemas


def kustomizations() -> list[Path]:
    dirs = [DEPLOY / "k8s" / "base"]
    dirs += sorted(p.parent for p in (DEPLOY / "k8s" / "overlays").glob("*/kustomization.yaml"))
    if (DEPLOY / "grafana" / "kustomization.yaml").exists():
        dirs.append(DEPLOY / "grafana")
    return dirs


def render(path: Path, report: Report) -> list[dict] | None:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    rel = path.relative_to(REPO)
    if proc.returncode != 0:
        report.fail(f"kubectl kustomize {rel}: {proc.stderr.strip()}")
        return None
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    report.ok(f"kubectl kustomize {rel}: {len(docs)} objects "
              f"({', '.join(sorted({d['kind'] for d in docs}))})")
    return docs


def kind_key(obj: dict) -> tuple[str, str]:
    group = obj.get("apiVersion", "").rpartition("/")[0]
    return group, obj.get("kind", "")


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate_schemas(where: str, docs: Iterable[dict], report: Report) -> None:
    for obj in docs:
        what = f"{where}: {name_of(obj)} ({obj.get('apiVersion')})"
        if kind_key(obj) in CRD_KINDS:
            report.note(f"{what}: no built-in schema (CRD kind), skipped by "
                        "kubernetes-validate; structural checks below")
            continue
        try:
            version = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            report.ok(f"{what} valid against Kubernetes {version} (strict)")
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            report.fail(f"{what} invalid against Kubernetes {err.version}: {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            report.fail(f"{what}: {err.message}")
        except Exception as err:  # noqa: BLE001 - report any validator failure as such
            report.fail(f"{what}: could not be validated: {err}")


# --------------------------------------------------------------------------------------
# Cross-checks of one rendered kustomization against the source


def configured_grace(config: dict[str, str], src: Source) -> float | None:
    """SHUTDOWN_GRACE in seconds as the binary parses it, or None if it refuses it."""
    if "SHUTDOWN_GRACE" not in config:
        return src.default_grace
    proc = run_gateway({"SHUTDOWN_GRACE": config["SHUTDOWN_GRACE"]})
    if proc.returncode != 0:
        return None
    return float(json.loads(proc.stdout)["config"]["shutdown_grace_seconds"])


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    for d in docs:
        if d.get("kind") == kind and d.get("metadata", {}).get("name") == name:
            return d
    return None


def secret_keys(obj: dict) -> set[str]:
    return set((obj.get("data") or {}).keys()) | set((obj.get("stringData") or {}).keys())


def route_matches_prefix(prefix: str, routes: set[str]) -> bool:
    """Kubernetes `Prefix` matching: element-wise on `/`-separated path segments."""
    want = [s for s in prefix.split("/") if s]
    return any([s for s in r.split("/") if s][: len(want)] == want for r in routes)


def check_gateway(where: str, docs: list[dict], src: Source, examples: list[dict],
                  docker: dict, report: Report) -> None:
    deploy = find(docs, "Deployment", GATEWAY)
    if not report.check(deploy is not None, f"{where}: Deployment/{GATEWAY} rendered"):
        return
    pod = deploy["spec"]["template"]["spec"]
    pod_labels = deploy["spec"]["template"]["metadata"].get("labels", {})
    containers = {c["name"]: c for c in pod.get("containers", [])}
    c = containers.get(GATEWAY)
    if not report.check(c is not None, f"{where}: container {GATEWAY} in the Deployment"):
        return

    # -- settings: names and values
    cm_name = next((e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e), None)
    sec_name = next((e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e), None)
    report.check(cm_name is not None and cm_name.startswith(CONFIGMAP),
                 f"{where}: envFrom ConfigMap {CONFIGMAP}", f"got {cm_name}")
    report.check(sec_name == SECRET, f"{where}: envFrom Secret {SECRET}", f"got {sec_name}")
    cm = find(docs, "ConfigMap", cm_name) if cm_name else None
    report.check(cm is not None, f"{where}: ConfigMap {cm_name} referenced by the Deployment is rendered")
    config: dict[str, str] = dict((cm or {}).get("data") or {})
    env_names = {e["name"]: e for e in c.get("env", [])}
    for name, e in env_names.items():
        if "value" in e:
            config[name] = e["value"]

    secret_sources = [d for d in docs if d.get("kind") == "Secret" and d["metadata"]["name"] == SECRET]
    secret_sources += [d for d in examples if d.get("kind") == "Secret" and d["metadata"]["name"] == SECRET]
    secret_names = set().union(*(secret_keys(s) for s in secret_sources)) if secret_sources else set()

    used = sorted(set(config) | set(env_names) | secret_names)
    for name in used:
        origin = ("a setting" if name in src.settings else
                  "read by the process" if name in src.other_env else None)
        report.check(origin is not None, f"{where}: env {name} is read by the binary"
                     + (f" ({origin})" if origin else ""),
                     "the binary's manifest names no such variable")
    # Each value alone (credentials added where a setting needs them), then all together,
    # as the binary itself parses them.
    placeholders = {k: "placeholder" for k in secret_names}
    for name, value in sorted(config.items()):
        if name not in src.settings:
            continue
        alone = {name: value, **(placeholders if name == "PULSE_HOSTNAME" else {})}
        why = config_refusal(alone)
        report.check(why is None, f"{where}: the binary accepts {name}={value!r}", why or "")
    why = config_refusal({**config, **placeholders})
    report.check(why is None, f"{where}: the binary accepts the whole configuration", why or "")
    if not where.endswith("base"):
        report.check("AMQP_URL" in config or "PULSE_HOSTNAME" in config,
                     f"{where}: a broker is configured (AMQP_URL or PULSE_HOSTNAME)",
                     "without either the gateway runs its embedded broker with demo traffic")
    if "AMQP_URL" not in config and "PULSE_HOSTNAME" in config:
        report.check({"PULSE_USERNAME", "PULSE_PASSWORD"} <= secret_names,
                     f"{where}: PULSE_HOSTNAME set, so Secret {SECRET} provides PULSE_USERNAME and PULSE_PASSWORD",
                     f"keys found: {sorted(secret_names)}")
    if "AMQP_URL" in config:
        report.check(bool(re.match(r"^amqps?://", config["AMQP_URL"])),
                     f"{where}: AMQP_URL is an amqp:// or amqps:// URL")

    # -- port
    port = src.default_port
    http = {p.get("name"): p for p in c.get("ports", [])}.get("http")
    report.check(http is not None and http["containerPort"] == src.default_port,
                 f"{where}: container port `http` {http and http['containerPort']} = the binary's default PORT ({src.default_port})")
    if "PORT" in config:
        report.check(config["PORT"] == str(port), f"{where}: PORT={config['PORT']} = container port {port}")
    report.check(port == docker.get("expose"), f"{where}: Dockerfile EXPOSE {docker.get('expose')} = container port {port}")

    def port_ok(p: Any) -> bool:
        return p == "http" or p == port

    # -- probes and hooks
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = c.get(probe)
        if spec is None:
            if probe != "startupProbe":
                report.fail(f"{where}: {probe} missing")
            continue
        get = spec.get("httpGet")
        if not report.check(get is not None, f"{where}: {probe} is an httpGet"):
            continue
        report.check(get["path"] in src.routes, f"{where}: {probe} path {get['path']} is a route of the binary",
                     f"routes: {sorted(src.routes)}")
        report.check(port_ok(get["port"]), f"{where}: {probe} port {get['port']} is the http port")
    report.check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/__heartbeat__",
                 f"{where}: readiness on /__heartbeat__ (fails while draining or without broker)")
    report.check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/__lbheartbeat__",
                 f"{where}: liveness on /__lbheartbeat__ (independent of the broker)")

    pre = (c.get("lifecycle") or {}).get("preStop") or {}
    pre_seconds = 0.0
    if "exec" in pre:
        cmd = pre["exec"]["command"]
        ok = len(cmd) == 2 and cmd[0].endswith("/sleep") and cmd[1].isdigit()
        report.check(ok, f"{where}: preStop exec is `sleep N` ({' '.join(cmd)})")
        pre_seconds = float(cmd[1]) if ok else 0.0
        report.check(not docker.get("distroless"),
                     f"{where}: preStop exec needs {cmd[0]} in the image: runtime stage is {docker.get('runtime')}",
                     "distroless images have no sleep binary")
    elif "sleep" in pre:
        pre_seconds = float(pre["sleep"]["seconds"])
        report.ok(f"{where}: preStop sleep action {pre_seconds:g}s")
    elif "httpGet" in pre:
        report.check(pre["httpGet"]["path"] in src.routes, f"{where}: preStop httpGet path is a route")
    grace = configured_grace(config, src)
    if grace is None:
        report.fail(f"{where}: the binary refuses SHUTDOWN_GRACE {config.get('SHUTDOWN_GRACE')!r}")
    else:
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        report.check(tgps > grace + pre_seconds,
                     f"{where}: terminationGracePeriodSeconds {tgps} > SHUTDOWN_GRACE {grace:g}s + preStop {pre_seconds:g}s")

    # -- security
    sc = {**(pod.get("securityContext") or {}), **(c.get("securityContext") or {})}
    report.check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
    report.check(sc.get("runAsUser") == docker.get("uid"),
                 f"{where}: runAsUser {sc.get('runAsUser')} = Dockerfile USER {docker.get('uid')}")
    report.check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
    report.check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false")
    report.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{where}: capabilities drop ALL")
    report.check((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{where}: seccomp RuntimeDefault")
    report.check(pod.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken false")
    report.check(any(t.get("topologyKey") == "kubernetes.io/hostname" for t in pod.get("topologySpreadConstraints", [])),
                 f"{where}: topology spread across kubernetes.io/hostname")
    image = c.get("image", "")
    if not where.endswith("base"):
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        report.check(tag not in ("", "latest"), f"{where}: image {image} has a pinned tag")

    # -- objects that point at the pods
    def selects_pods(selector: dict | None) -> bool:
        labels = (selector or {}).get("matchLabels", selector or {})
        return bool(labels) and all(pod_labels.get(k) == v for k, v in labels.items())

    svc = find(docs, "Service", GATEWAY)
    if report.check(svc is not None, f"{where}: Service/{GATEWAY} rendered"):
        report.check(selects_pods(svc["spec"].get("selector")), f"{where}: Service selects the gateway pods")
        svc_ports = {p.get("name"): p for p in svc["spec"]["ports"]}
        sp = svc_ports.get("http")
        report.check(sp is not None and port_ok(sp.get("targetPort")),
                     f"{where}: Service port `http` targets the container's http port")
    for sm in (d for d in docs if d.get("kind") == "ServiceMonitor"):
        report.check(svc is not None and (sm["spec"].get("selector", {}).get("matchLabels", {}).items()
                                          <= svc["metadata"].get("labels", {}).items()),
                     f"{where}: {name_of(sm)} selects Service/{GATEWAY}")
        for ep in sm["spec"].get("endpoints", []):
            report.check(svc is not None and ep.get("port") in {p.get("name") for p in svc["spec"]["ports"]},
                         f"{where}: {name_of(sm)} scrapes Service port `{ep.get('port')}`")
            report.check(ep.get("path", "/metrics") in src.routes,
                         f"{where}: {name_of(sm)} path {ep.get('path')} is a route of the binary")
    for np in (d for d in docs if d.get("kind") == "NetworkPolicy"):
        if not selects_pods(np["spec"].get("podSelector")):
            continue
        in_ports = [p.get("port") for r in np["spec"].get("ingress", []) for p in r.get("ports", [])]
        report.check(in_ports and all(port_ok(p) for p in in_ports),
                     f"{where}: {name_of(np)} admits ingress to port {port} only", f"ports {in_ports}")
        out_ports = {p.get("port") for r in np["spec"].get("egress", []) for p in r.get("ports", [])}
        report.check({53, 5671, 5672} <= out_ports, f"{where}: {name_of(np)} allows egress to DNS and AMQP 5671/5672",
                     f"ports {sorted(out_ports, key=str)}")
    for hpa in (d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        report.check(ref.get("kind") == "Deployment" and ref.get("name") == GATEWAY,
                     f"{where}: {name_of(hpa)} scales Deployment/{GATEWAY}")
        report.check("replicas" not in deploy["spec"],
                     f"{where}: Deployment leaves `replicas` to {name_of(hpa)}",
                     "an applied `replicas` resets the autoscaler's count")
    for pdb in (d for d in docs if d.get("kind") == "PodDisruptionBudget" and d["metadata"]["name"] != AFFINITY):
        report.check(selects_pods(pdb["spec"].get("selector")), f"{where}: {name_of(pdb)} selects the gateway pods")
    for ing in (d for d in docs if d.get("kind") == "Ingress"):
        for rule in ing["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                backend = p["backend"]["service"]
                # The gateways' Service, or the affinity tier in front of them.
                target = find(docs, "Service", backend["name"]) if backend["name"] in (GATEWAY, AFFINITY) else None
                ok_backend = (target is not None and
                              (backend["port"].get("name") in {x.get("name") for x in target["spec"]["ports"]} or
                               backend["port"].get("number") in {x.get("port") for x in target["spec"]["ports"]}))
                report.check(ok_backend, f"{where}: {name_of(ing)} path {p['path']} goes to a port of Service/{backend['name']}")
                if find(docs, "Deployment", AFFINITY) is not None:
                    report.check(backend["name"] == AFFINITY,
                                 f"{where}: {name_of(ing)} path {p['path']} goes through the affinity tier")
                report.check(route_matches_prefix(p["path"], src.routes),
                             f"{where}: {name_of(ing)} path {p['path']} leads to routes of the binary")


# --------------------------------------------------------------------------------------
# The affinity tier (deploy/k8s/components/affinity)

HAPROXY_CFG = DEPLOY / "k8s" / "components" / "affinity" / "haproxy.cfg"
SERVERS_MARKER = "# events-gateway: servers"


def haproxy_for_test(cfg: str, servers: list[str]) -> str:
    """The configuration as tests/gateway/replicas.rs runs it: everything up to the servers
    marker, then `servers` (Debian's HAProxy 2.6 has no `hash-key`)."""
    head = cfg[: cfg.index(SERVERS_MARKER)]
    return head + "\n".join(["  default-server check inter 200ms fall 1 rise 1 weight 100", *servers]) + "\n"


def check_affinity(where: str, docs: list[dict], src: Source, report: Report) -> None:
    proxy = find(docs, "Deployment", AFFINITY)
    if proxy is None:
        return
    pod = proxy["spec"]["template"]["spec"]
    c = next((c for c in pod["containers"] if c["name"] == "haproxy"), None)
    if not report.check(c is not None, f"{where}: container haproxy in Deployment/{AFFINITY}"):
        return
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    cm_name = next((v["configMap"]["name"] for v in volumes.values() if "configMap" in v), None)
    cm = find(docs, "ConfigMap", cm_name) if cm_name else None
    cfg = ((cm or {}).get("data") or {}).get("haproxy.cfg")
    if not report.check(cfg is not None, f"{where}: Deployment/{AFFINITY} mounts a ConfigMap with haproxy.cfg"):
        return
    report.check(cfg == HAPROXY_CFG.read_text(), f"{where}: its haproxy.cfg is {HAPROXY_CFG.relative_to(DEPLOY)}")
    args = c.get("args", [])
    mount = next((m["mountPath"] for m in c.get("volumeMounts", []) if volumes.get(m["name"], {}).get("configMap")), "")
    report.check("-f" in args and args[args.index("-f") + 1] == f"{mount}/haproxy.cfg",
                 f"{where}: haproxy reads the mounted haproxy.cfg ({' '.join(args)})")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    http = {p.get("name"): p for p in c.get("ports", [])}.get("http")
    bind = env.get("HAPROXY_BIND") or ""
    report.check(http is not None and bind.rsplit(":", 1)[-1] == str(http["containerPort"]),
                 f"{where}: HAPROXY_BIND {bind!r} = the haproxy container port {http and http['containerPort']}")
    report.check('"${HAPROXY_BIND}"' in cfg and '"${NAMESPACE}"' in cfg and "NAMESPACE" in env,
                 f"{where}: haproxy.cfg's variables HAPROXY_BIND and NAMESPACE are set")
    monitor = re.search(r"^\s*monitor-uri\s+(\S+)", cfg, re.M)
    for probe in ("readinessProbe", "livenessProbe"):
        path = (c.get(probe) or {}).get("httpGet", {}).get("path")
        report.check(monitor is not None and path == monitor.group(1),
                     f"{where}: haproxy {probe} on its monitor-uri ({path})")
    sc = {**(pod.get("securityContext") or {}), **(c.get("securityContext") or {})}
    report.check(sc.get("runAsNonRoot") is True and sc.get("readOnlyRootFilesystem") is True
                 and "ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
                 f"{where}: haproxy runs as non-root, read-only, without capabilities")
    image = c.get("image", "")
    m = re.search(r":(\d+)\.(\d+)", image)
    report.check(m is not None and (int(m.group(1)), int(m.group(2))) >= (2, 8),
                 f"{where}: haproxy image {image} is 2.8 or later (hash-key)")

    # The key and the ring.
    report.check(re.search(r"^\s*balance hash url_param\(bindings\)", cfg, re.M) is not None,
                 f"{where}: haproxy hashes on the `bindings` parameter")
    report.check(re.search(r"^\s*hash-type consistent\b", cfg, re.M) is not None,
                 f"{where}: haproxy's hashing is consistent (a new replica moves only its share)")
    check = re.search(r"^\s*option httpchk GET (\S+)", cfg, re.M)
    report.check(check is not None and check.group(1) == "/__heartbeat__" and check.group(1) in src.routes,
                 f"{where}: haproxy checks the gateways on /__heartbeat__ (fails while draining)")
    template = re.search(r"^\s*server-template \S+ (\d+) _http\._tcp\.([a-z0-9-]+)\.", cfg, re.M)
    if not report.check(template is not None, f"{where}: haproxy finds the gateways by DNS SRV (server-template)"):
        return
    slots, svc_name = int(template.group(1)), template.group(2)
    for hpa in (d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"):
        report.check(hpa["spec"]["maxReplicas"] <= slots,
                     f"{where}: server-template's {slots} slots >= {name_of(hpa)} maxReplicas {hpa['spec']['maxReplicas']}")
    svc = find(docs, "Service", svc_name)
    gw = find(docs, "Deployment", GATEWAY)
    if report.check(svc is not None and gw is not None, f"{where}: Service/{svc_name} of the SRV name is rendered"):
        labels = gw["spec"]["template"]["metadata"].get("labels", {})
        sel = svc["spec"].get("selector") or {}
        report.check(svc["spec"].get("clusterIP") == "None" and bool(sel)
                     and all(labels.get(k) == v for k, v in sel.items()),
                     f"{where}: Service/{svc_name} is headless and selects the gateway pods")
        port = {p.get("name"): p for p in svc["spec"]["ports"]}.get("http")
        report.check(port is not None and port.get("targetPort") in ("http", src.default_port)
                     and port.get("port") == src.default_port,
                     f"{where}: Service/{svc_name} port `http` (the SRV record's) is the gateways' port {src.default_port}")
        report.check(not svc["spec"].get("publishNotReadyAddresses", False),
                     f"{where}: Service/{svc_name} publishes ready gateways only")
    proxy_labels = proxy["spec"]["template"]["metadata"].get("labels", {})
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        obj = find(docs, kind, AFFINITY)
        sel = (obj or {}).get("spec", {}).get("selector" if kind == "PodDisruptionBudget" else "podSelector", {})
        labels = sel.get("matchLabels", {})
        report.check(bool(labels) and all(proxy_labels.get(k) == v for k, v in labels.items()),
                     f"{where}: {kind}/{AFFINITY} selects the haproxy pods")
    front = find(docs, "Service", AFFINITY)
    if report.check(front is not None, f"{where}: Service/{AFFINITY} rendered"):
        ports = {p.get("name"): p for p in front["spec"]["ports"]}
        report.check(ports.get("http", {}).get("targetPort") == "http",
                     f"{where}: Service/{AFFINITY} port `http` targets haproxy's port")
    cm_gw = next((d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"].startswith(CONFIGMAP)), None)
    report.check("TRUSTED_PROXIES" in ((cm_gw or {}).get("data") or {}),
                 f"{where}: TRUSTED_PROXIES is set (the gateways see the clients' addresses through the tier)")


def check_haproxy_config(report: Report) -> None:
    """`haproxy -c`: the file as shipped with forky's HAProxy (3.2, in the root of
    scripts/rabbitmq-4.3.sh), and as the loopback test runs it with Debian's (2.6)."""
    cfg = HAPROXY_CFG.read_text()
    env = {**os.environ, "HAPROXY_BIND": ":8080", "HAPROXY_ADMIN_SOCKET": "/tmp/haproxy-check.sock",
           "NAMESPACE": "events"}
    shipped = subprocess.run(["bash", str(REPO / "scripts" / "rabbitmq-4.3.sh"), "haproxy", "-c", "-f", "/dev/stdin"],
                             input=cfg, env=env, capture_output=True, text=True)
    report.check(shipped.returncode == 0, "haproxy.cfg as shipped: valid for HAProxy 3.2 (`haproxy -c`)",
                 (shipped.stderr or shipped.stdout).strip()[-2000:])
    if shutil.which("haproxy") is None:
        report.fail("haproxy.cfg as the test runs it: haproxy not found (apt-get install haproxy)")
        return
    test_cfg = haproxy_for_test(cfg, ["  server gw1 127.0.0.1:1", "  server gw2 127.0.0.1:2"])
    host = subprocess.run(["haproxy", "-c", "-f", "/dev/stdin"], input=test_cfg, env=env,
                          capture_output=True, text=True)
    version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    report.check(host.returncode == 0, f"haproxy.cfg as the test runs it: valid for {version}",
                 (host.stderr or host.stdout).strip()[-2000:])


# --------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def read_dockerfile(src: Source, report: Report) -> dict:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    lines = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    stages = [line for line in lines if line.upper().startswith("FROM ")]
    runtime = stages[-1].split()[1] if stages else ""
    expose = next((int(line.split()[1].split("/")[0]) for line in lines if line.upper().startswith("EXPOSE ")), None)
    user = next((line.split()[1] for line in lines if line.upper().startswith("USER ")), "")
    uid = int(user.split(":")[0]) if user.split(":")[0].isdigit() else None
    entry = next((line for line in lines if line.upper().startswith("ENTRYPOINT ")), "")
    entry_cmd = json.loads(entry.split(None, 1)[1]) if entry.startswith("ENTRYPOINT [") else entry.split()[1:]
    info = {"expose": expose, "uid": uid, "runtime": runtime, "distroless": "distroless" in runtime}

    section("Dockerfile and .dockerignore")
    report.check(len(stages) >= 2, f"Dockerfile is multi-stage ({len(stages)} stages)")
    report.check(expose == src.default_port, f"Dockerfile EXPOSE {expose} = default PORT {src.default_port}")
    report.check(uid is not None and uid != 0, f"Dockerfile USER {user} is a numeric non-root uid")
    report.check(bool(entry_cmd) and Path(entry_cmd[0]).name == src.binary,
                 f"Dockerfile ENTRYPOINT {entry_cmd} runs the binary `{src.binary}` (Cargo.toml)")
    report.check("cargo build --release --locked" in " ".join(lines), "Dockerfile builds with `cargo build --release --locked`")
    build_env = set(re.findall(r"\b(EVENTS_GATEWAY_[A-Z]+)=", text))
    report.check(build_env == src.version_env,
                 f"Dockerfile passes {sorted(build_env)} to cargo build = the binary's build-time variables {sorted(src.version_env)}")
    for arg in ("COMMIT", "SOURCE", "BUILD"):
        report.check(re.search(rf"^ARG {arg}\b", text, re.M) is not None, f"Dockerfile takes build arg {arg}")
    rust = re.search(r"^ARG RUST_VERSION=(\d+)\.(\d+)", text, re.M)
    msrv = tuple(int(x) for x in src.rust_version.split(".")[:2]) if src.rust_version else (0, 0)
    report.check(rust is not None and (int(rust.group(1)), int(rust.group(2))) >= msrv,
                 f"Dockerfile builder Rust {rust and rust.group(1)}.{rust and rust.group(2)} >= "
                 f"rust-version {src.rust_version} of Cargo.toml")

    ignore_path = REPO / ".dockerignore"
    if report.check(ignore_path.exists(), ".dockerignore exists"):
        ignore = {line.strip().rstrip("/") for line in ignore_path.read_text().splitlines()
                  if line.strip() and not line.startswith("#")}
        report.check({"target", ".git"} <= ignore, ".dockerignore excludes target and .git")
        needed = {"src", "Cargo.toml", "Cargo.lock", "tests", "benches", "*", "**"}
        report.check(not (ignore & needed), ".dockerignore keeps the crate's sources in the build context",
                     f"excluded: {sorted(ignore & needed)}")
    return info


# --------------------------------------------------------------------------------------
# PromQL in the dashboard and the alert rules

def parse_promql(exprs: list[str]) -> list[dict]:
    """Each expression's metrics, label matchers and syntax errors, from Prometheus's own
    grammar (deploy/promql/parse.mjs)."""
    proc = subprocess.run(["node", str(DEPLOY / "promql" / "parse.mjs")], input=json.dumps(exprs),
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        print(f"FATAL deploy/promql/parse.mjs failed: {proc.stderr.strip()}")
        sys.exit(2)
    return json.loads(proc.stdout)


def check_promql(where: str, exprs: list[str], src: Source, report: Report) -> set[str]:
    seen: set[str] = set()
    for parsed in parse_promql(exprs):
        report.check(not parsed["errors"], f"{where}: PromQL parses: {parsed['expr'][:60]}",
                     "; ".join(parsed["errors"]))
        seen |= set(parsed["metrics"])
        for label, op, value in parsed["matchers"]:
            allowed = src.labels.get(label)
            if allowed is None:
                continue  # a label the scrape adds (namespace, pod, job, le, ...)
            values = value.split("|") if "~" in op else [value]
            for v in values:
                report.check(v in allowed, f"{where}: label value {label}=\"{v}\" is one the binary uses",
                             f"allowed: {sorted(allowed)}")
    for name in sorted(seen):
        base = next((name[: -len(sfx)] for sfx in HISTOGRAM_SUFFIXES
                     if name.endswith(sfx) and name[: -len(sfx)] in src.metrics), name)
        report.check(base in src.metrics,
                     f"{where}: {name} is registered by the binary"
                     + (f" (histogram {base})" if base != name else ""),
                     "not in the binary's manifest")
    return seen


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs: list[str] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def check_rules(where: str, rule: dict, src: Source, report: Report) -> list[str]:
    exprs = []
    for group in rule.get("spec", {}).get("groups", []):
        for r in group.get("rules", []):
            what = r.get("alert") or r.get("record")
            report.check(bool(what) and bool(r.get("expr")), f"{where}: rule {what} has a name and an expr")
            if r.get("alert"):
                report.check(bool((r.get("labels") or {}).get("severity")), f"{where}: alert {what} has a severity")
                report.check(bool((r.get("annotations") or {}).get("summary")), f"{where}: alert {what} has a summary")
                report.check(re.match(r"^\d+[smh]$", str(r.get("for", "0m"))) is not None,
                             f"{where}: alert {what} `for` is a duration")
            exprs.append(str(r.get("expr", "")))
    return exprs


# --------------------------------------------------------------------------------------


def main() -> int:
    args = sys.argv[1:]
    if any(a not in ("-q", "--quiet") for a in args):
        print("usage: check.py [-q|--quiet]   (-q: print failures, notes and the summary only)")
        return 2
    report = Report(quiet=bool(args))
    if shutil.which("kubectl") is None:
        print("FATAL kubectl not found on PATH (kubectl with kustomize renders the manifests)")
        return 2
    kubectl = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True).stdout
    print(f"kubectl: {' / '.join(line.strip() for line in kubectl.splitlines() if line.strip())}")
    print(f"kubernetes-validate {kubernetes_validate.__version__}, schemas of Kubernetes {KUBERNETES_VERSION}, strict")

    src = read_source()
    print(f"binary {src.bin}: {len(src.settings)} settings, default PORT {src.default_port}, "
          f"{len(src.routes)} routes, {len(src.metrics)} metric families")

    docker = read_dockerfile(src, report)

    section("Render (kubectl kustomize)")
    rendered: dict[str, list[dict]] = {}
    for path in kustomizations():
        docs = render(path, report)
        if docs is not None:
            rendered[str(path.relative_to(DEPLOY))] = docs
    examples: list[tuple[str, dict]] = []
    for path in sorted(DEPLOY.rglob("*.example.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                examples.append((str(path.relative_to(DEPLOY)), d))

    section(f"Schemas (kubernetes-validate --strict, Kubernetes {KUBERNETES_VERSION})")
    for where, docs in rendered.items():
        validate_schemas(where, docs, report)
    for where, d in examples:
        validate_schemas(where, [d], report)
    for where, d in examples:
        if d.get("kind") == "Secret":
            values = list((d.get("stringData") or {}).values()) + list((d.get("data") or {}).values())
            report.check(all("REPLACE" in str(v) or v == "" for v in values),
                         f"{where}: {name_of(d)} holds placeholders only")

    section("Manifests against the binary")
    example_docs = [d for _, d in examples]
    for where, docs in rendered.items():
        if where.startswith("k8s/"):
            check_gateway(where, docs, src, example_docs, docker, report)

    section("Affinity tier (HAProxy) against the gateways and the binary")
    for where, docs in rendered.items():
        if where.startswith("k8s/"):
            check_affinity(where, docs, src, report)
    check_haproxy_config(report)

    section("Dashboard and alert rules against the binary's metrics")
    dash_path = DEPLOY / "grafana" / "events-gateway.json"
    dashboard = json.loads(dash_path.read_text())
    ids = [p.get("id") for p in dashboard.get("panels", [])]
    report.check(len(ids) == len(set(ids)), "dashboard panel ids are unique")
    used = check_promql("dashboard", dashboard_exprs(dashboard), src, report)
    rules = yaml.safe_load((DEPLOY / "grafana" / "alerts.yaml").read_text())
    used |= check_promql("alerts", check_rules("alerts", rules, src, report), src, report)
    for where, docs in rendered.items():
        for d in docs:
            if d.get("kind") == "ConfigMap" and "events-gateway.json" in (d.get("data") or {}):
                report.check(json.loads(d["data"]["events-gateway.json"]) == dashboard,
                             f"{where}: {name_of(d)} carries deploy/grafana/events-gateway.json")
    unused = sorted(m for m in src.metrics
                    if not PROCESS_METRIC.match(m) and not any(u == m or u.startswith(m + "_") for u in used))
    if unused:
        report.note(f"metrics exported but shown nowhere: {', '.join(unused)}")

    section("Summary")
    print(f"{report.passes} checks passed, {len(report.failures)} failed"
          + (f", {len(report.notes)} notes" if report.notes else ""))
    if report.failures:
        print("Failures:")
        for f in report.failures:
            print(f"  - {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
