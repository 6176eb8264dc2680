"""The real arm64 KVM test bed: QEMU, an L1 Linux, the reference VMM, real broker and agent.

An x86-64 host runs qemu-system-aarch64 (TCG) with EL2; the L1 arm64 Linux boots with KVM and
runs vmm/arm64's static VMM as /init; the VMM runs small L2 guest programs whose SMCCC calls
travel through the real KVM SMCCC filter, over a virtio-serial link, to an agent on the host
(reference/arm64-kvm-lab.md). This module installs what the bed needs, fetches the arm64 kernel
into a git-ignored cache through a private apt configuration, builds VMM, guests and initramfs,
starts broker and agent processes, boots QEMU with a plan, parses the VMM's console records,
and always kills every process it started by its PID. It must not know what any handler
answers: checks live in tests/kvm_bed, and the VMM's record format in vmm/arm64/src/log.h.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import gzip
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

from hyperbroker.kvm import SmcccFilter
from hyperbroker.testing import procs

REPO_ROOT = Path(__file__).resolve().parents[2]
VMM_DIR = REPO_ROOT / "vmm" / "arm64"
VMM_BUILD_DIR = VMM_DIR / "build"

# Host packages of reference/arm64-kvm-lab.md "Packages", each with how to tell it is there.
# (The initramfs is written by this module, so the cpio tool is not needed.)
HOST_PACKAGES: Mapping[str, Callable[[], bool]] = {
    "qemu-system-arm": lambda: shutil.which("qemu-system-aarch64") is not None,
    "gcc-aarch64-linux-gnu": lambda: shutil.which("aarch64-linux-gnu-gcc") is not None,
    "libc6-dev-arm64-cross": lambda: Path("/usr/aarch64-linux-gnu/lib/libc.a").exists(),
    "make": lambda: shutil.which("make") is not None,
}

# The guest kernel: Debian's cloud flavour, 6.4+ for the SMCCC filter (arm64-kvm-lab.md).
KERNEL_METAPACKAGE = "linux-image-cloud-arm64"
# Used when the metapackage cannot be resolved; HYPERBROKER_KVM_BED_KERNEL pins another.
KERNEL_FALLBACK_PACKAGE = "linux-image-6.12.95+deb12-cloud-arm64-unsigned"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARM64_IMAGE_MAGIC = b"ARM\x64"  # arm64 booting.rst: the Image header's magic at offset 56

# QEMU for the bed (arm64-kvm-lab.md "QEMU"): EL2 for KVM, the fast pointer-auth algorithm,
# no NIC (its option ROM is not installed), the agent link on a virtio-serial port.
QEMU = "qemu-system-aarch64"
QEMU_MACHINE = ["-M", "virt,virtualization=on,gic-version=3", "-cpu", "max,pauth-impdef=on"]
AGENT_PORT_NAME = "agent"  # vmm/arm64/src/main.c looks the port up by this name
KERNEL_ARGS = "console=ttyAMA0 rdinit=/init panic=-1 quiet loglevel=1"
PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h

HB_RECORD = re.compile(r"^HB (?:g\[(?P<guest>[^\]]*)\] )?(?P<rest>.*)$")
KEY_VALUE = re.compile(r'(\w+)=("([^"]*)"|\S*)')


class BedUnavailable(Exception):
    """QEMU cannot run on this machine at all (tests skip with this reason)."""


class BedError(Exception):
    """The bed could not be built or booted, or a process misbehaved (tests fail)."""


def _log(message: str) -> None:
    print(f"[kvm-bed] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The bed's cache: .cache/kvm-bed in the repository, or $HYPERBROKER_KVM_BED_CACHE."""
    override = os.environ.get("HYPERBROKER_KVM_BED_CACHE")
    return Path(override) if override else REPO_ROOT / ".cache" / "kvm-bed"


