"""kvtier.ko's ABI: the cffi binding and the C compiler agree on the uapi header, and the header obeys its rules.

Host-only (no module needed): the C side is gcc compiling kmod/include/uapi/linux/kvtier.h, the Python side is
kvtier._native built from the same file. Checks every struct's size and every field's offset, every integer
constant, that no struct has implicit padding (-Wpadded) or a different layout on i386 (no compat_ioctl needed),
and that every ioctl number encodes its struct's size and direction.
"""
import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvtier import kmod, kmod_netlink
from kvtier._native import ffi, lib

REPO = Path(__file__).resolve().parents[1]
UAPI_DIR = REPO / "kmod" / "include" / "uapi"
HEADER = UAPI_DIR / "linux" / "kvtier.h"
HEADER_TEXT = HEADER.read_text()
HEADER_CODE = re.sub(r"/\*.*?\*/", " ", HEADER_TEXT, flags=re.S)

# Independent of the build script: struct names and ioctl definitions read straight from the header.
STRUCTS = re.findall(r"\bstruct\s+(\w+)\s*\{", HEADER_CODE)
IOCTL_DEFS = {m.group(1): (m.group(2), int(m.group(3), 0), m.group(4)) for m in re.finditer(
    r"#define\s+(KVTIER_IOC_\w+)\s+(_IOWR|_IOR|_IOW|_IO)\(KVTIER_IOC_MAGIC,\s*(0x[0-9a-fA-F]+|\d+),\s*struct\s+(\w+)\)",
    HEADER_CODE)}
INT_MACROS = [m.group(1) for m in re.finditer(r"^\s*#define\s+(KVTIER_\w+)\s+([^\"\s].*)$", HEADER_CODE, re.M)]
ENUMERATORS = [item.split("=")[0].strip() for body in re.findall(r"\benum\s*\{(.*?)\}", HEADER_CODE, re.S)
               for item in body.split(",") if item.strip()]

IOC_DIR = {"_IO": 0, "_IOW": 1, "_IOR": 2, "_IOWR": 3}   # asm-generic/ioctl.h: _IOC_WRITE 1, _IOC_READ 2

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _fields(struct: str) -> list[str]:
    return [name for name, _ in ffi.typeof(f"struct {struct}").fields]


def _compile_and_run(tmp_path: Path, body: str) -> str:
    src = tmp_path / "abi.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <linux/kvtier.h>\n"
                   f"int main(void)\n{{\n{body}\treturn 0;\n}}\n")
    exe = tmp_path / "abi"
    subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", f"-I{UAPI_DIR}", "-o", exe, src], check=True,
                   capture_output=True, text=True)
    return subprocess.run([exe], check=True, capture_output=True, text=True).stdout


def test_header_is_the_one_the_binding_was_built_from():
    assert STRUCTS and IOCTL_DEFS and ENUMERATORS
    known = {t for t in ffi.list_types()[1]}
    assert set(STRUCTS) <= known, f"structs missing from the cffi binding: {set(STRUCTS) - known}"
    for name in INT_MACROS + ENUMERATORS:
        assert hasattr(lib, name), f"{name} missing from the cffi binding"


def test_struct_sizes_offsets_and_constants_match_gcc(tmp_path):
    body = ""
    for s in STRUCTS:
        body += f'\tprintf("sizeof {s} %zu\\n", sizeof(struct {s}));\n'
        body += f'\tprintf("alignof {s} %zu\\n", _Alignof(struct {s}));\n'
        for f in _fields(s):
            body += f'\tprintf("offsetof {s}.{f} %zu\\n", offsetof(struct {s}, {f}));\n'
            body += f'\tprintf("sizeof {s}.{f} %zu\\n", sizeof(((struct {s} *)0)->{f}));\n'
    for name in INT_MACROS + ENUMERATORS:
        body += f'\tprintf("const {name} %lld\\n", (long long)({name}));\n'
    compiled = dict(line.rsplit(" ", 1) for line in _compile_and_run(tmp_path, body).splitlines())

    expected = {}
    for s in STRUCTS:
        ctype = ffi.typeof(f"struct {s}")
        expected[f"sizeof {s}"] = ffi.sizeof(ctype)
        expected[f"alignof {s}"] = ffi.alignof(ctype)
        for f, field in ctype.fields:
            expected[f"offsetof {s}.{f}"] = ffi.offsetof(ctype, f)
            expected[f"sizeof {s}.{f}"] = ffi.sizeof(field.type)
    for name in INT_MACROS + ENUMERATORS:
        value = getattr(lib, name)
        expected[f"const {name}"] = value - (1 << 64) if value >= 1 << 63 else value
    assert {k: int(v) for k, v in compiled.items()} == expected


