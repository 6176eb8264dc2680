"""`hyperbroker demo --real-kvm`: the bed as a live demo of calls flowing."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from hyperbroker_tools.kvm_bed.boot import MetricSample, Services, boot
from hyperbroker_tools.kvm_bed.build import prepare, run_step
from hyperbroker_tools.kvm_bed.host import BedError, BedUnavailable
from hyperbroker_tools.kvm_bed.records import HB_RECORD, BootResult, CallRecord, parse_record

DEMO_POLICY = """\
# The demo's policy: TRNG served by the broker, one vendor-hyp call denied in the kernel.
handlers:
  trng: {plugin: trng, config: {}}
profiles:
  default:
    rules:
      - {name: trng, abi: trng, action: forward, handler: trng, fallback: not_supported,
         deadline_ms: 50}
      - {name: deny-vendor-call, functions: [0x86000100], action: deny}
"""


def _describe_call(c: CallRecord) -> str:
    x0 = c.x[0]
    shown = f"{x0:#x}" if x0 < 1 << 63 else str(x0 - (1 << 64))
    regs = " ".join(f"x{i}={v:#018x}" for i, v in enumerate(c.x[1:], start=1) if v)
    return f"{c.label:<16} fid={c.fid:#010x}  x0={shown:<10} {regs}  ({c.ns / 1000:.0f} µs)"


# The broker's per-call latency histogram (broker/metrics.py): its _count is the calls answered.
BROKER_CALLS_METRIC = "hyperbroker_broker_call_duration_seconds_count"


def _broker_calls(samples: Iterable[MetricSample]) -> float:
    return sum(s.value for s in samples if s.name == BROKER_CALLS_METRIC)


def run_demo(duration: float | None) -> int:
    """`hyperbroker demo --real-kvm`: boot the arm64 guest and show its calls flow live."""
    seconds = max(1, int(duration)) if duration is not None else 10
    try:
        artifacts = prepare()
    except BedUnavailable as e:
        print(f"real-KVM demo unavailable: {e}", file=sys.stderr)
        return 2
    except BedError as e:
        print(f"real-KVM demo failed to build: {e}", file=sys.stderr)
        return 1
    print(f"kernel {artifacts.kernel.package} {artifacts.kernel.version}; "
          f"guests: {', '.join(artifacts.guests)}")
    with tempfile.TemporaryDirectory(prefix="hb-demo-") as tmp:
        work = Path(tmp)
        policy = work / "policy.yaml"
        policy.write_text(DEMO_POLICY)
        services = Services(policy, work)
        try:
            services.start()
            assert services.broker is not None
            print(f"broker on {services.broker.address}, agent on {services.stream_socket}")
            print("the guest calls TRNG (forwarded; VERSION and GET_UUID answered by the agent, "
                  "the rest by the broker), 0x86000100 (denied by the kernel filter: no exit) "
                  "and 0x8400005f (forwarded, no handler serves it)")
            counted = {"calls": 0}
            last_report = [time.monotonic()]

            def show(line: str) -> None:
                m = HB_RECORD.match(line)
                if not m:
                    return
                rest = m.group("rest")
                if m.group("guest") is not None and rest.startswith("call "):
                    probe = BootResult([], None, 0.0)
                    parse_record(probe, line)
                    counted["calls"] += 1
                    print(f"  guest -> {_describe_call(probe.calls[0])}", flush=True)
                elif rest.startswith(("registered", "filter ", "run-end", "kvm ")):
                    print(f"  vmm   {rest}", flush=True)
                if time.monotonic() - last_report[0] > 2:
                    last_report[0] = time.monotonic()
                    with contextlib.suppress(OSError):
                        total = _broker_calls(services.broker_metrics())
                        print(f"  broker: {total:.0f} calls answered so far", flush=True)

            result = boot(artifacts, [run_step("demo", args=[seconds])],
                          agent_socket=services.stream_socket, timeout=seconds + 60,
                          on_line=show)
        except BedError as e:
            print(f"real-KVM demo failed: {e}\n{services.logs()}", file=sys.stderr)
            return 1
        finally:
            services.stop()
    run = result.runs[-1] if result.runs else None
    print(f"done: {counted['calls']} calls in {result.seconds:.1f} s "
          f"(L1 /init after {result.init_seconds or 0:.1f} s); "
          f"run {'ok' if run and run.ok else 'FAILED'}")
    return 0 if run is not None and run.ok else 1