def _run(cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
         cwd: Path | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(
        list(cmd), env=None if env is None else dict(env), cwd=cwd, capture_output=True,
        text=True, timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        raise BedError(
            f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"
        )
    return proc.stdout


# --------------------------------------------------------------------------- host packages


def ensure_host_packages() -> None:
    """Installs the missing host packages with apt-get (we are root); BedUnavailable if not."""
    missing = [name for name, present in HOST_PACKAGES.items() if not present()]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BedUnavailable(
                f"host packages {missing} are missing and cannot be installed here "
                "(needs root and apt-get)"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        _log(f"installing {' '.join(missing)}")
        try:
            _run(install, env=env)
        except BedError:
            _run(["apt-get", "update", "-q"], env=env)
            try:
                _run(install, env=env)
            except BedError as e:
                raise BedUnavailable(f"cannot install {missing}: {e}") from e
    try:
        _run([QEMU, "--version"], timeout=30)
    except (BedError, OSError) as e:
        raise BedUnavailable(f"{QEMU} does not run here: {e}") from e


# --------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True, slots=True)
class Kernel:
    image: Path
    package: str
    version: str


def _os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key] = value.strip().strip('"')
    return out


def _system_mirror(codename: str) -> str | None:
    """The URI the system's own apt sources use for Debian `codename` (deb822 or one-line)."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        with contextlib.suppress(OSError):
            for stanza in path.read_text().split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line.startswith(("#", " ")):
                        fields[key.strip().lower()] = value.strip()
                suites = fields.get("suites", "").split()
                if "deb" in fields.get("types", "").split() and codename in suites:
                    uri = fields.get("uris", "").split()
                    if uri:
                        return uri[0]
    lists = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == codename:
                    return words[1]
    return None


def _kernel_suite(codename: str) -> str:
    # bookworm's own kernel is 6.1, older than the SMCCC filter (6.4): take its backports.
    return f"{codename}-backports" if codename == "bookworm" else codename


def _apt_env(cache: Path) -> dict[str, str]:
    """A private APT_CONFIG under `cache`: the system's apt sources and state stay untouched."""
    release = _os_release()
    codename = release.get("VERSION_CODENAME", "bookworm")
    mirror = os.environ.get("HYPERBROKER_KVM_BED_MIRROR") or _system_mirror(codename)
    if not mirror:
        raise BedError(
            f"no Debian mirror for {codename} in the system's apt sources; "
            "set HYPERBROKER_KVM_BED_MIRROR"
        )
    apt = cache / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "etc/sources.list.d",
                "etc/preferences.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    signed = f"[arch=arm64 signed-by={DEBIAN_KEYRING}] " if DEBIAN_KEYRING.exists() else ""
    (apt / "etc" / "sources.list").write_text(
        f"deb {signed}{mirror} {_kernel_suite(codename)} main\n"
    )
    conf = apt / "apt.conf"
    conf.write_text(
        "".join(
            f'{key} "{value}";\n'
            for key, value in (
                ("Dir::Etc::sourcelist", apt / "etc" / "sources.list"),
                ("Dir::Etc::sourceparts", apt / "etc" / "sources.list.d"),
                ("Dir::Etc::preferences", apt / "etc" / "preferences"),
                ("Dir::Etc::preferencesparts", apt / "etc" / "preferences.d"),
                ("Dir::State::Lists", apt / "lists"),
                ("Dir::State::status", apt / "status"),
                ("Dir::Cache", apt / "cache"),
                ("APT::Architecture", "arm64"),
                ("APT::Sandbox::User", "root"),
                ("Acquire::Languages", "none"),
            )
        )
        + 'APT::Architectures { "arm64"; };\n'
    )
    return {**os.environ, "APT_CONFIG": str(conf)}


def _resolve_kernel_package(env: Mapping[str, str]) -> str:
    """The plain-Image package behind the cloud metapackage, or the pinned fallback."""
    pinned = os.environ.get("HYPERBROKER_KVM_BED_KERNEL")
    if pinned:
        return pinned
    try:
        out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE], env=env, timeout=60)
    except BedError:
        return KERNEL_FALLBACK_PACKAGE
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            # The -unsigned twin holds the plain Image (no EFI signature): prefer it.
            for name in (f"{dep}-unsigned", dep):
                with contextlib.suppress(BedError):
                    _run(["apt-cache", "show", name], env=env, timeout=60)
                    return name
    return KERNEL_FALLBACK_PACKAGE


