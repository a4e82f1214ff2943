/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kvtier internals shared by core.c (regions, chunks, migration, sharing) and
 * its interfaces: chardev.c (/dev/kvtier), genl.c (generic netlink), sysfs.c.
 *
 * Locking: one mutex, kvtier_lock, guards every region, block and chunk, the
 * region xarray and the counters written outside atomics. The order is
 *   mmap_lock -> kvtier_lock -> page lock -> i_mmap_rwsem
 * (faults arrive holding mmap_lock; migration locks pages and then zaps PTEs
 * with unmap_mapping_range()). Never touch user memory while holding
 * kvtier_lock: a fault on one of our own mappings would take it again.
 */
#ifndef _KVTIER_INTERNAL_H
#define _KVTIER_INTERNAL_H

#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mm_types.h>
#include <linux/mutex.h>
#include <linux/uidgid.h>
#include <linux/xarray.h>
#include <uapi/linux/kvtier.h>

/* Region ids stay below this so (id << KVTIER_MMAP_SHIFT) fits a loff_t. */
#define KVTIER_MAX_REGION_ID	((1U << 22) - 1)
/* Largest block: bounds the per-chunk page array (4096 pointers). */
#define KVTIER_MAX_BLOCK_BYTES	(16U << 20)

struct kvtier_region;

/**
 * struct kvtier_chunk - the pages behind one block, possibly shared.
 * @sharers: blocks pointing here (1: private; more: shared read-only)
 * @owners:  those blocks (struct kvtier_block.chunk_link), to zap them all
 * @node:    node every page of this chunk lives on (and new ones go to)
 * @nr_pages: pages per chunk (block_bytes / PAGE_SIZE)
 * @populated: pages allocated so far
 * @pages:   the pages, NULL until first touched
 */
struct kvtier_chunk {
	unsigned int sharers;
	struct list_head owners;
	int node;
	unsigned int nr_pages;
	unsigned int populated;
	struct page *pages[];
};

/**
 * struct kvtier_block - one block of a region.
 * @chunk: its pages (never NULL while the region lives)
 * @region: back pointer, for zapping a shared chunk's other owners
 * @index: block number inside @region
 * @chunk_link: entry in @chunk->owners
 */
struct kvtier_block {
	struct kvtier_chunk *chunk;
	struct kvtier_region *region;
	u32 index;
	u32 block_type;
	u32 priority;
	u32 faults;
	u32 migrations;
	struct list_head chunk_link;
};

/**
 * struct kvtier_region - a tagged, block-structured piece of driver memory.
 * @kref: fds that created/attached it and VMAs that map it
 * @id: global id; the mmap offset is id << KVTIER_MMAP_SHIFT
 * @owner: creator's euid
 * @grants: uids the owner let attach (xarray index = uid)
 */
struct kvtier_region {
	struct kref kref;
	u32 id;
	kuid_t owner;
	u64 size_bytes;
	u32 block_bytes;
	u32 nr_blocks;
	u32 pages_per_block;
	int node;
	struct kvtier_tags tags;
	struct xarray grants;
	u64 faults;
	u64 migrations;
	u64 migrated_bytes;
	struct kvtier_block blocks[];
};

/* Module-wide counters (kvtier_lock held for writes; readers may race). */
struct kvtier_counters {
	u64 regions;
	u64 reserved_bytes;	/* sum of region sizes: checked against max_total_bytes */
	u64 allocated_bytes;
	u64 faults;
	u64 migrations;
	u64 migrated_bytes;
	u64 shares;
	u64 cow_copies;
	u64 node_allocated_bytes[KVTIER_MAX_NODES];
	u64 node_migrated_in_bytes[KVTIER_MAX_NODES];
	u64 node_migrated_out_bytes[KVTIER_MAX_NODES];
};

extern struct mutex kvtier_lock;
extern struct xarray kvtier_regions;
extern struct kvtier_counters kvtier_counters;
extern unsigned long long kvtier_max_region_bytes;
extern unsigned long long kvtier_max_total_bytes;

/* core.c */
int kvtier_core_init(void);
void kvtier_core_exit(void);
bool kvtier_node_valid(int node);
struct kvtier_region *kvtier_region_create(const struct kvtier_region_create *req);
struct kvtier_region *kvtier_region_get_checked(u64 id, int *err);
void kvtier_region_get(struct kvtier_region *r);
void kvtier_region_put(struct kvtier_region *r);
bool kvtier_may_access(struct kvtier_region *r);
int kvtier_region_info(struct kvtier_region *r, struct kvtier_region_info *info);
int kvtier_set_tags(struct kvtier_region *r, const struct kvtier_set_tags *req);
int kvtier_migrate(struct kvtier_region *r, struct kvtier_migrate *req);
int kvtier_share(struct kvtier_region *dst, struct kvtier_region *src,
		 const struct kvtier_share *req);
int kvtier_unshare(struct kvtier_region *r, const struct kvtier_range *req);
int kvtier_access_reset(struct kvtier_region *r, const struct kvtier_range *req);
int kvtier_discard(struct kvtier_region *r, const struct kvtier_range *req);
int kvtier_block_query(struct kvtier_region *r, u32 first, u32 nr,
		       struct kvtier_block_state *out);
int kvtier_grant(struct kvtier_region *r, const struct kvtier_grant *req);
void kvtier_stats(struct kvtier_stats *st);
void kvtier_region_usage(const struct kvtier_region *r, u64 *resident, u64 *shared,
			 u64 *node_bytes);
vm_fault_t kvtier_fault(struct vm_fault *vmf);
vm_fault_t kvtier_page_mkwrite(struct vm_fault *vmf);
struct address_space *kvtier_mapping(void);

/* chardev.c */
int kvtier_chardev_init(void);
void kvtier_chardev_exit(void);

/* genl.c */
int kvtier_genl_init(void);
void kvtier_genl_exit(void);
void kvtier_genl_region_event(u8 cmd, const struct kvtier_region *r);
void kvtier_genl_migrated(const struct kvtier_region *r, u32 first, u32 nr, int node,
			  u64 bytes_moved);

/* sysfs.c */
int kvtier_sysfs_init(void);
void kvtier_sysfs_exit(void);

#endif /* _KVTIER_INTERNAL_H */
