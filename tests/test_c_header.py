"""include/hyperbroker/vmm_protocol.h agrees with the Python codec, byte for byte.

A VMM in C speaks the protocol through the header alone, the agent through
hyperbroker/vmm_protocol.py. These tests compile small C programs against the header with the
system compiler (-std=c11 -Wall -Wextra -Werror) and compare what C says (sizeof, offsetof, field
types, every constant) with what Python packs; then they move real frames both ways.
"""

from __future__ import annotations

import enum
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from hyperbroker import kvm
from hyperbroker.calls import ActionKind, Outcome, VmmAction
from hyperbroker.smccc import NR_ARGS
from hyperbroker.wire import vmm as proto

ROOT = Path(__file__).resolve().parent.parent
HEADER_PATH = ROOT / "include" / "hyperbroker" / "vmm_protocol.h"
HEADER_TEXT = HEADER_PATH.read_text()
CC = shutil.which("cc")

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler: `cc` is not on PATH")

TIMING_FIELDS = [
    "agent_ns", "link_ns", "broker_queue_ns", "handler_ns", "memory_ns", "memory_round_trips",
    "source",
]

# C struct -> (the Python struct that packs it, its fields in order). "f[]" marks an array.
STRUCTS: dict[str, tuple[struct.Struct, list[str]]] = {
    "hb_header": (proto.HEADER, ["magic", "version", "type", "length", "tag"]),
    "hb_mem_region": (proto.REGION, ["gpa", "size", "mmap_offset", "flags", "reserved"]),
    "hb_register_vm": (
        proto.REGISTER_VM,
        ["name[]", "profile[]", "nr_vcpus", "flags", "nr_regions", "reserved"],
    ),
    "hb_smccc_filter": (kvm.SMCCC_FILTER, ["base", "nr_functions", "action", "pad[]"]),
    "hb_register_vm_reply": (
        proto.REGISTER_VM_REPLY, ["status", "vm_id", "policy_version", "nr_filters", "reserved"],
    ),
    "hb_filter_report": (proto.FILTER_REPORT, ["vm_id", "nr_filters"]),
    "hb_call": (
        proto.CALL, ["vm_id", "vcpu", "seq", "function_id", "exit_flags", "exit_ns", "x[]"],
    ),
    "hb_timing": (proto.TIMING, TIMING_FIELDS),
    "hb_result": (
        proto.RESULT,
        ["vm_id", "vcpu", "seq", "outcome", "reg_mask", "x[]",
         *(f"timing.{f}" for f in TIMING_FIELDS), "nr_actions", "reserved"],
    ),
    "hb_action": (proto.ACTION, ["kind", "vcpu", "address", "value"]),
    "hb_destroy_vm": (proto.DESTROY_VM, ["vm_id", "reserved"]),
    "hb_status": (proto.STATUS, ["status", "reserved"]),
    "hb_vm_reset": (proto.VM_RESET, ["vm_id", "reserved"]),
    "hb_mem_access": (proto.MEM_ACCESS, ["vm_id", "length", "gpa"]),
    "hb_mem_reply": (proto.MEM_REPLY, ["status", "length"]),
    "hb_error": (proto.ERROR, ["code", "refused_type", "reserved"]),
}

# Header constants that are not members of one of the enums below.
SCALARS: dict[str, int] = {
    "HB_MAGIC": proto.MAGIC,
    "HB_VERSION": proto.VERSION,
    "HB_MAX_PAYLOAD": proto.MAX_PAYLOAD,
    "HB_MAX_MEM_CHUNK": proto.MAX_MEM_CHUNK,
    "HB_NR_REGS": NR_ARGS,
    "HB_MAX_REGIONS": proto.MAX_REGIONS,
    "HB_MAX_FILTERS": proto.MAX_FILTERS,
    "HB_MAX_VCPUS": proto.MAX_VCPUS,
    "HB_NAME_LEN": proto.NAME_LEN,
    "HB_PROFILE_LEN": proto.PROFILE_LEN,
    "HB_REGISTER_MEM_FDS": proto.REGISTER_MEM_FDS,
    "HB_REGISTER_BOOT_ID": proto.REGISTER_BOOT_ID,
    "HB_BOOT_ID_LEN": proto.BOOT_ID_LEN,
    "HB_REGION_READONLY": proto.REGION_READONLY,
}

