// SPDX-License-Identifier: GPL-2.0
/*
 * kvheat: per-block access heat and migration telemetry for kvtier (bcc).
 *
 * Attaches to kvtier.ko's tracepoints (kvtier_fault, kvtier_migrate) and to the
 * kernel's: exceptions:page_fault_user and a kprobe on task_numa_fault (faults and
 * NUMA hinting faults in anonymous ranges an engine registered), a kprobe on
 * migrate_pages() plus migrate:mm_migrate_pages (latency of kernel migrations).
 *
 * No kernel headers beyond the two below: under bcc, <linux/mm.h> alone adds ~30 s
 * of compile time in the test guest. What the migrate kprobe reads of struct page
 * is given instead: page->flags is its first word and page->lru its second (stable
 * since 2.6), and the node field's shift in page->flags comes as -DNODES_PGSHIFT.
 * The maps are read by userspace/kvtier/probes.py (the daemon, kvctl top and
 * bpf/kvheat.py). Parameters come as cflags:
 *   -DWITH_KVTIER=0|1    kvtier.ko's tracepoints (0 when the module is not loaded)
 *   -DWITH_ANON=0|1      user page faults / NUMA hinting faults in registered ranges
 *   -DWITH_MIGRATE=0|1   migrate_pages() latency and size
 *   -DHEAT_PAGES=0|1     heat per page inside a block rather than per block
 *   -DHEAT_ENTRIES=N     size of the heat map
 *   -DMAX_RANGES=N       anonymous ranges that can be registered
 *   -DIGNORE_TGID=PID    leave this process's kvtier faults out (the daemon's own accesses)
 *   -DKVHEAT_PAGE_SHIFT=N  log2 of the page size (12)
 *   -DNODES_PGSHIFT=N -DNODES_MASK=M  where page->flags keeps the node (source node of
 *                        kernel migrations; without them the source is reported unknown)
 */
#include <uapi/linux/ptrace.h>
#include <linux/migrate_mode.h>

#include "kvheat.h"

#ifndef WITH_KVTIER
#define WITH_KVTIER 1
#endif
#ifndef WITH_ANON
#define WITH_ANON 1
#endif
#ifndef WITH_MIGRATE
#define WITH_MIGRATE 1
#endif
#ifndef HEAT_PAGES
#define HEAT_PAGES 0
#endif
#ifndef HEAT_ENTRIES
#define HEAT_ENTRIES 65536
#endif
#ifndef MAX_RANGES
#define MAX_RANGES 16
#endif
#ifndef IGNORE_TGID
#define IGNORE_TGID 0
#endif
#ifndef KVHEAT_PAGE_SHIFT
#define KVHEAT_PAGE_SHIFT 12
#endif

/* the first two words of struct page */
struct kvheat_page_head {
	unsigned long flags;
	void *lru_next;
	void *lru_prev;
};

/* per CPU: the registered-range access the last user fault on this CPU counted */
struct kvheat_last_fault {
	u64 pid_tgid;
	struct kvheat_key key;
};

BPF_HASH(heat, struct kvheat_key, struct kvheat_val, HEAT_ENTRIES);
BPF_HASH(region_faults, u32, struct kvheat_region, 4096);
BPF_ARRAY(ranges, struct kvheat_range, MAX_RANGES);
BPF_ARRAY(counters, u64, KVHEAT_NR_COUNTERS);
BPF_HASH(mig_start, u32, struct kvheat_mig_start, 4096);
BPF_HASH(mig_lat_us, struct kvheat_hist_key, u64, 8192);
BPF_HASH(mig_bytes, struct kvheat_hist_key, u64, 8192);
BPF_PERCPU_ARRAY(last_fault, struct kvheat_last_fault, 1);

static __always_inline void count(int idx)
{
	u64 *c = counters.lookup(&idx);

	if (c)
		__sync_fetch_and_add(c, 1);
}

static __always_inline void heat_add(u32 region, u32 block, u32 page, int node, int write, int hint)
{
	struct kvheat_key k = {.region = region, .block = block, .page = HEAT_PAGES ? page : 0};
	struct kvheat_region rzero = {}, *r;
	struct kvheat_val zero = {}, *v;
	u64 now = bpf_ktime_get_ns();

	v = heat.lookup_or_try_init(&k, &zero);
	if (v) {
		__sync_fetch_and_add(&v->count, 1);
		if (write)
			__sync_fetch_and_add(&v->writes, 1);
		if (hint)
			__sync_fetch_and_add(&v->hint_faults, 1);
		v->last_ns = now;
		v->node = node;
	} else {
		count(KVHEAT_C_HEAT_FULL);
	}
	rzero.first_ns = now;
	r = region_faults.lookup_or_try_init(&region, &rzero);
	if (r) {
		__sync_fetch_and_add(&r->faults, 1);
		if (write)
			__sync_fetch_and_add(&r->writes, 1);
		if (hint)
			__sync_fetch_and_add(&r->hint_faults, 1);
		r->last_ns = now;
	}
}

static __always_inline u16 node16(int node)
{
	return node < 0 || node >= KVHEAT_NODE_ANY ? KVHEAT_NODE_ANY : node;
}

static __always_inline void hist_add(u32 kind, int src, int dst, u64 ns, u64 bytes)
{
	struct kvheat_hist_key k = {.kind = kind, .src = node16(src), .dst = node16(dst)};
	u64 zero = 0, *c;

	k.slot = bpf_log2l(ns / 1000);
	c = mig_lat_us.lookup_or_try_init(&k, &zero);
	if (c)
		__sync_fetch_and_add(c, 1);
	k.slot = bpf_log2l(bytes);
	c = mig_bytes.lookup_or_try_init(&k, &zero);
	if (c)
		__sync_fetch_and_add(c, 1);
	count(KVHEAT_C_MIGRATIONS);
}

