"""The agent's one stream to the broker: batching, reconnection, replay.

Whatever is pending when the writer runs (calls, registrations, memory replies) leaves as one
frame. When the stream breaks the agent redials with jittered exponential backoff, says hello
again, re-registers every live VM and re-sends every call still waiting, with its sequence
number, so the broker can answer a call it already ran from the vCPU's last-result record.
Rotated TLS files (or SIGHUP) take effect at the next reconnect, over a new channel.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Protocol

import grpc

from hyperbroker import __version__
from hyperbroker.agent import metrics
from hyperbroker.runtime.drive import run_eagerly
from hyperbroker.runtime.tls import TlsConfigError, TlsFiles, tls_stamp
from hyperbroker.wire.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger("hyperbroker.agent.link")

PROTOCOL_VERSION = 1


class LinkOwner(Protocol):
    def on_welcome(self, welcome: broker_pb2.BrokerWelcome) -> None: ...
    def on_broker_frame(self, frame: broker_pb2.BrokerFrame) -> None: ...
    def replay(self, frame: broker_pb2.AgentFrame, calls: list[bytes]) -> None: ...
    def live_vms(self) -> list[broker_pb2.VmRef]: ...
    @property
    def policy_version(self) -> int: ...


class BrokerLink:
    def __init__(self, owner: LinkOwner, target: str, host: str, tls: TlsFiles | None = None,
                 *, backoff_initial_s: float = 0.05, backoff_max_s: float = 5.0,
                 keepalive_s: float = 2.0, silence_s: float = 8.0) -> None:
        self.owner = owner
        self.target = target
        self.host = host
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        # The stream's own liveness check (AgentFrame.keepalive, echoed by the broker): HTTP/2
        # pings prove only the next hop, and behind an HTTP/2 proxy that is the proxy, so a
        # broker that is paused or wedged would hold its hosts for ever. After keepalive_s
        # without a frame from the broker the agent sends a keepalive; after silence_s the
        # stream is given up and the agent reconnects (through the proxy, to a live replica).
        self.keepalive_s = keepalive_s
        self.silence_s = silence_s
        self.last_rx = 0.0
        self._echoed = False  # the broker answers keepalives (older brokers do not)
        self._given_up: str | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.tls = tls
        self._tls_stamp = tls_stamp(tls) if tls is not None else ()
        self._reload_tls = False
        self.options = [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
        self.channel, self.stub = self._open_channel()
        self.up = False
        self.down_since = time.monotonic()
        self.connects = 0
        self.frame = broker_pb2.AgentFrame()
        self.calls: list[bytes] = []  # hb_call records for the frame being built
        self.max_batch = 1024
        self._dirty = False
        self._writing = False
        self._stopping = False
        self._call: grpc.aio.StreamStreamCall[broker_pb2.AgentFrame,
                                              broker_pb2.BrokerFrame] | None = None

    def _open_channel(self) -> tuple[grpc.aio.Channel, broker_pb2_grpc.BrokerStub]:
        if self.tls is not None:
            channel = grpc.aio.secure_channel(self.target, self.tls.channel_credentials(),
                                              self.options)
        else:
            channel = grpc.aio.insecure_channel(self.target, self.options)
        return channel, broker_pb2_grpc.BrokerStub(channel)

    def reload_tls(self) -> None:
        """SIGHUP: read the certificate, key and CA again at the next reconnect."""
        self._reload_tls = True
        log.info("TLS files will be read again when the broker stream next reconnects")

    async def _renew_channel_if_rotated(self) -> None:
        """A gRPC channel keeps the credentials it was made with: when the TLS files changed
        (or SIGHUP asked), the next connection goes over a new channel that reads them. The
        stream that is up is never dropped for it."""
        if self.tls is None:
            return
        stamp = tls_stamp(self.tls)
        if stamp == self._tls_stamp and not self._reload_tls:
            return
        try:
            channel, stub = self._open_channel()
        except TlsConfigError as e:
            log.error("TLS files changed but cannot be read (keeping the old ones): %s", e)
            return
        self._tls_stamp, self._reload_tls = stamp, False
        old, self.channel, self.stub = self.channel, channel, stub
        await old.close()
        log.warning("TLS: reconnecting with the certificate now in %s", self.tls.cert)

    def down_for(self) -> float:
        """Seconds the stream has been down; 0 while it is up."""
        return 0.0 if self.up else time.monotonic() - self.down_since

    # -- building the outbound frame (only while up; replay rebuilds it after a reconnect) --
    def mark(self) -> None:
        self._dirty = True

    def flush_soon(self) -> None:
        """Start writing what is pending now, unless a write is already under way (it will
        take this too). The write is started from the caller's own callback, without waking a
        writer task: at one call in flight that saves an event-loop round per call."""
        call = self._call
        if self._dirty and self.up and not self._writing and call is not None:
            self._writing = True
            run_eagerly(self._write_pending(call), self._write_done)

    async def _write_pending(self, call: grpc.aio.StreamStreamCall[broker_pb2.AgentFrame,
                                                                    broker_pb2.BrokerFrame]
                             ) -> None:
        while self._dirty:
            frame, self.frame, self._dirty = self.frame, broker_pb2.AgentFrame(), False
            calls, self.calls = self.calls, []
            # At most max_batch calls a frame, as the broker's welcome asked.
            frame.calls = b"".join(calls[: self.max_batch])
            await call.write(frame)
            for i in range(self.max_batch, len(calls), self.max_batch):
                await call.write(broker_pb2.AgentFrame(calls=b"".join(
                    calls[i : i + self.max_batch])))

    def _write_done(self, _: None, exc: BaseException | None) -> None:
        self._writing = False
        if exc is not None:
            if self._call is not None and not isinstance(exc, asyncio.CancelledError):
                log.warning("write to broker %s failed: %r", self.target, exc)
                self._given_up = f"write failed: {exc!r}"
                self._call.cancel()  # the reader sees the stream end and reconnects
            return
        self.flush_soon()

    async def run(self) -> None:
        attempt = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._renew_channel_if_rotated()
                await self._session()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if self.up or attempt == 0:
                    log.warning("broker stream to %s ended: %s %s", self.target, e.code().name,
                                e.details())
            except (ConnectionError, TimeoutError) as e:
                log.log(logging.WARNING if self.up or attempt == 0 else logging.DEBUG,
                        "broker stream to %s ended: %s", self.target, e)
            except Exception:
                log.exception("broker stream to %s failed", self.target)
            finally:
                if self.up:
                    self.up = False
                    self.down_since = time.monotonic()
                    metrics.STREAM_UP.set(0)
            if self._stopping:
                break
            if time.monotonic() - started > 10:
                attempt = 0
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** attempt)
            attempt += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))

    async def _session(self) -> None:
        call = self.stub.Connect()
        self._call = call
        self._given_up = None
        try:
            try:
                async with asyncio.timeout(self.silence_s):  # a paused broker never welcomes
                    await call.write(broker_pb2.AgentFrame(hello=broker_pb2.AgentHello(
                        host=self.host, agent_version=__version__, protocol=PROTOCOL_VERSION,
                        policy_version=self.owner.policy_version, resumed=self.connects > 0,
                        live_vms=self.owner.live_vms(), reconcile=True)))
                    first = await call.read()
            except TimeoutError:
                metrics.BROKER_SILENT.inc()
                raise TimeoutError(f"no welcome within {self.silence_s:g} s") from None
            if first is grpc.aio.EOF:
                raise ConnectionError("broker closed the stream before its welcome")
            assert isinstance(first, broker_pb2.BrokerFrame)
            if not first.HasField("welcome"):
                raise ConnectionError("broker's first frame carries no welcome")
            self.owner.on_welcome(first.welcome)
            self.max_batch = first.welcome.max_batch or self.max_batch
            self.frame = broker_pb2.AgentFrame()
            self.calls = []
            self.owner.replay(self.frame, self.calls)
            self._dirty = True
            self.up = True
            if self.connects:
                metrics.RECONNECTS.inc()
            self.connects += 1
            metrics.STREAM_UP.set(1)
            log.info("broker stream to %s up (broker %s, policy v%d)", self.target,
                     first.welcome.broker_id, first.welcome.policy.version)
            self.flush_soon()
            self.last_rx = time.monotonic()
            self._echoed = False
            self._watchdog = asyncio.get_running_loop().call_later(self.keepalive_s,
                                                                   self._watch, call)
            try:
                while True:
                    frame = await call.read()
                    if frame is grpc.aio.EOF:
                        break
                    assert isinstance(frame, broker_pb2.BrokerFrame)
                    self.last_rx = time.monotonic()
                    if frame.HasField("keepalive"):
                        self._echoed = True
                        if len(frame.ListFields()) == 1:
                            continue
                    self._on_frame(frame)
            finally:
                if self._watchdog is not None:
                    self._watchdog.cancel()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._given_up is None or (task is not None and task.cancelling()):
                raise
            raise ConnectionError(self._given_up) from None
        finally:
            self._call = None
            call.cancel()

    def _watch(self, call: grpc.aio.StreamStreamCall[broker_pb2.AgentFrame,
                                                     broker_pb2.BrokerFrame]) -> None:
        """Runs every keepalive_s while the stream is up: one timer, no task."""
        if self._call is None or self._call is not call:  # that stream has ended
            return
        quiet = time.monotonic() - self.last_rx
        if self._echoed and quiet >= self.silence_s:
            metrics.BROKER_SILENT.inc()
            self._given_up = f"no frame from the broker for {quiet:.1f} s"
            call.cancel()
            return
        if quiet >= self.keepalive_s:
            self.frame.keepalive.sent_ns = time.monotonic_ns()
            self.mark()
            self.flush_soon()
        self._watchdog = asyncio.get_running_loop().call_later(self.keepalive_s, self._watch,
                                                               call)

    def _on_frame(self, frame: broker_pb2.BrokerFrame) -> None:
        if frame.HasField("drain"):
            log.info("broker asks to drain: %s", frame.drain.reason)
        self.owner.on_broker_frame(frame)

    async def close(self) -> None:
        self._stopping = True
        if self._call is not None:
            self._call.cancel()
        await self.channel.close()
