#!/usr/bin/env python3
"""Offline checks of the deployment material in deploy/, without a cluster or a container
engine.

1. Render: `kubectl kustomize` renders deploy/k8s/base, every deploy/k8s/overlays/* and
   deploy/grafana.
2. Schemas: every rendered object, and every *.example.yaml, validates against the
   Kubernetes OpenAPI schemas of KUBERNETES_VERSION with kubernetes-validate in strict mode
   (unknown fields are errors). CRD kinds without a bundled schema (ServiceMonitor,
   PrometheusRule) are skipped there, said so, and get structural checks of their own.
3. Against the source: env names the manifests set are settings the binary reads
   (src/config.rs, or std::env::var in src/), values parse as their setting's type; probe,
   preStop and scrape paths are routes of src/http.rs; the container port is the default
   PORT of src/config.rs; the drain budget fits terminationGracePeriodSeconds; Service,
   ServiceMonitor, NetworkPolicy, Ingress, HPA and PDB point at what exists; the Dockerfile
   agrees (port, user, binary, build args).
4. Monitoring: every metric named by the dashboard's and the alert rules' queries is
   exported by src/metrics.rs (histogram series _bucket/_sum/_count map to their base name;
   process_* come from the prometheus crate), and label values are ones the binary uses.

Prints one line per check (failures, notes and the summary only with -q) and a summary;
exits 1 on any failure, 2 if a tool is missing.
Needs Python 3.11, PyYAML, kubernetes-validate and kubectl (with kustomize) on PATH.
"""

from __future__ import annotations

import json
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
SRC = REPO / "src"

# Kinds from CustomResourceDefinitions: kubernetes-validate has no schema for them.
CRD_KINDS = {
    ("monitoring.coreos.com", "ServiceMonitor"),
    ("monitoring.coreos.com", "PrometheusRule"),
}

GATEWAY = "events-gateway"  # Deployment and container name
CONFIGMAP = "events-gateway-config"
SECRET = "events-gateway-pulse"

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
    rust_type: str
    default: str | None
    choices: list[str] | None
    nonzero: bool = False


@dataclass
class Source:
    settings: dict[str, Setting]
    other_env: set[str]  # read with std::env::var outside the clap settings
    default_port: int
    routes: set[str]
    metrics: set[str]
    outcomes: set[str]
    drop_reasons: set[str]
    version_env: set[str]  # option_env! names compiled into /__version__
    binary: str
    rust_version: str


def read_source() -> Source:
    config_rs = (SRC / "config.rs").read_text()
    settings: dict[str, Setting] = {}
    # Each clap field: `#[arg(... env = "NAME" ...)]` then `pub field: Type,`.
    for m in re.finditer(r"#\[arg\((?P<attr>.*?)\)\]\s*pub\s+\w+\s*:\s*(?P<ty>[^,\n]+),",
                         config_rs, re.S):
        attr = m.group("attr")
        env = re.search(r'\benv\s*=\s*"([A-Z0-9_]+)"', attr)
        if not env:
            continue
        default = None
        quoted = re.search(r'\bdefault_value\s*=\s*"([^"]*)"', attr)
        literal = re.search(r"\bdefault_value_t\s*=\s*([^,)\s]+)", attr)
        if quoted:
            default = quoted.group(1)
        elif literal:
            default = literal.group(1).replace("_", "")
        choices = re.search(r"value_parser\s*=\s*\[([^\]]*)\]", attr)
        settings[env.group(1)] = Setting(
            env=env.group(1),
            rust_type=m.group("ty").strip(),
            default=default,
            choices=re.findall(r'"([^"]*)"', choices.group(1)) if choices else None,
        )
    # Settings that Config::from_args refuses at zero: `("NAME", args.field)` pairs.
    nonzero = set(re.findall(r'\(\s*"([A-Z0-9_]+)"\s*,\s*args\.', config_rs))
    for name in nonzero & set(settings):
        settings[name].nonzero = True
    # Every `env = "NAME"` anywhere in config.rs counts, even one the regex above missed.
    for name in re.findall(r'\benv\s*=\s*"([A-Z0-9_]+)"', config_rs):
        settings.setdefault(name, Setting(name, "?", None, None))

    other_env: set[str] = set()
    for path in SRC.rglob("*.rs"):
        other_env.update(re.findall(r'env::var(?:_os)?\(\s*"([A-Z0-9_]+)"\s*\)', path.read_text()))

    port = settings.get("PORT")
    default_port = int(port.default) if port and port.default and port.default.isdigit() else -1

    http_rs = (SRC / "http.rs").read_text()
    routes: set[str] = set()
    for m in re.finditer(r"warp::path!\(([^)]*)\)", http_rs):
        segments = re.findall(r'"([^"]*)"', m.group(1))
        if segments:
            routes.add("/" + "/".join(segments))
    connect = re.search(r"CONNECT_PATHS\s*:[^=]*=\s*&\[([^\]]*)\]", http_rs)
    if connect:
        for p in re.findall(r'"([^"]*)"', connect.group(1)):
            routes.update({p, p + "/"})
    version_env = set(re.findall(r'option_env!\(\s*"([A-Z0-9_]+)"\s*\)', http_rs))

    metrics_rs = (SRC / "metrics.rs").read_text()
    metrics = set(re.findall(r'"(events_gateway_[a-z0-9_]+)"', metrics_rs))

    def const_list(name: str) -> set[str]:
        m = re.search(rf"const\s+{name}\s*:[^=]*=\s*&\[([^\]]*)\]", metrics_rs, re.S)
        return set(re.findall(r'"([^"]*)"', m.group(1))) if m else set()

    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    bins = cargo.get("bin") or []
    binary = bins[0]["name"] if bins else cargo["package"]["name"]

    return Source(settings, other_env, default_port, routes, metrics,
                  const_list("OUTCOMES"), const_list("DROP_REASONS"), version_env, binary,
                  str(cargo["package"].get("rust-version", "")))


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