# C enum prefix -> the Python enum with the same members.
ENUMS: dict[str, type[enum.IntEnum]] = {
    "HB_MSG_": proto.MsgType,
    "HB_OUTCOME_": Outcome,
    "HB_ACTION_": ActionKind,
    "HB_SOURCE_": proto.ResultSource,
}


@dataclass(frozen=True)
class Field:
    offset: int
    code: str  # struct format code of one element; "s" for any byte array
    count: int  # 1 for a scalar


def python_fields(s: struct.Struct) -> list[Field]:
    """The fields of a little-endian, unaligned ('<') struct format, with their offsets."""
    assert s.format.startswith("<")
    out: list[Field] = []
    offset = 0
    for count_text, code in re.findall(r"(\d*)([a-zA-Z?])", s.format[1:]):
        count = int(count_text or 1)
        if code == "s":
            out.append(Field(offset, "s", count))
            offset += count
        else:
            out.append(Field(offset, code, count))
            offset += struct.calcsize("<" + code) * count
    assert offset == s.size
    return out


def header_constants() -> list[str]:
    defines = re.findall(r"^#define\s+(HB_\w+)\s", HEADER_TEXT, re.M)
    members = re.findall(r"^\s*(HB_\w+)\s*=", HEADER_TEXT, re.M)
    return defines + members


C_TYPECODE = """
#define TC(e) _Generic((e), char: "s", uint8_t: "B", int8_t: "b", uint16_t: "H", \\
    int16_t: "h", uint32_t: "I", int32_t: "i", uint64_t: "Q", int64_t: "q", default: "?")
"""


def layout_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
             '#include "hyperbroker/vmm_protocol.h"', C_TYPECODE, "int main(void)", "{"]
    for name, (_, fields) in STRUCTS.items():
        lines.append(f'\tprintf("S {name} %zu\\n", sizeof(struct {name}));')
        for f in fields:
            member = f.removesuffix("[]")
            ref = f"((struct {name} *)0)->{member}"
            elem = f"{ref}[0]" if f.endswith("[]") else ref
            lines.append(
                f'\tprintf("F {name} {member} %zu %s %zu\\n", offsetof(struct {name}, {member}),'
                f" TC({elem}), sizeof({ref}) / sizeof({elem}));"
            )
    for const in header_constants():
        lines.append(f'\tprintf("K {const} %lld\\n", (long long)({const}));')
    lines += ["\treturn 0;", "}"]
    return "\n".join(lines) + "\n"


# One CALL built with the header's structs, written as raw bytes; and a RESULT read back.
WIRE_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include "hyperbroker/vmm_protocol.h"

static int write_call(void)
{
    struct hb_header h;
    struct hb_call c;
    memset(&h, 0, sizeof(h));
    memset(&c, 0, sizeof(c));
    h.magic = HB_MAGIC;
    h.version = HB_VERSION;
    h.type = HB_MSG_CALL;
    h.length = sizeof(c);
    h.tag = 0xA1B2C3D4u;
    c.vm_id = 0x01020304u;
    c.vcpu = 0x05060708u;
    c.seq = 0x1112131415161718ull;
    c.function_id = 0xC4000053u;
    c.exit_flags = 0x00000003u;
    c.exit_ns = 0x2122232425262728ull;
    for (unsigned i = 0; i < HB_NR_REGS; i++)
        c.x[i] = 0x8000000000000000ull | ((uint64_t)i << 32) | (0xF0u + i);
    if (fwrite(&h, sizeof(h), 1, stdout) != 1 || fwrite(&c, sizeof(c), 1, stdout) != 1)
        return 1;
    return 0;
}

