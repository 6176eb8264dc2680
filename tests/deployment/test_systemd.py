"""The systemd units: hardening, restarts, state, sockets, and command lines the CLI parses.

Where systemd-analyze is on the machine, the units are verified for real.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from hyperbroker.cli import errors

from .support import CHART, SYSTEMD, cli_options, container, exec_argv, one, unit_entries, values_of

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
    # The CLI's exit status for a configuration error (hyperbroker.cli.errors.USAGE): a unit
    # that restarted on it would loop forever on a missing policy or a held port.
    assert service["RestartPreventExitStatus"] == str(errors.USAGE)
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
    # The broker's default drain grace (hyperbroker/cli/main.py --drain-grace) fits in the timeout.
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
    read.add("HYPERBROKER_LOG")  # hyperbroker/cli/main.py reads it for --log-level
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
