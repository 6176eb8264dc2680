"""Bounds on a policy document, checked before anything is built from it.

A policy arrives from an operator or over the Admin API; neither may make the broker parse,
expand or check without end. The text is composed into YAML nodes by libyaml (linear in its
size; aliases stay references, nothing is expanded), then one walk over the node graph counts
the nodes, the rules, the nesting depth and the size the document would have with every alias
expanded. Any bound passed refuses the document with one line; only a document within every
bound is constructed (lib/yaml's SafeConstructor semantics, duplicate keys refused) and
validated. The limits are documented in docs/policy.md "Limits".
"""

from __future__ import annotations

from typing import Any

import yaml

from hyperbroker.broker.policy.model import PolicyError

MAX_BYTES = 256 << 10  # 256 KiB of YAML
MAX_RULES = 2048  # in all profiles together
MAX_DEPTH = 32  # nested mappings and lists
MAX_NODES = 50_000  # scalars, mappings and lists written in the document
ALIAS_FACTOR = 4  # the document with aliases expanded: at most this many times its nodes
MAX_MESSAGE = 400  # characters of one error message
MAX_ERRORS = 100  # errors in one refusal; the rest are counted


class DocumentTooLarge(ValueError):
    """The document passes a bound; str() is the one-line reason."""


_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where installed


def compose(text: str) -> yaml.Node | None:
    """`text` as YAML nodes, within the bounds above; raises DocumentTooLarge or YAMLError."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise DocumentTooLarge(f"the document is {size} bytes; a policy is at most {MAX_BYTES} "
                               "bytes")
    loader = _Loader(text)
    try:
        node: yaml.Node | None = loader.get_single_node()
    finally:
        loader.dispose()
    if node is not None:
        measure(node)
    return node


def measure(root: yaml.Node) -> None:
    """Walk the node graph once: depth, node count, rules and the alias-expanded size."""
    expanded: dict[int, int] = {}  # id(node) -> its size with aliases expanded
    open_: set[int] = set()  # nodes on the path from the root: an alias back is a cycle
    distinct = 0

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    # Iterative post-order walk: a deep document must not exhaust Python's stack.
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack[-1]
        key = id(node)
        if key in expanded:
            stack.pop()
            continue
        if depth > MAX_DEPTH:
            raise DocumentTooLarge(f"line {node.start_mark.line + 1}: nested deeper than "
                                   f"{MAX_DEPTH} levels")
        kids = children(node)
        if key not in open_:
            open_.add(key)
            distinct += 1
            if distinct > MAX_NODES:
                raise DocumentTooLarge(f"more than {MAX_NODES} YAML nodes; a policy is at "
                                       f"most {MAX_RULES} rules")
            pending = [k for k in kids if id(k) not in expanded]
            for k in pending:
                if id(k) in open_:
                    raise DocumentTooLarge(f"line {k.start_mark.line + 1}: an alias refers to "
                                           "a node that contains it (a recursive document)")
            stack.extend((k, depth + 1) for k in pending)
            if pending:
                continue
        stack.pop()
        open_.discard(key)
        expanded[key] = 1 + sum(expanded[id(k)] for k in kids)
        if expanded[key] > ALIAS_FACTOR * MAX_NODES:
            raise DocumentTooLarge(_alias_message(expanded[key]))
    total = expanded[id(root)]
    if total > ALIAS_FACTOR * max(distinct, 64):
        raise DocumentTooLarge(_alias_message(total, distinct))
    _count_rules(root)


def _alias_message(total: int, distinct: int | None = None) -> str:
    written = f" from {distinct} written" if distinct is not None else ""
    return (f"aliases expand the document to more than {total} nodes{written}; expansion is "
            f"limited to {ALIAS_FACTOR}x the nodes written (an alias bomb?)")


def _count_rules(root: yaml.Node) -> None:
    """The rules of every profile, counted on the nodes (an alias counts once per use)."""
    profiles = _get(root, "profiles")
    if not isinstance(profiles, yaml.MappingNode):
        return
    rules = 0
    for _, body in profiles.value:
        raw = _get(body, "rules")
        if isinstance(raw, yaml.SequenceNode):
            rules += len(raw.value)
    if rules > MAX_RULES:
        raise DocumentTooLarge(f"{rules} rules; a policy has at most {MAX_RULES} rules in all "
                               "its profiles")


def _get(node: yaml.Node, name: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == name:
                found: yaml.Node = v
                return found
    return None


def clip(message: str) -> str:
    """One error message, bounded: a huge value written in the document is not echoed."""
    message = " ".join(message.split()) if "\n" in message else message
    if len(message) <= MAX_MESSAGE:
        return message
    return message[:MAX_MESSAGE - 25] + f"... ({len(message)} characters)"


def first_errors(errors: list[PolicyError]) -> list[PolicyError]:
    """At most MAX_ERRORS of `errors`, the last one saying how many more there were."""
    if len(errors) <= MAX_ERRORS:
        return errors
    more = len(errors) - MAX_ERRORS + 1
    return [*errors[:MAX_ERRORS - 1],
            PolicyError(f"policy: {more} more errors not shown (fix the ones above first)",
                        "", ())]
