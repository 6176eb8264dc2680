"""Discovery never lies, as a checked property (issue 6 item 4; docs/policy.md "Discovery that
never lies").

Two halves. The shipped example: in every profile of examples/policy.yaml, every function ID a
forwarded discovery call claims is called, through the handler the profile forwards it to, and
is not answered NOT_SUPPORTED; FEATURES-style calls say yes to each of their claims. The engine:
a policy whose discovery claims something the profile does not serve is refused, naming the
profile, the handler, the discovery call and the claimed function. The shipped handlers own their
ABIs whole, so ownership alone keeps their claims inside what they serve; the refusals are shown
with a TRNG split across two small handlers (a discovery front and an entropy pool), which
ownership allows, and with a PSCI handler whose PSCI_FEATURES claims more than it serves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from hyperbroker.broker.policy import (
    KERNEL,
    KERNEL_SERVED,
    DiscoveryClaim,
    Policy,
    PolicyInvalid,
    load_policy,
    to_json,
)
from hyperbroker.calls import NOT_SUPPORTED, Call, Result
from hyperbroker.handlers.api import Abi, CallContext, Handler, discover_plugins
from hyperbroker.handlers.ffa import abi as ffa_abi
from hyperbroker.handlers.psci import PsciHandler
from hyperbroker.handlers.psci import abi as psci_abi
from hyperbroker.handlers.trng import abi as trng_abi
from hyperbroker.smccc import NR_ARGS, RESERVED_ARCH_RANGES, FunctionRange
from hyperbroker.testing.context import FakeContext

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.yaml"
W_MASK = 0xFFFF_FFFF
# PSCI 1.0, optional (include/uapi/linux/psci.h)
PSCI_CPU_FREEZE = 0x8400_000B

# Discovery calls that take the queried function ID in x1 and answer for it alone.
QUERY_CALLS = frozenset({psci_abi.PSCI_FEATURES, trng_abi.FEATURES, ffa_abi.FFA_FEATURES})
# x1 for calls that fail on zero by design rather than for lack of service: FFA_VERSION(0) asks
# for FF-A 0.0, which an FF-A 1.x endpoint does not speak (FFA_VERSION).
ARGS: Mapping[int, int] = {ffa_abi.FFA_VERSION: ffa_abi.OUR_VERSION}
# What a plugin's ABI needs before its calls are served: FF-A answers nothing but FFA_VERSION
# until the caller has negotiated a version (FFA_VERSION).
SETUP: Mapping[str, Sequence[tuple[int, int]]] = {
    "ffa": [(ffa_abi.FFA_VERSION, ffa_abi.OUR_VERSION)],
}


def not_supported(result: Result) -> bool:
    """NOT_SUPPORTED as each ABI spells it: -1 in x0 (SMCCC, PSCI, TRNG, KVM vendor services; w0
    for SMC32), or FFA_ERROR with w2 = NOT_SUPPORTED (-1) (include/linux/arm_ffa.h)."""
    x0 = result.register(0)
    if x0 & W_MASK == ffa_abi.FFA_ERROR:
        return result.register(2) & W_MASK == W_MASK
    return x0 & W_MASK == W_MASK


class Guest:
    """One VM calling one handler instance, its state kept across calls."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.ctx = FakeContext()

    async def call(self, fid: int, x1: int | None = None) -> Result:
        """`fid` with x1 (by default ARGS', or a FEATURES-style call asked about itself, or
        zero) and x2.. zero."""
        if x1 is None:
            x1 = ARGS.get(fid, fid if fid in QUERY_CALLS else 0)
        x = (fid, x1) + (0,) * (NR_ARGS - 2)
        return await self.handler.handle(Call(vcpu=0, seq=0, function_id=fid, x=x), self.ctx)

    async def set_up(self) -> None:
        for fid, x1 in SETUP.get(type(self.handler).plugin, ()):
            assert not not_supported(await self.call(fid, x1))


def example() -> Policy:
    return load_policy(EXAMPLE.read_text(), discover_plugins())


