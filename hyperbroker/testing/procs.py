"""Start broker and agent processes for the demo, the benchmark and the end-to-end tests, and the
servers around them the tests use (Redis, HAProxy, Prometheus).

Each process prints one "ready" line on stdout (with the port it bound when asked for port 0);
`start_*` waits for that line, so callers never race a process that is still starting, and
`ManagedProcess.stop` always ends the process (SIGTERM, then SIGKILL) and collects its output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO


@dataclass
class ManagedProcess:
    name: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def start_reader(self) -> None:
        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                m = rx.search(line)
                if m:
                    return m
            seen = len(self.lines)
            if self.proc.poll() is not None:
                time.sleep(0.05)
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + "\n".join(self.lines[-30:]))
            time.sleep(0.01)
        raise TimeoutError(f"{self.name} did not print /{pattern}/ within {timeout} s:\n"
                           + "\n".join(self.lines[-30:]))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        return self.proc.returncode


def spawn_cli(name: str, args: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hyperbroker.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
        start_new_session=True)
    mp = ManagedProcess(name, proc)
    mp.start_reader()
    return mp


@dataclass
class Broker:
    process: ManagedProcess
    port: int
    metrics_port: int | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_broker(policy: Path | None, state_dir: Path | None, *, port: int = 0,
                 metrics: bool = True, log_level: str = "warning",
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 store: str | None = None) -> Broker:
    """A broker on `store` (a URL) if given, else SQLite in `state_dir`, else in memory."""
    args = ["--log-level", log_level, "serve", "--listen", f"127.0.0.1:{port}"]
    if policy is not None:
        args += ["--policy", str(policy)]
    if store is not None:
        args += ["--store", store]
    else:
        args += ["--state-dir", str(state_dir)] if state_dir else ["--memory-store"]
    if metrics:
        args += ["--metrics-listen", "127.0.0.1:0"]
    mp = spawn_cli("broker", args + (extra or []), env)
    m = mp.wait_for(r"listening on [\d.]+:(\d+) policy v\d+(?: metrics on :(\d+))?")
    return Broker(mp, int(m.group(1)), int(m.group(2)) if m.group(2) else None)


@dataclass
class AgentProcess:
    process: ManagedProcess
    socket: Path
    stream_socket: Path
    metrics_port: int | None


def start_agent(broker_address: str, host_id: str, socket_dir: Path | None = None, *,
                metrics: bool = True, log_level: str = "warning",
                extra: list[str] | None = None, env: dict[str, str] | None = None
                ) -> AgentProcess:
    return start_agents(broker_address, [host_id], socket_dir, metrics=metrics,
                        log_level=log_level, extra=extra, env=env)[0]


def start_agents(broker_address: str, host_ids: list[str], socket_dir: Path | None = None, *,
                 metrics: bool = True, log_level: str = "warning",
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 timeout: float = 20.0) -> list[AgentProcess]:
    """One agent per host id, all started before any is waited for (fifty agents start in
    the time of a few). `timeout` bounds the wait for each one's ready line."""
    d = socket_dir or Path(tempfile.mkdtemp(prefix="hb-agent-"))
    started = []
    for host_id in host_ids:
        sock, stream = d / f"{host_id}.sock", d / f"{host_id}-stream.sock"
        args = ["--log-level", log_level, "agent", "--broker", broker_address, "--host-id",
                host_id, "--socket", str(sock), "--stream-socket", str(stream)]
        if metrics:
            args += ["--metrics-listen", "127.0.0.1:0"]
        started.append((spawn_cli(f"agent-{host_id}", args + (extra or []), env), sock, stream))
    agents = []
    try:
        for mp, sock, stream in started:
            m = mp.wait_for(r"ready: .*?(?:metrics on :(\d+))?$", timeout)
            agents.append(AgentProcess(mp, sock, stream, int(m.group(1)) if m.group(1) else None))
    except BaseException:
        for mp, _, _ in started:
            mp.stop()
        raise
    return agents


