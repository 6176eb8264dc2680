"""Guest memory over the agent link, with a real handler: the ffa handler probes the RX/TX
buffers of FFA_RXTX_MAP with MEM_READ, refuses a map outside the VM's RAM, and writes partition
descriptors into RX with MEM_WRITE before the RESULT (FFA_PARTITION_INFO_GET, FFA_RXTX_MAP;
docs/ffa.md). Guest program: vmm/arm64/guests/ffa_mem.c.
"""

from __future__ import annotations

import pytest

from .conftest import MainRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FFA_ERROR = 0x8400_0060
FFA_SUCCESS_32 = 0x8400_0061
INVALID_PARAMETERS = 0xFFFF_FFFE  # -2 in w2, zero-extended
ECHO_ID, SHA256_ID = 0x8001, 0x8002  # the ffa handler's default partitions


def test_a_buffer_outside_the_vms_ram_is_refused(main_run: MainRun) -> None:
    call = main_run.result.call("ffa_mem", "map.outside")
    assert (call.x[0], call.x[2]) == (FFA_ERROR, INVALID_PARAMETERS)


def test_the_handler_reads_and_writes_guest_memory_through_the_vmm(main_run: MainRun) -> None:
    result = main_run.result
    assert result.call("ffa_mem", "version").x[0] == 0x1_0002
    assert result.call("ffa_mem", "map").x[0] == FFA_SUCCESS_32
    info = result.call("ffa_mem", "info")
    assert (info.x[0], info.x[2], info.x[3]) == (FFA_SUCCESS_32, 2, 24)  # count, size
    # The descriptors were in RX when the call returned: MEM_WRITE came before the RESULT.
    [line] = [x for x in result.lines if x.startswith("HB g[ffa_mem] rx ")]
    words = dict(item.split("=") for item in line.split()[3:])
    assert int(words["desc0"], 0) & 0xFFFF == ECHO_ID
    assert int(words["desc1"], 0) & 0xFFFF == SHA256_ID
    assert result.call("ffa_mem", "rx_release").x[0] == FFA_SUCCESS_32
    run = result.run("ffa_mem")
    assert run.ok
    # Both ends of both buffers probed; one write of the descriptors; nothing out of bounds
    # reached the VMM (the agent checks the registered region first).
    assert (run.mem_reads, run.mem_writes, run.mem_refused) == (4, 1, 0)
