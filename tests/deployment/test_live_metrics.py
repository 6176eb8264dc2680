"""The metrics contract on live processes: a broker (every shipped handler, examples/policy.yaml),
an agent and a TEE service, with calls flowing through the agent from a Python VMM.

Each /metrics holds its own process's families and no other's, and `promtool check metrics`
accepts each. A real Prometheus (the distribution's) scrapes all three every second and runs the
shipped rules; every dashboard query and every alert's operands then return data.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hyperbroker.handlers.hyperv import abi as hv
from hyperbroker.testing.optee import TeeProcess, start_tee_process
from hyperbroker.testing.procs import (
    AgentProcess,
    Broker,
    PrometheusServer,
    start_agent,
    start_broker,
)
from hyperbroker.testing.vmm import GuestRam, VmmClient

from .support import (
    METRICS,
    TEE_SERVICE_METRICS,
    dashboard_expressions,
    grafana_to_promql,
    rule_list,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
DATA_DEADLINE_S = 90.0  # data arrives within seconds; this bounds a busy machine's worst

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
TRNG_RND64 = 0xC4000053
MEM_SHARE, MEM_UNSHARE = 0xC6000003, 0xC6000004  # pKVM memshare (docs/memshare.md)
RAM_GPA, RAM_SIZE = 0x4000_0000, 1 << 20
OWN_FAMILIES = {
    "broker": {n for n in METRICS if not n.startswith("hyperbroker_agent_")},
    "agent": {n for n in METRICS if n.startswith("hyperbroker_agent_")},
    "tee-serve": set(TEE_SERVICE_METRICS),
}


@dataclass
class Fleet:
    broker: Broker
    agent: AgentProcess
    tee: TeeProcess
    tee_metrics_port: int
    calls: list[int]  # calls answered so far, one counter the traffic thread bumps

    def endpoints(self) -> dict[str, int]:
        assert self.broker.metrics_port and self.agent.metrics_port
        return {"broker": self.broker.metrics_port, "agent": self.agent.metrics_port,
                "tee-serve": self.tee_metrics_port}


async def traffic(agent: AgentProcess, calls: list[int], stop: threading.Event) -> None:
    """Calls of every kind the dashboard shows, until `stop`: TRNG and memshare from a VM on the
    default profile, Hyper-V hypercalls from one on the hyperv-guest profile."""
    client = await VmmClient.connect(str(agent.socket), "seqpacket")
    ram = GuestRam(RAM_GPA, RAM_SIZE)
    vm = await client.register("vm-metrics", 1, ram=ram)
    hv_ram = GuestRam(RAM_GPA, RAM_SIZE, "hv-ram")
    hv_vm = await client.register("vm-hyperv", 1, "hyperv-guest", ram=hv_ram)
    get_partition_id = hv.Control(hv.HVCALL_GET_PARTITION_ID, False, 0, 0, 0, 0).encode()
    shared = False
    try:
        while not stop.is_set():
            await client.call(vm.vm_id, 0, TRNG_RND64, [64])
            await client.call(vm.vm_id, 0, MEM_UNSHARE if shared else MEM_SHARE, [RAM_GPA])
            shared = not shared
            await client.call(hv_vm.vm_id, 0, hv.HV_FUNC_ID,
                              [get_partition_id, 0, RAM_GPA])
            calls[0] += 3
            await asyncio.sleep(0.02)
    finally:
        client.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("metrics")
    tee = start_tee_process(tmp / "tee", extra=("--metrics-port", "0"))
    broker = agent = None
    stop = threading.Event()
    thread = None
    try:
        m = next(re.search(r"metrics on :(\d+)", line) for line in tee.lines
                 if "listening on" in line)
        assert m, tee.lines
        policy = tmp / "policy.yaml"
        policy.write_text(EXAMPLE.read_text().replace("127.0.0.1:50061", tee.address))
        broker = start_broker(policy, tmp / "state")
        agent = start_agent(broker.address, "host-a", tmp)
        calls = [0]
        failures: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(traffic(agent, calls, stop))
            except BaseException as e:  # reported by the fixture and the tests
                failures.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while calls[0] < 30 and not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not failures, failures
        assert calls[0] >= 30, f"only {calls[0]} calls answered in 60 s"
        yield Fleet(broker, agent, tee, int(m.group(1)), calls)
        assert not failures, failures
    finally:
        stop.set()
        if thread is not None:
            thread.join(30)
        for proc in (agent, broker):
            if proc is not None:
                proc.process.stop()
        tee.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_each_process_exports_its_own_families_and_no_others(fleet: Fleet) -> None:
    for process, port in fleet.endpoints().items():
        exported = {f for f in families(scrape(port)) if f.startswith("hyperbroker_")}
        assert exported == OWN_FAMILIES[process], (
            process, "foreign:", sorted(exported - OWN_FAMILIES[process]),
            "missing:", sorted(OWN_FAMILIES[process] - exported))


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed: scripts/system_deps.sh installs it "
                           "(package prometheus); without it the units are unchecked")
def test_promtool_check_metrics_accepts_every_endpoint(fleet: Fleet) -> None:
    for process, port in fleet.endpoints().items():
        run = subprocess.run(["promtool", "check", "metrics"], input=scrape(port),
                             capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 0, f"{process}: {run.stdout}{run.stderr}"


def alert_operands(expr: str) -> list[str]:
    """The series an alert compares, without the comparison: `a > 0.01 and b > 0.2` gives a
    and b, `absent(x == 1)` gives x. A healthy system keeps the alert itself empty; what must
    have data is what it looks at."""
    out = []
    for part in re.split(r"\s+(?:and|or|unless)\s+", expr):
        part = part.strip()
        inner = re.fullmatch(r"absent\((.*)\)", part)
        part = inner.group(1) if inner else part
        out.append(re.sub(r"\s*(?:==|!=|>=|<=|>|<)\s*[0-9.e+-]+$", "", part).strip())
    return out


def every_expression() -> list[tuple[str, str]]:
    out = [(e.where, grafana_to_promql(e.expr)) for e in dashboard_expressions()]
    for rule in rule_list():
        if "record" in rule:
            out.append((f"record {rule['record']}", rule["expr"]))
            out.append((f"recorded series {rule['record']}", rule["record"]))
        else:
            out += [(f"alert {rule['alert']}", operand)
                    for operand in alert_operands(rule["expr"])]
    return out


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus is not installed: scripts/system_deps.sh installs it; "
                           "without it no expression is evaluated")
def test_prometheus_evaluates_every_dashboard_and_alert_expression_to_data(
        fleet: Fleet, tmp_path: Path) -> None:
    ports = fleet.endpoints()
    prometheus = PrometheusServer(tmp_path / "prometheus", {
        "hyperbroker-broker": [f"127.0.0.1:{ports['broker']}"],
        "hyperbroker-agent": [f"127.0.0.1:{ports['agent']}"],
        "hyperbroker-tee": [f"127.0.0.1:{ports['tee-serve']}"],
    }).start()
    try:
        expressions = every_expression()
        assert len(expressions) > 50
        empty = dict(expressions)
        # rate() needs two scrapes and a recorded series one evaluation after them: bounded by
        # the data arriving, with a deadline far beyond what a busy machine needs.
        calls_before = fleet.calls[0]
        deadline = time.monotonic() + DATA_DEADLINE_S
        while empty and time.monotonic() < deadline:
            empty = {where: expr for where, expr in empty.items() if not prometheus.query(expr)}
            if empty:
                time.sleep(1)
        flowing = time.monotonic() + 30
        while fleet.calls[0] <= calls_before and time.monotonic() < flowing:
            time.sleep(0.05)
        assert fleet.calls[0] > calls_before, "calls stopped flowing"
        assert empty == {}, f"no data after {DATA_DEADLINE_S:g} s: {empty}\n{prometheus.log()}"
        up = prometheus.query("up")
        assert {s["metric"]["job"]: s["value"][1] for s in up} == {  # type: ignore[index]
            "hyperbroker-broker": "1", "hyperbroker-agent": "1", "hyperbroker-tee": "1"}
    finally:
        prometheus.stop()