def _extract_image(deb: Path, image: Path) -> None:
    """Copies boot/vmlinuz-* out of the .deb without unpacking the modules."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if re.fullmatch(r"(\./)?boot/vmlinuz-.*", member.name) and member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None
                    tmp = image.with_suffix(".tmp")
                    with open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    tmp.replace(image)
                    break
        # Drain the rest, so dpkg-deb ends normally instead of on a broken pipe.
        while proc.stdout.read(1 << 20):
            pass
    if not image.exists():
        raise BedError(f"{deb.name} has no boot/vmlinuz-*")
    with open(image, "rb") as f:
        header = f.read(64)
    if header[56:60] != ARM64_IMAGE_MAGIC:
        raise BedError(f"{image} is not a plain arm64 Image (no ARM\\x64 magic)")


def fetch_kernel(cache: Path | None = None) -> Kernel:
    """The arm64 kernel Image, from the cache or fetched with apt-get download into it."""
    cache = cache or cache_dir()
    kdir = cache / "kernel"
    meta = kdir / "kernel.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        kernel = Kernel(kdir / info["image"], info["package"], info["version"])
        if kernel.image.exists():
            return kernel
    kdir.mkdir(parents=True, exist_ok=True)
    env = _apt_env(cache)
    _log("updating the private arm64 package index")
    _run(["apt-get", "-q", "update"], env=env, timeout=300)
    package = _resolve_kernel_package(env)
    debs = kdir / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir()
    _log(f"downloading {package}")
    _run(["apt-get", "-q", "download", package], env=env, cwd=debs, timeout=600)
    deb = next(debs.glob("*.deb"), None)
    if deb is None:
        raise BedError(f"apt-get download {package} left no .deb")
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    image = kdir / "Image"
    _extract_image(deb, image)
    shutil.rmtree(debs, ignore_errors=True)
    meta.write_text(json.dumps({"image": image.name, "package": package, "version": version}))
    return Kernel(image, package, version)


# --------------------------------------------------------------------------- build


def build_vmm() -> Path:
    """`make` in vmm/arm64: the static VMM and every guest program; returns the build dir."""
    _run(["make", "-s", "-C", str(VMM_DIR), f"-j{os.cpu_count() or 1}"], timeout=600)
    return VMM_BUILD_DIR


def guest_programs() -> list[str]:
    """Every guest program: one source file each in vmm/arm64/guests (NAME.c or NAME.S)."""
    sources = (VMM_DIR / "guests").iterdir()
    return sorted(p.stem for p in sources if p.suffix in (".c", ".S") and p.is_file())


def _newc_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
                ino: int = 0) -> bytes:
    """One record of the kernel's initramfs format (newc cpio, buffer-format.rst)."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, rdev[0],
              rdev[1], len(encoded), 0)
    head = b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + encoded
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build_initramfs(build: Path, out: Path, guests: Iterable[str] | None = None) -> Path:
    """/init (the VMM), /dev/console (char 5:1, so /init has a console), /guests/NAME.bin for
    each of `guests` (default: every guest program)."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        ("dev", 0o040755, b"", (0, 0)),
        ("dev/console", 0o020600, b"", (5, 1)),
        ("proc", 0o040555, b"", (0, 0)),
        ("sys", 0o040555, b"", (0, 0)),
        ("guests", 0o040755, b"", (0, 0)),
        ("init", 0o100755, (build / "hb-vmm").read_bytes(), (0, 0)),
    ]
    for name in guest_programs() if guests is None else guests:
        entries.append(
            (f"guests/{name}.bin", 0o100644, (build / "guests" / f"{name}.bin").read_bytes(),
             (0, 0))
        )
    blob = b"".join(
        _newc_entry(name, mode, data, rdev, ino)
        for ino, (name, mode, data, rdev) in enumerate(entries, start=1)
    ) + _newc_entry("TRAILER!!!", 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(blob, compresslevel=6, mtime=0))
    tmp.replace(out)
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class Artifacts:
    kernel: Kernel
    initramfs: Path
    guests: tuple[str, ...]


def prepare(cache: Path | None = None) -> Artifacts:
    """Everything a boot needs: packages, kernel, VMM, guests, initramfs.

    Serialised by a lock file in the cache, so two test runs on one machine never fetch,
    build or write the initramfs at the same time.
    """
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_host_packages()
        kernel = fetch_kernel(cache)
        build = build_vmm()
        initramfs = build_initramfs(build, cache / "initramfs.cpio.gz")
        return Artifacts(kernel, initramfs, tuple(guest_programs()))


# --------------------------------------------------------------------------- plans


def run_step(guest: str, *, profile: str = "default", args: Iterable[int] = (),
             vcpus: int = 1, timeout_ms: int | None = None,
             call_timeout_ms: int | None = None) -> str:
    """Run guest program `guest` registered with the agent under `profile`."""
    items = [f"guest={guest}", f"profile={profile}", f"vcpus={vcpus}"]
    items += [f"arg={a:#x}" for a in args]
    if timeout_ms is not None:
        items.append(f"timeout={timeout_ms}")
    if call_timeout_ms is not None:
        items.append(f"call_timeout={call_timeout_ms}")
    return "run:" + ",".join(items)


def local_step(guest: str, forward: Iterable[tuple[int, int]], *,
               args: Iterable[int] = ()) -> str:
    """Run `guest` with no agent: the VMM forwards `forward` (base, count) to itself."""
    items = [f"guest={guest}", "local"]
    items += [f"fwd={base:#x}+{count:#x}" for base, count in forward]
    items += [f"arg={a:#x}" for a in args]
    return "run:" + ",".join(items)


@dataclasses.dataclass(frozen=True, slots=True)
class RanBefore:
    """A marker in a filter-record list: the VM's vCPU runs once here (the filter freezes)."""


