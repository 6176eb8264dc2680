"""The bed's harness without QEMU: console records, plans, initramfs, metrics text."""

from __future__ import annotations

import gzip
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from hyperbroker.kvm import SmcccFilter
from hyperbroker_tools import kvm_bed

u64 = st.integers(0, (1 << 64) - 1)
label = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"='),
                min_size=1, max_size=20)
guest = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)


@given(guest, label, st.integers(0, 0xFFFF_FFFF), st.tuples(u64, u64, u64, u64),
       st.integers(0, 10**12), st.sampled_from(["hvc", "smc"]))
def test_a_guest_call_line_parses_back_to_what_the_guest_saw(
    g: str, lab: str, fid: int, x: tuple[int, int, int, int], ns: int, conduit: str,
) -> None:
    # The line as guests/rt/hb_guest.c hb_report() builds it and src/vm.c prefixes it.
    line = (f"HB g[{g}] call label={lab} fid={fid:#x} conduit={conduit} x0={x[0]:#x} "
            f"x1={x[1]:#x} x2={x[2]:#x} x3={x[3]:#x} ns={ns}")
    result = kvm_bed.BootResult([], None, 0.0)
    kvm_bed.parse_record(result, line)
    assert result.calls == [kvm_bed.CallRecord(g, lab, fid, conduit, x, ns)]


@given(st.dictionaries(st.integers(0, 0xFFFF_FFFF), st.integers(1, 10**6), max_size=8))
def test_a_run_end_record_carries_the_exits_per_function(fids: dict[int, int]) -> None:
    text = ",".join(f"{fid:#010x}:{n}" for fid, n in fids.items()) or "-"
    result = kvm_bed.BootResult([], None, 0.0)
    kvm_bed.parse_record(result, f"HB run-end guest=g vm=bed-g-1 reason=exit status=0 ok=1 "
                                 f"run_ms=3 hypercalls={sum(fids.values())} mmio=1 "
                                 f"link_failures=0 fids={text} mem_reads=0")
    assert result.runs[0].fids == fids and result.runs[0].ok


def test_samples_are_attributed_to_the_run_that_made_them() -> None:
    result = kvm_bed.BootResult([], None, 0.0)
    for line in (
        "HB run-begin guest=latency vm=bed-latency-4 vcpus=1 local=1 setup_us=1",
        "HB g[latency] samples fid=0xc4000053 n=1000 min_ns=1 p10_ns=2 median_ns=3 p90_ns=4 "
        "p99_ns=5 max_ns=6 mean_ns=3 counter_hz=62500000",
        "HB ping n=10 min_ns=7 median_ns=8 p90_ns=9 max_ns=10",
    ):
        kvm_bed.parse_record(result, line)
    s = result.samples_of("latency", fid=0xC400_0053, local=True)
    assert (s.vm, s.n, s.median_ns, s.max_ns) == ("bed-latency-4", 1000, 3, 6)
    assert result.samples_of("ping").median_ns == 8


def test_lines_that_are_not_records_are_ignored() -> None:
    result = kvm_bed.BootResult([], None, 0.0)
    for line in ("[    6.85] reboot: Power down", "HBX nothing", ""):
        kvm_bed.parse_record(result, line)
    assert result == kvm_bed.BootResult([], None, 0.0)


def test_a_filter_plan_spells_each_record_as_the_vmm_reads_it() -> None:
    pad = bytearray(15)
    pad[3] = 7
    step = kvm_bed.filters_step([
        SmcccFilter(0x8400_0060, 0xA0, 2), kvm_bed.RanBefore(),
        SmcccFilter(0x8500_0000, 1, 3, bytes(pad)),
    ])
    # vmm/arm64/src/main.c parse_record: BASE+NR=ACTION[/pI=V]..., or "ran".
    assert step == "filters:0x84000060+0xa0=2,ran,0x85000000+0x1=3/p3=7"


