"""The userspace PSCI handler: folds handlers.psci.service answers into registers and actions.

Per-VM vCPU power lives in ctx.state as VmPower's JSON form and is written only when a call
changes it. The adapter never awaits, so the broker may run it inside its stream task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hyperbroker.calls import ActionKind, Call, Outcome, Result
from hyperbroker.handlers.api import Abi, CallContext, Handler, HandlerConfigError
from hyperbroker.handlers.psci import abi, service
from hyperbroker.handlers.psci.power import Power, VmPower
from hyperbroker.handlers.psci.service import AddressRange, PsciConfig
from hyperbroker.smccc import FunctionRange

STATE_VERSION = 1


def _ids(ranges: Sequence[FunctionRange]) -> list[int]:
    return [fid for r in ranges for fid in range(r.base, r.end)]


def _int_list(key: str, raw: object) -> list[int]:
    if not isinstance(raw, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw
    ):
        raise HandlerConfigError(f"{key}: must be a list of non-negative integers, not {raw!r}")
    return list(raw)


def parse_config(config: Mapping[str, Any]) -> PsciConfig:
    """The policy's config: mapping -> PsciConfig, or HandlerConfigError naming the key."""
    raw_version = str(config.get("version", "1.3"))
    if raw_version not in abi.VERSIONS:
        raise HandlerConfigError(
            f"version: {raw_version!r} is not one of {', '.join(abi.VERSIONS)}")
    flags = {}
    for key in ("system_suspend", "system_off2"):
        value = config.get(key, True)
        if not isinstance(value, bool):
            raise HandlerConfigError(f"{key}: must be true or false, not {value!r}")
        flags[key] = value
    boot = _int_list("boot_vcpus", config.get("boot_vcpus", [0]))
    if not boot:
        raise HandlerConfigError("boot_vcpus: at least one vCPU must be on at start")
    mpidrs: tuple[int, ...] | None = None
    if "mpidrs" in config:
        mpidrs = tuple(_int_list("mpidrs", config["mpidrs"]))
        if any(m & ~abi.MPIDR_HWID_BITMASK for m in mpidrs):
            raise HandlerConfigError(
                f"mpidrs: affinities must fit MPIDR_HWID_BITMASK {abi.MPIDR_HWID_BITMASK:#x}")
        if len(set(mpidrs)) != len(mpidrs):
            raise HandlerConfigError("mpidrs: two vCPUs share an affinity")
    ranges = []
    raw_ranges = config.get("entry_ranges", [])
    if not isinstance(raw_ranges, list):
        raise HandlerConfigError("entry_ranges: must be a list of {base, size}")
    for item in raw_ranges:
        if (not isinstance(item, dict) or set(item) != {"base", "size"}
                or not all(isinstance(item[k], int) and not isinstance(item[k], bool)
                           for k in ("base", "size"))
                or item["base"] < 0 or item["size"] <= 0):
            raise HandlerConfigError(f"entry_ranges: {item!r} is not {{base, size}} with size > 0")
        ranges.append(AddressRange(item["base"], item["size"]))
    return PsciConfig(
        version=abi.VERSIONS[raw_version],
        system_suspend=flags["system_suspend"],
        system_off2=flags["system_off2"],
        boot_vcpus=frozenset(boot),
        mpidrs=mpidrs,
        entry_ranges=tuple(ranges),
    )


class PsciHandler(Handler):
    plugin = "psci"
    abi = Abi("psci", abi.RANGES, abi.FUNCTION_NAMES)
    eager = True  # never awaits

    @classmethod
    def config_keys(cls) -> Sequence[str]:
        return ("version", "system_suspend", "system_off2", "boot_vcpus", "mpidrs",
                "entry_ranges")

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.psci = parse_config(self.config)

    def function_name(self, fid: int) -> str | None:
        if not any(fid in r for r in self.ranges):
            return None
        return abi.FUNCTION_NAMES.get(fid, "PSCI_RESERVED")

    def served_functions(self) -> frozenset[int]:
        """The IDs of this handler's ranges answered with anything but NOT_SUPPORTED."""
        return service.served_functions(self.psci)

    def discovery_claims(self) -> Mapping[int, frozenset[int]]:
        """Discovery function ID -> the function IDs it tells the guest are served."""
        return service.discovery_claims(self.psci)

    def static_answers(self) -> Mapping[int, Result]:
        return {
            fid: Result.regs(x0, outcome=Outcome.GUEST_ERROR if x0 < 0 else Outcome.OK)
            for fid, x0 in service.static_x0(self.psci, _ids(self.ranges)).items()
        }

    def power(self, ctx: CallContext) -> VmPower:
        """This VM's stored power state, or its state at start when none is stored yet."""
        stored = VmPower.from_json((ctx.state.get() or {}).get("power"))
        if stored is None:
            return self.boot_power(ctx.vm.nr_vcpus)
        if len(stored.vcpus) != ctx.vm.nr_vcpus:
            return stored.resized(ctx.vm.nr_vcpus)
        return stored

    def boot_power(self, nr_vcpus: int) -> VmPower:
        return VmPower.initial(nr_vcpus, self.psci.boot_vcpus)

    async def handle(self, call: Call, ctx: CallContext) -> Result:
        if not 0 <= call.vcpu < ctx.vm.nr_vcpus:
            # The VMM named a vCPU the VM was registered without: no power state to act on.
            return Result.regs(abi.PsciError.INTERNAL_FAILURE, outcome=Outcome.GUEST_ERROR)
        stored = self.power(ctx)
        power = stored.observe(call.vcpu)
        request = service.decode(self.psci, call.function_id, call.x)
        answer = service.transition(self.psci, request, call.vcpu, power,
                                    self.boot_power(ctx.vm.nr_vcpus))
        new = answer.power if answer.power is not None else power
        if new != stored:
            ctx.state.put({"v": STATE_VERSION, "power": new.to_json()})
        return Result.regs(answer.x0, actions=answer.actions,
                           outcome=Outcome.GUEST_ERROR if answer.error else Outcome.OK)

    async def undo(self, call: Call, result: Result, ctx: CallContext) -> None:
        """A CPU_ON the guest never saw succeed: the VMM never got the action, so the target is
        OFF again (not ON_PENDING) and the guest's retry powers it on."""
        targets = [a.vcpu for a in result.actions if a.kind == ActionKind.CPU_ON]
        if not targets:
            return
        stored = self.power(ctx)
        power = stored
        for t in targets:
            if 0 <= t < len(power.vcpus) and power.state(t) is Power.ON_PENDING:
                power = power.stop(t)
        if power != stored:
            ctx.state.put({"v": STATE_VERSION, "power": power.to_json()})

    async def vm_destroyed(self, ctx: CallContext) -> None:
        ctx.state.put(None)

    async def vm_reset(self, ctx: CallContext) -> None:
        """A new boot starts with the boot vCPUs ON and every secondary OFF, whatever the old
        boot had powered on (a VMM-initiated reset comes with no SYSTEM_RESET call of ours)."""
        if ctx.state.get() is not None:
            ctx.state.put(None)
