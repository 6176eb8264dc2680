"""The hosts and VMs a broker holds: leases, registration, reconciling, resets, clean-up.

A broker serves a host only while it holds the host's lease in the store (broker.store): an
agent's hello claims it (fencing off any broker that held it before) and rebuilds the host's
VMs from what the store recorded, so a broker taking over from a dead or partitioned one
carries on with the same handler state. Every write of a host's VMs goes under its lease; a
host whose lease is lost, or whose write fails, is abandoned here (its stream ends; whoever
claims it next starts from the store). Hosts know nothing of the call path (broker.dispatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from hyperbroker.broker import metrics, peers
from hyperbroker.broker.context import CallCtx, StateDoc
from hyperbroker.broker.peers import host_peer
from hyperbroker.broker.policy_versions import PolicyRegistry, PolicyVersion
from hyperbroker.broker.sessions import HostSession, VmSession, load_stored_result, regions_of
from hyperbroker.broker.store import Fenced, Store, StoreBatch, StoreUnavailable
from hyperbroker.calls import Call, Result
from hyperbroker.runtime.drive import run_eagerly
from hyperbroker.wire.v1 import broker_pb2

log = logging.getLogger("hyperbroker.broker")


class Hosts:
    def __init__(self, store: Store, policies: PolicyRegistry, *,
                 reregister_grace_s: float, broker_id: str, lease_ttl_s: float) -> None:
        self.store = store
        self.policies = policies
        self.reregister_grace_s = reregister_grace_s
        self.broker_id = broker_id
        self.lease_ttl_s = lease_ttl_s
        self.hosts: dict[str, HostSession] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        metrics.LEASES_HELD.set_function(
            lambda: sum(1 for h in self.hosts.values() if h.lease is not None))

    # ---- state ---------------------------------------------------------------------------
    async def flush(self, host: HostSession) -> None:
        """Commit what the host's calls changed, under its lease. A lost lease or a failed
        write abandons the host (and raises): the results that depended on it never leave."""
        async with host.flush_lock:
            if not host.batch:
                return
            batch, host.batch = host.batch, StoreBatch()
            if host.lease is None:
                raise Fenced(f"host {host.host} has no lease on this broker")
            try:
                await self.store.commit(host.lease, batch)
            except (Fenced, StoreUnavailable) as e:
                self.abandon(host, e)
                raise

    def abandon(self, host: HostSession, why: BaseException | str) -> None:
        """This broker may no longer change the host (another took it over, or the store
        failed a write): forget it here, without touching the store, and end its stream."""
        if self.hosts.get(host.host) is not host:
            return
        del self.hosts[host.host]
        metrics.VMS.dec(len(host.vms))
        metrics.HOSTS_ABANDONED.labels("fenced" if isinstance(why, Fenced) else "store").inc()
        log.error("host %s abandoned (%s): its %d VMs are left to whoever claims it next",
                  host.host, why, len(host.vms))
        host.vms.clear()
        host.batch = StoreBatch()
        host.lease = None
        if host.on_abandon is not None:
            host.on_abandon(str(why))

    # ---- hosts and VMs -------------------------------------------------------------------
    async def claim(self, name: str) -> HostSession:
        """An agent for `name` said hello: take the host's lease (the previous holder, if any,
        is fenced off) and, when this broker does not hold the host yet, rebuild its VMs from
        what the store recorded, so reconciling or a re-registration finds them."""
        session = self.hosts.get(name)
        if session is None:
            session = HostSession(name)
        async with session.flush_lock:  # a commit under the old epoch must not race the take
            session.lease = await self.store.take_lease(name, self.broker_id, self.lease_ttl_s)
        if self.hosts.get(name) is not session:
            self.hosts[name] = session
            try:
                await self._hydrate(session)
            except BaseException:
                del self.hosts[name]  # the next hello tries again from the start
                raise
        return session

    def host(self, name: str) -> HostSession:
        """The session of a host this broker holds (tests and the Admin API)."""
        return self.hosts[name]

    async def _hydrate(self, host: HostSession) -> None:
        for vm_key, record in (await self.store.host_vms(host.host)).items():
            try:
                reg = broker_pb2.VmRegistered.FromString(record)
                pv = await self.policies.get(reg.policy_version)
            except Exception:
                log.exception("host %s: stored VM %s cannot be read back; ignoring it",
                              host.host, vm_key)
                continue
            if pv is None or reg.vm_id in host.vms:
                log.warning("host %s: stored VM %s (policy v%d) cannot be resumed", host.host,
                            vm_key, reg.policy_version)
                continue
            vm = await self._session(host, reg, pv)
            host.vms[reg.vm_id] = vm
            metrics.VMS.inc()
        if host.vms:
            log.info("host %s: %d VMs taken over from the store", host.host, len(host.vms))

    async def _session(self, host: HostSession, reg: broker_pb2.VmRegistered,
                       pv: PolicyVersion) -> VmSession:
        """A VmSession with everything the store holds for it."""
        vm = VmSession(host.host, reg, pv)
        vm.generation = host.generation
        stored = await self.store.load_vm(vm.key)
        for handler, raw in stored.docs.items():
            vm.states[handler] = StateDoc((vm.key, handler), raw)
        for vcpu, (seq, blob) in stored.results.items():
            if vcpu < vm.nr_vcpus:
                rec = vm.vcpus[vcpu]
                rec.last_result, rec.last_writes = load_stored_result(blob)
                rec.last_seq = seq
                rec.rename(vm.vm_id)  # the agent may have given the VM a new handle since
        return vm

    async def renew_leases(self) -> None:
        """Keep the hosts this broker holds; a host another broker took over is abandoned."""
        for host in list(self.hosts.values()):
            lease = host.lease
            if lease is None:
                continue
            try:
                ours = await self.store.renew_lease(lease, self.lease_ttl_s)
            except StoreUnavailable as e:
                log.warning("cannot renew the lease of host %s: %s", host.host, e)
                continue
            if not ours and host.lease is lease:
                self.abandon(host, Fenced(f"host {host.host} was taken over by another broker"))

    async def expire_hosts(self, expiry_s: float) -> None:
        """Hosts whose agent has been away longer than `expiry_s` are gone: their VMs are
        destroyed, with every handler's clean-up, by the lease holder only."""
        now = time.monotonic()
        for name, session in list(self.hosts.items()):
            if session.writer is not None or session.disconnected_at is None:
                continue
            if now - session.disconnected_at < expiry_s:
                continue
            lease = session.lease
            if lease is None or not await self.store.renew_lease(lease, self.lease_ttl_s):
                self.abandon(session, Fenced(f"host {name} is held by another broker now"))
                continue
            log.warning("host %s away for %.0f s: destroying its %d VMs", name,
                        now - session.disconnected_at, len(session.vms))
            for vm_id in list(session.vms):
                self.destroy_vm(session, vm_id)
            del self.hosts[name]

    async def sweep_orphans(self, expiry_s: float) -> None:
        """Hosts whose lease lapsed `expiry_s` ago and which no broker took since: their
        broker died and their agent never came back. Take each over and destroy its VMs with
        every handler's clean-up, as their own broker's host expiry would have."""
        for name in await self.store.expired_leases(expiry_s):
            if name in self.hosts:
                continue
            host = HostSession(name)
            host.lease = await self.store.take_lease(name, self.broker_id, self.lease_ttl_s)
            await self._hydrate(host)
            log.warning("host %s: its broker is gone and its agent has not come back for "
                        "%.0f s: destroying its %d VMs", name, expiry_s, len(host.vms))
            for vm_id in list(host.vms):
                vm = host.vms.pop(vm_id)
                metrics.VMS.dec()
                await self._cleanup_vm(host, vm)
            await self.store.drop_lease(host.lease)

    async def register_vm(self, host: HostSession, reg: broker_pb2.VmRegistered) -> None:
        pv = await self.policies.get(reg.policy_version)
        if pv is None:
            host.queue_rejected(reg.vm_id, f"policy version {reg.policy_version} is unknown to "
                                           "this broker")
            return
        if reg.policy_digest and reg.policy_digest != pv.policy.digest:
            host.queue_rejected(reg.vm_id, f"policy version {reg.policy_version} of this broker "
                                           "is not the text the VM's filter was compiled from "
                                           "(different store?)")
            return
        if (reg.profile or "default") not in pv.policy.profiles:
            host.queue_rejected(reg.vm_id, f"profile {reg.profile!r} is not in policy version "
                                           f"{reg.policy_version}")
            return
        if not 0 < reg.nr_vcpus <= 512:
            host.queue_rejected(reg.vm_id, f"nr_vcpus {reg.nr_vcpus} outside 1..512")
            return
        old = host.vms.get(reg.vm_id)
        if old is not None:
            if old.name == reg.name and old.incarnation == reg.incarnation:
                old.generation = host.generation
                return  # a re-registration after reconnecting: the session lives on
            # The agent reused the handle for another registration: the old boot is over.
            log.info("vm %s (id %d) replaced by a new registration %s", old.info.key, old.vm_id,
                     reg.name)
            self.destroy_vm(host, reg.vm_id)
        for vm_id, held in list(host.vms.items()):
            if (held.name == reg.name and held.incarnation == reg.incarnation
                    and held.nr_vcpus == reg.nr_vcpus and held.regions == regions_of(reg)):
                # The same boot under a new handle (a restarted agent numbers VMs afresh).
                del host.vms[vm_id]
                held.vm_id, held.generation = reg.vm_id, host.generation
                for rec in held.vcpus:
                    rec.rename(reg.vm_id)
                host.vms[reg.vm_id] = held
                log.info("vm %s resumed as id %d", held.info.key, reg.vm_id)
                return
            if held.name == reg.name:
                self.destroy_vm(host, vm_id)  # the same name, another boot: that one is over
        vm = await self._session(host, reg, pv)
        if host.vms.get(reg.vm_id) is not None or self.hosts.get(host.host) is not host:
            return  # the host changed hands, or the handle was taken, while the store answered
        assert host.lease is not None
        try:
            await self.store.put_vm(host.lease, vm.key, reg.SerializeToString())
        except (Fenced, StoreUnavailable) as e:
            self.abandon(host, e)
            raise
        host.vms[reg.vm_id] = vm
        metrics.VMS.inc()
        log.info("vm %s registered (id %d, profile %s, policy v%d, %d vCPUs)", vm.info.key,
                 vm.vm_id, vm.profile, pv.version, vm.nr_vcpus)

    def reconcile(self, host: HostSession, live: dict[int, str]) -> None:
        """The agent's list of its VMs (AgentHello.live_vms): every VM held for the host that
        is not in it, or is there as another incarnation, ended while the stream was down."""
        for vm_id, vm in list(host.vms.items()):
            if live.get(vm_id) != vm.incarnation:
                log.info("vm %s is no longer on host %s: destroying it", vm.info.key, host.host)
                self.destroy_vm(host, vm_id)

    def divergent(self, host: HostSession, vm_id: int, vcpu: int, seq: int) -> None:
        """The agent answered (vm, vcpu, seq) with its fallback before this broker's result
        arrived: if that result changed state, its handler undoes it."""
        metrics.DIVERGENT_RESULTS.inc()
        vm = host.vms.get(vm_id)
        if vm is None or vcpu >= vm.nr_vcpus:
            return
        rec = vm.vcpus[vcpu]
        if rec.last_seq != seq or rec.last_call is None:
            log.info("vm %s vcpu %d seq %d: the guest got the fallback; nothing to undo",
                     vm.info.key, vcpu, seq)
            return
        name, call, result = rec.last_call
        rec.last_call = None
        # Stepped at once: the guest's retry may be in this same frame, right behind the report.
        task = run_eagerly(self._undo(host, vm, name, call, result), lambda r, e: None)
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _undo(self, host: HostSession, vm: VmSession, name: str, call: Call,
                    result: Result) -> None:
        ctx = CallCtx(self, host, vm, name)
        try:
            await vm.pv.policy.handlers[name].undo(call, result, ctx)
        except Exception:
            peers.log.error(host_peer(host.host), "handler %s failed to undo %#x seq %d of vm "
                            "%s", name, call.function_id, call.seq, vm.info.key, exc_info=True)
            return
        peers.log.warning(host_peer(host.host), "vm %s vcpu %d: %s undid fid %#x seq %d, whose "
                          "result the guest never saw", vm.info.key, call.vcpu, name,
                          call.function_id, call.seq)
        await self.flush_quietly(host)

    async def flush_quietly(self, host: HostSession) -> None:
        """flush() for background work: a failure has abandoned the host and is logged."""
        with contextlib.suppress(Fenced, StoreUnavailable):
            await self.flush(host)

    def adopt(self, host: HostSession) -> None:
        """A new agent process says hello for the host: its VMMs register again the VMs that
        still run (the same boot IDs resume them); after the grace, the others are gone."""
        host.generation += 1
        asyncio.get_running_loop().call_later(self.reregister_grace_s, self._sweep, host,
                                              host.generation)

    def _sweep(self, host: HostSession, generation: int) -> None:
        if host.generation != generation:
            return  # yet another agent process came since: its own sweep decides
        for vm_id, vm in list(host.vms.items()):
            if vm.generation < generation:
                log.info("vm %s was not registered again after its agent restarted: destroying "
                         "it", vm.info.key)
                self.destroy_vm(host, vm_id)

    def destroy_vm(self, host: HostSession, vm_id: int) -> None:
        vm = host.vms.pop(vm_id, None)
        if vm is None:
            return
        metrics.VMS.dec()
        self._spawn(self._cleanup_vm(host, vm))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reset_vm(self, host: HostSession, vm_id: int, request_id: int) -> None:
        """The VMM reset the VM by itself (HB_MSG_VM_RESET); answered once handlers forgot it."""
        vm = host.vms.get(vm_id)
        if vm is None:
            host.queue_reset_done(request_id)  # nothing to forget here
            return
        self._spawn(self._reset_then(host, vm, lambda: host.queue_reset_done(request_id)))

    async def _reset_then(self, host: HostSession, vm: VmSession,
                          then: Callable[[], None]) -> None:
        """Every handler of the VM's profile forgets per-boot state; then `then` (the answer)."""
        policy = vm.pv.policy
        for name in sorted({r.handler for r in policy.profiles[vm.profile].rules if r.handler}):
            try:
                await policy.handlers[name].vm_reset(CallCtx(self, host, vm, name))
            except Exception:
                peers.log.error(host_peer(host.host), "handler %s failed to reset vm %s", name,
                                vm.info.key, exc_info=True)
        log.info("vm %s reset", vm.info.key)
        then()
        host.wake()

    def forget_vm(self, vm: VmSession) -> None:
        """A VM is gone for good: drop what dispatch keeps for it (Dispatcher)."""

    async def _cleanup_vm(self, host: HostSession, vm: VmSession) -> None:
        """Run every handler's vm_destroyed hook, then drop the VM's records."""
        self.forget_vm(vm)
        policy = vm.pv.policy
        profile = policy.profiles[vm.profile]
        used = {r.handler for r in profile.rules if r.handler}
        for name in sorted(used):
            ctx = CallCtx(self, host, vm, name)
            try:
                await policy.handlers[name].vm_destroyed(ctx)
            except Exception:
                peers.log.error(host_peer(host.host), "handler %s failed to clean up vm %s",
                                name, vm.info.key, exc_info=True)
        batch = host.batch
        for state_key in [k for k in batch.vm_state if k[0] == vm.key]:
            del batch.vm_state[state_key]
        for result_key in [k for k in batch.last_results if k[0] == vm.key]:
            del batch.last_results[result_key]
        lease = host.lease
        if lease is None:
            return  # abandoned meanwhile: the VM is the new holder's to clean up
        try:
            await self.flush(host)
            await self.store.forget_vm(lease, vm.key)
        except (Fenced, StoreUnavailable) as e:
            self.abandon(host, e)
            peers.log.warning(host_peer(host.host), "vm %s: clean-up not recorded (%s)",
                              vm.info.key, e)
            return
        log.info("vm %s destroyed", vm.info.key)

    async def drain(self, timeout_s: float) -> None:
        """Wait for running handlers (and VM clean-ups) to finish, at most `timeout_s`."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        for host in list(self.hosts.values()):
            await self.flush_quietly(host)
