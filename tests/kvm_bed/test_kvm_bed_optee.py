"""OP-TEE from a real arm64 guest through real KVM, the agent, the broker and a TEE service
(issue 5, "Tests and checks": the real-KVM bed).

One boot runs vmm/arm64/guests/optee_mac.c under a profile that forwards the OP-TEE ABI to an
`optee` handler pointed at `python -m hyperbroker.tee.server`, started here next to the bed's broker
and agent. The guest makes the probe's fast calls, then OPEN_SESSION + INVOKE_COMMAND (GENERATE_KEY,
SIGN, VERIFY) + CLOSE_SESSION on the keyed-MAC TA with every `struct optee_msg_arg` in its own RAM,
and reports what the proxy wrote back into each message. Values: OP-TEE's optee_smc.h
(core/arch/arm/include/sm/) and core/include/optee_msg.h, docs/tee-proxy.md (the proxy's table),
tee/apps/mac.py (the TA).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperbroker.handlers.optee import abi
from hyperbroker.tee.gp import Origin, TeeResult
from hyperbroker.testing.optee import start_tee_process
from hyperbroker_tools import kvm_bed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GUEST = "optee_mac"
PROFILE = "optee"
SENTINEL = 0xA5A5_A5A5  # guests/optee_mac.c: ret and ret_origin before each call
UNTOUCHED = 0xEEEE_EEEE_EEEE_EEEE  # the SIGN output bytes past the MAC
KEY_NAME = b"bed-key"
MESSAGES = ("open", "register_shm", "generate_key", "sign", "verify", "verify.flipped", "close",
            "sign.closed", "unregister_shm", "unaligned", "outside_ram", "bad_cmd")

# The ABI forwarded whole: fast calls with the default fallback, yielding calls with
# "foreign-interrupt" (docs/tee-proxy.md). yield_ms 1 makes the proxy yield whenever the service
# takes longer than a millisecond, so the guest's RETURN_FROM_RPC loop runs against real KVM.
POLICY = """\
handlers:
  optee:
    plugin: optee
    config: {{backend: "{backend}", timeout_ms: 5000, yield_ms: 1}}
profiles:
  {profile}:
    rules:
      - {{name: optee-fast, ranges: [{{base: 0xB2000000, count: 0x10000}},
                                    {{base: 0xBF000000, count: 0x10000}}],
         action: forward, handler: optee, deadline_ms: 2000}}
      - {{name: optee-yield, ranges: [{{base: 0x32000000, count: 0x10000}}],
         action: forward, handler: optee, deadline_ms: 2000, fallback: foreign-interrupt}}
"""


@dataclasses.dataclass
class OpteeRun:
    result: kvm_bed.BootResult
    messages: dict[str, dict[str, int]]
    rpc_total: int
    broker_metrics: list[kvm_bed.MetricSample]
    tee_state: Path


def _guest_records(result: kvm_bed.BootResult, kind: str) -> list[dict[str, str]]:
    """The guest's own lines of `kind` ("msg", "rpc") as their key=value fields."""
    out = []
    for line in result.lines:
        m = re.match(rf"^HB g\[{GUEST}\] {kind} (.*)$", line)
        if m:
            out.append(dict(re.findall(r"(\w+)=(\S+)", m.group(1))))
    return out


def _numbers(fields: dict[str, str]) -> dict[str, int]:
    return {k: int(v, 0) for k, v in fields.items() if k != "label"}