def expected_claims(policy: Policy, profile: str) -> set[tuple[str, int]]:
    """(handler, discovery call) for every claim the guest hears in `profile`, from the handlers."""
    prof = policy.profiles[profile]
    out = set()
    for name in {e.handler for e in prof.dispatch}:
        method = getattr(policy.handlers[name], "discovery_claims", None)
        for call in (method() if method else {}):
            entry = prof.lookup(call)
            if entry is not None and entry.handler == name:
                out.add((name, call))
    return out


# ---- the example: every claim is called ---------------------------------------------------


@pytest.mark.parametrize("profile", sorted(example().profiles))
async def test_every_claimed_function_of_the_example_answers(profile: str) -> None:
    policy = example()
    prof = policy.profiles[profile]
    assert {(c.handler, c.call) for c in prof.discovery} == expected_claims(policy, profile)
    guests: dict[str, Guest] = {}

    async def guest(name: str) -> Guest:
        if name not in guests:
            guests[name] = Guest(policy.handlers[name])
            await guests[name].set_up()
        return guests[name]

    for claim in prof.discovery:
        asker = await guest(claim.handler)
        for fid, server in claim.served_by:
            if fid in KERNEL_SERVED:
                # The kernel keeps the Arm architecture range in every filter
                # (arch/arm64/kvm/hypercalls.c).
                assert server == KERNEL and any(fid in r for r in RESERVED_ARCH_RANGES)
                continue
            entry = prof.lookup(fid)
            assert entry is not None and entry.handler == server, hex(fid)
            answer = await (await guest(server)).call(fid)
            assert not not_supported(answer), f"{profile}: {server} {fid:#010x} {answer}"
            if claim.call in QUERY_CALLS:
                said = await asker.call(claim.call, fid)
                assert not not_supported(said), f"{profile}: {claim.call:#x}({fid:#010x})"
        assert not not_supported(await asker.call(claim.call)), hex(claim.call)


def test_the_example_proves_a_claim_for_every_forwarding_handler_that_makes_one() -> None:
    policy = example()
    handlers = {c.handler for p in policy.profiles.values() for c in p.discovery}
    assert handlers == {"trng", "psci", "ffa", "memshare", "hyperv"}
    psci = next(c for c in policy.profiles["default"].discovery
                if c.call == psci_abi.PSCI_FEATURES)
    # Linux asks PSCI_FEATURES(SMCCC_VERSION): the kernel serves it in every profile.
    assert (psci_abi.SMCCC_VERSION, KERNEL) in psci.served_by


def test_policy_check_json_lists_each_discovery_call_and_who_serves_its_claims() -> None:
    out = to_json(example())["profiles"]["hyperv-guest"]["discovery"]
    uid = next(d for d in out if d["name"] == "VENDOR_HYP_CALL_UID")
    assert uid == {"handler": "hyperv", "function_id": 0x8600_FF01, "name": "VENDOR_HYP_CALL_UID",
                   "claims": [{"function_id": 0x4600_0001, "name": "HV_FUNC_ID",
                               "served_by": "hyperv"}]}
    assert to_json(example())["profiles"]["in-kernel"]["discovery"] == []


# ---- the engine: claims that are not served are refused --------------------------------------

TRNG_DISCOVERY = FunctionRange(trng_abi.VERSION, 3)  # TRNG_VERSION, _FEATURES, _GET_UUID
TRNG_RND = (FunctionRange(trng_abi.RND32, 1), FunctionRange(trng_abi.RND64, 1))


class TrngFront(Handler):
    """Answers TRNG discovery; the random numbers come from whatever the profile forwards."""

    plugin = "trng-front"
    abi = Abi("trng-front", (TRNG_DISCOVERY,), trng_abi.FUNCTION_NAMES)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return NOT_SUPPORTED

    def served_functions(self) -> frozenset[int]:
        return frozenset(range(TRNG_DISCOVERY.base, TRNG_DISCOVERY.end))

    def discovery_claims(self) -> Mapping[int, frozenset[int]]:
        return {trng_abi.FEATURES: trng_abi.SERVED}


class TrngPool(Handler):
    """Serves TRNG_RND32/RND64; `serves` may narrow it (the other answers NOT_SUPPORTED)."""

    plugin = "trng-pool"
    abi = Abi("trng-pool", TRNG_RND, {trng_abi.RND32: "TRNG_RND32", trng_abi.RND64: "TRNG_RND64"})

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return ("serves",)

    @property
    def ranges(self) -> Sequence[FunctionRange]:
        return TRNG_RND

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return NOT_SUPPORTED

    def served_functions(self) -> frozenset[int]:
        return frozenset(self.config.get("serves", [trng_abi.RND32, trng_abi.RND64]))


