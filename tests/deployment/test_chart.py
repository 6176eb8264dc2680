"""The Helm chart, and that every file under deploy/ parses.

Helm templates are checked without helm through their YAML skeletons (support.skeleton); the
flags the manifests pass must exist in the real CLI parser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from .support import (
    CHART,
    DASHBOARD,
    DEPLOY,
    PENDING_FLAGS,
    RULES,
    TEMPLATES,
    chart_values,
    cli_options,
    container,
    define,
    lookup,
    one,
    skeleton_objects,
    value_references,
    yaml_files,
)

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
    # Kubernetes' native gRPC probes (grpc.health.v1; GA in Kubernetes 1.27).
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
    # https://helm.sh/docs/chart_best_practices/labels
    labels = define("hyperbroker.labels")
    for key in ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                "app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
        assert f"{key}:" in labels
    for path in TEMPLATES.glob("*.yaml"):
        text = path.read_text()
        assert text.count('include "hyperbroker.labels"') >= text.count("\nkind: "), path.name


def test_every_worker_metrics_port_is_declared_served_and_scraped() -> None:
    # broker.workers: worker i on metricsPort + i (broker.workers.worker_args), the parent's
    # restarts counter on metricsPort + workers. The pod declares them, the Service carries them
    # and the ServiceMonitor scrapes each, worker 0 being the plain `metrics` port.
    beyond_first = "range $i := untilStep 1 (int .Values.broker.workers) 1"
    for name in ("broker-deployment.yaml", "broker-services.yaml"):
        text = (TEMPLATES / name).read_text()
        assert beyond_first in text and "metrics-w{{ $i }}" in text, name
        assert "add $.Values.broker.metricsPort $i" in text, name
        assert "metrics-sup" in text, name
        assert "add .Values.broker.metricsPort .Values.broker.workers" in text, name
    monitors = (TEMPLATES / "servicemonitors.yaml").read_text()
    assert "range $i := until (int $.Values.broker.workers)" in monitors
    assert "metrics-w{{ $i }}" in monitors and "port: metrics-sup" in monitors
    assert "replacement: hyperbroker-workers" in monitors


def test_broker_deployment_serves_grpc_and_metrics_with_policy_and_state() -> None:
    objects = skeleton_objects()
    deployment = one(objects, "Deployment")
    broker = container(deployment, "broker")
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    # The skeleton keeps every conditional block: health is the port of the tls.enabled case,
    # metrics-w<i> and metrics-sup those of broker.workers > 1 (their numbers are expressions).
    assert ports == {"grpc": 50051, "metrics": 9464, "health": 50052,
                     "metrics-wtpl": "tpl", "metrics-sup": "tpl"}
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
    # metrics-w<i> and metrics-sup: the broker.workers > 1 block (skeletons keep both branches)
    assert {p["name"] for p in cluster_ip["spec"]["ports"]} == {"grpc", "metrics", "metrics-wtpl",
                                                                 "metrics-sup"}
    # Headless for client-side round_robin (grpc/grpc doc/load-balancing.md); no metrics port, so
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
    # hyperbroker-workers: the supervising parent of broker.workers > 1 (its restarts counter)
    assert jobs == {"hyperbroker-broker", "hyperbroker-agent", "hyperbroker-workers"}
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


def test_mtls_is_on_by_default_from_cert_manager_or_a_named_secret() -> None:
    values = chart_values()
    assert values["tls"]["enabled"] is True
    validate = define("hyperbroker.validate")
    # Without a named Secret the render needs cert-manager and an issuer, else it fails.
    assert 'Capabilities.APIVersions.Has "cert-manager.io/v1"' in validate
    assert "tls.certManager.issuerRef.name" in validate
    cert = (TEMPLATES / "broker-certificate.yaml").read_text()
    assert cert.splitlines()[0] == ('{{- if and .Values.tls.enabled (not .Values.tls.secretName) '
                                    '(.Capabilities.APIVersions.Has "cert-manager.io/v1") }}')
    certificate = one(skeleton_objects(), "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert set(certificate["spec"]) >= {"secretName", "dnsNames", "issuerRef", "renewBefore"}
    assert len(certificate["spec"]["dnsNames"]) == 2  # the headless and the ClusterIP Service
    assert 'include "hyperbroker.broker.tlsSecret"' in cert
    # The broker mounts that Secret (the named one, or cert-manager's) whole, never by subPath,
    # so kubelet's in-place renewal reaches the files the broker reads again.
    deployment = (TEMPLATES / "broker-deployment.yaml").read_text()
    assert 'secretName: {{ include "hyperbroker.broker.tlsSecret" . }}' in deployment
    broker = container(one(skeleton_objects(), "Deployment"), "broker")
    tls_mounts = [m for m in broker["volumeMounts"] if m["mountPath"].startswith(
        "/etc/hyperbroker/") and m["name"] in ("tls", "admin-ca", "admin-tokens")]
    assert tls_mounts and all("subPath" not in m for m in tls_mounts)
    args = broker["args"]
    for flag in ("--tls-cert", "--tls-ca", "--health-listen", "--admin-ca", "--admin-write",
                 "--admin-read", "--admin-tokens", "--spiffe-template"):
        assert flag in args, flag
    assert "--insecure-admin" not in deployment


def test_the_plaintext_health_port_is_health_only_and_not_in_any_service() -> None:
    # The broker serves grpc.health.v1 alone there (tests/e2e/test_mtls.py checks the process);
    # the chart exposes it to kubelet only: no Service routes to it.
    services = [o for o in skeleton_objects() if o["kind"] == "Service"]
    assert services
    for service in services:
        assert all(p["port"] != 50052 and p.get("name") != "health"
                   for p in service["spec"]["ports"]), service["metadata"]
    assert define("hyperbroker.broker.probeAction").count("healthPort") == 1
