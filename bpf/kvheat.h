/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kvheat: the map keys and values shared by kvheat.bpf.c and its readers
 * (userspace/kvtier/probes.py reads the KVHEAT_* constants from this file; bcc
 * gives the reader these struct layouts through the compiled maps).
 * Fixed-width types and explicit padding only, as in the module's uapi header.
 */
#ifndef _KVHEAT_H
#define _KVHEAT_H

#define KVHEAT_ANON_BIT		0x80000000	/* heat/region ids of anonymous ranges: bit | range id */
#define KVHEAT_NODE_ANY		0xffff		/* node not known (e.g. compaction's target) */
#define KVHEAT_KIND_KVTIER	0		/* migration by kvtier.ko (tracepoint kvtier_migrate) */
#define KVHEAT_KIND_KERNEL	1		/* migrate_pages(): move_pages, mbind, NUMA balancing, demotion */
#define KVHEAT_HIST_SLOTS	65		/* bcc's bpf_log2l(): slot s >= 1 holds [2^(s-1), 2^s); 0 lands in 1 */

/* counters[] indexes */
#define KVHEAT_C_KVTIER_FAULTS	0	/* kvtier_fault events seen */
#define KVHEAT_C_ANON_FAULTS	1	/* user faults inside a registered anonymous range */
#define KVHEAT_C_HINT_FAULTS	2	/* NUMA hinting faults inside a registered range */
#define KVHEAT_C_MIGRATIONS	3	/* migrations recorded (kvtier blocks + migrate_pages calls) */
#define KVHEAT_C_HEAT_FULL	4	/* accesses dropped: the heat map was full */
#define KVHEAT_C_RANGES		5	/* written by userspace: registered ranges (0: skip the range scan) */
#define KVHEAT_NR_COUNTERS	8

/* heat: one entry per block (or per page with -DHEAT_PAGES=1) that was touched */
struct kvheat_key {
	__u32 region;		/* kvtier region id, or KVHEAT_ANON_BIT | range id */
	__u32 block;
	__u32 page;		/* page inside the block; 0 unless HEAT_PAGES */
	__u32 pad;
};

struct kvheat_val {
	__u64 count;		/* faults counted (first touches and re-faults after an access reset) */
	__u64 writes;
	__u64 hint_faults;	/* NUMA hinting faults (anonymous ranges) */
	__u64 last_ns;		/* bpf_ktime_get_ns() of the last access */
	__s32 node;		/* node of the page at the last fault (-1: not known) */
	__u32 pad;
};

/* region_faults: per region (or range) totals, for fault rates */
struct kvheat_region {
	__u64 faults;
	__u64 writes;
	__u64 hint_faults;
	__u64 first_ns;
	__u64 last_ns;
};

/* ranges[]: anonymous memory an engine registered (written by userspace) */
struct kvheat_range {
	__u32 tgid;		/* 0: slot unused */
	__u32 id;
	__u64 start;		/* user virtual addresses [start, end) */
	__u64 end;
	__u64 block_bytes;	/* how the range divides into blocks */
};

/* mig_lat_us / mig_bytes: log2 histograms per (kind, source node, target node) */
struct kvheat_hist_key {
	__u32 kind;		/* KVHEAT_KIND_* */
	__u16 src;		/* node, or KVHEAT_NODE_ANY */
	__u16 dst;
	__u32 slot;
	__u32 pad;
};

/* mig_start: a migrate_pages() call in flight, per thread */
struct kvheat_mig_start {
	__u64 ts_ns;
	__s32 src;
	__s32 dst;
};

#endif /* _KVHEAT_H */
