/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * kvtier: KV-cache regions as tagged memory on DRAM and CXL/NUMA nodes.
 *
 * The one ABI header shared by kvtier.ko and userspace (the cffi binding in
 * userspace/kvtier/_native_build.py reads this file). Rules, as in the vfio and
 * udmabuf headers: fixed-width types only, explicit padding, __u64 for user
 * pointers, no enums or bitfields in structs, command numbers that encode
 * direction and size. Unknown flag bits and non-zero padding/reserved fields are
 * -EINVAL, unknown commands -ENOTTY, unreadable/unwritable user memory -EFAULT.
 * A struct never changes: a new capability is a new command or a new flag bit,
 * announced by KVTIER_IOC_API.
 *
 * Objects. A *region* is memory the driver allocates page by page on a NUMA
 * node and maps into processes with mmap(2) (MAP_SHARED, fault-driven). It is
 * divided into fixed-size *blocks* (a multiple of the page size). Regions have
 * global ids. The fd that creates a region, and every fd that attaches it, holds
 * a reference; so does every mapping. The region and its pages are freed when
 * the last reference goes (KVTIER_IOC_REGION_RELEASE, close(2), munmap(2)).
 *
 * mmap: pass the region's mmap_offset (plus a page-aligned offset inside the
 * region) as the offset argument. Only an fd that created or attached the region
 * may map it.
 *
 * Ownership: a region belongs to the creating euid and carries a tenant id.
 * Another uid can attach it only with CAP_SYS_ADMIN or after the owner granted
 * it (KVTIER_IOC_GRANT); otherwise -EACCES. Every other command on a region
 * needs the same access. KVTIER_IOC_SHARE needs access to both regions and the
 * same tenant id (-EPERM otherwise), so blocks never cross tenants, and a tenant
 * id alone never opens another user's data.
 */
#ifndef _UAPI_LINUX_KVTIER_H
#define _UAPI_LINUX_KVTIER_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define KVTIER_DEVICE_NAME	"kvtier"
#define KVTIER_API_VERSION	1
#define KVTIER_IOC_MAGIC	0xDA

/* mmap offset of a region: its id shifted into the high bits of the offset. */
#define KVTIER_MMAP_SHIFT	40	/* bytes: a region is at most 1 TiB */
#define KVTIER_MAX_NODES	64	/* node ids in per-node arrays below */
#define KVTIER_NODE_NONE	(-1)	/* block not populated yet */

/* Block types (kvtier_tags.block_type): what a KV block holds. */
#define KVTIER_BLOCK_UNKNOWN	0
#define KVTIER_BLOCK_PREFIX	1	/* shared system prompt / document prefix */
#define KVTIER_BLOCK_HISTORY	2	/* earlier turns of a conversation */
#define KVTIER_BLOCK_GENERATED	3	/* tokens generated in the current turn */
#define KVTIER_BLOCK_TYPE_MAX	3

/* Priority classes (kvtier_tags.priority): higher is more urgent. */
#define KVTIER_PRIO_IDLE	0
#define KVTIER_PRIO_NORMAL	1
#define KVTIER_PRIO_DECODE	2	/* session decoding now: keep in its working tier */
#define KVTIER_PRIO_MAX		2

struct kvtier_tags {
	__u64 tenant_id;
	__u64 session_id;
	__u32 layer_first;
	__u32 layer_count;	/* 0: all layers */
	__u32 head_first;
	__u32 head_count;	/* 0: all heads */
	__u32 block_type;	/* KVTIER_BLOCK_* */
	__u32 priority;		/* KVTIER_PRIO_* */
};

/* KVTIER_IOC_API: handshake; the kernel fills everything. */
#define KVTIER_FEATURE_MIGRATE		(1ULL << 0)
#define KVTIER_FEATURE_SHARE		(1ULL << 1)	/* read-only sharing, SIGBUS on write, UNSHARE copies */
#define KVTIER_FEATURE_GRANT		(1ULL << 2)
#define KVTIER_FEATURE_MOVABLE_NODES	(1ULL << 3)	/* allocates on ZONE_MOVABLE-only nodes (dax kmem) */
#define KVTIER_FEATURE_ACCESS_RESET	(1ULL << 4)	/* KVTIER_IOC_ACCESS_RESET: access sampling */
#define KVTIER_FEATURE_DISCARD		(1ULL << 5)	/* KVTIER_IOC_DISCARD: give blocks' pages back */