def filters_step(records: Iterable[SmcccFilter | RanBefore]) -> str:
    """Install raw filter records on a fresh VM against real KVM, in order."""
    items: list[str] = []
    for r in records:
        if isinstance(r, RanBefore):
            items.append("ran")
            continue
        text = f"{r.base:#x}+{r.nr_functions:#x}={r.action}"
        text += "".join(f"/p{i}={b}" for i, b in enumerate(r.pad) if b)
        items.append(text)
    return "filters:" + ",".join(items)


def ping_step(n: int) -> str:
    return f"ping:n={n}"


# --------------------------------------------------------------------------- console records


def _fields(text: str) -> dict[str, str]:
    return {m.group(1): m.group(3) if m.group(3) is not None else m.group(2)
            for m in KEY_VALUE.finditer(text)}


@dataclasses.dataclass(frozen=True, slots=True)
class CallRecord:
    """One SMCCC call as the L2 guest saw it."""

    guest: str
    label: str
    fid: int
    conduit: str
    x: tuple[int, int, int, int]
    ns: int
    profile: str = ""  # the policy profile of the VM that made it ("-" when the VMM answered)


@dataclasses.dataclass(frozen=True, slots=True)
class Samples:
    """Statistics of guest-observed round trips (nanoseconds), or of link pings."""

    source: str  # the guest program, or "ping"
    vm: str  # the VM the samples came from ("" for pings)
    local: bool  # the VMM answered the calls itself (no agent)
    fid: int | None
    n: int
    min_ns: int
    median_ns: int
    p90_ns: int
    max_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class RunRecord:
    guest: str
    reason: str
    status: int
    ok: bool
    hypercalls: int
    link_failures: int
    fids: Mapping[int, int]
    run_ms: int
    profile: str = ""
    mem_reads: int = 0  # the agent's guest-memory requests the VMM served in this run
    mem_writes: int = 0
    mem_refused: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeRecord:
    """What KVM_SET_DEVICE_ATTR returned for one raw filter record (or a ran marker)."""

    index: int
    ran: bool
    errno: str


