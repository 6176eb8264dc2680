"""Broken policy documents, each of which a broker must refuse quickly with one-line reasons.

Alias bombs, documents past every bound of broker.policy.bounds, deep nesting, wrong types and
plain mistakes. Used by the policy-bound tests against `policy check`, `serve` and `apply`.
"""

from __future__ import annotations

HEAD = "handlers: {trng: {}}\nprofiles:\n  default:\n    rules:\n"
OK_RULE = "      - {name: trng, abi: trng, action: forward, handler: trng}\n"


def _rules(n: int, start: int = 0x8600_0000, step: int = 2, action: str = "deny") -> str:
    return "".join(f"      - {{name: r{i}, functions: [{start + step * i:#x}], action: {action}}}\n"
                   for i in range(n))


def _bomb(levels: int, fan: int) -> str:
    lines = ["a0: &a0 [x]"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * fan)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + f"\nprofiles: {{default: {{rules: *a{levels}}}}}\n"


def _merge_bomb(levels: int) -> str:
    lines = ["m0: &m0 {k0: 1}"]
    for i in range(1, levels + 1):
        lines.append(f"m{i}: &m{i} {{x: [*m{i - 1}, *m{i - 1}, *m{i - 1}, *m{i - 1}], "
                     f"<<: *m{i - 1}}}")
    return "\n".join(lines) + f"\nprofiles: {{default: *m{levels}}}\n"


BROKEN: dict[str, str] = {
    "alias bomb (9 x 9)": _bomb(9, 9),
    "alias bomb (10^9 references)": _bomb(9, 10),
    "alias bomb through merge keys": _merge_bomb(14),
    "recursive alias": "profiles: &p {default: {rules: [*p]}}\n",
    "100,000 rules": HEAD + _rules(100_000),
    "3,000 rules (past the rule limit)": "profiles:\n  default:\n    rules:\n" + "".join(
        f"      - {{name: r{i}, functions: [{i}], action: deny}}\n" for i in range(3000)),
    "2,040 rules and one overlap": HEAD + _rules(2040)
    + "      - {name: overlap, functions: [0x86000000], action: deny}\n",
    "nesting 40 deep": HEAD + "      - {name: deep, action: deny, functions: "
                       + "[" * 40 + "1" + "]" * 40 + "}\n",
    "nesting 5,000 deep": "profiles: " + "[" * 5000 + "]" * 5000 + "\n",
    "a 200 KB key": HEAD + "      - {name: k, functions: [1], action: deny, "
                    + "x" * 200_000 + ": 1}\n",
    "many errors (2,000 bad actions)": HEAD + _rules(2000, action="explode"),
    "document is a list": "- profiles\n- handlers\n",
    "document is a scalar": "just some text\n",
    "empty document": "",
    "two documents": "profiles: {default: {}}\n---\nprofiles: {other: {}}\n",
    "profiles is a string": "profiles: everything\n",
    "rules is a mapping": "profiles: {default: {rules: {a: 1}}}\n",
    "a rule is a string": HEAD + "      - deny everything\n",
    "functions is a string": HEAD + "      - {name: f, functions: 0x86000000, action: deny}\n",
    "a range is a string": HEAD + "      - {name: f, ranges: [0x86000000], action: deny}\n",
    "base is a boolean": HEAD + "      - {name: f, ranges: [{base: true, count: 1}], "
                         "action: deny}\n",
    "deadline is a string": HEAD + OK_RULE.replace("}", ", deadline_ms: fast}"),
    "deadline is 10^30": HEAD + OK_RULE.replace("}", f", deadline_ms: {10 ** 30}}}"),
    "action is a number": HEAD + "      - {name: f, functions: [0x86000000], action: 42}\n",
    "handler name is a list": "handlers: {[a, b]: {}}\n" + HEAD.split("\n", 1)[1] + OK_RULE,
    "version 2": "version: 2\n" + HEAD + OK_RULE,
    "unknown top-level key": "polices: {}\n" + HEAD + OK_RULE,
    "duplicate key": "profiles: {default: {}}\nprofiles: {other: {}}\n",
    "not YAML (unclosed bracket)": "profiles: {default: {rules: [\n",
    "a NUL byte": "profiles:\x00 {}\n",
    "fallback is a list": HEAD + OK_RULE.replace("}", ", fallback: [1, 2]}"),
    "plugin not installed": "handlers: {x: {plugin: no-such-plugin}}\nprofiles: {default: {}}\n",
    "reserved Arm-architecture range": HEAD + "      - {name: a, functions: [0x80008000], "
                                       "action: deny}\n",
    "empty range": HEAD + "      - {name: a, ranges: [{base: 0x86000000, count: 0}], "
                   "action: deny}\n",
    "wrapping range": HEAD + "      - {name: a, ranges: [{base: 0xffffffff, count: 2}], "
                      "action: deny}\n",
    "rule without a name": HEAD + "      - {functions: [0x86000000], action: deny}\n",
}


def big_valid(base: str, n: int = 2000) -> str:
    """`base` (a policy text ending in its profiles) plus a profile of `n` deny rules."""
    return base + "  big:\n    rules:\n" + _rules(n)