def test_no_implicit_padding_and_same_layout_on_i386(tmp_path):
    src = tmp_path / "padded.c"
    asserts = "".join(f"_Static_assert(sizeof(struct {s}) == {ffi.sizeof(f'struct {s}')}, \"{s}\");\n"
                      for s in STRUCTS)
    asserts += "".join(
        f"_Static_assert(__builtin_offsetof(struct {s}, {f}) == {ffi.offsetof(f'struct {s}', f)}, \"{s}.{f}\");\n"
        for s in STRUCTS for f in _fields(s))
    src.write_text("#include <linux/kvtier.h>\n" + "".join(f"struct {s} v_{s};\n" for s in STRUCTS) + asserts)
    # -Wpadded: the compiler would insert padding (inside or at the end of) a struct.
    out = subprocess.run(["gcc", "-c", "-Wpadded", "-Werror", f"-I{UAPI_DIR}", "-o", os.devnull, src],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # i386 aligns __u64 to 4 bytes: a layout that holds there too needs no compat_ioctl translation.
    out = subprocess.run(["gcc", "-m32", "-fsyntax-only", "-Wpadded", "-Werror", f"-I{UAPI_DIR}",
                          "-idirafter", "/usr/include/x86_64-linux-gnu", src], capture_output=True, text=True)
    if "No such file" in out.stderr or "unrecognized" in out.stderr:
        pytest.skip(f"gcc -m32 unavailable: {out.stderr.splitlines()[0]}")
    assert out.returncode == 0, out.stderr


def test_ioctl_numbers_encode_struct_size_direction_and_magic():
    assert set(IOCTL_DEFS) == {name for name in dir(lib) if name.startswith("KVTIER_IOC_")} - {"KVTIER_IOC_MAGIC"}
    numbers = set()
    for name, (macro, nr, struct) in IOCTL_DEFS.items():
        cmd = getattr(lib, name)
        assert cmd & 0xFF == nr, name
        assert (cmd >> 8) & 0xFF == lib.KVTIER_IOC_MAGIC, name
        assert (cmd >> 16) & 0x3FFF == ffi.sizeof(f"struct {struct}"), f"{name}: _IOC_SIZE"
        assert cmd >> 30 == IOC_DIR[macro], f"{name}: _IOC_DIR"
        numbers.add(nr)
    assert len(numbers) == len(IOCTL_DEFS), "two commands share a number"
    # The API handshake reports supported commands as bits of a __u64.
    assert max(numbers) < 64
    assert set(kmod.IOCTLS.values()) == set(IOCTL_DEFS)


def test_fixed_width_types_only_and_u64_aligned_u64s():
    for s in STRUCTS:
        for f, field in ffi.typeof(f"struct {s}").fields:
            t = field.type
            while t.kind == "array":
                t = t.item
            assert t.kind in ("primitive", "struct"), f"{s}.{f}: {t.cname}"
            if t.kind == "primitive":
                assert t.cname in ("unsigned int", "int", "unsigned long long", "long long"), f"{s}.{f}: {t.cname}"
                assert field.offset % ffi.sizeof(t) == 0, f"{s}.{f} is not naturally aligned"
    declared = re.findall(r"^\s*(?!struct\b)(\w+)\s+\w+(?:\[\w+\])?;", HEADER_CODE, re.M)
    assert declared and set(declared) <= {"__u32", "__s32", "__u64", "__s64"}


def test_string_constants_match_python(tmp_path):
    out = _compile_and_run(tmp_path, '\tprintf("%s %s %s\\n", KVTIER_DEVICE_NAME, KVTIER_GENL_NAME, '
                                     'KVTIER_GENL_MCGRP_EVENTS);\n').split()
    assert out == [Path(kmod.DEVICE_PATH).name, kmod_netlink.FAMILY, kmod_netlink.MCGRP_EVENTS]
    assert (kmod.GENL_NAME, kmod.GENL_MCGRP_EVENTS) == (kmod_netlink.FAMILY, kmod_netlink.MCGRP_EVENTS)


def test_netlink_attribute_types_follow_the_header_comments():
    commented = dict(re.findall(r"KVTIER_A_(\w+),\s*/\*\s*(u64|u32|s32|nest)\b", HEADER_TEXT))
    wire = {"u64": "uint64", "u32": "uint32", "s32": "int32", "nest": "node_stats"}
    assert set(kmod_netlink.header_attrs()) == set(kmod_netlink.ATTR_TYPES)
    for name, ctype in commented.items():
        assert kmod_netlink.ATTR_TYPES[name] == wire[ctype], name
    assert len(commented) >= len(kmod_netlink.ATTR_TYPES) - 2   # all but UNSPEC and PAD carry a type


def test_kvt_ioctl_returns_negative_errno():
    # Our magic on a file that is no kvtier device: the VFS answers ENOTTY, and the wrapper returns -errno.
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        api = ffi.new("struct kvtier_api *")
        assert lib.kvt_ioctl(fd, lib.KVTIER_IOC_API, api) == -errno.ENOTTY
    finally:
        os.close(fd)
    assert lib.kvt_ioctl(-1, lib.KVTIER_IOC_API, ffi.NULL) == -errno.EBADF


def test_device_missing_is_a_clear_error(tmp_path):
    with pytest.raises(OSError) as err:
        kmod.Device(str(tmp_path / "kvtier"))
    assert err.value.errno == errno.ENOENT
    assert "kvtier" in str(err.value)
    if not kmod.module_loaded():
        with pytest.raises(OSError, match="kvtier.ko is not loaded"):
            kmod.Device()


def test_tags_defaults_and_unknown_field_refused():
    assert kmod.Tags().priority == lib.KVTIER_PRIO_NORMAL
    with pytest.raises(TypeError, match="unknown tag field"):
        kmod._tag_items({"tenant": 1})