@dataclasses.dataclass
class BootResult:
    lines: list[str]
    returncode: int | None
    seconds: float
    init_seconds: float | None = None
    kvm: dict[str, str] = dataclasses.field(default_factory=dict)
    calls: list[CallRecord] = dataclasses.field(default_factory=list)
    samples: list[Samples] = dataclasses.field(default_factory=list)
    runs: list[RunRecord] = dataclasses.field(default_factory=list)
    probes: list[ProbeRecord] = dataclasses.field(default_factory=list)
    filters: list[dict[str, str]] = dataclasses.field(default_factory=list)
    registrations: list[dict[str, str]] = dataclasses.field(default_factory=list)
    refusals: list[dict[str, str]] = dataclasses.field(default_factory=list)
    actions: list[dict[str, str]] = dataclasses.field(default_factory=list)
    destroyed: list[dict[str, str]] = dataclasses.field(default_factory=list)
    vm_resets: list[dict[str, str]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    done: dict[str, str] | None = None
    current_vm: dict[str, str] = dataclasses.field(default_factory=dict)

    def call(self, guest: str, label: str, profile: str | None = None) -> CallRecord:
        """The last call `label` of `guest` (run under `profile`, if given)."""
        found = [c for c in self.calls if c.guest == guest and c.label == label
                 and profile in (None, c.profile)]
        if not found:
            raise KeyError(f"no call {label!r} from guest {guest!r} (profile {profile}); "
                           f"console:\n{self.console()}")
        return found[-1]

    def run(self, guest: str, profile: str | None = None) -> RunRecord:
        found = [r for r in self.runs if r.guest == guest and profile in (None, r.profile)]
        if not found:
            raise KeyError(f"no run of guest {guest!r} (profile {profile}); "
                           f"console:\n{self.console()}")
        return found[-1]

    def actions_of(self, guest: str, profile: str | None = None) -> list[dict[str, str]]:
        """The VMM actions carried out for `guest`'s runs, in order."""
        return [a for a in self.actions if a.get("guest") == guest
                and profile in (None, a.get("profile"))]

    def samples_of(self, source: str, *, fid: int | None = None,
                   local: bool | None = None) -> Samples:
        found = [s for s in self.samples if s.source == source
                 and (fid is None or s.fid == fid) and (local is None or s.local == local)]
        if not found:
            raise KeyError(f"no samples from {source!r} (fid {fid}, local {local}); "
                           f"console:\n{self.console()}")
        return found[-1]

    def console(self, last: int = 80) -> str:
        return "\n".join(self.lines[-last:])


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text, 0) if text is not None else default
    except ValueError:
        return default


def parse_record(result: BootResult, line: str) -> None:
    """Folds one console line (an "HB ..." record of vmm/arm64/src/log.h) into `result`."""
    m = HB_RECORD.match(line)
    if not m:
        return
    guest, rest = m.group("guest"), m.group("rest")
    kind, _, tail = rest.partition(" ")
    f = _fields(tail)
    if guest is not None:
        if kind == "call":
            x = tuple(_int(f.get(f"x{i}")) for i in range(4))
            result.calls.append(CallRecord(
                guest, f.get("label", ""), _int(f.get("fid")), f.get("conduit", "hvc"),
                (x[0], x[1], x[2], x[3]), _int(f.get("ns")), result.current_vm.get("profile", ""),
            ))
        elif kind == "samples":
            result.samples.append(Samples(
                guest, result.current_vm.get("vm", ""), result.current_vm.get("local") == "1",
                _int(f.get("fid")) if "fid" in f else None, _int(f.get("n")),
                _int(f.get("min_ns")), _int(f.get("median_ns")), _int(f.get("p90_ns")),
                _int(f.get("max_ns")),
            ))
        elif kind == "exception":
            result.problems.append(line)
        return
    if kind == "kvm":
        result.kvm = f
    elif kind == "run-end":
        fids = {}
        for item in f.get("fids", "-").split(","):
            fid, sep, count = item.partition(":")
            if sep:
                fids[_int(fid)] = _int(count)
        result.runs.append(RunRecord(
            f.get("guest", ""), f.get("reason", ""), _int(f.get("status")),
            f.get("ok") == "1", _int(f.get("hypercalls")), _int(f.get("link_failures")),
            fids, _int(f.get("run_ms")), result.current_vm.get("profile", ""),
            _int(f.get("mem_reads")), _int(f.get("mem_writes")), _int(f.get("mem_refused")),
        ))
    elif kind == "probe":
        result.probes.append(ProbeRecord(_int(f.get("index")), f.get("ran") == "1",
                                         f.get("errno", "")))
    elif kind == "run-begin":
        result.current_vm = f
    elif kind == "ping":
        result.samples.append(Samples(
            "ping", "", False, None, _int(f.get("n")), _int(f.get("min_ns")),
            _int(f.get("median_ns")), _int(f.get("p90_ns")), _int(f.get("max_ns")),
        ))
    elif kind == "filter":
        result.filters.append(f)
    elif kind == "action":
        result.actions.append({**f, "profile": result.current_vm.get("profile", "")})
    elif kind == "registered":
        result.registrations.append(f)
    elif kind == "register-refused":
        result.refusals.append(f)
    elif kind == "destroyed":
        result.destroyed.append(f)
    elif kind == "vm-reset":
        result.vm_resets.append({**f, "profile": result.current_vm.get("profile", "")})
    elif kind == "boot":
        result.init_seconds = result.seconds
    elif kind == "done":
        result.done = f
    elif kind in ("plan-error", "run-error", "probe-error", "kvm-error", "kvm-run-error",
                  "link-error", "unexpected-exit", "call-failed", "ping-error"):
        result.problems.append(line)


