"""The VMM endpoint: Unix sockets that VMMs connect to, in SEQPACKET or STREAM mode.

Each connection is driven by reader/writer callbacks on the event loop (no task per message).
SEQPACKET packets are whole frames and may carry file descriptors (SCM_RIGHTS) for guest RAM;
a STREAM is cut into frames by hyperbroker.wire.vmm.StreamFramer. Frames go to the Agent;
this module does not interpret them. A connection that cannot be framed any more (bad magic on a
stream) gets an HB_MSG_ERROR and is closed; a bad frame on SEQPACKET only gets the error.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path

from hyperbroker.agent import metrics
from hyperbroker.kvm import errno_name
from hyperbroker.runtime.loglimit import PeerLog
from hyperbroker.runtime.net import CannotListen
from hyperbroker.wire import vmm as proto

# Every line here is caused by a VMM: each VMM process has its log budget (runtime.loglimit).
log = PeerLog(logging.getLogger("hyperbroker.agent.vmm"))

MAX_PACKET = proto.HEADER.size + proto.MAX_PAYLOAD
MAX_FDS = proto.MAX_REGIONS
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
MAX_OUTBOUND = 8 * 1024 * 1024  # a VMM that does not read its replies is cut off past this
MAX_READS_PER_WAKE = 64
ACCEPT_RETRY_S = 0.5  # out of file descriptors: stop accepting this long rather than spin
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7), SO_PEERCRED)

FrameSink = Callable[["VmmConnection", bytes, list[int]], None]


class VmmConnection:
    def __init__(self, sock: socket.socket, seqpacket: bool, sink: FrameSink,
                 on_close: Callable[[VmmConnection], None]) -> None:
        self.sock = sock
        self.seqpacket = seqpacket
        self.sink = sink
        self.on_close = on_close
        self.framer = None if seqpacket else proto.StreamFramer()
        self.peer = peer_name(sock)
        self.vm_ids: set[int] = set()
        self.closed = False
        self.mem_waiters: dict[int, asyncio.Future[proto.MemReadReply]] = {}
        self._next_tag = 1
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)
        metrics.VMM_CONNECTIONS.inc()

    @property
    def mode(self) -> str:
        return "seqpacket" if self.seqpacket else "stream"

    def next_tag(self) -> int:
        tag = self._next_tag
        self._next_tag = (tag + 1) & 0xFFFF_FFFF or 1
        return tag

    def _readable(self) -> None:
        for _ in range(MAX_READS_PER_WAKE):
            if self.closed:
                return
            fds: list[int] = []
            try:
                if self.seqpacket:
                    data, ancdata, flags, _ = self.sock.recvmsg(MAX_PACKET + 1, ANCILLARY_SPACE)
                    for level, kind, payload in ancdata:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            fa = array.array("i")
                            fa.frombytes(payload[: len(payload) - len(payload) % fa.itemsize])
                            fds.extend(fa)
                else:
                    data, flags = self.sock.recv(256 * 1024), 0
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.info(self.peer, "connection read failed: %s", e)
                self.close()
                return
            if not data:
                self.close()
                return
            if self.seqpacket:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_PACKET:
                    for fd in fds:
                        os.close(fd)
                    self.send_error(errno.EMSGSIZE, 0, 0,
                                    f"packet larger than {MAX_PACKET} bytes or with more than "
                                    f"{MAX_FDS} file descriptors")
                    continue
                self.sink(self, data, fds)
            else:
                assert self.framer is not None
                try:
                    frames = self.framer.feed(data)
                except proto.ProtocolError as e:
                    self.send_error(e.code, e.msg_type, e.tag, f"{e}; closing the stream")
                    self.close()
                    return
                for frame in frames:
                    self.sink(self, frame, [])

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self._out:
            self._queue(data)
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            log.info(self.peer, "connection write failed: %s", e)
            self.close()
            return
        if sent < len(data):
            self._queue(data[sent:] if sent else data)
            self._loop.add_writer(self._fd, self._writable)

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes > MAX_OUTBOUND:
            log.error(self.peer, "connection does not read its replies (%d bytes queued); "
                      "closing", self._out_bytes)
            self.close()

    def _writable(self) -> None:
        while self._out:
            data = self._out[0]
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            if sent < len(data):
                self._out[0] = data[sent:]
                self._out_bytes -= sent
                return
            self._out.popleft()
            self._out_bytes -= sent
        self._loop.remove_writer(self._fd)

    def send_error(self, code: int, refused_type: int, tag: int, message: str) -> None:
        counter = metrics.PROTOCOL_ERROR.get(code)
        (counter or metrics.PROTOCOL_ERRORS.labels(errno_name(code))).inc()
        log.warning(self.peer, "refused vmm frame (type %#x, tag %d): %s: %s", refused_type,
                    tag, errno_name(code), message)
        self.send(proto.encode(proto.ErrorMsg(code, refused_type, message[:1000]), tag))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self.sock.close()
        metrics.VMM_CONNECTIONS.dec()
        for fut in self.mem_waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError("VMM connection closed"))
        self.on_close(self)


def peer_name(sock: socket.socket) -> str:
    """Who is at the other end of a Unix socket, by the credentials the kernel recorded at
    connect (SO_PEERCRED): the key of its log budget, and the name its log lines carry."""
    try:
        pid, uid, _ = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   UCRED.size))
    except OSError:
        return "vmm (no peer credentials)"
    return f"vmm pid {pid} uid {uid}"


class VmmListener:
    """A listening Unix socket; every accepted connection becomes a VmmConnection."""

    def __init__(self, path: Path, seqpacket: bool, sink: FrameSink,
                 on_open: Callable[[VmmConnection], None],
                 on_close: Callable[[VmmConnection], None]) -> None:
        self.path = path
        self.seqpacket = seqpacket
        kind = socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_UNIX, kind)
        try:
            if path.exists() and stat.S_ISSOCK(path.stat().st_mode):
                path.unlink()  # a stale socket from a previous run
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sock.bind(str(path))
            os.chmod(path, 0o660)
        except OSError as e:
            self.sock.close()
            raise CannotListen("VMM socket", str(path), f"{e.strerror}; the agent's user needs "
                               f"write access to {path.parent} (docs/operations.md, "
                               f"\"Running with systemd\")") from e
        self.sock.listen(64)
        self.sock.setblocking(False)
        self._sink = sink
        self._on_open = on_open
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.error(f"listener {self.path}", "accept failed: %s", e)
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The socket stays readable: without a pause this would spin.
                    self._loop.remove_reader(self.sock.fileno())
                    self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)
                return
            self._on_open(VmmConnection(conn, self.seqpacket, self._sink, self._on_close))

    def _resume(self) -> None:
        self._retry = None
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