class TrngPoolSilent(TrngPool):
    """A handler that does not implement served_functions(): trusted for what it is sent."""

    plugin = "trng-pool-silent"
    served_functions = None  # type: ignore[assignment]


class PsciOverclaims(PsciHandler):
    """PSCI whose PSCI_FEATURES also says yes to CPU_FREEZE, which it answers NOT_SUPPORTED."""

    plugin = "psci-overclaims"

    def discovery_claims(self) -> Mapping[int, frozenset[int]]:
        claims = dict(super().discovery_claims())
        claims[psci_abi.PSCI_FEATURES] |= {PSCI_CPU_FREEZE}
        return claims


class ClaimsElsewhere(Handler):
    """Claims through an ID outside its own range: no profile forwards that call to it."""

    plugin = "claims-elsewhere"

    @property
    def ranges(self) -> Sequence[FunctionRange]:
        return (FunctionRange(0xC300_0000, 16),)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        return NOT_SUPPORTED

    def discovery_claims(self) -> Mapping[int, frozenset[int]]:
        return {0x8300_FF01: frozenset({0xC300_0100})}


class ClaimsBroken(TrngFront):
    plugin = "claims-broken"

    def discovery_claims(self) -> Mapping[int, frozenset[int]]:
        raise RuntimeError("no table")


class ClaimsJunk(TrngFront):
    plugin = "claims-junk"

    def discovery_claims(self) -> Any:
        return {trng_abi.FEATURES: "RND64"}


PLUGINS: Mapping[str, type[Handler]] = {
    cls.plugin: cls for cls in (TrngFront, TrngPool, TrngPoolSilent, PsciOverclaims,
                                ClaimsElsewhere, ClaimsBroken, ClaimsJunk)
}

FRONT = ("      - {name: discovery, ranges: [{base: 0x84000050, count: 3}], action: forward,"
         " handler: front}\n")


def policy(rules: str, handlers: str = "") -> str:
    return ("handlers:\n  front: {plugin: trng-front}\n  pool: {plugin: trng-pool}\n" + handlers
            + "profiles:\n  entropy:\n    rules:\n" + rules)


def refused(text: str) -> list[str]:
    with pytest.raises(PolicyInvalid) as info:
        load_policy(text, PLUGINS)
    assert all(e.errno_name == "" for e in info.value.errors)
    return [e.message for e in info.value.errors]


def test_claims_served_by_another_handler_are_accepted_and_named() -> None:
    loaded = load_policy(policy(
        FRONT + "      - {name: random, functions: [TRNG_RND32, TRNG_RND64], action: forward,"
                " handler: pool}\n"), PLUGINS)
    (claim,) = loaded.profiles["entropy"].discovery
    assert claim == DiscoveryClaim("front", trng_abi.FEATURES, (
        (trng_abi.VERSION, "front"), (trng_abi.FEATURES, "front"), (trng_abi.GET_UUID, "front"),
        (trng_abi.RND32, "pool"), (trng_abi.RND64, "pool")))


def test_a_claim_the_profile_denies_is_refused_naming_profile_handler_call_and_function() -> None:
    text = policy(FRONT + "      - {name: no-rnd, functions: [TRNG_RND32, TRNG_RND64],"
                          " action: deny}\n")
    with pytest.raises(PolicyInvalid) as info:
        load_policy(text, PLUGINS)
    first = info.value.errors[0]
    assert first.message == (
        "profile 'entropy': handler 'front' claims through TRNG_FEATURES (0x84000051) that "
        "TRNG_RND32 (0x84000053) is served, but rule 'no-rnd' denies it (the kernel answers "
        "NOT_SUPPORTED); a discovery call may claim only what the profile forwards to a handler "
        "that serves it")
    assert first.errno_name == "" and first.rules == ("discovery", "no-rnd")
    assert [e.message.split(" that ")[1].split(" is served")[0]
            for e in info.value.errors] == ["TRNG_RND32 (0x84000053)", "TRNG_RND64 (0xc4000053)"]