#if WITH_KVTIER
TRACEPOINT_PROBE(kvtier, kvtier_fault)
{
	if (IGNORE_TGID && bpf_get_current_pid_tgid() >> 32 == IGNORE_TGID)
		return 0;
	count(KVHEAT_C_KVTIER_FAULTS);
	heat_add(args->region_id, args->block, args->page, args->node, args->write, 0);
	return 0;
}

TRACEPOINT_PROBE(kvtier, kvtier_migrate)
{
	hist_add(KVHEAT_KIND_KVTIER, args->from_node, args->node, args->duration_ns, args->bytes);
	return 0;
}
#endif

#if WITH_ANON
/* Is addr inside a range registered by the current process? Then count it. */
static __always_inline int anon_access(u64 addr, int write)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tgid = pid_tgid >> 32;
	int nr_idx = KVHEAT_C_RANGES, zero = 0;
	u64 *nr = counters.lookup(&nr_idx);
	struct kvheat_range *hit = NULL;
	struct kvheat_last_fault *last;
	u32 block, page;
	u64 off;
	int i;

	if (!nr || !*nr)
		return 0;
	last = last_fault.lookup(&zero);
	if (last)
		last->pid_tgid = 0;
	/* find the range first, count once after the loop: keeps the unrolled body small */
#pragma unroll
	for (i = 0; i < MAX_RANGES; i++) {
		int idx = i;
		struct kvheat_range *r = ranges.lookup(&idx);

		if (r && r->tgid == tgid && addr >= r->start && addr < r->end && r->block_bytes) {
			hit = r;
			break;
		}
	}
	if (!hit)
		return 0;
	off = addr - hit->start;
	block = off / hit->block_bytes;
	page = (off % hit->block_bytes) >> KVHEAT_PAGE_SHIFT;
	count(KVHEAT_C_ANON_FAULTS);
	heat_add(KVHEAT_ANON_BIT | hit->id, block, page, -1, write, 0);
	if (last) {
		last->pid_tgid = pid_tgid;
		last->key.region = KVHEAT_ANON_BIT | hit->id;
		last->key.block = block;
		last->key.page = HEAT_PAGES ? page : 0;
	}
	return 1;
}

TRACEPOINT_PROBE(exceptions, page_fault_user)
{
	anon_access(args->address, args->error_code & 2 /* X86_PF_WRITE */);
	return 0;
}

/*
 * kprobe:task_numa_fault: the fault being handled on this CPU was a NUMA hinting
 * fault (do_numa_page() calls it; do_numa_page itself is inlined). If the user
 * fault just counted was in a registered range, mark it as one.
 */
int kvheat_numa_hint(struct pt_regs *ctx)
{
	int zero = 0;
	struct kvheat_last_fault *last = last_fault.lookup(&zero);
	struct kvheat_region *r;
	struct kvheat_val *v;

	if (!last || !last->pid_tgid || last->pid_tgid != bpf_get_current_pid_tgid())
		return 0;
	count(KVHEAT_C_HINT_FAULTS);
	v = heat.lookup(&last->key);
	if (v)
		__sync_fetch_and_add(&v->hint_faults, 1);
	r = region_faults.lookup(&last->key.region);
	if (r)
		__sync_fetch_and_add(&r->hint_faults, 1);
	last->pid_tgid = 0;
	return 0;
}
#endif

#if WITH_MIGRATE
/* kprobe:migrate_pages: remember when, from where and to where, per thread */
int kvheat_migrate_entry(struct pt_regs *ctx, void **from, void *get_new, void *put_new,
			 unsigned long private, int mode, int reason)
{
	struct kvheat_mig_start s = {.ts_ns = bpf_ktime_get_ns(), .src = -1, .dst = -1};
	u32 tid = bpf_get_current_pid_tgid();
	void *first = NULL;

	bpf_probe_read_kernel(&first, sizeof(first), from);	/* from->next */
#ifdef NODES_PGSHIFT
	if (first && first != from) {
		struct kvheat_page_head *pg = (void *)((char *)first - offsetof(struct kvheat_page_head, lru_next));
		unsigned long flags = 0;

		bpf_probe_read_kernel(&flags, sizeof(flags), &pg->flags);
		s.src = (flags >> NODES_PGSHIFT) & NODES_MASK;
	}
#endif
	/* NUMA balancing passes the node itself; move_pages, mbind, demotion and the rest a
	 * struct migration_target_control whose first member is the node; compaction stays put. */
	if (reason == MR_NUMA_MISPLACED)
		s.dst = (int)private;
	else if (reason == MR_COMPACTION)
		s.dst = s.src;
	else if (private)
		bpf_probe_read_kernel(&s.dst, sizeof(s.dst), (void *)private);
	mig_start.update(&tid, &s);
	return 0;
}

TRACEPOINT_PROBE(migrate, mm_migrate_pages)
{
	u32 tid = bpf_get_current_pid_tgid();
	struct kvheat_mig_start *s = mig_start.lookup(&tid);

	if (!s)
		return 0;
	hist_add(KVHEAT_KIND_KERNEL, s->src, s->dst, bpf_ktime_get_ns() - s->ts_ns,
		 (u64)args->succeeded << KVHEAT_PAGE_SHIFT);
	mig_start.delete(&tid);
	return 0;
}
#endif
