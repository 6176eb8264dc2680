"""Validation of deploy/: the Helm chart, the systemd units, the Grafana dashboard, the rules.

Every YAML and JSON file must parse. The metric names (and their labels) that the dashboard and
the Prometheus rules may use are the contract in METRICS; the broker and agent code must export
exactly those. Helm templates are checked without helm: each is reduced to a YAML skeleton
(control lines dropped, `.Values` expressions replaced by their defaults) that must parse and
carry the objects and fields an operator expects; the flags the manifests pass must exist in the
real CLI parser. Where helm (or the helm_python package), promtool or systemd-analyze is on the
machine, the chart is rendered for real, the rules' unit tests run and the units are verified.
These tests know nothing of how the broker or the agent work inside.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "hyperbroker"
TEMPLATES = CHART / "templates"
DASHBOARD = DEPLOY / "grafana" / "hyperbroker-dashboard.json"
RULES = DEPLOY / "prometheus" / "hyperbroker-rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "hyperbroker-rules.test.yaml"
SYSTEMD = DEPLOY / "systemd"


# ---- the metrics contract -----------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    kind: str  # "counter" | "gauge" | "histogram"
    labels: frozenset[str] = frozenset()


def _m(kind: str, *labels: str) -> Metric:
    return Metric(kind, frozenset(labels))


# The names the lead implements (brief "deploy/"; docs/operations.md "Metrics" explains each).
# Counter names include _total, as they are exposed.
METRICS: Mapping[str, Metric] = {
    # broker
    "hyperbroker_broker_call_duration_seconds": _m("histogram", "handler", "function", "outcome"),
    "hyperbroker_broker_calls_in_flight": _m("gauge"),
    "hyperbroker_broker_handler_errors_total": _m("counter", "handler"),
    "hyperbroker_broker_duplicate_calls_total": _m("counter"),
    "hyperbroker_broker_agents_connected": _m("gauge"),
    "hyperbroker_broker_vms": _m("gauge"),
    "hyperbroker_broker_frames_total": _m("counter", "direction"),
    "hyperbroker_broker_batch_size": _m("histogram"),
    "hyperbroker_broker_memory_requests_total": _m("counter"),
    "hyperbroker_broker_memory_bytes_total": _m("counter", "direction"),
    "hyperbroker_broker_rate_limited_total": _m("counter"),
    "hyperbroker_broker_policy_version": _m("gauge"),
    # agent
    "hyperbroker_agent_call_duration_seconds": _m("histogram", "source", "outcome"),
    "hyperbroker_agent_calls_in_flight": _m("gauge"),
    "hyperbroker_agent_fallbacks_total": _m("counter", "reason"),
    "hyperbroker_agent_broker_stream_up": _m("gauge"),
    "hyperbroker_agent_reconnects_total": _m("counter"),
    "hyperbroker_agent_vms": _m("gauge"),
    "hyperbroker_agent_vmm_connections": _m("gauge"),
    "hyperbroker_agent_protocol_errors_total": _m("counter", "code"),
    "hyperbroker_agent_memory_bytes_total": _m("counter", "direction"),
    "hyperbroker_agent_link_rtt_seconds": _m("histogram"),
    # handlers: every metric the shipped handler packages export (docs/operations.md "Handlers")
    "hyperbroker_trng_bits_total": _m("counter"),
    "hyperbroker_ffa_shares_total": _m("counter", "kind"),
    "hyperbroker_ffa_pages_shared_total": _m("counter", "kind"),
    "hyperbroker_ffa_reclaims_total": _m("counter", "reason"),
    "hyperbroker_ffa_pages_reclaimed_total": _m("counter", "reason"),
    "hyperbroker_ffa_direct_messages_total": _m("counter", "partition", "kind", "result"),
    "hyperbroker_ffa_errors_total": _m("counter", "function", "code"),
    "hyperbroker_ffa_partition_up": _m("gauge", "partition"),
    "hyperbroker_hyperv_hypercalls_total": _m("counter", "call", "status"),
    "hyperbroker_hyperv_guest_crashes_total": _m("counter", "kind"),
    "hyperbroker_hyperv_guest_crashed": _m("gauge", "host", "vm"),
    "hyperbroker_hyperv_synic_total": _m("counter", "kind"),
    "hyperbroker_memshare_calls_total": _m("counter", "function", "result"),
    "hyperbroker_memshare_shared_bytes": _m("gauge", "host", "vm"),
    "hyperbroker_memshare_guarded_granules": _m("gauge", "host", "vm"),
    "hyperbroker_tee_sessions_open": _m("gauge", "ta"),
    "hyperbroker_tee_call_seconds": _m("histogram", "command", "part"),
    "hyperbroker_tee_errors_total": _m("counter", "code", "origin"),
    "hyperbroker_tee_smc_errors_total": _m("counter", "code"),
    "hyperbroker_tee_backend_failures_total": _m("counter", "command", "reason"),
    "hyperbroker_tee_yields_total": _m("counter"),
    "hyperbroker_tee_threads_running": _m("gauge"),
}
PROCESS_PREFIXES = ("hyperbroker_broker_", "hyperbroker_agent_")
# Labels Prometheus attaches to every scraped series (the chart's ServiceMonitors set both).
TARGET_LABELS = frozenset({"job", "instance"})
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# Grafana's own variables.
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


# ---- PromQL, as far as these files need it -------------------------------------------------

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_QUANTILE = re.compile(r"histogram_quantile\(\s*[0-9.]+\s*,\s*sum by \(([^)]*)\)")


def _unquoted(expr: str) -> str:
    return _QUOTED.sub('""', expr)


def hyperbroker_tokens(expr: str) -> list[tuple[int, str]]:
    """(position, name) of every series name in `expr` that belongs to hyperbroker."""
    text = _unquoted(expr)
    return [(m.start(), m.group()) for m in _IDENT.finditer(text) if "hyperbroker_" in m.group()]


def contract_metric(token: str) -> tuple[str, str] | None:
    """(contract name, suffix) for a series name, or None if it is not in the contract."""
    if token in METRICS and METRICS[token].kind != "histogram":
        return token, ""
    for suffix in HISTOGRAM_SUFFIXES:
        base = token.removesuffix(suffix)
        if base != token and METRICS.get(base, Metric("")).kind == "histogram":
            return base, suffix
    return None


def grouping_labels(expr: str) -> set[str]:
    text = _unquoted(expr)
    labels = {name for sel in _SELECTOR.findall(text) for name in _MATCHER.findall(sel)}
    for group in _GROUPING.findall(text):
        labels |= {part.strip() for part in group.split(",") if part.strip()}
    return labels


def grafana_to_promql(expr: str) -> str:
    """Replace the dashboard's variables with values Prometheus accepts."""
    return expr.replace("$__rate_interval", "5m").replace("$handler", ".*")