def test_a_claim_no_rule_forwards_is_refused() -> None:
    (one, two) = refused(policy(FRONT))
    assert "TRNG_RND32 (0x84000053) is served, but no rule forwards it" in one
    assert "TRNG_RND64 (0xc4000053)" in two


def test_a_claim_left_to_the_kernel_is_refused() -> None:
    messages = refused(policy(
        FRONT + "      - {name: kvm-rnd, functions: [TRNG_RND32, TRNG_RND64], action: handle}\n"))
    assert len(messages) == 2
    assert "but rule 'kvm-rnd' leaves it to the kernel (handle)" in messages[0]


def test_a_claim_forwarded_to_a_handler_that_does_not_serve_it_is_refused() -> None:
    messages = refused(policy(
        FRONT + "      - {name: random, functions: [TRNG_RND32, TRNG_RND64], action: forward,"
                " handler: pool64}\n",
        handlers="  pool64: {plugin: trng-pool, config: {serves: [0xC4000053]}}\n"))
    assert messages == [
        "profile 'entropy': handler 'front' claims through TRNG_FEATURES (0x84000051) that "
        "TRNG_RND32 (0x84000053) is served, but rule 'random' forwards it to handler 'pool64', "
        "whose served_functions() does not hold it; a discovery call may claim only what the "
        "profile forwards to a handler that serves it"]


def test_a_handler_without_served_functions_is_trusted_for_what_it_is_sent() -> None:
    loaded = load_policy(policy(
        FRONT + "      - {name: random, functions: [TRNG_RND32, TRNG_RND64], action: forward,"
                " handler: quiet}\n",
        handlers="  quiet: {plugin: trng-pool-silent}\n"), PLUGINS)
    (claim,) = loaded.profiles["entropy"].discovery
    assert (trng_abi.RND64, "quiet") in claim.served_by


def test_a_handler_claiming_more_than_it_serves_itself_is_refused() -> None:
    messages = refused("handlers:\n  psci: {plugin: psci-overclaims}\nprofiles:\n  default:\n"
                       "    rules:\n      - {name: psci, abi: psci, action: forward,"
                       " handler: psci}\n")
    assert messages == [
        "profile 'default': handler 'psci' claims through PSCI_FEATURES (0x8400000a) that "
        "PSCI_CPU_FREEZE (0x8400000b) is served, but rule 'psci' forwards it to handler 'psci', "
        "whose served_functions() does not hold it; a discovery call may claim only what the "
        "profile forwards to a handler that serves it"]


def test_every_profile_is_checked_on_its_own() -> None:
    text = ("handlers:\n  front: {plugin: trng-front}\n  pool: {plugin: trng-pool}\n"
            "profiles:\n  split:\n    rules:\n" + FRONT
            + "      - {name: random, functions: [TRNG_RND32, TRNG_RND64], action: forward,"
              " handler: pool}\n"
            "  front-only:\n    rules:\n" + FRONT
            + "  kernel:\n    rules: []\n")
    messages = refused(text)
    assert len(messages) == 2 and all(m.startswith("profile 'front-only': ") for m in messages)


def test_a_claim_through_a_call_the_profile_does_not_forward_to_the_handler_is_not_checked(
) -> None:
    loaded = load_policy("handlers:\n  e: {plugin: claims-elsewhere}\nprofiles:\n  default:\n"
                         "    rules:\n      - {name: e, ranges: [{base: 0xC3000000, count: 16}],"
                         " action: forward, handler: e}\n", PLUGINS)
    assert loaded.profiles["default"].discovery == ()


@pytest.mark.parametrize("plugin,message", [
    ("claims-broken", "handler 'front': discovery_claims() failed: RuntimeError: no table"),
    ("claims-junk", "handler 'front': discovery_claims() must return a mapping of discovery "
                    "function ID to a set of function IDs"),
])
def test_a_discovery_protocol_that_fails_is_reported_not_raised(plugin: str,
                                                                message: str) -> None:
    text = (f"handlers:\n  front: {{plugin: {plugin}}}\nprofiles:\n  default:\n    rules:\n"
            + FRONT)
    assert message in refused(text)