struct kvtier_api {
	__u32 api_version;	/* KVTIER_API_VERSION */
	__u32 page_size;
	__u64 features;		/* KVTIER_FEATURE_* */
	__u64 ioctls;		/* bit n set: command number n is supported */
	__u64 max_region_bytes;	/* module parameter */
	__u64 max_total_bytes;	/* module parameter: all regions together */
	__u32 max_nodes;	/* KVTIER_MAX_NODES */
	__u32 pad;
};

/* KVTIER_IOC_REGION_CREATE */
#define KVTIER_CREATE_POPULATE	(1U << 0)	/* allocate every page now, not on first fault */

struct kvtier_region_create {
	__u64 size_bytes;	/* in: multiple of block_bytes */
	__u32 block_bytes;	/* in: multiple of the page size */
	__s32 node;		/* in: NUMA node for new pages */
	__u32 flags;		/* in: KVTIER_CREATE_* */
	__u32 pad;
	struct kvtier_tags tags;	/* in */
	__u64 region_id;	/* out */
	__u64 mmap_offset;	/* out */
};

/* KVTIER_IOC_REGION_ATTACH: take a reference on an existing region from this fd. */
struct kvtier_region_attach {
	__u64 region_id;	/* in */
	__u64 mmap_offset;	/* out */
	__u64 size_bytes;	/* out */
	__u32 block_bytes;	/* out */
	__u32 pad;
};

/* KVTIER_IOC_REGION_RELEASE: drop this fd's reference (mappings keep theirs). */
struct kvtier_region_release {
	__u64 region_id;
};

/* KVTIER_IOC_REGION_INFO */
struct kvtier_region_info {
	__u64 region_id;	/* in */
	__u64 size_bytes;
	__u32 block_bytes;
	__u32 nr_blocks;
	__u32 owner_uid;
	__s32 node;		/* node new pages go to */
	struct kvtier_tags tags;
	__u64 resident_bytes;	/* populated pages, all nodes */
	__u64 shared_bytes;	/* of which shared with another region */
	__u64 faults;
	__u64 migrations;	/* blocks migrated */
	__u64 migrated_bytes;
	__u64 node_bytes[KVTIER_MAX_NODES];	/* populated bytes per node */
};

/* KVTIER_IOC_SET_TAGS: region tags (nr_blocks == 0) or per-block type/priority. */
#define KVTIER_TAG_SESSION	(1U << 0)
#define KVTIER_TAG_LAYERS	(1U << 1)
#define KVTIER_TAG_HEADS	(1U << 2)
#define KVTIER_TAG_TYPE		(1U << 3)
#define KVTIER_TAG_PRIORITY	(1U << 4)
/* tenant_id cannot be changed: it decides who may share with whom. */

struct kvtier_set_tags {
	__u64 region_id;
	__u32 first_block;
	__u32 nr_blocks;	/* 0: the region's own tags (any KVTIER_TAG_*); else only TYPE/PRIORITY */
	__u32 mask;		/* KVTIER_TAG_*: which fields of tags to set */
	__u32 pad;
	struct kvtier_tags tags;
};

/* KVTIER_IOC_MIGRATE: move blocks [first_block, first_block + nr_blocks) to node. */
#define KVTIER_MIGRATE_POPULATE	(1U << 0)	/* also allocate unpopulated pages there */

struct kvtier_migrate {
	__u64 region_id;	/* in */
	__u32 first_block;	/* in */
	__u32 nr_blocks;	/* in */
	__s32 node;		/* in: target node */
	__u32 flags;		/* in: KVTIER_MIGRATE_* */
	__u64 bytes_moved;	/* out: bytes copied to the target node */
	__u32 blocks_moved;	/* out */
	__u32 pad;
};