@dataclass(frozen=True)
class Expression:
    where: str
    expr: str
    series_only: bool = False  # a series selector (label_values), not a computed value


def check_expression(e: Expression, recorded: Mapping[str, frozenset[str]]) -> list[str]:
    """Problems with one expression: unknown series, misused types, unknown labels.

    `recorded`: recording-rule names this expression may use, with the labels they keep.
    """
    problems: list[str] = []
    allowed = set(TARGET_LABELS)
    text = _unquoted(e.expr)
    for pos, token in hyperbroker_tokens(e.expr):
        before = text[:pos].rstrip()
        rated = before.endswith(("rate(", "increase("))
        if ":" in token:
            if token not in recorded:
                problems.append(f"{e.where}: {token} is not a recording rule here")
            else:
                allowed |= recorded[token]
            continue
        found = contract_metric(token)
        if found is None:
            problems.append(f"{e.where}: {token} is not in the metrics contract")
            continue
        name, suffix = found
        metric = METRICS[name]
        allowed |= metric.labels
        if metric.kind == "histogram":
            allowed.add("le")
        if e.series_only:
            continue
        if (metric.kind == "counter" or suffix) and not rated:
            problems.append(f"{e.where}: {token} is a counter; use rate() or increase()")
        if metric.kind == "gauge" and rated:
            problems.append(f"{e.where}: {token} is a gauge; rate() of it means nothing")
    unknown = grouping_labels(e.expr) - allowed
    if unknown:
        problems.append(f"{e.where}: labels {sorted(unknown)} are not on the series it uses")
    quantiles = e.expr.count("histogram_quantile(")
    groupings = _QUANTILE.findall(_unquoted(e.expr))
    if len(groupings) != quantiles or any("le" not in g.replace(" ", "").split(",")
                                          for g in groupings):
        problems.append(f"{e.where}: histogram_quantile needs sum by (..., le)")
    return problems


# ---- files ---------------------------------------------------------------------------------


def load_rules() -> dict[str, Any]:
    data = yaml.safe_load(RULES.read_text())
    assert isinstance(data, dict)
    return data


def rule_list() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in load_dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return panels


def dashboard_expressions() -> list[Expression]:
    out = [Expression(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
           for p in dashboard_panels() for t in p.get("targets", [])]
    for var in load_dashboard()["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", text)
            assert inner, f"variable {var['name']}: expected label_values(series, label)"
            out.append(Expression(f"variable {var['name']}", inner.group(1), series_only=True))
    return out


def yaml_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.suffix in (".yaml", ".yml") and TEMPLATES not in path.parents:
            yield path


# ---- Helm skeletons ------------------------------------------------------------------------

_TPL_COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.S)
_TPL_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")
_TPL_ALIAS = re.compile(r"\$(\w+)\s*:=\s*\.Values((?:\.\w+)+)")
_TPL_VALUE = re.compile(r"(?:\.Values|\$(\w+))((?:\.\w+)+)")


def chart_values() -> dict[str, Any]:
    data = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _aliases(text: str) -> dict[str, tuple[str, ...]]:
    return {m.group(1): tuple(m.group(2).split(".")[1:]) for m in _TPL_ALIAS.finditer(text)}


