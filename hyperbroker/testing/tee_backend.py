"""A TeeBackend that calls a tee.service.TeeService in the same process, without gRPC.

The proxy and the reference TEE in one event loop: the handler's tests use it to exercise every
path against the real trusted applications, and a single-host setup could use it to skip the
network. It only converts between handlers.optee.backend values and the service's.
"""

from __future__ import annotations

from hyperbroker.handlers.optee.backend import (
    BackendReply,
    BackendStatus,
    CancelRequest,
    CloseRequest,
    InvokeRequest,
    OpenSessionRequest,
    TeeParam,
    TeeVm,
)
from hyperbroker.tee.service import Reply, TeeService
from hyperbroker.tee.ta import Param, VmIdentity


def to_service(p: TeeParam) -> Param:
    return Param.received(p.type, p.a, p.b, p.data, p.size, p.null)


def from_service(p: Param) -> TeeParam:
    a, b, data, size = p.reply()
    return TeeParam(p.type, a, b, data, size, p.null)


class LocalTeeBackend:
    def __init__(self, service: TeeService) -> None:
        self.service = service

    def _reply(self, r: Reply) -> BackendReply:
        return BackendReply(BackendStatus(r.status), r.ret, r.origin, r.session,
                            self.service.epoch, tuple(from_service(p) for p in r.params))

    async def vm_created(self, vm: TeeVm, max_sessions: int) -> int:
        await self.service.vm_created(VmIdentity(vm.host, vm.name), vm.incarnation, max_sessions)
        return self.service.epoch

    async def vm_destroyed(self, vm: TeeVm) -> int:
        return await self.service.vm_destroyed(VmIdentity(vm.host, vm.name), vm.incarnation)

    async def open_session(self, request: OpenSessionRequest) -> BackendReply:
        vm = request.vm
        return self._reply(await self.service.open_session(
            VmIdentity(vm.host, vm.name), vm.incarnation, request.ta, request.login,
            request.client, [to_service(p) for p in request.params], request.cancel_id))

    async def invoke_command(self, request: InvokeRequest) -> BackendReply:
        vm = request.vm
        return self._reply(await self.service.invoke(
            VmIdentity(vm.host, vm.name), vm.incarnation, request.session, request.epoch,
            request.func, [to_service(p) for p in request.params], request.cancel_id))

    async def close_session(self, request: CloseRequest) -> BackendReply:
        vm = request.vm
        return self._reply(await self.service.close_session(
            VmIdentity(vm.host, vm.name), vm.incarnation, request.session, request.epoch))

    async def cancel(self, request: CancelRequest) -> BackendReply:
        vm = request.vm
        return self._reply(await self.service.cancel(
            VmIdentity(vm.host, vm.name), vm.incarnation, request.session, request.epoch,
            request.cancel_id))

    async def close(self) -> None:
        await self.service.close()