# --------------------------------------------------------------------------- processes


def hyperbroker_command() -> list[str]:
    """The hyperbroker CLI of this interpreter's environment (as hyperbroker.procs starts it)."""
    return [sys.executable, "-m", "hyperbroker.cli"]


def scrape(port: int) -> str:
    """The Prometheus text a metrics endpoint on 127.0.0.1:`port` serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


@dataclasses.dataclass(frozen=True, slots=True)
class MetricSample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse_metrics(text: str) -> list[MetricSample]:
    """Prometheus text exposition format: one sample per non-comment line."""
    out: list[MetricSample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        with contextlib.suppress(ValueError):
            out.append(MetricSample(m.group(1), labels, float(m.group(3))))
    return out


class Services:
    """A real broker and agent (hyperbroker.procs), for one policy, with state in `workdir`."""

    def __init__(self, policy: Path, workdir: Path, host_id: str = "kvm-bed") -> None:
        self.policy = policy
        self.workdir = workdir
        self.host_id = host_id
        self.broker: procs.Broker | None = None
        self.agent: procs.AgentProcess | None = None

    def start(self) -> Services:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.broker = procs.start_broker(self.policy, self.workdir / "state")
            self.agent = procs.start_agent(self.broker.address, self.host_id, self.workdir)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise BedError(f"broker/agent did not start: {e}") from e
        return self

    @property
    def stream_socket(self) -> Path:
        assert self.agent is not None, "start() first"
        return self.agent.stream_socket

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.process.stop()

    def stop(self) -> None:
        for managed in (self.agent, self.broker):
            if managed is not None:
                managed.process.stop()

    def broker_metrics(self) -> list[MetricSample]:
        assert self.broker is not None and self.broker.metrics_port is not None
        return parse_metrics(scrape(self.broker.metrics_port))

    def agent_metrics(self) -> list[MetricSample]:
        assert self.agent is not None and self.agent.metrics_port is not None
        return parse_metrics(scrape(self.agent.metrics_port))

    def logs(self) -> str:
        return "\n".join(
            f"--- {m.process.name}\n" + "\n".join(m.process.lines[-40:])
            for m in (self.broker, self.agent) if m is not None
        )

    def __enter__(self) -> Services:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- boot


def plan_initrd(artifacts: Artifacts, plan: Sequence[str], out: Path) -> Path:
    """The bed's initramfs with /plan (one step a line) appended as a second archive.

    The kernel unpacks concatenated (compressed) cpio archives in order (buffer-format.rst), so
    a boot's plan costs one small archive, and no plan is bound by the command line's size.
    """
    if any("\n" in step for step in plan):
        raise BedError("a plan step cannot hold a newline")
    extra = gzip.compress(
        _newc_entry("plan", 0o100644, "".join(f"{step}\n" for step in plan).encode(), ino=1)
        + _newc_entry("TRAILER!!!", 0),
        mtime=0,
    )
    out.write_bytes(artifacts.initramfs.read_bytes() + extra)
    return out


def qemu_command(artifacts: Artifacts, initrd: Path, agent_socket: Path | None) -> list[str]:
    cmd = [
        QEMU, *QEMU_MACHINE, "-smp", "1", "-m", "512", "-display", "none", "-monitor", "none",
        "-serial", "stdio", "-no-reboot", "-nic", "none",
        "-kernel", str(artifacts.kernel.image), "-initrd", str(initrd),
        "-append", KERNEL_ARGS,
    ]
    if agent_socket is not None:
        cmd += [
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={agent_socket},server=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]
    return cmd


def _die_with_parent() -> None:
    """In the QEMU child: SIGKILL it if the harness dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").rstrip("\r\n"))
    lines.put(None)