/*
 * KVTIER_IOC_SHARE: make dst blocks share src blocks' pages, read-only.
 * Both regions must be accessible to the caller and belong to the same tenant.
 * A write to a shared page raises SIGBUS; KVTIER_IOC_UNSHARE gives a block a
 * private, writable copy. Pages are freed when the last sharer lets go.
 */
struct kvtier_share {
	__u64 dst_region_id;
	__u64 src_region_id;
	__u32 dst_first_block;
	__u32 src_first_block;
	__u32 nr_blocks;	/* both regions must have the same block_bytes */
	__u32 pad;
};

/* KVTIER_IOC_UNSHARE: copy shared blocks into private pages on their node. */
struct kvtier_range {
	__u64 region_id;
	__u32 first_block;
	__u32 nr_blocks;
};

/*
 * KVTIER_IOC_ACCESS_RESET (struct kvtier_range): unmap the blocks' pages from every
 * process, keeping them allocated, so the next touch of each page faults again
 * (minor fault) and is counted by the kvtier_fault tracepoint: access sampling for
 * probes that keep per-block heat (bpf/). Empty blocks are left alone.
 */

/*
 * KVTIER_IOC_DISCARD (struct kvtier_range): free the blocks' pages, unmapping them
 * from every process; the next touch of a page faults in a zeroed one on the block's
 * node. A shared block drops only its own reference to the pages it shares. For a
 * user of the region that frees a block's contents (kvtierd trims free space), as
 * FALLOC_FL_PUNCH_HOLE does for a memfd.
 */

/* KVTIER_IOC_BLOCK_QUERY: one kvtier_block_state per block into entries_ptr. */
#define KVTIER_BLOCK_POPULATED	(1U << 0)	/* every page allocated */
#define KVTIER_BLOCK_PARTIAL	(1U << 1)	/* some pages allocated */
#define KVTIER_BLOCK_SHARED	(1U << 2)	/* pages shared with another region */

struct kvtier_block_state {
	__s32 node;		/* node of the block's pages, KVTIER_NODE_NONE if none */
	__u32 flags;		/* KVTIER_BLOCK_* state bits above */
	__u32 block_type;
	__u32 priority;
	__u32 faults;
	__u32 migrations;
};

struct kvtier_block_query {
	__u64 region_id;
	__u32 first_block;
	__u32 nr_blocks;
	__u64 entries_ptr;	/* user pointer to nr_blocks struct kvtier_block_state */
};

/* KVTIER_IOC_GRANT: owner (or CAP_SYS_ADMIN) lets uid attach region_id. */
#define KVTIER_GRANT_REVOKE	(1U << 0)

struct kvtier_grant {
	__u64 region_id;
	__u32 uid;
	__u32 flags;
};

/* KVTIER_IOC_STATS: module-wide and per-node counters. */
struct kvtier_node_stats {
	__u64 allocated_bytes;
	__u64 migrated_in_bytes;
	__u64 migrated_out_bytes;
};

struct kvtier_stats {
	__u64 regions;
	__u64 allocated_bytes;
	__u64 shared_bytes;
	__u64 faults;
	__u64 migrations;
	__u64 migrated_bytes;
	__u64 shares;
	__u64 cow_copies;	/* blocks given private copies by UNSHARE */
	struct kvtier_node_stats nodes[KVTIER_MAX_NODES];
};

