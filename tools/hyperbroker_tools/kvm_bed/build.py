"""The bed's artifacts: the static VMM and guest programs of vmm/arm64, the initramfs, plans.

A plan is a list of text steps the VMM (vmm/arm64/src/main.c) runs in order: run a guest program
under a profile, install filter records, ping the agent link.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import os
from collections.abc import Iterable
from pathlib import Path

from hyperbroker.kvm import SmcccFilter
from hyperbroker_tools.kvm_bed.host import (
    VMM_BUILD_DIR,
    VMM_DIR,
    Kernel,
    cache_dir,
    ensure_host_packages,
    fetch_kernel,
    run_checked,
)


def build_vmm() -> Path:
    """`make` in vmm/arm64: the static VMM and every guest program; returns the build dir."""
    run_checked(["make", "-s", "-C", str(VMM_DIR), f"-j{os.cpu_count() or 1}"], timeout=600)
    return VMM_BUILD_DIR


def guest_programs() -> list[str]:
    """Every guest program: one source file each in vmm/arm64/guests (NAME.c or NAME.S)."""
    sources = (VMM_DIR / "guests").iterdir()
    return sorted(p.stem for p in sources if p.suffix in (".c", ".S") and p.is_file())


def newc_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
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
        newc_entry(name, mode, data, rdev, ino)
        for ino, (name, mode, data, rdev) in enumerate(entries, start=1)
    ) + newc_entry("TRAILER!!!", 0)
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
