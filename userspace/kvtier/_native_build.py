"""cffi builder for kvtier._native: the small C shim between Python and the kernel.

The shim wraps raw syscalls (no libnuma needed at build or run time) and returns -errno instead of
touching the thread's errno, so the Python side can raise OSError(errno) without races.

It also binds kvtier.ko's ABI, read from the one uapi header the module is built with
(kmod/include/uapi/linux/kvtier.h): its structs, its KVTIER_* integer constants and its anonymous enums
are turned into cdef text at build time, and the generated C includes the same header, so the compiler
(not this file) computes every value and cffi checks every struct field offset against it on import.
"""
import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# The source tree (pip install -e / pip install . / an sdist, which MANIFEST.in gives kmod/include).
INCLUDE_DIR = HERE.parents[1] / "kmod" / "include"
UAPI_HEADER = INCLUDE_DIR / "uapi" / "linux" / "kvtier.h"

CDEF = """
#define MPOL_DEFAULT ...
#define MPOL_PREFERRED ...
#define MPOL_BIND ...
#define MPOL_INTERLEAVE ...
#define MPOL_LOCAL ...
#define MPOL_F_NODE ...
#define MPOL_F_ADDR ...
#define MPOL_F_MEMS_ALLOWED ...
#define MPOL_MF_STRICT ...
#define MPOL_MF_MOVE ...
#define MPOL_MF_MOVE_ALL ...

long kvt_move_pages(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags);
long kvt_mbind(uintptr_t addr, unsigned long len, int mode, const unsigned long *nodemask,
               unsigned long maxnode, unsigned int flags);
long kvt_get_mempolicy(int *mode, unsigned long *nodemask, unsigned long maxnode, uintptr_t addr,
                       unsigned long flags);
long kvt_page_size(void);
void kvt_copy_nt(void *dst, const void *src, size_t n);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/mempolicy.h>

static long kvt_ret(long r) { return r < 0 ? -errno : r; }

long kvt_move_pages(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags)
{
    return kvt_ret(syscall(SYS_move_pages, pid, count, pages, nodes, status, flags));
}

long kvt_mbind(uintptr_t addr, unsigned long len, int mode, const unsigned long *nodemask,
               unsigned long maxnode, unsigned int flags)
{
    return kvt_ret(syscall(SYS_mbind, addr, len, mode, nodemask, maxnode, flags));
}

long kvt_get_mempolicy(int *mode, unsigned long *nodemask, unsigned long maxnode, uintptr_t addr,
                       unsigned long flags)
{
    return kvt_ret(syscall(SYS_get_mempolicy, mode, nodemask, maxnode, addr, flags));
}

long kvt_page_size(void) { return sysconf(_SC_PAGESIZE); }

/* A copy with non-temporal stores: a big KV block written into (or read out of) an arena is not read again soon,
 * so it skips the read-for-ownership of every destination line and leaves the caches to the engine. SSE2, the
 * x86-64 baseline (AVX2 measured no faster: the stores are memory-bound); elsewhere a plain memcpy. */
#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#include <string.h>
void kvt_copy_nt(void *dst, const void *src, size_t n)
{
#if defined(__x86_64__)
    char *d = dst;
    const char *s = src;
    size_t head = (16 - ((uintptr_t)d & 15)) & 15, i = 0;

    if (head > n)
        head = n;
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));

        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
    _mm_sfence();   /* the stores are visible before the caller tells the daemon the block is written */
    memcpy(d + i, s + i, n - i);
#else
    memcpy(dst, src, n);
#endif
}
"""

# kvtier.ko: the ioctl call itself. The raw syscall, so the fuzz test can pass any pointer as arg.
KMOD_CDEF = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;   /* asm-generic/int-ll64.h, as the kernel spells it */
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;

long kvt_ioctl(int fd, unsigned long cmd, void *arg);
"""

KMOD_SOURCE = r"""
#include <linux/kvtier.h>

long kvt_ioctl(int fd, unsigned long cmd, void *arg)
{
    return kvt_ret(syscall(SYS_ioctl, fd, cmd, arg));
}
"""

_INT_LITERAL = re.compile(r"^\(?\s*-?(0x[0-9a-fA-F]+|\d+)[uUlL]*\s*\)?$")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def uapi_cdef(header_text: str) -> str:
    """cdef text for the uapi header: its KVTIER_* integer macros, anonymous enums and structs.

    Macros become `#define NAME ...` (the compiler evaluates _IOWR() and shifts); enumerators become
    `static const int NAME;`; structs are copied field by field, with array lengths written as numbers
    so cffi declares the full layout and verifies it against the compiler on import.
    """
    text = _strip_comments(header_text)
    lines = []
    literals = {}
    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(KVTIER_\w+)[ \t]+(.+?)[ \t]*$", text, flags=re.M):
        name, value = m.group(1), m.group(2).strip()
        if value.startswith('"'):
            continue  # string constants (device and family names) are read by the Python side
        lines.append(f"#define {name} ...")
        if _INT_LITERAL.match(value):
            literals[name] = int(re.sub(r"[()\suUlL]", "", value), 0)
    for body in re.findall(r"\benum\s*\{(.*?)\}\s*;", text, flags=re.S):
        for item in body.split(","):
            name = item.split("=")[0].strip()
            if name:
                lines.append(f"static const int {name};")
    for name, body in re.findall(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", text, flags=re.S):
        fields = []
        for decl in body.split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            decl = re.sub(r"\[(\w+)\]", lambda a: f"[{literals.get(a.group(1), a.group(1))}]", decl)
            fields.append(f"    {decl};")
        lines.append(f"struct {name} {{\n" + "\n".join(fields) + "\n};")
    return "\n".join(lines) + "\n"


def build_ffi() -> FFI:
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.cdef(KMOD_CDEF)
    ffi.cdef(uapi_cdef(UAPI_HEADER.read_text()))
    # -Iuapi first: <linux/kvtier.h> is the uapi file itself, as an installed header would be.
    ffi.set_source("kvtier._native", SOURCE + KMOD_SOURCE,
                   include_dirs=[os.fspath(INCLUDE_DIR / "uapi"), os.fspath(INCLUDE_DIR)])
    return ffi


ffibuilder = build_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
