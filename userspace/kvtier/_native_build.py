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

struct kvt_dirent {
    uint64_t seq;
    uint8_t key[16];
    uint64_t offset;
    uint64_t nbytes;
    uint32_t arena;
    uint8_t used;
    uint8_t metalen;
    uint16_t tier;
    uint8_t meta[16];
};
#define KVT_DIR_HEADER_BYTES ...
#define KVT_DIR_WAYS ...
long kvt_dir_put(void *dir, uint64_t nbuckets, const struct kvt_dirent *v);
long kvt_dir_del(void *dir, uint64_t nbuckets, const void *key);
long kvt_dir_find(const void *dir, uint64_t nbuckets, const void *key, struct kvt_dirent *out);
int kvt_dir_same(const void *dir, long index, uint64_t seq);
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

/* The block directory (kvtier.daemon.directory): where a domain's blocks lie in the first memory tier, mapped
 * read-only by its clients so a get finds and copies a block without a round trip to the daemon. A 4 KiB header,
 * then buckets of KVT_DIR_WAYS 64-byte entries (one cache line each), a bucket per low bits of the key (an
 * xxh3_128, uniform). Each entry is a seqlock: the daemon makes seq odd, changes the entry, makes it even again;
 * it empties an entry before the slot it names is freed, so a reader that sees the same even seq before and
 * after copying the block's bytes copied that block, and otherwise asks the daemon. */
#include <stdint.h>
struct kvt_dirent {
    uint64_t seq;       /* even: stable; odd: being changed */
    uint8_t key[16];    /* the daemon's block key */
    uint64_t offset;    /* of the block in its arena */
    uint64_t nbytes;
    uint32_t arena;     /* the arena id clients map (hello's arenas) */
    uint8_t used;
    uint8_t metalen;    /* bytes of msgpack'd meta (dtype, shape) */
    uint16_t tier;
    uint8_t meta[16];
};
_Static_assert(sizeof(struct kvt_dirent) == 64, "one cache line per entry");
#define KVT_DIR_HEADER_BYTES 4096
#define KVT_DIR_WAYS 8

static struct kvt_dirent *kvt_dir_bucket(const void *dir, uint64_t nbuckets, const void *key)
{
    uint64_t h;

    memcpy(&h, key, sizeof h);
    return (struct kvt_dirent *)((char *)dir + KVT_DIR_HEADER_BYTES) + (h & (nbuckets - 1)) * KVT_DIR_WAYS;
}

static long kvt_dir_index(const void *dir, const struct kvt_dirent *e)
{
    return e - (const struct kvt_dirent *)((const char *)dir + KVT_DIR_HEADER_BYTES);
}

static void kvt_dir_write(struct kvt_dirent *e, const struct kvt_dirent *v)
{
    uint64_t s = e->seq;

    __atomic_store_n(&e->seq, s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);   /* odd before any field changes */
    memcpy((char *)e + sizeof e->seq, (const char *)v + sizeof v->seq, sizeof *e - sizeof e->seq);
    __atomic_store_n(&e->seq, s + 2, __ATOMIC_RELEASE);
}

/* Publish v (by v->key): its entry's index, or -ENOSPC when the bucket is full (the block is then found by asking
 * the daemon). */
long kvt_dir_put(void *dir, uint64_t nbuckets, const struct kvt_dirent *v)
{
    struct kvt_dirent *b = kvt_dir_bucket(dir, nbuckets, v->key), *free_e = NULL;
    int i;

    for (i = 0; i < KVT_DIR_WAYS; i++) {
        if (b[i].used && !memcmp(b[i].key, v->key, sizeof v->key)) {
            kvt_dir_write(&b[i], v);
            return kvt_dir_index(dir, &b[i]);
        }
        if (!b[i].used && !free_e)
            free_e = &b[i];
    }
    if (!free_e)
        return -ENOSPC;
    kvt_dir_write(free_e, v);
    return kvt_dir_index(dir, free_e);
}

long kvt_dir_del(void *dir, uint64_t nbuckets, const void *key)
{
    static const struct kvt_dirent empty;
    struct kvt_dirent *b = kvt_dir_bucket(dir, nbuckets, key);
    int i;

    for (i = 0; i < KVT_DIR_WAYS; i++)
        if (b[i].used && !memcmp(b[i].key, key, sizeof b[i].key)) {
            kvt_dir_write(&b[i], &empty);
            return kvt_dir_index(dir, &b[i]);
        }
    return -ENOENT;
}

/* The reader: a copy of key's entry in *out (out->seq: the seq it was read at) and its index, or -ENOENT (also
 * while the entry is being changed). The caller copies the block, then checks kvt_dir_same(). */
long kvt_dir_find(const void *dir, uint64_t nbuckets, const void *key, struct kvt_dirent *out)
{
    const struct kvt_dirent *b = kvt_dir_bucket(dir, nbuckets, key);
    int i;

    for (i = 0; i < KVT_DIR_WAYS; i++) {
        uint64_t s = __atomic_load_n(&b[i].seq, __ATOMIC_ACQUIRE);

        if (s & 1)
            continue;
        memcpy(out, &b[i], sizeof *out);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&b[i].seq, __ATOMIC_RELAXED) != s)
            continue;
        if (out->used && !memcmp(out->key, key, sizeof out->key)) {
            out->seq = s;
            return kvt_dir_index(dir, &b[i]);
        }
    }
    return -ENOENT;
}

/* Whether entry `index` still has the seq it was found at: then what was read through it was that block. */
int kvt_dir_same(const void *dir, long index, uint64_t seq)
{
    const struct kvt_dirent *e = (const struct kvt_dirent *)((const char *)dir + KVT_DIR_HEADER_BYTES) + index;

    __atomic_thread_fence(__ATOMIC_ACQUIRE);   /* the block's bytes are read before seq is read again */
    return __atomic_load_n(&e->seq, __ATOMIC_RELAXED) == seq;
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
