"""cffi builder for kvtier._native: the small C shim between Python and the kernel.

The shim wraps raw syscalls (no libnuma needed at build or run time) and returns -errno instead of
touching the thread's errno, so the Python side can raise OSError(errno) without races.
"""
from cffi import FFI

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
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <unistd.h>
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
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvtier._native", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