def value_references(text: str) -> set[tuple[str, ...]]:
    """Every values path a template reads: `.Values.a.b`, and `$alias.c` after
    `$alias := .Values.a`."""
    text = _TPL_COMMENT.sub("", text)
    aliases = _aliases(text)
    refs: set[tuple[str, ...]] = set()
    for action in _TPL_ACTION.findall(text):
        for m in _TPL_VALUE.finditer(action):
            alias, path = m.group(1), tuple(m.group(2).split(".")[1:])
            if alias is None:
                refs.add(path)
            elif alias in aliases:
                refs.add(aliases[alias] + path)
    return refs


def lookup(values: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = values
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(".".join(path))
        node = node[key]
    return node


def skeleton(text: str, values: Mapping[str, Any]) -> str:
    """The template as YAML: lines that are only an action (control flow, included blocks) go;
    a `.Values` expression (optionally `| quote`) becomes its default; any other expression
    becomes the word `tpl`. Both branches of an `if` stay, which YAML tolerates."""
    text = _TPL_COMMENT.sub("", text)
    aliases = _aliases(text)

    def inline(m: re.Match[str]) -> str:
        found = re.fullmatch(r"(?:\.Values|\$(\w+))((?:\.\w+)+)(\s*\|\s*quote)?", m.group(1))
        if found and (found.group(1) is None or found.group(1) in aliases):
            path = tuple(found.group(2).split(".")[1:])
            if found.group(1) is not None:
                path = aliases[found.group(1)] + path
            value = lookup(values, path)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return json.dumps(str(value)) if found.group(3) else str(value)
        return "tpl"

    lines = [_TPL_ACTION.sub(inline, line) for line in text.splitlines()
             if not _TPL_ACTION.fullmatch(line.strip())]
    return "\n".join(lines)


def skeleton_objects() -> list[dict[str, Any]]:
    values = chart_values()
    objects: list[dict[str, Any]] = []
    for path in sorted(TEMPLATES.glob("*.yaml")):
        for doc in yaml.safe_load_all(skeleton(path.read_text(), values)):
            if doc is not None:
                doc["__file__"] = path.name
                objects.append(doc)
    return objects


def one(objects: list[dict[str, Any]], kind: str, **match: Any) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind
             and all(o["metadata"].get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one {kind} {match}, found {len(found)}"
    return found[0]


def container(pod_owner: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_owner["spec"]["template"]["spec"]
    found: list[dict[str, Any]] = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1
    return found[0]


def helpers() -> str:
    return (TEMPLATES / "_helpers.tpl").read_text()


def define(name: str) -> str:
    m = re.search(r'\{\{-? define "' + re.escape(name) + r'" -?\}\}(.*?)\{\{-? end \}\}\n\n',
                  helpers() + "\n\n", re.S)
    assert m, f"_helpers.tpl defines {name}"
    return m.group(1)


# ---- systemd units -------------------------------------------------------------------------


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys repeat in units, and `\\` continues
    a line."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def values_of(entries: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in entries if k == key]


def unit_environment(entries: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for assignment in values_of(entries, "Environment"):
        for word in shlex.split(assignment):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def exec_argv(unit: Path, dropin: Path | None) -> list[str]:
    """ExecStart as the service would get it, with the unit's and the drop-in's variables
    (systemd: ${VAR} is one word, $VAR splits on white space, %d is the credentials dir)."""
    entries = unit_entries(unit)["Service"]
    env = unit_environment(entries)
    if dropin is not None:
        env |= unit_environment(unit_entries(dropin)["Service"])
    env = {k: v.replace("%d", "/run/credentials/x").replace("%H", "kvm-host-1")
           for k, v in env.items()}
    (exec_start,) = values_of(entries, "ExecStart")
    argv: list[str] = []
    for word in shlex.split(exec_start):
        braced = re.fullmatch(r"\$\{(\w+)\}", word)
        bare = re.fullmatch(r"\$(\w+)", word)
        if braced:
            argv.append(env[braced.group(1)])
        elif bare:
            argv.extend(env.get(bare.group(1), "").split())
        else:
            argv.append(word)
    return argv


def cli_options(command: str) -> set[str]:
    from hyperbroker.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices = sub.choices
    assert isinstance(choices, dict)
    return {opt for action in choices[command]._actions for opt in action.option_strings}


# Flags in the brief's CLI contract that hyperbroker/cli.py does not have yet. The chart passes
# --workers only when broker.workers > 1. Remove a flag here once the CLI has it.
PENDING_FLAGS: dict[str, set[str]] = {"serve": set(), "agent": set()}


# ---- every file parses ---------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    paths = list(yaml_files())
    assert {p.name for p in paths} >= {"Chart.yaml", "values.yaml", "hyperbroker-rules.yaml",
                                       "hyperbroker-rules.test.yaml"}
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"


def test_every_json_file_parses() -> None:
    paths = sorted(DEPLOY.rglob("*.json"))
    assert DASHBOARD in paths
    for path in paths:
        json.loads(path.read_text())


def test_every_helm_template_parses_as_a_yaml_skeleton() -> None:
    kinds = {(o["__file__"], o["kind"]) for o in skeleton_objects()}
    assert ("broker-deployment.yaml", "Deployment") in kinds
    assert ("agent-daemonset.yaml", "DaemonSet") in kinds
    assert ("policy-configmap.yaml", "ConfigMap") in kinds
    assert ("servicemonitors.yaml", "ServiceMonitor") in kinds
    assert ("broker-pdb.yaml", "PodDisruptionBudget") in kinds


# ---- the chart -----------------------------------------------------------------------------


def test_chart_metadata_follows_helm_conventions() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == chart["name"].lower() == "hyperbroker"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"]
    # reference/grpc-python.md §3.7: native gRPC probes; GA in Kubernetes 1.27.
    assert chart["kubeVersion"].startswith(">=1.27")


def test_values_keys_are_camel_case() -> None:
    def walk(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield f"{path}.{key}".lstrip(".")
                yield from walk(value, f"{path}.{key}")

    bad = [p for p in walk(chart_values(), "")
           if not re.fullmatch(r"[a-z][a-zA-Z0-9]*", p.rsplit(".", 1)[-1])]
    assert bad == []


def test_templates_read_only_values_that_exist() -> None:
    values = chart_values()
    refs = set().union(*(value_references(p.read_text()) for p in TEMPLATES.iterdir()))
    missing = []
    for ref in refs:
        try:
            lookup(values, ref)
        except KeyError:
            missing.append(".".join(ref))
    assert missing == []


def test_every_value_is_read_by_a_template() -> None:
    refs = set().union(*(value_references(p.read_text()) for p in TEMPLATES.iterdir()))

    def leaves(node: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if isinstance(node, dict) and node and path not in refs:
            for key, value in node.items():
                yield from leaves(value, (*path, key))
        else:
            yield path

    unread = [".".join(leaf) for leaf in leaves(chart_values(), ())
              if not any(leaf[:len(ref)] == ref for ref in refs)]
    assert unread == []


def test_every_object_carries_the_standard_labels() -> None:
    # https://helm.sh/docs/chart_best_practices/labels (reference/grpc-python.md §6.3)
    labels = define("hyperbroker.labels")
    for key in ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                "app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
        assert f"{key}:" in labels
    for path in TEMPLATES.glob("*.yaml"):
        text = path.read_text()
        assert text.count('include "hyperbroker.labels"') >= text.count("\nkind: "), path.name


def test_broker_deployment_serves_grpc_and_metrics_with_policy_and_state() -> None:
    objects = skeleton_objects()
    deployment = one(objects, "Deployment")
    broker = container(deployment, "broker")
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    # The skeleton keeps every conditional block: health is the port of the tls.enabled case.
    assert ports == {"grpc": 50051, "metrics": 9464, "health": 50052}
    args = broker["args"]
    assert args[0] == "serve"
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert flags["--listen"] == "0.0.0.0:50051"
    assert flags["--metrics-listen"] == "0.0.0.0:9464"
    assert flags["--policy"] == "/etc/hyperbroker/policy.yaml"
    mounts = {m["mountPath"]: m for m in broker["volumeMounts"]}
    assert mounts["/etc/hyperbroker/policy.yaml"]["subPath"] == "policy.yaml"
    assert mounts["/etc/hyperbroker/policy.yaml"]["readOnly"] is True
    assert mounts[flags["--state-dir"]]["name"] == "state"
    # Security contexts and resources come from values through toYaml.
    reads = {".".join(r) for r in value_references(
        (TEMPLATES / "broker-deployment.yaml").read_text())}
    assert {"broker.podSecurityContext", "broker.securityContext", "broker.resources"} <= reads
    values = chart_values()["broker"]
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert values["securityContext"]["allowPrivilegeEscalation"] is False
    assert values["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert values["resources"]["requests"]["cpu"]


def test_broker_probes_are_native_grpc_health_checks_of_the_broker_service() -> None:
    action = define("hyperbroker.broker.probeAction")
    # kubelet's grpc probe: numeric port, service name for grpc.health.v1 Check; under mTLS the
    # broker's plaintext health-only port (--health-listen), since the probe cannot speak TLS.
    assert re.search(r"grpc:\n  port: \{\{ if \.Values\.tls\.enabled \}\}"
                     r"\{\{ \.Values\.broker\.healthPort \}\}\{\{ else \}\}"
                     r"\{\{ \.Values\.broker\.port \}\}\{\{ end \}\}\n"
                     r"  service: hyperbroker\.v1\.Broker\n", action)
    text = (TEMPLATES / "broker-deployment.yaml").read_text()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert re.search(probe + r':\n\s+\{\{- include "hyperbroker\.broker\.probeAction" \. '
                         r"\| nindent 12 \}\}", text), probe


def test_policy_configmap_holds_the_policy_file() -> None:
    configmap = one(skeleton_objects(), "ConfigMap")
    assert list(configmap["data"]) == ["policy.yaml"]


def test_default_policy_in_values_is_valid() -> None:
    from hyperbroker.broker.policy import load_policy
    from hyperbroker.handlers.api import discover_plugins

    policy = load_policy(chart_values()["policy"]["content"], discover_plugins())
    assert "default" in policy.profiles


def test_broker_has_a_cluster_ip_and_a_headless_service() -> None:
    services = [o for o in skeleton_objects() if o["kind"] == "Service"]
    by_file = {(s["__file__"], s["spec"].get("clusterIP")): s for s in services}
    cluster_ip = by_file[("broker-services.yaml", None)]
    headless = by_file[("broker-services.yaml", "None")]
    assert cluster_ip["spec"]["type"] == "ClusterIP"  # .Values.broker.service.type
    assert {p["name"] for p in cluster_ip["spec"]["ports"]} == {"grpc", "metrics"}
    # Headless for client-side round_robin (reference/grpc-python.md §6.1); no metrics port, so
    # a ServiceMonitor never scrapes a pod twice.
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert "-broker-headless." in define("hyperbroker.broker.headlessHost")
    assert "hyperbroker.broker.headlessHost" in define("hyperbroker.agent.brokerAddress")


def test_agent_daemonset_uses_host_sockets_and_the_node_name_as_host_id() -> None:
    daemonset = one(skeleton_objects(), "DaemonSet")
    agent = container(daemonset, "agent")
    pod = daemonset["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["sockets"]["hostPath"]["path"] == "/run/hyperbroker"
    assert {m["mountPath"] for m in agent["volumeMounts"]} >= {"/run/hyperbroker"}
    env = {e["name"]: e for e in agent["env"]}
    assert env["HYPERBROKER_HOST_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    args = agent["args"]
    flags = dict(zip(args[0::2], args[1::2], strict=False))
    assert flags["--host-id"] == "$(HYPERBROKER_HOST_ID)"  # kubelet expands $(VAR) in args
    assert flags["--socket"] == "/run/hyperbroker/agent.sock"
    assert flags["--stream-socket"] == "/run/hyperbroker/agent-stream.sock"
    assert flags["--metrics-listen"] == "0.0.0.0:9465"
    assert agent["securityContext"]["runAsNonRoot"] is True
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"]["add"] == ["CHOWN", "FOWNER"]


def test_service_monitors_are_optional_and_name_the_jobs_the_rules_use() -> None:
    text = (TEMPLATES / "servicemonitors.yaml").read_text()
    assert text.lstrip().startswith("{{- if .Values.serviceMonitor.enabled }}")
    assert chart_values()["serviceMonitor"]["enabled"] is False
    monitors = [o for o in skeleton_objects() if o["kind"] == "ServiceMonitor"]
    jobs = {r["replacement"] for m in monitors for e in m["spec"]["endpoints"]
            for r in e["relabelings"] if r["targetLabel"] == "job"}
    assert jobs == {"hyperbroker-broker", "hyperbroker-agent"}
    rules_text = RULES.read_text()
    assert 'job="hyperbroker-broker"' in rules_text and 'job="hyperbroker-agent"' in rules_text


def test_notes_tell_the_operator_where_things_are() -> None:
    notes = (TEMPLATES / "NOTES.txt").read_text()
    for needle in ("grpc.health.v1.Health/Check", "hyperbroker.v1.Broker", "agent.sock",
                   "hyperbroker.agent.brokerAddress", "tls.enabled"):
        assert needle in notes


def test_chart_flags_exist_in_the_cli() -> None:
    objects = skeleton_objects()
    for kind, name, command in (("Deployment", "broker", "serve"),
                                ("DaemonSet", "agent", "agent")):
        args = container(one(objects, kind), name)["args"]
        flags = {a for a in args if isinstance(a, str) and a.startswith("--")}
        known = cli_options(command)
        assert flags - known - PENDING_FLAGS[command] == set(), command


def test_pending_flags_are_still_pending() -> None:
    for command, flags in PENDING_FLAGS.items():
        assert flags & cli_options(command) == set(), f"drop them from PENDING_FLAGS ({command})"


# ---- the metrics contract against the code ---------------------------------------------------


def exported_metrics(modules: list[Any]) -> dict[str, Metric]:
    """The metrics defined at the top level of `modules`, named as they are exposed."""
    from hyperbroker.runtime.metrics import Counter, Gauge, Histogram

    exported: dict[str, Metric] = {}
    for module in modules:
        for obj in vars(module).values():
            if not isinstance(obj, Counter | Gauge | Histogram):
                continue
            (desc,) = obj.describe()
            labels = frozenset(obj.labelnames)
            name = desc.name + ("_total" if desc.type == "counter" else "")
            exported[name] = Metric(desc.type, labels)
    return exported


def test_broker_and_agent_export_exactly_the_contract() -> None:
    from hyperbroker.agent import metrics as agent_metrics
    from hyperbroker.broker import metrics as broker_metrics

    wanted = {n: m for n, m in METRICS.items() if n.startswith(PROCESS_PREFIXES)}
    assert exported_metrics([broker_metrics, agent_metrics]) == wanted


def test_shipped_handlers_export_exactly_the_contract() -> None:
    # Shipped = the entry points into this project's handlers package; every module of each
    # such handler's package is imported and its metrics collected.
    import pkgutil
    from importlib.metadata import entry_points

    from hyperbroker.handlers.api import ENTRY_POINT_GROUP

    packages = {".".join(ep.value.split(":")[0].split(".")[:3])
                for ep in entry_points(group=ENTRY_POINT_GROUP)
                if ep.value.startswith("hyperbroker.handlers.")}
    assert {"hyperbroker.handlers.trng", "hyperbroker.handlers.ffa", "hyperbroker.handlers.hyperv",
            "hyperbroker.handlers.memshare"} <= packages
    modules = []
    for name in sorted(packages):
        package = importlib.import_module(name)
        modules.append(package)
        modules += [importlib.import_module(info.name)
                    for info in pkgutil.walk_packages(package.__path__, f"{name}.")]
    wanted = {n: m for n, m in METRICS.items() if not n.startswith(PROCESS_PREFIXES)}
    assert exported_metrics(modules) == wanted


def test_call_buckets_span_5us_to_5s() -> None:
    from hyperbroker.broker.metrics import CALL_DURATION

    child = CALL_DURATION.labels("h", "f", "ok")
    assert child.bounds[0] == pytest.approx(5e-6)
    assert child.bounds[-1] == pytest.approx(5.0)
    assert len(child.counts) == len(child.bounds) + 1  # and +Inf


# ---- the dashboard -------------------------------------------------------------------------


def test_dashboard_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], int] = {}
    for panel in dashboard_panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]


def test_dashboard_uses_only_contract_metrics_correctly() -> None:
    expressions = dashboard_expressions()
    assert len(expressions) > 20
    problems = [p for e in expressions for p in check_expression(e, {})]
    assert problems == []


def test_dashboard_shows_every_broker_and_agent_metric() -> None:
    used = {found[0] for e in dashboard_expressions() for _, t in hyperbroker_tokens(e.expr)
            if (found := contract_metric(t))}
    wanted = {n for n in METRICS if n.startswith(PROCESS_PREFIXES)}
    assert wanted - used == set()


def test_dashboard_shows_crashed_guests_ffa_shares_and_memshare_bytes() -> None:
    # A crashed guest is something a dashboard must show (issue 6 item 1).
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", []))
             for p in dashboard_panels()}
    crashed = exprs["Crashed guests"]
    assert "hyperbroker_hyperv_guest_crashed" in crashed
    assert "by (host, vm)" in crashed
    assert "increase(hyperbroker_hyperv_guest_crashes_total" in crashed
    assert any("rate(hyperbroker_ffa_shares_total" in e and "hyperbroker_ffa_reclaims_total" in e
               for e in exprs.values())
    assert any("hyperbroker_memshare_shared_bytes" in e for e in exprs.values())


def test_dashboard_shows_what_the_brief_lists() -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", []))
             for p in dashboard_panels()}
    rate = "rate(hyperbroker_broker_call_duration_seconds_count"
    assert any("by (handler, outcome)" in e and rate in e for e in exprs.values())
    for quantile in ("0.5", "0.99"):
        assert any(f"histogram_quantile({quantile}, sum by (handler, function, le)" in e
                   for e in exprs.values())
        assert any(f"histogram_quantile({quantile}, sum by (handler, le)" in e
                   for e in exprs.values())
        assert any(f"histogram_quantile({quantile}, sum by (source, le)" in e
                   and "hyperbroker_agent_call_duration_seconds_bucket" in e
                   for e in exprs.values())
    assert any("by (reason)" in e and "fallbacks_total" in e for e in exprs.values())


def test_dashboard_variables_are_defined() -> None:
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in defined
    text = json.dumps(dashboard["panels"])
    used = set(re.findall(r"\$\{?(\w+)", text)) - GRAFANA_BUILTINS
    assert used <= defined
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


# ---- the rules -----------------------------------------------------------------------------


def recorded_labels() -> dict[str, frozenset[str]]:
    out = {}
    for rule in rule_list():
        if "record" in rule:
            groups = _GROUPING.findall(rule["expr"])
            out[rule["record"]] = frozenset(
                part.strip() for g in groups for part in g.split(",") if part.strip()) - {"le"}
    return out


def test_rules_use_only_contract_metrics_correctly() -> None:
    recorded = recorded_labels()
    problems = []
    for rule in rule_list():
        name = rule.get("record") or rule["alert"]
        problems += check_expression(Expression(name, rule["expr"]), recorded)
    assert problems == []


def test_recording_rule_names_follow_level_metric_operation() -> None:
    # https://prometheus.io/docs/practices/rules/ naming: level:metric:operations
    for name in recorded_labels():
        level, metric, operation = name.split(":")
        assert level and operation
        known = metric in METRICS or contract_metric(metric) or contract_metric(metric + "_total")
        assert known, name


def test_p99_per_handler_is_recorded() -> None:
    (rule,) = [r for r in rule_list() if r.get("record", "").startswith("handler:")
               and "p99" in r["record"]]
    assert "histogram_quantile(0.99, sum by (handler, le)" in rule["expr"]


def test_alerts_cover_the_brief() -> None:
    alerts = {r["alert"]: r for r in rule_list() if "alert" in r}
    assert 'up{job="hyperbroker-broker"} == 0' in alerts["HyperbrokerBrokerDown"]["expr"]
    assert alerts["HyperbrokerAgentStreamDown"]["expr"] == "hyperbroker_agent_broker_stream_up == 0"
    assert alerts["HyperbrokerAgentStreamDown"]["for"] == "1m"
    assert "ratio_rate5m > 0.01" in alerts["HyperbrokerFallbackRatioHigh"]["expr"]
    assert alerts["HyperbrokerFallbackRatioHigh"]["for"] == "5m"
    assert "hyperbroker_broker_handler_errors_total" in alerts["HyperbrokerHandlerErrors"]["expr"]
    assert "p99_5m >" in alerts["HyperbrokerBrokerLatencyHigh"]["expr"]
    assert "hyperbroker_hyperv_guest_crashes_total" in alerts["HyperbrokerGuestCrash"]["expr"]
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description"} <= set(alert["annotations"]), name


def test_rule_unit_tests_cover_every_alert() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())
    assert tests["rule_files"] == [RULES.name]
    tested = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", [])
              if case["exp_alerts"]}
    assert tested == {r["alert"] for r in rule_list() if "alert" in r}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        run = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60,
                             check=False)
        assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query:{i}", "expr": grafana_to_promql(e.expr)}
             for i, e in enumerate(dashboard_expressions())]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