@pytest.fixture(scope="module")
def optee_run(bed: kvm_bed.Artifacts,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpteeRun]:
    work = tmp_path_factory.mktemp("kvm-bed-optee")
    tee = start_tee_process(work / "tee-state")
    try:
        policy = work / "policy.yaml"
        policy.write_text(POLICY.format(backend=tee.address, profile=PROFILE))
        with kvm_bed.Services(policy, work / "services") as services:
            try:
                result = kvm_bed.boot(bed, [kvm_bed.run_step(GUEST, profile=PROFILE)],
                                      agent_socket=services.stream_socket, timeout=90)
            except kvm_bed.BedError as e:
                pytest.fail(f"{e}\n{services.logs()}\n--- tee\n" + "\n".join(tee.lines[-40:]))
            metrics = services.broker_metrics()
    finally:
        tee.stop()
    messages = {r["label"]: _numbers(r) for r in _guest_records(result, "msg")}
    rpc = [_numbers(r)["total"] for r in _guest_records(result, "rpc")]
    yield OpteeRun(result, messages, rpc[-1] if rpc else -1, metrics, work / "tee-state")


def _msg(run: OpteeRun, label: str) -> dict[str, int]:
    assert label in run.messages, run.result.console()
    return run.messages[label]


def test_the_guest_ran_every_step_and_ended_cleanly(optee_run: OpteeRun) -> None:
    run = optee_run.result.run(GUEST, PROFILE)
    assert run.ok and run.link_failures == 0, optee_run.result.console()
    assert not optee_run.result.problems
    assert list(optee_run.messages) == list(MESSAGES)
    # Messages and buffers travelled over the link as the VMM's MEM_READ / MEM_WRITE; the read
    # outside the VM's RAM was refused by the agent already, never reaching the VMM.
    assert run.mem_reads > 0 and run.mem_writes > 0 and run.mem_refused == 0


def test_the_probe_calls_get_what_lets_linux_finish_probing(optee_run: OpteeRun) -> None:
    """The Linux driver's probe calls (drivers/tee/optee/smc_abi.c optee_probe), as
    docs/tee-proxy.md's table answers them."""
    r = optee_run.result
    assert r.call(GUEST, "uid").x == abi.MSG_UID
    smc = r.call(GUEST, "uid.smc")
    assert smc.conduit == "smc" and smc.x == abi.MSG_UID
    assert r.call(GUEST, "revision").x[:2] == abi.MSG_REVISION
    assert r.call(GUEST, "os_revision").x[:3] == (4, 0, 0)  # os_revision 4.0, no build id
    assert r.call(GUEST, "os_uuid").x == abi.OS_UUID
    assert r.call(GUEST, "thread_count").x[:2] == (abi.SmcReturn.OK, 8)
    assert r.call(GUEST, "caps").x == (abi.SmcReturn.OK,
                                       abi.SEC_CAP_DYNAMIC_SHM | abi.SEC_CAP_MEMREF_NULL, 0, 0)
    assert r.call(GUEST, "caps.unknown_bit").x[0] == abi.SmcReturn.ENOTAVAIL  # unknown capability
    assert r.call(GUEST, "shm_cache.disable").x[0] == abi.SmcReturn.ENOTAVAIL  # loop ends
    assert r.call(GUEST, "shm_cache.enable").x[0] == abi.SmcReturn.OK
    assert r.call(GUEST, "count").x[0] == abi.calls_count()


def test_open_session_to_the_mac_ta_from_guest_memory(optee_run: OpteeRun) -> None:
    m = _msg(optee_run, "open")
    assert (m["a0"], m["ret"], m["origin"]) == (abi.SmcReturn.OK, TeeResult.SUCCESS,
                                                Origin.TRUSTED_APP)
    assert m["session"] not in (0, SENTINEL)


def test_register_shm_writes_only_ret(optee_run: OpteeRun) -> None:
    """entry_std.c register_shm / unregister_shm leave ret_origin as the guest left it."""
    for label in ("register_shm", "unregister_shm"):
        m = _msg(optee_run, label)
        assert (m["a0"], m["ret"], m["origin"]) == (abi.SmcReturn.OK, TeeResult.SUCCESS,
                                                    SENTINEL), label