static int read_result(void)
{
    struct hb_header h;
    struct hb_result r;
    struct hb_action a;
    if (fread(&h, sizeof(h), 1, stdin) != 1 || h.magic != HB_MAGIC || h.type != HB_MSG_RESULT)
        return 2;
    if (fread(&r, sizeof(r), 1, stdin) != 1)
        return 3;
    printf("header %u %u %u %u\n", (unsigned)h.version, (unsigned)h.type, (unsigned)h.length,
           (unsigned)h.tag);
    printf("result %u %u %llu %u %u\n", (unsigned)r.vm_id, (unsigned)r.vcpu,
           (unsigned long long)r.seq, (unsigned)r.outcome, (unsigned)r.reg_mask);
    for (unsigned i = 0; i < HB_NR_REGS; i++)
        printf("x %llu\n", (unsigned long long)r.x[i]);
    printf("timing %llu %llu %llu %llu %llu %u %u\n",
           (unsigned long long)r.timing.agent_ns, (unsigned long long)r.timing.link_ns,
           (unsigned long long)r.timing.broker_queue_ns, (unsigned long long)r.timing.handler_ns,
           (unsigned long long)r.timing.memory_ns, (unsigned)r.timing.memory_round_trips,
           (unsigned)r.timing.source);
    for (unsigned i = 0; i < r.nr_actions; i++) {
        if (fread(&a, sizeof(a), 1, stdin) != 1)
            return 4;
        printf("action %u %u %llu %llu\n", (unsigned)a.kind, (unsigned)a.vcpu,
               (unsigned long long)a.address, (unsigned long long)a.value);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "call") == 0)
        return write_call();
    if (argc == 2 && strcmp(argv[1], "result") == 0)
        return read_result();
    return 64;
}
"""


def compile_c(tmp: Path, name: str, source: str) -> Path:
    assert CC is not None
    src = tmp / f"{name}.c"
    src.write_text(source)
    exe = tmp / name
    built = subprocess.run(
        [CC, "-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'include'}", "-o", str(exe),
         str(src)],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, f"{name}.c does not compile:\n{built.stderr}"
    return exe


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """What the C compiler says: sizes, fields and constants, parsed from the layout program."""
    exe = compile_c(tmp_path_factory.mktemp("layout"), "layout", layout_program())
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    sizes: dict[str, int] = {}
    fields: dict[str, list[tuple[str, Field]]] = {}
    consts: dict[str, int] = {}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "S":
            sizes[rest[0]] = int(rest[1])
        elif kind == "F":
            name, member, offset, code, count = rest
            code = "s" if code in ("s", "B") and int(count) > 1 else code
            fields.setdefault(name, []).append((member, Field(int(offset), code, int(count))))
        else:
            consts[rest[0]] = int(rest[1])
    return {"sizes": sizes, "fields": fields, "consts": consts}


@pytest.fixture(scope="module")
def wire_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory.mktemp("wire"), "wire", WIRE_PROGRAM)


# ---- layouts ------------------------------------------------------------------------------------


def test_every_struct_in_the_header_is_checked() -> None:
    declared = set(re.findall(r"^struct (hb_\w+) \{", HEADER_TEXT, re.M))
    assert declared == set(STRUCTS)


@pytest.mark.parametrize("name", list(STRUCTS))
def test_struct_size_matches_the_python_format(name: str, c_layout: dict[str, object]) -> None:
    sizes = c_layout["sizes"]
    assert isinstance(sizes, dict)
    assert sizes[name] == STRUCTS[name][0].size


@pytest.mark.parametrize("name", list(STRUCTS))
def test_struct_fields_match_the_python_format_in_order_offset_and_type(
    name: str, c_layout: dict[str, object],
) -> None:
    fields = c_layout["fields"]
    assert isinstance(fields, dict)
    py = python_fields(STRUCTS[name][0])
    c = [f for _, f in fields[name]]
    assert len(py) == len(c), f"{name}: Python packs {len(py)} fields, the table names {len(c)}"
    for (member, cf), pf in zip(fields[name], py, strict=True):
        assert cf == pf, f"struct {name}.{member}: C {cf} != Python {pf}"


@pytest.mark.parametrize("name", list(STRUCTS))
def test_struct_has_no_implicit_padding(name: str, c_layout: dict[str, object]) -> None:
    # "Every struct is packed by construction (natural alignment, no implicit padding)".
    fields = c_layout["fields"]
    assert isinstance(fields, dict)
    end = 0
    for member, f in fields[name]:
        elem = 1 if f.code == "s" else struct.calcsize("<" + f.code)
        assert f.offset == end, f"hole before {name}.{member}"
        assert f.offset % elem == 0, f"{name}.{member} is not naturally aligned"
        end = f.offset + f.count * elem
    assert end == STRUCTS[name][0].size


def test_smccc_filter_is_kvms_struct_with_deny_and_fwd_to_user() -> None:
    # include/uapi/linux/kvm.h; the header comment names the actions by value.
    assert kvm.SMCCC_FILTER.size == 24
    assert re.search(r"1 = KVM_SMCCC_FILTER_DENY, 2 = KVM_SMCCC_FILTER_FWD_TO_USER", HEADER_TEXT)
    assert (kvm.FilterAction.DENY, kvm.FilterAction.FWD_TO_USER) == (1, 2)


# ---- constants ----------------------------------------------------------------------------------


def expected_constants() -> dict[str, int]:
    out = dict(SCALARS)
    for prefix, cls in ENUMS.items():
        out.update({prefix + m.name: int(m) for m in cls})
    return out


def test_every_header_constant_has_a_python_counterpart() -> None:
    assert set(header_constants()) == set(expected_constants())


@pytest.mark.parametrize("const", sorted(expected_constants()))
def test_header_constant_equals_python(const: str, c_layout: dict[str, object]) -> None:
    consts = c_layout["consts"]
    assert isinstance(consts, dict)
    assert consts[const] == expected_constants()[const]


def test_header_bounds_nr_vcpus_by_the_max_vcpus_constant() -> None:
    assert re.search(r"nr_vcpus;\s*/\*\s*1\.\.HB_MAX_VCPUS", HEADER_TEXT)


# ---- bytes on the wire, both directions ---------------------------------------------------------


def test_a_call_frame_built_in_c_decodes_in_python(wire_exe: Path) -> None:
    data = subprocess.run([str(wire_exe), "call"], check=True, capture_output=True).stdout
    assert len(data) == proto.HEADER.size + proto.CALL.size
    got = proto.decode(data)
    assert (got.type, got.tag) == (proto.MsgType.CALL, 0xA1B2C3D4)
    assert got.message == proto.CallMsg(
        vm_id=0x01020304, vcpu=0x05060708, seq=0x1112131415161718, function_id=0xC4000053,
        exit_flags=3, exit_ns=0x2122232425262728,
        x=tuple((1 << 63) | (i << 32) | (0xF0 + i) for i in range(NR_ARGS)),
    )


def test_a_result_frame_encoded_in_python_reads_back_in_c(wire_exe: Path) -> None:
    msg = proto.ResultMsg(
        vm_id=0x0A0B0C0D, vcpu=3, seq=0x0102030405060708, outcome=Outcome.GUEST_ERROR,
        reg_mask=0x3FFFF, x=tuple((i << 56) | i for i in range(NR_ARGS)),
        timing=proto.Timing(1, 2, 3, 4, 5, 6, proto.ResultSource.FALLBACK),
        actions=(VmmAction(ActionKind.CPU_ON, 1, 0x4020_0000, 0xFEED),
                 VmmAction(ActionKind.INJECT_IRQ, 2, 1, 27)),
    )
    data = proto.encode(msg, tag=0x77)
    out = subprocess.run([str(wire_exe), "result"], input=data, check=True,
                         capture_output=True).stdout.decode().splitlines()
    assert out == [
        f"header 1 {0x83} {len(data) - 16} {0x77}",
        f"result {0x0A0B0C0D} 3 {0x0102030405060708} 1 {0x3FFFF}",
        *(f"x {(i << 56) | i}" for i in range(NR_ARGS)),
        "timing 1 2 3 4 5 6 2",
        f"action 1 1 {0x4020_0000} {0xFEED}",
        "action 7 2 1 27",
    ]
