"""What the deploy/ checks share: paths, the metrics contract, PromQL and Helm template reading.

The metric names (and their labels) that the dashboard and the Prometheus rules may use are the
contract in METRICS; the broker and agent code must export exactly those. Helm templates are
read without helm: each is reduced to a YAML skeleton (control lines dropped, `.Values`
expressions replaced by their defaults) that must parse and carry the objects and fields an
operator expects. systemd units are read as INI-like entries. These helpers know nothing of how
the broker or the agent work inside.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]  # tests/deployment/support.py
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


# The metrics contract (docs/operations.md "Metrics" explains each).
# Counter names include _total, as they are exposed.
METRICS: Mapping[str, Metric] = {
    # broker
    "hyperbroker_broker_call_duration_seconds": _m("histogram", "handler", "function", "outcome"),
    "hyperbroker_broker_calls_in_flight": _m("gauge"),
    "hyperbroker_broker_handler_errors_total": _m("counter", "handler"),
    "hyperbroker_broker_admin_audit_total": _m("counter", "method", "decision"),
    "hyperbroker_broker_duplicate_calls_total": _m("counter"),
    "hyperbroker_broker_divergent_results_total": _m("counter"),
    "hyperbroker_broker_hosts_abandoned_total": _m("counter", "reason"),
    "hyperbroker_broker_host_leases": _m("gauge"),
    "hyperbroker_broker_agents_connected": _m("gauge"),
    "hyperbroker_broker_vms": _m("gauge"),
    "hyperbroker_broker_frames_total": _m("counter", "direction"),
    "hyperbroker_broker_batch_size": _m("histogram"),
    "hyperbroker_broker_memory_requests_total": _m("counter"),
    "hyperbroker_broker_memory_bytes_total": _m("counter", "direction"),
    "hyperbroker_broker_rate_limited_total": _m("counter"),
    "hyperbroker_broker_policy_version": _m("gauge"),
    "hyperbroker_broker_malformed_total": _m("counter", "reason"),
    # agent
    "hyperbroker_agent_call_duration_seconds": _m("histogram", "source", "outcome"),
    "hyperbroker_agent_calls_in_flight": _m("gauge"),
    "hyperbroker_agent_fallbacks_total": _m("counter", "reason"),
    "hyperbroker_agent_broker_stream_up": _m("gauge"),
    "hyperbroker_agent_reconnects_total": _m("counter"),
    "hyperbroker_agent_broker_silent_total": _m("counter"),
    "hyperbroker_agent_vms": _m("gauge"),
    "hyperbroker_agent_vmm_connections": _m("gauge"),
    "hyperbroker_agent_protocol_errors_total": _m("counter", "code"),
    "hyperbroker_agent_vms_rejected_total": _m("counter", "reason"),
    "hyperbroker_agent_divergent_results_total": _m("counter"),
    "hyperbroker_agent_memory_bytes_total": _m("counter", "direction"),
    "hyperbroker_agent_link_rtt_seconds": _m("histogram"),
    # handlers: every metric the shipped handler packages export (docs/operations.md "Handlers")
    "hyperbroker_trng_bytes_total": _m("counter"),
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
# The TEE service's own (`hyperbroker tee-serve`); no dashboard panel uses them yet.
TEE_SERVICE_METRICS: Mapping[str, Metric] = {
    "hyperbroker_tee_backend_sessions": _m("gauge", "ta"),
    "hyperbroker_tee_backend_vms": _m("gauge"),
    "hyperbroker_tee_backend_requests_total": _m("counter", "method", "result"),
    "hyperbroker_tee_backend_ta_seconds": _m("histogram", "ta", "entry"),
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


# Flags the deployment files may pass that hyperbroker.cli does not have yet. The chart passes
# --workers only when broker.workers > 1. Remove a flag here once the CLI has it.
PENDING_FLAGS: dict[str, set[str]] = {"serve": set(), "agent": set()}