@dataclass
class RedisServer:
    """A redis-server of the tests' own: a free port, its own directory, AOF on (so a restart
    keeps what was written, as the production set-up in docs/operations.md does)."""

    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    appendfsync: str = "always"  # "everysec": what docs/operations.md recommends for speed
    password: str | None = None  # requirepass
    tls: tuple[Path, Path, Path] | None = None  # certificate, key, CA: serve TLS only

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (scripts/system_deps.sh "
                                    "installs it; it needs root and apt-get)")
        self.directory.mkdir(parents=True, exist_ok=True)
        chosen = bool(self.port)
        for _attempt in range(5):
            if not chosen:
                self.port = free_port()  # another process may take it first: then try again
            try:
                return self._start(binary)
            except RuntimeError:
                if chosen or "in use" not in self._log():
                    raise
        raise RuntimeError(f"redis-server found no free port:\n{self._log()}")

    def _log(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _start(self, binary: str) -> RedisServer:
        extra = ["--requirepass", self.password] if self.password else []
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                     "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(
            [binary, *ports, *extra, "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--appendonly", "yes", "--appendfsync", self.appendfsync,
             "--save", "", "--daemonize", "no", "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n"
                                   f"{self._log()}")
            if self.tls is not None:
                if "Ready to accept connections" in self._log():
                    return self
            else:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                            return self
                except OSError:
                    pass
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on :{self.port} did not answer PING within 30 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HAPROXY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "hyperbroker.cfg"


@dataclass
class LoadBalancer:
    """HAProxy with the shipped configuration (deploy/haproxy/hyperbroker.cfg) in front of three
    brokers, on a free port."""

    brokers: list[str]
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LoadBalancer:
        binary = shutil.which("haproxy")
        if binary is None:
            raise FileNotFoundError("haproxy is not installed (scripts/system_deps.sh installs "
                                    "it; it needs root and apt-get)")
        if len(self.brokers) != 3:
            raise ValueError("the shipped HAProxy configuration names three brokers")
        self.port = self.port or free_port()
        env = dict(os.environ, HB_LISTEN=self.address,
                   **{f"HB_BROKER_{i + 1}": b for i, b in enumerate(self.brokers)})
        check = subprocess.run([binary, "-c", "-q", "-f", str(HAPROXY_CONFIG)], env=env,
                               capture_output=True, text=True, check=False)
        if check.returncode:
            raise RuntimeError(f"haproxy refused {HAPROXY_CONFIG}:\n{check.stderr}")
        log = tempfile.TemporaryFile()  # noqa: SIM115 - haproxy writes it while it runs
        self.process = subprocess.Popen([binary, "-db", "-f", str(HAPROXY_CONFIG)], env=env,
                                        stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n"
                                   + log.read().decode(errors="replace")[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"haproxy on :{self.port} did not accept within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "hyperbroker-rules.yaml"


@dataclass
class PrometheusServer:
    """The distribution's Prometheus (scripts/system_deps.sh installs it) on a free port, in its
    own directory, scraping `jobs` (job name -> HOST:PORT targets) every `interval` and evaluating
    the shipped rules (deploy/prometheus/hyperbroker-rules.yaml) as often."""

    directory: Path
    jobs: dict[str, list[str]]
    interval: str = "1s"
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    _log_file: BinaryIO | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (scripts/system_deps.sh "
                                    "installs it; it needs root and apt-get)")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval,
                       "scrape_timeout": self.interval},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                               for job, targets in self.jobs.items()],
        }
        (self.directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.port = self.port or free_port()
        self._log_file = log = (self.directory / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n"
                                   + self.log())
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus on :{self.port} not ready within {timeout} s:\n"
                           + self.log())

    def log(self) -> str:
        try:
            return (self.directory / "prometheus.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def query(self, expr: str) -> list[dict[str, object]]:
        """The instant vector `expr` evaluates to now (HTTP API /api/v1/query); an error of
        Prometheus's (a bad expression) raises."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=30) as r:
            reply = json.loads(r.read())
        if reply.get("status") != "success":
            raise ValueError(f"{expr}: {reply.get('error')}")
        result = reply["data"]["result"]
        return result if isinstance(result, list) else [result]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