def test_run_steps_name_guest_profile_and_arguments() -> None:
    assert kvm_bed.run_step("calls", args=[0x8600_0100, 0]) == (
        "run:guest=calls,profile=default,vcpus=1,arg=0x86000100,arg=0x0")
    assert kvm_bed.local_step("latency", [(0xC400_0053, 1)], args=[5]) == (
        "run:guest=latency,local,fwd=0xc4000053+0x1,arg=0x5")


def _read_newc(blob: bytes) -> dict[str, tuple[int, int, int, bytes]]:
    """name -> (mode, rdevmajor, rdevminor, data), checking 4-byte alignment on the way."""
    out: dict[str, tuple[int, int, int, bytes]] = {}
    offset = 0
    while True:
        assert offset % 4 == 0 and blob[offset:offset + 6] == b"070701"
        fields = [int(blob[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_at = offset + 110
        name = blob[name_at:name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        data = blob[data_at:data_at + filesize]
        offset = data_at + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (fields[1], fields[9], fields[10], data)


def test_the_initramfs_holds_init_a_console_node_and_every_guest(tmp_path: Path) -> None:
    build = tmp_path / "build"
    (build / "guests").mkdir(parents=True)
    (build / "hb-vmm").write_bytes(b"\x7fELF vmm")
    (build / "guests" / "one.bin").write_bytes(b"abc")
    (build / "guests" / "two.bin").write_bytes(b"")
    archive = kvm_bed.build_initramfs(build, tmp_path / "initramfs.cpio.gz", ["one", "two"])
    entries = _read_newc(gzip.decompress(archive.read_bytes()))
    assert entries["init"] == (0o100755, 0, 0, b"\x7fELF vmm")
    assert entries["dev/console"][:3] == (0o020600, 5, 1)  # char 5:1, /init's console
    assert entries["guests/one.bin"][3] == b"abc" and entries["guests/two.bin"][3] == b""
    assert {"dev", "proc", "sys", "guests"} <= set(entries)


def test_prometheus_text_parses_into_samples() -> None:
    text = (
        "# HELP x_total calls\n# TYPE x_total counter\n"
        'x_total{function="TRNG_RND64",handler="trng"} 3.0\n'
        "y_seconds_sum 0.5\n"
        'z{a="q\\"uote"} NaN\n'
    )
    samples = kvm_bed.parse_metrics(text)
    assert samples[0] == kvm_bed.MetricSample(
        "x_total", {"function": "TRNG_RND64", "handler": "trng"}, 3.0)
    assert samples[1] == kvm_bed.MetricSample("y_seconds_sum", {}, 0.5)
    assert len(samples) == 3


def test_every_guest_source_file_is_a_guest_program() -> None:
    names = kvm_bed.guest_programs()
    assert {"trng", "calls", "fallback", "latency", "smp", "reset", "demo"} <= set(names)
    assert "rt" not in names  # the runtime folder is not a program


def test_a_boots_plan_travels_as_a_second_archive_after_the_initramfs(tmp_path: Path) -> None:
    build = tmp_path / "build"
    (build / "guests").mkdir(parents=True)
    (build / "hb-vmm").write_bytes(b"vmm")
    base = kvm_bed.build_initramfs(build, tmp_path / "initramfs.cpio.gz", [])
    kernel = kvm_bed.Kernel(tmp_path / "Image", "pkg", "1")
    artifacts = kvm_bed.Artifacts(kernel, base, ())
    plan = [kvm_bed.run_step("trng"), kvm_bed.ping_step(3)]
    initrd = kvm_bed.plan_initrd(artifacts, plan, tmp_path / "initrd.cpio.gz")
    raw = initrd.read_bytes()
    assert raw.startswith(base.read_bytes())
    second = _read_newc(gzip.decompress(raw[len(base.read_bytes()):]))
    assert second["plan"][3].decode().splitlines() == plan
