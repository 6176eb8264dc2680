"""The metrics contract against the code, the Grafana dashboard and the Prometheus rules.

Where promtool is on the machine the rules' unit tests run and every dashboard query is parsed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import (
    _GROUPING,
    GRAFANA_BUILTINS,
    METRICS,
    PROCESS_PREFIXES,
    RULES,
    RULES_TEST,
    TEE_SERVICE_METRICS,
    Expression,
    Metric,
    check_expression,
    contract_metric,
    dashboard_expressions,
    dashboard_panels,
    grafana_to_promql,
    hyperbroker_tokens,
    load_dashboard,
    rule_list,
)

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


def test_a_process_registry_holds_only_its_sets_whatever_was_imported() -> None:
    # Every part imported into one interpreter, as a test or a shared helper may: the agent's
    # and tee-serve's registries still hold only their own families, the broker's its own and
    # its handlers'.
    for module in ("broker.server", "handlers.ffa.handler", "handlers.hyperv.handler",
                   "handlers.memshare.handler", "handlers.optee.handler", "handlers.trng.handler",
                   "tee.server", "agent.server"):
        importlib.import_module(f"hyperbroker.{module}")
    from hyperbroker.agent.metrics import AGENT
    from hyperbroker.broker.metrics import BROKER
    from hyperbroker.handlers.api import HANDLER_METRICS
    from hyperbroker.runtime.metrics import process_registry
    from hyperbroker.tee.metrics import TEE_SERVICE

    def names(*sets: Any) -> set[str]:
        return {m.name + ("_total" if m.type == "counter" else "")
                for m in process_registry(*sets).collect() if m.name.startswith("hyperbroker_")}

    assert names(AGENT) == {n for n in METRICS if n.startswith("hyperbroker_agent_")}
    assert names(TEE_SERVICE) == set(TEE_SERVICE_METRICS)
    assert names(BROKER, HANDLER_METRICS) == {n for n in METRICS
                                              if not n.startswith("hyperbroker_agent_")}


def test_the_tee_service_exports_exactly_its_contract() -> None:
    from hyperbroker.tee import metrics as tee_metrics

    assert exported_metrics([tee_metrics]) == TEE_SERVICE_METRICS


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