HUMANTIME = re.compile(
    r"^\s*(\d+\s*(nsec|ns|usec|us|msec|ms|seconds|second|sec|s|minutes|minute|min|m|"
    r"hours|hour|hr|h|days|day|d|weeks|week|w|months|month|M|years|year|y)\s*)+$")


def value_fits(setting: Setting, value: str) -> str | None:
    """None if `value` parses as the setting's type, else why not."""
    ty = setting.rust_type.replace(" ", "")
    if ty.startswith("Option<") and ty.endswith(">"):
        ty = ty[len("Option<"):-1]
    if setting.choices is not None and value not in setting.choices:
        return f"must be one of {setting.choices}"
    if setting.nonzero and (value.isdigit() and int(value) == 0 or
                            ty == "Duration" and re.fullmatch(r"[0\s]+[a-zA-Z]+", value)):
        return "must be greater than zero (src/config.rs refuses 0)"
    if ty in ("u8", "u16", "u32", "u64", "usize"):
        if not value.isdigit():
            return f"must be an unsigned integer ({ty})"
        if ty == "u16" and int(value) > 65535:
            return "must fit in u16"
        if ty == "u32" and int(value) > 2**32 - 1:
            return "must fit in u32"
        return None
    if ty == "bool":
        return None if value in ("true", "false") else "must be true or false"
    if ty == "Duration":
        return None if HUMANTIME.match(value) else "must be a duration such as 30s or 5m"
    if ty in ("f32", "f64"):
        return None if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value) else f"must be a number ({ty})"
    if ty == "IpAddr":
        return None if re.match(r"^[0-9.]+$|^[0-9a-fA-F:]+$", value) else "must be an IP address"
    return None  # String and anything unknown: no constraint known here


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "msec": 0.001, "s": 1, "sec": 1, "second": 1, "seconds": 1,
             "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600,
             "hour": 3600, "hours": 3600}
    total = 0.0
    for num, unit in re.findall(r"(\d+)\s*([a-zA-Z]+)", text):
        if unit not in units:
            raise ValueError(text)
        total += int(num) * units[unit]
    return total


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
        origin = ("src/config.rs" if name in src.settings else
                  "std::env::var in src/" if name in src.other_env else None)
        report.check(origin is not None, f"{where}: env {name} is read by the binary"
                     + (f" ({origin})" if origin else ""),
                     "not an `env = \"NAME\"` in src/config.rs nor read with std::env::var in src/")
    for name, value in sorted(config.items()):
        setting = src.settings.get(name)
        if setting is None:
            continue
        why = value_fits(setting, value)
        report.check(why is None, f"{where}: {name}={value!r} parses as {setting.rust_type}", why or "")
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
                 f"{where}: container port `http` {http and http['containerPort']} = default PORT in src/config.rs ({src.default_port})")
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
        report.check(get["path"] in src.routes, f"{where}: {probe} path {get['path']} is a route of src/http.rs",
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
    grace_text = config.get("SHUTDOWN_GRACE", (src.settings.get("SHUTDOWN_GRACE") or Setting("", "", "30s", None)).default or "30s")
    try:
        grace = duration_seconds(grace_text)
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        report.check(tgps > grace + pre_seconds,
                     f"{where}: terminationGracePeriodSeconds {tgps} > SHUTDOWN_GRACE {grace:g}s + preStop {pre_seconds:g}s")
    except ValueError:
        report.fail(f"{where}: SHUTDOWN_GRACE {grace_text!r} is not a duration")

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
                         f"{where}: {name_of(sm)} path {ep.get('path')} is a route of src/http.rs")
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
    for pdb in (d for d in docs if d.get("kind") == "PodDisruptionBudget"):
        report.check(selects_pods(pdb["spec"].get("selector")), f"{where}: {name_of(pdb)} selects the gateway pods")
    for ing in (d for d in docs if d.get("kind") == "Ingress"):
        for rule in ing["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                backend = p["backend"]["service"]
                ok_backend = (svc is not None and backend["name"] == GATEWAY and
                              (backend["port"].get("name") in {x.get("name") for x in svc["spec"]["ports"]} or
                               backend["port"].get("number") in {x.get("port") for x in svc["spec"]["ports"]}))
                report.check(ok_backend, f"{where}: {name_of(ing)} path {p['path']} goes to a port of Service/{GATEWAY}")
                report.check(route_matches_prefix(p["path"], src.routes),
                             f"{where}: {name_of(ing)} path {p['path']} leads to routes of src/http.rs")


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
                 f"Dockerfile passes {sorted(build_env)} to cargo build = option_env! names in src/http.rs {sorted(src.version_env)}")
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

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "inf", "nan", "start", "end"}
# Aggregation operators: like functions, but `by (...)` / `without (...)` may sit between
# the name and its parenthesis.
PROMQL_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                       "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed)."""
    m = re.match(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", expr, re.S)
    if m:
        expr = m.group(1)
    elif re.match(r"^\s*label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", expr):
        return set()
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", s)
    names = set()
    for tok in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[tok.start() - 1] if tok.start() else " "
        if before.isdigit() or before in ".$":
            continue
        if re.match(r"\s*\(", s[tok.end():]):
            continue  # a function
        if tok.group(0).lower() in PROMQL_WORDS | PROMQL_AGGREGATIONS:
            continue
        names.add(tok.group(0))
    return names


def check_promql(where: str, exprs: list[str], src: Source, report: Report) -> set[str]:
    seen: set[str] = set()
    for expr in exprs:
        seen |= promql_metrics(expr)
        for label, op, value in re.findall(r'\b(outcome|reason)\s*(=~|!~|=|!=)\s*"([^"]*)"', expr):
            allowed = src.outcomes if label == "outcome" else src.drop_reasons
            values = value.split("|") if "~" in op else [value]
            for v in values:
                report.check(v in allowed, f"{where}: label value {label}=\"{v}\" is one the binary uses",
                             f"allowed: {sorted(allowed)}")
    for name in sorted(seen):
        base = next((name[: -len(sfx)] for sfx in HISTOGRAM_SUFFIXES
                     if name.endswith(sfx) and name[: -len(sfx)] in src.metrics), name)
        if PROCESS_METRIC.match(name):
            report.ok(f"{where}: {name} (process collector of the prometheus crate)")
        else:
            report.check(base in src.metrics,
                         f"{where}: {name} is exported by src/metrics.rs"
                         + (f" (histogram {base})" if base != name else ""),
                         "not in src/metrics.rs")
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
    print(f"source: {len(src.settings)} settings in src/config.rs, default PORT {src.default_port}, "
          f"{len(src.routes)} routes in src/http.rs, {len(src.metrics)} metrics in src/metrics.rs")

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

    section("Manifests against the source")
    example_docs = [d for _, d in examples]
    for where, docs in rendered.items():
        if where.startswith("k8s/"):
            check_gateway(where, docs, src, example_docs, docker, report)

    section("Dashboard and alert rules against src/metrics.rs")
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
    unused = sorted(m for m in src.metrics if not any(u == m or u.startswith(m + "_") for u in used))
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