#define KVTIER_IOC_API			_IOR(KVTIER_IOC_MAGIC, 0x00, struct kvtier_api)
#define KVTIER_IOC_REGION_CREATE	_IOWR(KVTIER_IOC_MAGIC, 0x01, struct kvtier_region_create)
#define KVTIER_IOC_REGION_ATTACH	_IOWR(KVTIER_IOC_MAGIC, 0x02, struct kvtier_region_attach)
#define KVTIER_IOC_REGION_RELEASE	_IOW(KVTIER_IOC_MAGIC, 0x03, struct kvtier_region_release)
#define KVTIER_IOC_REGION_INFO		_IOWR(KVTIER_IOC_MAGIC, 0x04, struct kvtier_region_info)
#define KVTIER_IOC_SET_TAGS		_IOW(KVTIER_IOC_MAGIC, 0x05, struct kvtier_set_tags)
#define KVTIER_IOC_MIGRATE		_IOWR(KVTIER_IOC_MAGIC, 0x06, struct kvtier_migrate)
#define KVTIER_IOC_SHARE		_IOW(KVTIER_IOC_MAGIC, 0x07, struct kvtier_share)
#define KVTIER_IOC_UNSHARE		_IOW(KVTIER_IOC_MAGIC, 0x08, struct kvtier_range)
#define KVTIER_IOC_BLOCK_QUERY		_IOW(KVTIER_IOC_MAGIC, 0x09, struct kvtier_block_query)
#define KVTIER_IOC_GRANT		_IOW(KVTIER_IOC_MAGIC, 0x0a, struct kvtier_grant)
#define KVTIER_IOC_STATS		_IOR(KVTIER_IOC_MAGIC, 0x0b, struct kvtier_stats)
#define KVTIER_IOC_ACCESS_RESET		_IOW(KVTIER_IOC_MAGIC, 0x0c, struct kvtier_range)
#define KVTIER_IOC_DISCARD		_IOW(KVTIER_IOC_MAGIC, 0x0d, struct kvtier_range)

/* ---- generic netlink family "kvtier" (spec: kmod/netlink/kvtier.yaml) ---- */

#define KVTIER_GENL_NAME		"kvtier"
#define KVTIER_GENL_VERSION		1
#define KVTIER_GENL_MCGRP_EVENTS	"events"

enum {
	KVTIER_CMD_UNSPEC,
	KVTIER_CMD_REGION_GET,		/* dump: one KVTIER_CMD_REGION_GET message per region */
	KVTIER_CMD_STATS_GET,		/* do: module and per-node counters */
	KVTIER_CMD_REGION_NEW,		/* notification on "events" */
	KVTIER_CMD_REGION_DEL,		/* notification on "events" */
	KVTIER_CMD_MIGRATED,		/* notification on "events": a completed KVTIER_IOC_MIGRATE */

	__KVTIER_CMD_MAX,
	KVTIER_CMD_MAX = (__KVTIER_CMD_MAX - 1)
};

enum {
	KVTIER_A_UNSPEC,
	KVTIER_A_REGION_ID,		/* u64 */
	KVTIER_A_OWNER_UID,		/* u32 */
	KVTIER_A_TENANT_ID,		/* u64 */
	KVTIER_A_SESSION_ID,		/* u64 */
	KVTIER_A_SIZE_BYTES,		/* u64 */
	KVTIER_A_BLOCK_BYTES,		/* u32 */
	KVTIER_A_NODE,			/* s32: region's node, or the target of a migration */
	KVTIER_A_RESIDENT_BYTES,	/* u64 */
	KVTIER_A_SHARED_BYTES,		/* u64 */
	KVTIER_A_FAULTS,		/* u64 */
	KVTIER_A_MIGRATIONS,		/* u64 */
	KVTIER_A_MIGRATED_BYTES,	/* u64 */
	KVTIER_A_FIRST_BLOCK,		/* u32: migration notifications */
	KVTIER_A_NR_BLOCKS,		/* u32 */
	KVTIER_A_BYTES_MOVED,		/* u64 */
	KVTIER_A_REGIONS,		/* u64: stats */
	KVTIER_A_ALLOCATED_BYTES,	/* u64: stats, and per node */
	KVTIER_A_SHARES,		/* u64: stats */
	KVTIER_A_NODE_STATS,		/* nest, repeated: one per node with KVTIER_A_NODE_* */
	KVTIER_A_NODE_ID,		/* u32 inside KVTIER_A_NODE_STATS */
	KVTIER_A_NODE_MIGRATED_IN_BYTES,	/* u64 inside KVTIER_A_NODE_STATS */
	KVTIER_A_NODE_MIGRATED_OUT_BYTES,	/* u64 inside KVTIER_A_NODE_STATS */
	KVTIER_A_PAD,

	__KVTIER_A_MAX,
	KVTIER_A_MAX = (__KVTIER_A_MAX - 1)
};

#endif /* _UAPI_LINUX_KVTIER_H */
