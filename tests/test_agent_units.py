"""The agent's pure parts: guest-memory region checks and mappings, the compiled policy view."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperbroker.agent.compiled_policy import AgentPolicy, AgentProfile
from hyperbroker.agent.memory import MappedRam, MemoryAccessError, RegionMap
from hyperbroker.smccc import NOT_SUPPORTED_U64
from hyperbroker.wire.v1 import broker_pb2
from hyperbroker.wire.vmm import REGION_READONLY, MemRegion

RAM = MemRegion(0x4000_0000, 0x10_0000)
ROM = MemRegion(0x1000, 0x1000, 0, REGION_READONLY)


def test_an_access_inside_one_region_is_located() -> None:
    regions = RegionMap([RAM, ROM])
    assert regions.locate(0x4000_0010, 16, write=True) == (1, 0x10)
    assert regions.locate(0x1000, 0x1000, write=False) == (0, 0)


@pytest.mark.parametrize(("gpa", "n"), [
    (0x3FFF_FFF8, 16),  # straddles the start
    (0x400F_FFF8, 16),  # straddles the end
    (0x2000, 1),  # between regions
    (0, 8),
])
def test_an_access_not_wholly_inside_a_region_is_efault(gpa: int, n: int) -> None:
    with pytest.raises(MemoryAccessError) as e:
        RegionMap([RAM, ROM]).locate(gpa, n, write=False)
    assert e.value.code == errno.EFAULT


def test_a_write_to_a_read_only_region_is_eacces() -> None:
    with pytest.raises(MemoryAccessError) as e:
        RegionMap([ROM]).locate(0x1000, 4, write=True)
    assert e.value.code == errno.EACCES


@pytest.mark.parametrize("regions", [
    [MemRegion(0x1000, 0)],  # empty
    [MemRegion(2**64 - 0x1000, 0x2000)],  # wraps
    [MemRegion(0x1000, 0x2000), MemRegion(0x2000, 0x1000)],  # overlap
])
def test_bad_region_sets_are_refused_at_registration(regions: list[MemRegion]) -> None:
    with pytest.raises(MemoryAccessError) as e:
        RegionMap(regions)
    assert e.value.code == errno.EINVAL


@given(st.integers(0, 2**64 - 1), st.integers(1, 1 << 20))
def test_locate_accepts_exactly_the_accesses_inside_the_region(gpa: int, n: int) -> None:
    inside = RAM.gpa <= gpa and gpa + n <= RAM.end
    try:
        RegionMap([RAM]).locate(gpa, n, write=False)
        assert inside
    except MemoryAccessError:
        assert not inside


def sealed_memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_mapped_ram_reads_and_writes_the_vmms_memory() -> None:
    fd = sealed_memfd(RAM.size)
    vmm_view = mmap.mmap(fd, RAM.size)
    ram = MappedRam(RegionMap([RAM]), [fd])
    vmm_view[0x100:0x104] = b"abcd"
    assert ram.read(RAM.gpa + 0x100, 4) == b"abcd"
    ram.write(RAM.gpa + 0x200, b"xyz")
    assert vmm_view[0x200:0x203] == b"xyz"
    ram.close()
    vmm_view.close()
    os.close(fd)


def test_mapped_ram_needs_one_fd_per_region_and_aligned_offsets() -> None:
    with pytest.raises(MemoryAccessError):
        MappedRam(RegionMap([RAM]), [])
    fd = sealed_memfd(0x20_0000)
    with pytest.raises(MemoryAccessError) as e:
        MappedRam(RegionMap([MemRegion(RAM.gpa, 0x1000, 0x10)]), [fd])
    assert e.value.code == errno.EINVAL
    os.close(fd)


@pytest.mark.parametrize("size, seals, refused", [
    (RAM.size, 0, "F_SEAL_SHRINK"),
    (RAM.size, fcntl.F_SEAL_GROW, "F_SEAL_SHRINK"),
    (RAM.size - 0x1000, fcntl.F_SEAL_SHRINK, "past the end"),
    (RAM.size, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL, None),
])
def test_only_ram_that_cannot_shrink_under_the_mapping_is_mapped(
        size: int, seals: int, refused: str | None) -> None:
    fd = os.memfd_create("ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    try:
        if refused is None:
            MappedRam(RegionMap([RAM]), [fd]).close()
        else:
            with pytest.raises(MemoryAccessError) as e:
                MappedRam(RegionMap([RAM]), [fd])
            assert e.value.code == errno.EINVAL and refused in str(e.value)
    finally:
        os.close(fd)


def test_a_file_that_takes_no_seals_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ram.img"
    path.write_bytes(bytes(RAM.size))
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(MemoryAccessError) as e:
            MappedRam(RegionMap([RAM]), [fd])
        assert e.value.code == errno.EINVAL and "F_SEAL_SHRINK" in str(e.value)
    finally:
        os.close(fd)


def profile() -> AgentProfile:
    pb = broker_pb2.CompiledProfile(name="p", default_deadline_us=100_000)
    pb.kernel_filter.add(base=0x8400_0050, nr_functions=16, action=2, rule="trng")
    pb.rules.add(base=0x8400_0050, nr_functions=16, deadline_us=50_000, rule="trng",
                 fallback=[2**64 - 3], fallback_mask=1)
    pb.rules.add(base=0xC400_0050, nr_functions=16, deadline_us=20_000, rule="trng64")
    pb.static_answers.add(function_id=0x8400_0050, x=[0x10000, 0, 0, 0], mask=0xF)
    return AgentProfile(pb)


def test_rules_are_found_by_range_and_the_default_covers_the_rest() -> None:
    p = profile()
    assert p.rule_for(0x8400_0053).rule == "trng"
    assert p.rule_for(0x8400_0053).deadline_s == 0.05
    assert p.rule_for(0x8400_0053).fallback == (2**64 - 3,)
    assert p.rule_for(0xC400_005F).rule == "trng64"
    assert p.rule_for(0xC400_0060).rule == ""  # just past the range
    default = p.rule_for(0x8600_0000)
    assert default.deadline_s == 0.1 and default.fallback[0] == NOT_SUPPORTED_U64
    assert p.rule_for(0xC400_0050).fallback[0] == NOT_SUPPORTED_U64  # no fallback given


def test_filters_and_static_answers_come_from_the_compiled_profile() -> None:
    p = profile()
    assert [(f.base, f.nr_functions, f.action) for f in p.filters] == [(0x8400_0050, 16, 2)]
    assert p.static[0x8400_0050] == ((0x10000, 0, 0, 0), 0xF)


def test_a_policy_knows_its_profiles_by_name() -> None:
    pb = broker_pb2.CompiledPolicy(version=3, digest="d")
    pb.profiles.add(name="default")
    pb.profiles.add(name="other")
    policy = AgentPolicy(pb)
    assert policy.version == 3 and set(policy.profiles) == {"default", "other"}