# ---- systemd -------------------------------------------------------------------------------

HARDENING = {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "NoNewPrivileges": "yes", "PrivateDevices": "yes", "RestrictSUIDSGID": "yes"}


@pytest.mark.parametrize("unit", ["hyperbroker-broker.service", "hyperbroker-agent.service"])
def test_units_are_hardened_and_restart_on_failure(unit: str) -> None:
    sections = unit_entries(SYSTEMD / unit)
    assert set(sections) == {"Unit", "Service", "Install"}
    service = dict(sections["Service"][::-1])  # first occurrence wins for this check
    assert values_of(sections["Unit"], "Description")
    assert "network-online.target" in values_of(sections["Unit"], "After")
    assert values_of(sections["Install"], "WantedBy") == ["multi-user.target"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, key
    assert service.get("DynamicUser") == "yes" or service.get("User")
    assert values_of(sections["Service"], "CapabilityBoundingSet") == [""]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert re.fullmatch(r"\d+s", service["TimeoutStopSec"])


def test_broker_unit_keeps_state_and_drains_within_its_stop_timeout() -> None:
    service = dict(unit_entries(SYSTEMD / "hyperbroker-broker.service")["Service"])
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "hyperbroker"
    argv = exec_argv(SYSTEMD / "hyperbroker-broker.service", None)
    assert argv[1] == "serve"
    flags = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert flags["--state-dir"] == "/var/lib/hyperbroker"
    assert flags["--policy"] == "/etc/hyperbroker/policy.yaml"
    assert flags["--listen"] == "0.0.0.0:50051"
    assert flags["--metrics-listen"] == "0.0.0.0:9464"
    # The broker's default drain grace (hyperbroker/cli.py --drain-grace) fits in the timeout.
    from hyperbroker.cli.main import build_parser

    grace = build_parser().parse_args(argv[1:]).drain_grace
    assert grace + 5 < int(service["TimeoutStopSec"].removesuffix("s"))


def test_agent_unit_owns_the_socket_directory() -> None:
    service = dict(unit_entries(SYSTEMD / "hyperbroker-agent.service")["Service"])
    assert service["RuntimeDirectory"] == "hyperbroker"
    assert service["UMask"] == "0007"  # group (the VMMs) may connect to the sockets
    argv = exec_argv(SYSTEMD / "hyperbroker-agent.service", None)
    assert argv[1] == "agent"
    flags = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert flags["--socket"] == "/run/hyperbroker/agent.sock"
    assert flags["--stream-socket"] == "/run/hyperbroker/agent-stream.sock"
    assert flags["--host-id"] == "kvm-host-1"  # %H
    sysusers = (SYSTEMD / "hyperbroker.sysusers.conf").read_text()
    assert re.search(r"^u hyperbroker -:hyperbroker ", sysusers, re.M)
    assert service["User"] == service["Group"] == "hyperbroker"


@pytest.mark.parametrize("unit,command", [("hyperbroker-broker.service", "serve"),
                                          ("hyperbroker-agent.service", "agent")])
def test_unit_command_lines_parse_with_the_cli(unit: str, command: str) -> None:
    from hyperbroker.cli.main import build_parser

    dropin = SYSTEMD / f"{unit}.d" / "tls.conf"
    for with_tls in (None, dropin):
        argv = exec_argv(SYSTEMD / unit, with_tls)
        assert argv[0] == "/opt/hyperbroker/bin/hyperbroker"
        args = build_parser().parse_args(argv[1:])
        assert args.command == command
        if with_tls is not None:
            assert args.tls_cert == "/run/credentials/x/tls.crt"
            assert args.tls_key == "/run/credentials/x/tls.key"
            assert args.tls_ca == "/run/credentials/x/ca.crt"
            creds = values_of(unit_entries(dropin)["Service"], "LoadCredential")
            assert sorted(c.split(":")[0] for c in creds) == ["ca.crt", "tls.crt", "tls.key"]


def test_env_example_names_only_variables_the_units_read() -> None:
    read = set()
    for unit in ("hyperbroker-broker.service", "hyperbroker-agent.service"):
        text = (SYSTEMD / unit).read_text()
        read |= set(re.findall(r"\$\{?(\w+)", text))
    read.add("HYPERBROKER_LOG")  # hyperbroker/cli.py reads it for --log-level
    example = (SYSTEMD / "hyperbroker.env.example").read_text()
    named = set(re.findall(r"^#?(HYPERBROKER_\w+)=", example, re.M))
    assert named and named <= read
    # The example's flags are for one of the two commands the units run.
    known = cli_options("serve") | cli_options("agent")
    assert set(re.findall(r"--[a-z][a-z-]+", example)) <= known


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    system = Path("/usr/lib/systemd/system")
    units = tmp_path / "etc" / "systemd" / "system"
    lib = tmp_path / "usr" / "lib" / "systemd" / "system"
    binary = tmp_path / "opt" / "hyperbroker" / "bin" / "hyperbroker"
    for d in (units, lib, binary.parent):
        d.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    for dependency in [*system.glob("*.target"), *system.glob("*.slice")]:
        shutil.copy(dependency, lib)
    for path in SYSTEMD.iterdir():
        if path.suffix == ".service":
            shutil.copy(path, units)
        elif path.name.endswith(".service.d"):
            shutil.copytree(path, units / path.name)
    run = subprocess.run(
        ["systemd-analyze", "verify", f"--root={tmp_path}",
         "/etc/systemd/system/hyperbroker-broker.service",
         "/etc/systemd/system/hyperbroker-agent.service"],
        capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0 and run.stderr.strip() == "", run.stderr


# ---- the chart rendered by Helm itself, where Helm is available ------------------------------

FULL_VALUES: dict[str, Any] = {
    "broker": {"replicas": 3, "state": {"persistence": {"enabled": False}}},
    "tls": {"enabled": True, "secretName": "hyperbroker-tls"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "agent": {"nodeSelector": {"kubernetes.io/arch": "arm64"}},
}


def helm_render(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`helm template` with the helm binary, or the same through helm_python (Helm's Go SDK)."""
    if shutil.which("helm"):
        run = subprocess.run(["helm", "template", "hb", str(CHART), "--namespace", "vm",
                              "--values", "-"], input=json.dumps(values), capture_output=True,
                             text=True, timeout=120, check=False)
        if run.returncode != 0:
            raise RuntimeError(run.stderr)
        texts = [run.stdout]
    else:
        helm_python = importlib.import_module("helm_python")
        with helm_python.Chart.load(str(CHART)) as chart:
            rendered = chart.render(dict(values), name="hb", namespace="vm")
        texts = [t for name, t in rendered.items() if name.endswith(".yaml")]
    return [d for t in texts for d in yaml.safe_load_all(t) if d]


HAVE_HELM = shutil.which("helm") is not None or importlib.util.find_spec("helm_python") is not None
needs_helm = pytest.mark.skipif(not HAVE_HELM, reason="neither helm nor helm_python is installed")


@needs_helm
def test_helm_renders_the_defaults() -> None:
    objects = helm_render({})
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "DaemonSet", "Deployment", "PersistentVolumeClaim", "Service",
                     "Service", "Service", "ServiceAccount", "ServiceAccount"]
    deployment = one(objects, "Deployment")
    broker = container(deployment, "broker")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert broker[probe]["grpc"] == {"port": 50051, "service": "hyperbroker.v1.Broker"}
    assert "--workers" not in broker["args"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    labels = deployment["metadata"]["labels"]
    assert labels["helm.sh/chart"] == "hyperbroker-0.1.0"
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    agent = container(one(objects, "DaemonSet"), "agent")
    args = agent["args"]
    assert args[args.index("--broker") + 1] == (
        "hb-hyperbroker-broker-headless.vm.svc.cluster.local:50051")


@needs_helm
def test_helm_renders_every_option() -> None:
    objects = helm_render(FULL_VALUES)
    broker = container(one(objects, "Deployment"), "broker")
    # kubelet's gRPC probe has no TLS: under mTLS the probes fall back to TCP.
    assert broker["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert "--tls-ca" in broker["args"]
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    assert all(m["metadata"]["labels"]["release"] == "prometheus" for m in monitors)
    daemonset = one(objects, "DaemonSet")
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["hostPath"]["path"] == "/etc/hyperbroker/tls"
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]


@needs_helm
@pytest.mark.parametrize("values,message", [
    ({"broker": {"replicas": 2}}, "broker.replicas > 1 needs"),
    ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
    ({"policy": {"content": ""}}, "set policy.content or policy.existingConfigMap"),
])
def test_helm_refuses_values_that_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        helm_render(values)