def boot(artifacts: Artifacts, plan: Sequence[str], *, agent_socket: Path | None = None,
         timeout: float = 90, on_wait: Callable[[str], None] | None = None,
         on_line: Callable[[str], None] | None = None) -> BootResult:
    """Boots the L1 Linux, runs `plan` in the VMM, returns the parsed console.

    `on_wait(token)` is called when a guest waits for the host (hb_wait); the guest resumes
    when it returns. QEMU is killed by its PID however this ends.
    """
    result = BootResult([], None, 0.0)
    with tempfile.TemporaryDirectory(prefix="hb-bed-") as tmp:
        initrd = plan_initrd(artifacts, plan, Path(tmp) / "initrd.cpio.gz")
        return _boot(artifacts, initrd, agent_socket, timeout, on_wait, on_line, result)


def _boot(artifacts: Artifacts, initrd: Path, agent_socket: Path | None, timeout: float,
          on_wait: Callable[[str], None] | None, on_line: Callable[[str], None] | None,
          result: BootResult) -> BootResult:
    started = time.monotonic()
    proc = subprocess.Popen(
        qemu_command(artifacts, initrd, agent_socket), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None and proc.stdin is not None
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BedError(f"the bed did not finish in {timeout:.0f} s\n{result.console()}")
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            result.seconds = time.monotonic() - started
            result.lines.append(line)
            parse_record(result, line)
            if on_line is not None:
                on_line(line)
            m = HB_RECORD.match(line)
            if m and m.group("rest").startswith("wait "):
                token = _fields(m.group("rest")).get("token", "")
                if on_wait is not None:
                    on_wait(token)
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
        result.returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        reader.join(timeout=5)
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- latency

# The calls the latency figures time (DEN0098 IDs, reference/kvm-smccc.md §5.2): RND64 is
# answered by the broker's handler; VERSION has a static answer the agent serves itself.
TRNG_VERSION = 0x8400_0050
TRNG_RND64 = 0xC400_0053


def latency_plan(n: int = 1000) -> list[str]:
    """Steps timing `n` calls each way, and `n` link pings (needs TRNG forwarded to the broker)."""
    return [
        run_step("latency", args=[TRNG_RND64, n, 64]),
        run_step("latency", args=[TRNG_VERSION, n]),
        local_step("latency", [(TRNG_RND64, 1)], args=[TRNG_RND64, n, 64]),
        ping_step(n),
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class LatencyFigures:
    broker: Samples  # guest HVC -> VMM -> agent -> broker handler -> back
    agent_static: Samples  # guest HVC -> VMM -> agent's static answer -> back
    local: Samples  # guest HVC -> VMM answers in L1 -> back
    link: Samples  # VMM -> agent -> VMM, HB_MSG_PING, no guest

    def as_json(self) -> dict[str, dict[str, int]]:
        return {name: {k: v for k, v in dataclasses.asdict(getattr(self, name)).items()
                       if k.endswith("_ns") or k == "n"}
                for name in ("broker", "agent_static", "local", "link")}


def latency_figures(result: BootResult) -> LatencyFigures:
    return LatencyFigures(
        broker=result.samples_of("latency", fid=TRNG_RND64, local=False),
        agent_static=result.samples_of("latency", fid=TRNG_VERSION, local=False),
        local=result.samples_of("latency", fid=TRNG_RND64, local=True),
        link=result.samples_of("ping"),
    )


def latency_markdown(fig: LatencyFigures, kernel: Kernel) -> str:
    """The table docs/performance.md carries, from one bed run."""
    def row(what: str, s: Samples) -> str:
        return (f"| {what} | {s.n} | {s.median_ns / 1000:.0f} | {s.p90_ns / 1000:.0f} | "
                f"{s.min_ns / 1000:.0f} |")

    return "\n".join([
        f"Measured on the bed (QEMU TCG, L1 kernel {kernel.package} {kernel.version}, one vCPU),"
        " guest-observed with the virtual counter around each HVC:",
        "",
        "| round trip | calls | median µs | p90 µs | min µs |",
        "| --- | ---: | ---: | ---: | ---: |",
        row("forwarded, answered by the broker (TRNG_RND64)", fig.broker),
        row("forwarded, static answer from the agent (TRNG_VERSION)", fig.agent_static),
        row("answered by the VMM in L1, no agent (TRNG_RND64)", fig.local),
        row("VMM <-> agent link alone (HB_MSG_PING, no guest)", fig.link),
        "",
    ])


# --------------------------------------------------------------------------- demo


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