def test_the_mac_ta_signs_into_guest_memory_and_verifies(optee_run: OpteeRun) -> None:
    """GENERATE_KEY and SIGN on RMEM parameters, VERIFY on TMEM page lists (NONCONTIG)."""
    session = _msg(optee_run, "open")["session"]
    for label in ("generate_key", "sign", "verify"):
        m = _msg(optee_run, label)
        assert (m["a0"], m["ret"], m["origin"]) == (abi.SmcReturn.OK, TeeResult.SUCCESS,
                                                    Origin.TRUSTED_APP), label
        assert m["session"] == session, label  # the proxy writes session for OPEN_SESSION only
    sign = _msg(optee_run, "sign")
    assert sign["size"] == 32  # HMAC-SHA256, in a 64-byte output buffer
    mac = [sign[f"mac{i}"] for i in range(4)]
    assert any(mac) and UNTOUCHED not in mac
    assert [sign[f"tail{i}"] for i in range(4)] == [UNTOUCHED] * 4  # nothing past `size`
    flipped = _msg(optee_run, "verify.flipped")
    assert (flipped["ret"], flipped["origin"]) == (TeeResult.MAC_INVALID, Origin.TRUSTED_APP)
    # The key stayed in the TEE: sealed in the service's state, never in a message.
    assert list(optee_run.tee_state.rglob(KEY_NAME.hex() + ".key"))


def test_close_session_then_the_session_is_unknown(optee_run: OpteeRun) -> None:
    close = _msg(optee_run, "close")
    assert (close["a0"], close["ret"], close["origin"]) == (abi.SmcReturn.OK,
                                                            TeeResult.SUCCESS, Origin.TEE)
    closed = _msg(optee_run, "sign.closed")
    assert (closed["a0"], closed["ret"], closed["origin"]) == (
        abi.SmcReturn.OK, TeeResult.BAD_PARAMETERS, Origin.TEE)


def test_smc_level_errors_leave_the_message_untouched(optee_run: OpteeRun) -> None:
    """thread_optee_smc.c: EBADADDR for an unaligned or unreachable message, EBADCMD for an
    unknown command, ERESUME for a resume that names no call (OPTEE_SMC_RETURN_ERESUME)."""
    for label, code in (("unaligned", abi.SmcReturn.EBADADDR),
                        ("outside_ram", abi.SmcReturn.EBADADDR),
                        ("bad_cmd", abi.SmcReturn.EBADCMD)):
        m = _msg(optee_run, label)
        assert (m["a0"], m["ret"], m["origin"]) == (code, SENTINEL, SENTINEL), label
    assert optee_run.result.call(GUEST, "resume_nothing").x[0] == abi.SmcReturn.ERESUME


def test_every_call_left_the_kernel_and_the_yields_add_up(optee_run: OpteeRun) -> None:
    """Each SMC is one KVM_EXIT_HYPERCALL; every foreign-interrupt RPC the guest resumed was a
    yield of the broker's handler (none came from the agent's fallback)."""
    run = optee_run.result.run(GUEST, PROFILE)
    rpcs = optee_run.rpc_total
    assert rpcs == sum(m["rpc"] for m in optee_run.messages.values())
    assert run.fids == {
        abi.CALLS_UID: 2, abi.GET_OS_REVISION: 1, abi.CALLS_REVISION: 1,
        abi.GET_THREAD_COUNT: 1, abi.EXCHANGE_CAPABILITIES: 2, abi.DISABLE_SHM_CACHE: 1,
        abi.ENABLE_SHM_CACHE: 1, abi.GET_OS_UUID: 1, abi.CALLS_COUNT: 1,
        abi.CALL_WITH_ARG: len(MESSAGES), abi.RETURN_FROM_RPC: rpcs + 1,
    }
    yields = sum(s.value for s in optee_run.broker_metrics
                 if s.name == "hyperbroker_tee_yields_total")
    assert yields == rpcs
    served = {s.labels["function"] for s in optee_run.broker_metrics
              if s.name.endswith("_count") and s.labels.get("handler") == "optee" and s.value}
    assert {"OPTEE_CALL_WITH_ARG", "OPTEE_EXCHANGE_CAPABILITIES"} <= served
