"""`hyperbroker policy schema`: a JSON Schema of the policy format, from the loader's own model.

The real CLI prints it; it is a valid draft 2020-12 schema; every shipped example policy and
every policy the loader accepts below validates against it; and what it refuses, the loader
refuses too (the schema says less than the loader, never something else).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from hyperbroker.broker.policy import PolicyInvalid, load_policy
from hyperbroker.handlers.api import discover_plugins

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
TRNG = {"name": "trng", "abi": "trng", "action": "forward", "handler": "trng"}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "hyperbroker.cli", "policy", "schema"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    out: dict[str, Any] = json.loads(run.stdout)
    jsonschema.Draft202012Validator.check_schema(out)
    return out


def errors(schema: dict[str, Any], document: object) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors(document)]


def loads(document: dict[str, Any]) -> bool:
    try:
        load_policy(yaml.safe_dump(document), discover_plugins())
    except PolicyInvalid:
        return False
    return True


def test_there_are_example_policies() -> None:
    assert {p.name for p in EXAMPLES} >= {"policy.yaml", "new-policy.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_policy_validates(schema: dict[str, Any], path: Path) -> None:
    assert errors(schema, yaml.safe_load(path.read_text())) == []


ACCEPTED: list[dict[str, Any]] = [
    {"profiles": {"default": None}},
    {"version": 1, "handlers": None, "profiles": {"in-kernel": {"rules": None}}},
    {"handlers": {"trng": None}, "profiles": {"default": {"default_deadline_ms": 60000,
                                                          "rules": [TRNG]}}},
    {"handlers": {"t": {"plugin": "trng", "config": None}},
     "profiles": {"default": {"rules": [
         {"name": "rnd", "functions": ["TRNG_RND32", 0xC4000053], "action": "forward",
          "handler": "t", "deadline_ms": 1, "fallback": {"x0": -3, "x17": 2**64 - 1},
          "agent_static": False},
         {"name": "rest", "ranges": [{"base": 0x84000050, "count": 3},
                                     {"base": 0x84000054, "count": 12},
                                     {"base": 0xC4000050, "count": 3},
                                     {"base": 0xC4000054, "count": 12}],
          "action": "forward", "handler": "t", "fallback": "not_supported"},
         {"name": "no-sip", "abi": ["sip", "oem"], "action": "deny"}]}}},
]


@pytest.mark.parametrize("document", ACCEPTED)
def test_what_the_loader_accepts_validates(schema: dict[str, Any],
                                           document: dict[str, Any]) -> None:
    assert loads(document)
    assert errors(schema, document) == []


REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("an unknown top-level key", {"profile": {}, "profiles": {"default": None}}),
    ("no profiles", {"handlers": {}}),
    ("another format version", {"version": 2, "profiles": {"default": None}}),
    ("a plugin not installed", {"handlers": {"x": {"plugin": "nope"}},
                                "profiles": {"default": None}}),
    ("an unknown rule key", {"handlers": {"trng": None},
                             "profiles": {"default": {"rules": [{**TRNG, "deadline": 5}]}}}),
    ("an unknown action", {"profiles": {"default": {"rules": [
        {"name": "x", "abi": "trng", "action": "drop"}]}}}),
    ("a rule without a name", {"handlers": {"trng": None}, "profiles": {"default": {
        "rules": [{k: v for k, v in TRNG.items() if k != "name"}]}}}),
    ("a rule that selects nothing", {"profiles": {"default": {"rules": [
        {"name": "x", "action": "deny"}]}}}),
    ("an unknown ABI", {"profiles": {"default": {"rules": [
        {"name": "x", "abi": "trng2", "action": "deny"}]}}}),
    ("a forward rule without a handler", {"profiles": {"default": {"rules": [
        {"name": "x", "abi": "trng", "action": "forward"}]}}}),
    ("a deadline on a deny rule", {"profiles": {"default": {"rules": [
        {"name": "x", "abi": "sip", "action": "deny", "deadline_ms": 5}]}}}),
    ("a deadline past a minute", {"handlers": {"trng": None}, "profiles": {"default": {
        "rules": [{**TRNG, "deadline_ms": 60001}]}}}),
    ("a fallback register past x17", {"handlers": {"trng": None}, "profiles": {"default": {
        "rules": [{**TRNG, "fallback": {"x18": 0}}]}}}),
    ("an empty range", {"profiles": {"default": {"rules": [
        {"name": "x", "ranges": [{"base": 0x84000050, "count": 0}], "action": "deny"}]}}}),
    ("a range past 32 bits", {"profiles": {"default": {"rules": [
        {"name": "x", "ranges": [{"base": 2**32, "count": 1}], "action": "deny"}]}}}),
    ("agent_static not a boolean", {"handlers": {"trng": None}, "profiles": {"default": {
        "rules": [{**TRNG, "agent_static": "yes"}]}}}),
]


@pytest.mark.parametrize(("what", "document"), REFUSED, ids=[w for w, _ in REFUSED])
def test_what_the_schema_refuses_the_loader_refuses(schema: dict[str, Any], what: str,
                                                    document: dict[str, Any]) -> None:
    assert errors(schema, document), f"the schema accepts {what}"
    assert not loads(document), f"the loader accepts {what}"
