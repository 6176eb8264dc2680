"""What the bed needs from this machine: its cache, the host packages, the arm64 kernel.

The host packages (QEMU, an aarch64 cross compiler and its C library, make) are installed with
apt-get when missing. The L1 kernel is Debian's cloud-flavoured arm64 kernel (6.4 or later, for
KVM's SMCCC filter), fetched through a private apt configuration into the bed's git-ignored
cache and reused from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]  # tools/hyperbroker_tools/kvm_bed/host.py
VMM_DIR = REPO_ROOT / "vmm" / "arm64"
VMM_BUILD_DIR = VMM_DIR / "build"

# The host packages the bed needs (Debian names), each with how to tell it is there.
# (The initramfs is written by this module, so the cpio tool is not needed.)
HOST_PACKAGES: Mapping[str, Callable[[], bool]] = {
    "qemu-system-arm": lambda: shutil.which("qemu-system-aarch64") is not None,
    "gcc-aarch64-linux-gnu": lambda: shutil.which("aarch64-linux-gnu-gcc") is not None,
    "libc6-dev-arm64-cross": lambda: Path("/usr/aarch64-linux-gnu/lib/libc.a").exists(),
    "make": lambda: shutil.which("make") is not None,
}

# The L1 kernel: Debian's cloud flavour, 6.4+ for KVM's SMCCC filter (KVM_ARM_VM_SMCCC_FILTER,
# Documentation/virt/kvm/devices/vm.rst, merged in 6.4).
KERNEL_METAPACKAGE = "linux-image-cloud-arm64"
# Used when the metapackage cannot be resolved; HYPERBROKER_KVM_BED_KERNEL pins another.
KERNEL_FALLBACK_PACKAGE = "linux-image-6.12.95+deb12-cloud-arm64-unsigned"
QEMU = "qemu-system-aarch64"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARM64_IMAGE_MAGIC = b"ARM\x64"  # arm64 booting.rst: the Image header's magic at offset 56


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


def run_checked(cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
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
            run_checked(install, env=env)
        except BedError:
            run_checked(["apt-get", "update", "-q"], env=env)
            try:
                run_checked(install, env=env)
            except BedError as e:
                raise BedUnavailable(f"cannot install {missing}: {e}") from e
    try:
        run_checked([QEMU, "--version"], timeout=30)
    except (BedError, OSError) as e:
        raise BedUnavailable(f"{QEMU} does not run here: {e}") from e




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
        out = run_checked(["apt-cache", "depends", KERNEL_METAPACKAGE], env=env, timeout=60)
    except BedError:
        return KERNEL_FALLBACK_PACKAGE
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            # The -unsigned twin holds the plain Image (no EFI signature): prefer it.
            for name in (f"{dep}-unsigned", dep):
                with contextlib.suppress(BedError):
                    run_checked(["apt-cache", "show", name], env=env, timeout=60)
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
    run_checked(["apt-get", "-q", "update"], env=env, timeout=300)
    package = _resolve_kernel_package(env)
    debs = kdir / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir()
    _log(f"downloading {package}")
    run_checked(["apt-get", "-q", "download", package], env=env, cwd=debs, timeout=600)
    deb = next(debs.glob("*.deb"), None)
    if deb is None:
        raise BedError(f"apt-get download {package} left no .deb")
    version = run_checked(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    image = kdir / "Image"
    _extract_image(deb, image)
    shutil.rmtree(debs, ignore_errors=True)
    meta.write_text(json.dumps({"image": image.name, "package": package, "version": version}))
    return Kernel(image, package, version)
