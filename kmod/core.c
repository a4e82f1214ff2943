// SPDX-License-Identifier: GPL-2.0
/*
 * kvtier core: regions, blocks, chunks, faults, migration and sharing.
 *
 * A region is an array of blocks; each block points at a chunk that owns the
 * block's pages. Sharing makes several blocks point at one chunk, so a shared
 * chunk is migrated once and every owner's mapping range is zapped. Pages are
 * allocated by the driver (not on the LRU), so the kernel cannot move or
 * reclaim them: on a ZONE_MOVABLE node (dax kmem, CXL) they keep that memory
 * from being offlined while allocated. That is the price of knowing exactly
 * where every KV block lives; max_total_bytes bounds it.
 *
 * This file knows nothing about its interfaces (chardev.c, genl.c, sysfs.c).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/capability.h>
#include <linux/cred.h>
#include <linux/gfp.h>
#include <linux/highmem.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/nodemask.h>
#include <linux/overflow.h>
#include <linux/pagemap.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>

#include "kvtier_internal.h"

#define CREATE_TRACE_POINTS
#include "kvtier_trace.h"

unsigned long long kvtier_max_region_bytes = 1ULL << 30;
module_param_named(max_region_bytes, kvtier_max_region_bytes, ullong, 0644);
MODULE_PARM_DESC(max_region_bytes, "Largest region in bytes (default 1 GiB, at most 1 TiB)");

unsigned long long kvtier_max_total_bytes;
module_param_named(max_total_bytes, kvtier_max_total_bytes, ullong, 0644);
MODULE_PARM_DESC(max_total_bytes,
		 "All regions together, in bytes (default 0: half of RAM at load time)");

DEFINE_MUTEX(kvtier_lock);
DEFINE_XARRAY_ALLOC1(kvtier_regions);
struct kvtier_counters kvtier_counters;

/**
 * kvtier_node_valid() - may pages be placed on @node?
 * @node: user-supplied node id
 *
 * Return: true for an online node with memory whose id fits the uapi arrays.
 */
bool kvtier_node_valid(int node)
{
	return node >= 0 && node < KVTIER_MAX_NODES && node < MAX_NUMNODES &&
	       node_online(node) && node_state(node, N_MEMORY);
}

static loff_t kvtier_region_offset(const struct kvtier_region *r)
{
	return (loff_t)r->id << KVTIER_MMAP_SHIFT;
}

/*
 * Nodes onlined from device-dax (kmem) or CXL are ZONE_MOVABLE only: a
 * GFP_HIGHUSER allocation fails there, so ask for movable memory on such a
 * node. __GFP_THISNODE makes placement exact and keeps the OOM killer out.
 */
static struct page *kvtier_alloc_page(int node, bool zero)
{
	gfp_t gfp = node_state(node, N_NORMAL_MEMORY) ? GFP_HIGHUSER : GFP_HIGHUSER_MOVABLE;
	struct page *page;

	gfp |= __GFP_THISNODE | __GFP_NOWARN | __GFP_RETRY_MAYFAIL;
	if (zero)
		gfp |= __GFP_ZERO;
	page = alloc_pages_node(node, gfp, 0);
	if (page) {
		kvtier_counters.allocated_bytes += PAGE_SIZE;
		kvtier_counters.node_allocated_bytes[page_to_nid(page)] += PAGE_SIZE;
	}
	return page;
}

static void kvtier_free_page(struct page *page)
{
	kvtier_counters.allocated_bytes -= PAGE_SIZE;
	kvtier_counters.node_allocated_bytes[page_to_nid(page)] -= PAGE_SIZE;
	put_page(page);
}

static struct kvtier_chunk *kvtier_chunk_alloc(unsigned int nr_pages, int node)
{
	struct kvtier_chunk *c;

	c = kvzalloc(struct_size(c, pages, nr_pages), GFP_KERNEL);
	if (!c)
		return NULL;
	INIT_LIST_HEAD(&c->owners);
	c->nr_pages = nr_pages;
	c->node = node;
	return c;
}

static void kvtier_chunk_attach(struct kvtier_block *b, struct kvtier_chunk *c)
{
	b->chunk = c;
	c->sharers++;
	list_add_tail(&b->chunk_link, &c->owners);
}

/* Free @c's pages (no PTE maps them any more); the chunk is empty afterwards. */
static void kvtier_chunk_free_pages(struct kvtier_chunk *c)
{
	unsigned int i;

	for (i = 0; i < c->nr_pages; i++) {
		if (c->pages[i]) {
			kvtier_free_page(c->pages[i]);
			c->pages[i] = NULL;
		}
	}
	c->populated = 0;
}

/* Drop @b's reference on its chunk; the last sharer frees the pages. */
static void kvtier_chunk_detach(struct kvtier_block *b)
{
	struct kvtier_chunk *c = b->chunk;

	if (!c)
		return;
	b->chunk = NULL;
	list_del(&b->chunk_link);
	if (--c->sharers)
		return;
	kvtier_chunk_free_pages(c);
	kvfree(c);
}

/* Remove every PTE, in every process, that maps block @b (even_cows: 1). */
static void kvtier_zap_block(const struct kvtier_block *b)
{
	const struct kvtier_region *r = b->region;

	unmap_mapping_range(kvtier_mapping(),
			    kvtier_region_offset(r) + (loff_t)b->index * r->block_bytes,
			    r->block_bytes, 1);
}

/*
 * Zap block @b, whose pages are @c's, so that no PTE survives: a fault that
 * looked a page up before we took kvtier_lock holds that page's lock until
 * its PTE is in place, so lock every page first, then zap.
 */
static void kvtier_zap_block_locked(const struct kvtier_block *b, const struct kvtier_chunk *c)
{
	unsigned int i;

	for (i = 0; i < c->nr_pages; i++)
		if (c->pages[i])
			lock_page(c->pages[i]);
	kvtier_zap_block(b);
	for (i = 0; i < c->nr_pages; i++)
		if (c->pages[i])
			unlock_page(c->pages[i]);
}

static void kvtier_zap_chunk(const struct kvtier_chunk *c)
{
	const struct kvtier_block *b;

	list_for_each_entry(b, &c->owners, chunk_link)
		kvtier_zap_block(b);
}

/* Give block @b chunk @c in place of @old: no PTE to @old's pages survives. */
static void kvtier_block_rechunk(struct kvtier_block *b, struct kvtier_chunk *old,
				 struct kvtier_chunk *c)
{
	kvtier_zap_block_locked(b, old);
	kvtier_chunk_detach(b);
	kvtier_chunk_attach(b, c);
}

static int kvtier_chunk_populate(struct kvtier_chunk *c)
{
	unsigned int i;

	for (i = 0; i < c->nr_pages; i++) {
		if (c->pages[i])
			continue;
		c->pages[i] = kvtier_alloc_page(c->node, true);
		if (!c->pages[i])
			return -ENOMEM;
		c->populated++;
	}
	return 0;
}

/* Overflow-safe: is [first, first + nr) a non-empty range of @r's blocks? */
static bool kvtier_range_ok(const struct kvtier_region *r, u32 first, u32 nr)
{
	return nr && (u64)first + nr <= r->nr_blocks;
}

static bool kvtier_tags_ok(const struct kvtier_tags *t)
{
	return t->block_type <= KVTIER_BLOCK_TYPE_MAX && t->priority <= KVTIER_PRIO_MAX;
}

static void kvtier_region_free(struct kvtier_region *r)
{
	u32 i;

	for (i = 0; i < r->nr_blocks; i++)
		kvtier_chunk_detach(&r->blocks[i]);
	xa_destroy(&r->grants);
	kvfree(r);
}

/**
 * kvtier_region_create() - allocate a region described by a create request.
 * @req: validated in here: sizes, node, flags, padding and tags
 *
 * Return: the region holding one reference (the caller's), or ERR_PTR.
 */
struct kvtier_region *kvtier_region_create(const struct kvtier_region_create *req)
{
	struct kvtier_region *r;
	u64 nr_blocks;
	u32 i, id;
	int err;

	if (req->flags & ~KVTIER_CREATE_POPULATE || req->pad || !kvtier_tags_ok(&req->tags))
		return ERR_PTR(-EINVAL);
	if (!req->block_bytes || req->block_bytes % PAGE_SIZE ||
	    req->block_bytes > KVTIER_MAX_BLOCK_BYTES)
		return ERR_PTR(-EINVAL);
	if (!req->size_bytes || req->size_bytes % req->block_bytes ||
	    req->size_bytes > (1ULL << KVTIER_MMAP_SHIFT))
		return ERR_PTR(-EINVAL);
	if (req->size_bytes > kvtier_max_region_bytes)
		return ERR_PTR(-E2BIG);
	if (!kvtier_node_valid(req->node))
		return ERR_PTR(-EINVAL);
	nr_blocks = div_u64(req->size_bytes, req->block_bytes);

	r = kvzalloc(struct_size(r, blocks, nr_blocks), GFP_KERNEL);
	if (!r)
		return ERR_PTR(-ENOMEM);
	kref_init(&r->kref);
	xa_init(&r->grants);
	r->owner = current_euid();
	r->size_bytes = req->size_bytes;
	r->block_bytes = req->block_bytes;
	r->nr_blocks = nr_blocks;
	r->pages_per_block = req->block_bytes >> PAGE_SHIFT;
	r->node = req->node;
	r->tags = req->tags;

	mutex_lock(&kvtier_lock);
	/* Checked again below: fail before populating a region that cannot fit. */
	if (kvtier_counters.reserved_bytes + r->size_bytes > kvtier_max_total_bytes) {
		err = -ENOSPC;
		goto err_free;
	}
	for (i = 0; i < r->nr_blocks; i++) {
		struct kvtier_block *b = &r->blocks[i];
		struct kvtier_chunk *c = kvtier_chunk_alloc(r->pages_per_block, r->node);

		if (!c) {
			err = -ENOMEM;
			goto err_free;
		}
		b->region = r;
		b->index = i;
		b->block_type = r->tags.block_type;
		b->priority = r->tags.priority;
		kvtier_chunk_attach(b, c);
		if (req->flags & KVTIER_CREATE_POPULATE) {
			err = kvtier_chunk_populate(c);
			if (err)
				goto err_free;
		}
	}
	if (kvtier_counters.reserved_bytes + r->size_bytes > kvtier_max_total_bytes) {
		err = -ENOSPC;
		goto err_free;
	}
	err = xa_alloc(&kvtier_regions, &id, r, XA_LIMIT(1, KVTIER_MAX_REGION_ID), GFP_KERNEL);
	if (err)
		goto err_free;
	r->id = id;
	kvtier_counters.regions++;
	kvtier_counters.reserved_bytes += r->size_bytes;
	mutex_unlock(&kvtier_lock);

	trace_kvtier_region_create(r->id, r->tags.session_id, r->tags.tenant_id,
				   r->size_bytes, r->block_bytes, r->node);
	kvtier_genl_region_event(KVTIER_CMD_REGION_NEW, r);
	return r;

err_free:
	kvtier_region_free(r);
	mutex_unlock(&kvtier_lock);
	return ERR_PTR(err == -EBUSY ? -ENOSPC : err);
}

/* kref release: called with kvtier_lock held, which it drops. */
static void kvtier_region_release(struct kref *kref)
{
	struct kvtier_region *r = container_of(kref, struct kvtier_region, kref);

	xa_erase(&kvtier_regions, r->id);
	kvtier_counters.regions--;
	kvtier_counters.reserved_bytes -= r->size_bytes;
	for (u32 i = 0; i < r->nr_blocks; i++)
		kvtier_chunk_detach(&r->blocks[i]);
	mutex_unlock(&kvtier_lock);

	trace_kvtier_region_destroy(r->id, r->tags.session_id, r->nr_blocks);
	kvtier_genl_region_event(KVTIER_CMD_REGION_DEL, r);
	xa_destroy(&r->grants);
	kvfree(r);
}

/**
 * kvtier_region_get() - take another reference on a region the caller holds.
 * @r: region
 */
void kvtier_region_get(struct kvtier_region *r)
{
	kref_get(&r->kref);
}

/**
 * kvtier_region_put() - drop a reference; the last one frees the region.
 * @r: region
 *
 * Must not be called with kvtier_lock held.
 */
void kvtier_region_put(struct kvtier_region *r)
{
	kref_put_mutex(&r->kref, kvtier_region_release, &kvtier_lock);
}

/**
 * kvtier_may_access() - may the current task use region @r?
 * @r: region
 *
 * Return: true for the owner, a granted uid, or CAP_SYS_ADMIN.
 */
bool kvtier_may_access(struct kvtier_region *r)
{
	kuid_t euid = current_euid();

	if (uid_eq(euid, r->owner) || xa_load(&r->grants, __kuid_val(euid)))
		return true;
	return capable(CAP_SYS_ADMIN);
}

/**
 * kvtier_region_get_checked() - look up a region by id for the current task.
 * @id: region id from userspace
 * @err: set to -ENOENT (no such region) or -EACCES (no access) on failure
 *
 * Return: the region with a reference taken, or NULL.
 */
struct kvtier_region *kvtier_region_get_checked(u64 id, int *err)
{
	struct kvtier_region *r = NULL;

	*err = -ENOENT;
	if (!id || id > KVTIER_MAX_REGION_ID)
		return NULL;
	mutex_lock(&kvtier_lock);
	r = xa_load(&kvtier_regions, id);
	if (r && !kvtier_may_access(r)) {
		*err = -EACCES;
		r = NULL;
	}
	if (r)
		kref_get(&r->kref);
	mutex_unlock(&kvtier_lock);
	return r;
}

/**
 * kvtier_region_usage() - populated bytes of a region, in all and per node.
 * @r: region (kvtier_lock held)
 * @resident: populated bytes
 * @shared: of which in chunks shared with another block
 * @node_bytes: KVTIER_MAX_NODES counters to add to, or NULL
 */
void kvtier_region_usage(const struct kvtier_region *r, u64 *resident, u64 *shared,
			 u64 *node_bytes)
{
	u32 i;

	*resident = 0;
	*shared = 0;
	for (i = 0; i < r->nr_blocks; i++) {
		const struct kvtier_chunk *c = r->blocks[i].chunk;
		u64 bytes = (u64)c->populated << PAGE_SHIFT;

		*resident += bytes;
		if (c->sharers > 1)
			*shared += bytes;
		if (node_bytes && bytes)
			node_bytes[c->node] += bytes;
	}
}

/**
 * kvtier_region_info() - fill a KVTIER_IOC_REGION_INFO reply.
 * @r: region
 * @info: out (region_id already set)
 *
 * Return: 0.
 */
int kvtier_region_info(struct kvtier_region *r, struct kvtier_region_info *info)
{
	mutex_lock(&kvtier_lock);
	info->size_bytes = r->size_bytes;
	info->block_bytes = r->block_bytes;
	info->nr_blocks = r->nr_blocks;
	info->owner_uid = from_kuid_munged(current_user_ns(), r->owner);
	info->node = r->node;
	info->tags = r->tags;
	info->faults = r->faults;
	info->migrations = r->migrations;
	info->migrated_bytes = r->migrated_bytes;
	memset(info->node_bytes, 0, sizeof(info->node_bytes));
	kvtier_region_usage(r, &info->resident_bytes, &info->shared_bytes, info->node_bytes);
	mutex_unlock(&kvtier_lock);
	return 0;
}

/**
 * kvtier_set_tags() - update a region's tags or some blocks' type/priority.
 * @r: region
 * @req: nr_blocks == 0: region tags selected by mask; else TYPE/PRIORITY only
 *
 * Return: 0 or -EINVAL.
 */
int kvtier_set_tags(struct kvtier_region *r, const struct kvtier_set_tags *req)
{
	const u32 all = KVTIER_TAG_SESSION | KVTIER_TAG_LAYERS | KVTIER_TAG_HEADS |
			KVTIER_TAG_TYPE | KVTIER_TAG_PRIORITY;
	const struct kvtier_tags *t = &req->tags;
	u32 i;

	if (req->pad || !req->mask || req->mask & ~all)
		return -EINVAL;
	if ((req->mask & KVTIER_TAG_TYPE && t->block_type > KVTIER_BLOCK_TYPE_MAX) ||
	    (req->mask & KVTIER_TAG_PRIORITY && t->priority > KVTIER_PRIO_MAX))
		return -EINVAL;

	mutex_lock(&kvtier_lock);
	if (!req->nr_blocks) {
		if (req->first_block)
			goto einval;
		if (req->mask & KVTIER_TAG_SESSION)
			r->tags.session_id = t->session_id;
		if (req->mask & KVTIER_TAG_LAYERS) {
			r->tags.layer_first = t->layer_first;
			r->tags.layer_count = t->layer_count;
		}
		if (req->mask & KVTIER_TAG_HEADS) {
			r->tags.head_first = t->head_first;
			r->tags.head_count = t->head_count;
		}
		if (req->mask & KVTIER_TAG_TYPE)
			r->tags.block_type = t->block_type;
		if (req->mask & KVTIER_TAG_PRIORITY)
			r->tags.priority = t->priority;
		mutex_unlock(&kvtier_lock);
		return 0;
	}
	if (req->mask & ~(KVTIER_TAG_TYPE | KVTIER_TAG_PRIORITY) ||
	    !kvtier_range_ok(r, req->first_block, req->nr_blocks))
		goto einval;
	for (i = req->first_block; i < req->first_block + req->nr_blocks; i++) {
		if (req->mask & KVTIER_TAG_TYPE)
			r->blocks[i].block_type = t->block_type;
		if (req->mask & KVTIER_TAG_PRIORITY)
			r->blocks[i].priority = t->priority;
	}
	mutex_unlock(&kvtier_lock);
	return 0;
einval:
	mutex_unlock(&kvtier_lock);
	return -EINVAL;
}

/*
 * Move one chunk to @node using @fresh pages (taken from *used on). Old pages
 * are locked first: a fault that already looked one up holds its lock until
 * its PTE is installed, so after lock + zap no PTE maps an old page and no
 * new fault can find one (faults wait on kvtier_lock). A page pinned for DMA
 * (FOLL_PIN) would keep being written behind our back: refuse with -EBUSY.
 */
static int kvtier_chunk_migrate(struct kvtier_chunk *c, int node, bool populate,
				struct page **fresh, unsigned long *used, u64 *bytes)
{
	unsigned int i, locked;
	int err = 0;

	for (locked = 0; locked < c->nr_pages; locked++)
		if (c->pages[locked])
			lock_page(c->pages[locked]);
	kvtier_zap_chunk(c);
	for (i = 0; i < c->nr_pages; i++) {
		if (c->pages[i] && page_maybe_dma_pinned(c->pages[i])) {
			err = -EBUSY;
			goto unlock;
		}
	}
	for (i = 0; i < c->nr_pages; i++) {
		struct page *old = c->pages[i];

		if (!old) {
			if (!populate)
				continue;
			c->pages[i] = fresh[(*used)++];
			clear_highpage(c->pages[i]);
			c->populated++;
			continue;
		}
		c->pages[i] = fresh[(*used)++];
		copy_highpage(c->pages[i], old);
		*bytes += PAGE_SIZE;
		kvtier_counters.node_migrated_out_bytes[page_to_nid(old)] += PAGE_SIZE;
		kvtier_counters.node_migrated_in_bytes[node] += PAGE_SIZE;
		unlock_page(old);
		kvtier_free_page(old);
	}
	c->node = node;
	return 0;
unlock:
	for (i = 0; i < locked; i++)
		if (c->pages[i])
			unlock_page(c->pages[i]);
	return err;
}

static bool kvtier_chunk_in_place(const struct kvtier_chunk *c, int node, bool populate)
{
	return c->node == node && (!populate || c->populated == c->nr_pages);
}

/**
 * kvtier_migrate() - move a range of blocks to another node (KVTIER_IOC_MIGRATE).
 * @r: region
 * @req: in: range, node, flags; out: bytes_moved, blocks_moved
 *
 * Every target page is allocated before anything changes, so -ENOMEM leaves
 * the region as it was. Shared chunks move once, for all their sharers.
 * Concurrent readers and writers see the old or the new copy of a page: the
 * old one is unmapped everywhere before it is copied, and faults wait.
 *
 * Return: 0, -EINVAL, -ENOMEM or -EBUSY (a page is pinned; blocks before it
 * stay moved).
 */
int kvtier_migrate(struct kvtier_region *r, struct kvtier_migrate *req)
{
	bool populate = req->flags & KVTIER_MIGRATE_POPULATE;
	unsigned long need = 0, used = 0, i;
	struct page **fresh = NULL;
	u32 first = req->first_block, nr = req->nr_blocks, b;
	u64 bytes = 0;
	u32 moved = 0;
	int err = 0;

	if (req->flags & ~KVTIER_MIGRATE_POPULATE || req->pad || !kvtier_node_valid(req->node))
		return -EINVAL;
	if (!kvtier_range_ok(r, first, nr))
		return -EINVAL;

	mutex_lock(&kvtier_lock);
	for (b = first; b < first + nr; b++) {
		const struct kvtier_chunk *c = r->blocks[b].chunk;

		if (!kvtier_chunk_in_place(c, req->node, populate))
			need += populate ? c->nr_pages : c->populated;
	}
	if (need) {
		fresh = kvmalloc_array(need, sizeof(*fresh), GFP_KERNEL);
		if (!fresh) {
			err = -ENOMEM;
			goto out;
		}
		for (i = 0; i < need; i++) {
			fresh[i] = kvtier_alloc_page(req->node, false);
			if (!fresh[i]) {
				need = i;
				err = -ENOMEM;
				goto out;
			}
		}
	}
	for (b = first; b < first + nr; b++) {
		struct kvtier_block *blk = &r->blocks[b];
		struct kvtier_chunk *c = blk->chunk;
		u64 chunk_bytes = 0;

		int from = c->node;
		bool has_pages;
		u64 start;

		if (kvtier_chunk_in_place(c, req->node, populate))
			continue;
		/* An empty block just changes where its first pages will go. */
		has_pages = c->populated || populate;
		start = ktime_get_ns();
		err = kvtier_chunk_migrate(c, req->node, populate, fresh, &used, &chunk_bytes);
		if (err)
			break;
		if (!has_pages)
			continue;
		blk->migrations++;
		moved++;
		bytes += chunk_bytes;
		trace_kvtier_migrate(r->id, r->tags.session_id, b, req->node, chunk_bytes, from,
				     ktime_get_ns() - start);
	}
	r->migrations += moved;
	r->migrated_bytes += bytes;
	kvtier_counters.migrations += moved;
	kvtier_counters.migrated_bytes += bytes;
out:
	/* Pages not used: blocks already there, shared chunks seen twice, errors. */
	for (i = used; i < need; i++)
		kvtier_free_page(fresh[i]);
	mutex_unlock(&kvtier_lock);
	kvfree(fresh);
	req->bytes_moved = bytes;
	req->blocks_moved = moved;
	if (!err)
		kvtier_genl_migrated(r, first, nr, req->node, bytes);
	return err;
}

/**
 * kvtier_share() - make dst blocks share src blocks' pages (KVTIER_IOC_SHARE).
 * @dst: region whose blocks give up their own pages
 * @src: region whose chunks become shared (may be @dst, without overlap)
 * @req: ranges
 *
 * Return: 0, -EPERM (different tenants) or -EINVAL.
 */
int kvtier_share(struct kvtier_region *dst, struct kvtier_region *src,
		 const struct kvtier_share *req)
{
	u32 i, nr = req->nr_blocks;

	if (req->pad)
		return -EINVAL;
	if (dst->tags.tenant_id != src->tags.tenant_id)
		return -EPERM;
	if (dst->block_bytes != src->block_bytes || !kvtier_range_ok(dst, req->dst_first_block, nr) ||
	    !kvtier_range_ok(src, req->src_first_block, nr))
		return -EINVAL;
	if (dst == src && req->dst_first_block < req->src_first_block + nr &&
	    req->src_first_block < req->dst_first_block + nr)
		return -EINVAL;

	mutex_lock(&kvtier_lock);
	for (i = 0; i < nr; i++) {
		struct kvtier_block *d = &dst->blocks[req->dst_first_block + i];
		struct kvtier_block *s = &src->blocks[req->src_first_block + i];

		if (d->chunk == s->chunk)
			continue;
		kvtier_zap_block_locked(d, d->chunk);
		kvtier_chunk_detach(d);
		kvtier_chunk_attach(d, s->chunk);
		kvtier_counters.shares++;
	}
	mutex_unlock(&kvtier_lock);
	trace_kvtier_share(dst->id, src->id, dst->tags.session_id, req->dst_first_block,
			   req->src_first_block, nr);
	return 0;
}

/**
 * kvtier_access_reset() - unmap blocks everywhere, keeping their pages (KVTIER_IOC_ACCESS_RESET).
 * @r: region
 * @req: blocks [first_block, first_block + nr_blocks)
 *
 * Access sampling, as DAMON does it: the next touch of each page re-faults (a
 * minor fault, no allocation) and so fires the kvtier_fault tracepoint again,
 * which lets probes count repeated accesses rather than first touches only.
 *
 * Return: 0 or -EINVAL.
 */
int kvtier_access_reset(struct kvtier_region *r, const struct kvtier_range *req)
{
	u32 b;

	if (!kvtier_range_ok(r, req->first_block, req->nr_blocks))
		return -EINVAL;
	mutex_lock(&kvtier_lock);
	for (b = req->first_block; b < req->first_block + req->nr_blocks; b++) {
		const struct kvtier_block *blk = &r->blocks[b];

		if (blk->chunk->populated)
			kvtier_zap_block_locked(blk, blk->chunk);
	}
	mutex_unlock(&kvtier_lock);
	return 0;
}

/**
 * kvtier_discard() - free blocks' pages; the next touch faults in zeroed ones.
 * @r: region
 * @req: range
 *
 * A block sharing its chunk gets an empty chunk of its own (the sharers keep
 * the pages). Every page is locked before the zap, as for migration, so a
 * fault in flight cannot leave a PTE to a page freed here.
 *
 * Return: 0, -EINVAL or -ENOMEM (blocks before the failing one are discarded).
 */
int kvtier_discard(struct kvtier_region *r, const struct kvtier_range *req)
{
	u32 b;
	int err = 0;

	if (!kvtier_range_ok(r, req->first_block, req->nr_blocks))
		return -EINVAL;

	mutex_lock(&kvtier_lock);
	for (b = req->first_block; b < req->first_block + req->nr_blocks; b++) {
		struct kvtier_block *blk = &r->blocks[b];
		struct kvtier_chunk *c = blk->chunk;

		if (!c->populated)
			continue;
		if (c->sharers > 1) {
			struct kvtier_chunk *fresh = kvtier_chunk_alloc(c->nr_pages, c->node);

			if (!fresh) {
				err = -ENOMEM;
				break;
			}
			kvtier_block_rechunk(blk, c, fresh);
			continue;
		}
		kvtier_zap_block_locked(blk, c);
		kvtier_chunk_free_pages(c);
	}
	mutex_unlock(&kvtier_lock);
	return err;
}

/**
 * kvtier_unshare() - give shared blocks private, writable copies.
 * @r: region
 * @req: range; blocks that are not shared are left alone
 *
 * Return: 0, -EINVAL or -ENOMEM (blocks before the failing one are copied).
 */
int kvtier_unshare(struct kvtier_region *r, const struct kvtier_range *req)
{
	u32 b;
	int err = 0;

	if (!kvtier_range_ok(r, req->first_block, req->nr_blocks))
		return -EINVAL;

	mutex_lock(&kvtier_lock);
	for (b = req->first_block; b < req->first_block + req->nr_blocks; b++) {
		struct kvtier_block *blk = &r->blocks[b];
		struct kvtier_chunk *old = blk->chunk, *c;
		unsigned int i;

		if (old->sharers < 2)
			continue;
		c = kvtier_chunk_alloc(old->nr_pages, old->node);
		if (!c) {
			err = -ENOMEM;
			break;
		}
		/* Shared pages are never writable, so copying them is race-free. */
		for (i = 0; i < old->nr_pages; i++) {
			if (!old->pages[i])
				continue;
			c->pages[i] = kvtier_alloc_page(c->node, false);
			if (!c->pages[i])
				break;
			copy_highpage(c->pages[i], old->pages[i]);
			c->populated++;
		}
		if (i < old->nr_pages) {
			kvtier_chunk_free_pages(c);
			kvfree(c);
			err = -ENOMEM;
			break;
		}
		kvtier_block_rechunk(blk, old, c);
		kvtier_counters.cow_copies++;
	}
	mutex_unlock(&kvtier_lock);
	return err;
}

/**
 * kvtier_block_query() - per-block residency and tags.
 * @r: region
 * @first: first block
 * @nr: number of blocks, range already checked by the caller
 * @out: @nr entries
 *
 * Return: 0 or -EINVAL.
 */
int kvtier_block_query(struct kvtier_region *r, u32 first, u32 nr,
		       struct kvtier_block_state *out)
{
	u32 i;

	if (!kvtier_range_ok(r, first, nr))
		return -EINVAL;
	mutex_lock(&kvtier_lock);
	for (i = 0; i < nr; i++) {
		const struct kvtier_block *b = &r->blocks[first + i];
		const struct kvtier_chunk *c = b->chunk;
		struct kvtier_block_state *s = &out[i];

		memset(s, 0, sizeof(*s));
		s->node = c->populated ? c->node : KVTIER_NODE_NONE;
		if (c->populated == c->nr_pages)
			s->flags |= KVTIER_BLOCK_POPULATED;
		else if (c->populated)
			s->flags |= KVTIER_BLOCK_PARTIAL;
		if (c->sharers > 1)
			s->flags |= KVTIER_BLOCK_SHARED;
		s->block_type = b->block_type;
		s->priority = b->priority;
		s->faults = b->faults;
		s->migrations = b->migrations;
	}
	mutex_unlock(&kvtier_lock);
	return 0;
}

/**
 * kvtier_grant() - let another uid attach a region, or revoke that.
 * @r: region
 * @req: uid and flags
 *
 * Return: 0, -EINVAL, -EACCES (only the owner or CAP_SYS_ADMIN may grant)
 * or -ENOMEM.
 */
int kvtier_grant(struct kvtier_region *r, const struct kvtier_grant *req)
{
	kuid_t uid;
	int err = 0;

	if (req->flags & ~KVTIER_GRANT_REVOKE)
		return -EINVAL;
	uid = make_kuid(current_user_ns(), req->uid);
	if (!uid_valid(uid))
		return -EINVAL;
	if (!uid_eq(current_euid(), r->owner) && !capable(CAP_SYS_ADMIN))
		return -EACCES;
	mutex_lock(&kvtier_lock);
	if (req->flags & KVTIER_GRANT_REVOKE)
		xa_erase(&r->grants, __kuid_val(uid));
	else
		err = xa_err(xa_store(&r->grants, __kuid_val(uid), xa_mk_value(1), GFP_KERNEL));
	mutex_unlock(&kvtier_lock);
	return err;
}

/**
 * kvtier_stats() - module-wide and per-node counters (KVTIER_IOC_STATS).
 * @st: out
 */
void kvtier_stats(struct kvtier_stats *st)
{
	struct kvtier_region *r;
	unsigned long id;
	int n;

	memset(st, 0, sizeof(*st));
	mutex_lock(&kvtier_lock);
	st->regions = kvtier_counters.regions;
	st->allocated_bytes = kvtier_counters.allocated_bytes;
	st->faults = kvtier_counters.faults;
	st->migrations = kvtier_counters.migrations;
	st->migrated_bytes = kvtier_counters.migrated_bytes;
	st->shares = kvtier_counters.shares;
	st->cow_copies = kvtier_counters.cow_copies;
	/* Count each shared chunk once: through its first owner. */
	xa_for_each(&kvtier_regions, id, r) {
		for (u32 i = 0; i < r->nr_blocks; i++) {
			const struct kvtier_block *b = &r->blocks[i];
			const struct kvtier_chunk *c = b->chunk;

			if (c->sharers > 1 &&
			    list_first_entry(&c->owners, struct kvtier_block, chunk_link) == b)
				st->shared_bytes += (u64)c->populated << PAGE_SHIFT;
		}
	}
	for (n = 0; n < KVTIER_MAX_NODES; n++) {
		st->nodes[n].allocated_bytes = kvtier_counters.node_allocated_bytes[n];
		st->nodes[n].migrated_in_bytes = kvtier_counters.node_migrated_in_bytes[n];
		st->nodes[n].migrated_out_bytes = kvtier_counters.node_migrated_out_bytes[n];
	}
	mutex_unlock(&kvtier_lock);
}

/* vmf->pgoff -> (region page index); the region comes from the VMA. */
static struct kvtier_block *kvtier_fault_block(struct vm_fault *vmf, unsigned int *slot)
{
	struct kvtier_region *r = vmf->vma->vm_private_data;
	unsigned long idx = vmf->pgoff & ((1UL << (KVTIER_MMAP_SHIFT - PAGE_SHIFT)) - 1);

	if (idx >= r->size_bytes >> PAGE_SHIFT)
		return NULL;
	*slot = idx % r->pages_per_block;
	return &r->blocks[idx / r->pages_per_block];
}

/**
 * kvtier_fault() - map a region page, allocating it on first touch.
 * @vmf: fault
 *
 * The page is returned locked (VM_FAULT_LOCKED) so migration, which locks
 * pages before zapping, cannot miss a PTE this fault is about to install.
 *
 * Return: VM_FAULT_LOCKED, or VM_FAULT_SIGBUS (outside the region, no memory).
 */
vm_fault_t kvtier_fault(struct vm_fault *vmf)
{
	struct kvtier_region *r = vmf->vma->vm_private_data;
	struct kvtier_block *b;
	struct kvtier_chunk *c;
	struct page *page;
	unsigned int slot;
	int node;

	b = kvtier_fault_block(vmf, &slot);
	if (!b)
		return VM_FAULT_SIGBUS;
	mutex_lock(&kvtier_lock);
	c = b->chunk;
	page = c->pages[slot];
	if (!page) {
		page = kvtier_alloc_page(c->node, true);
		if (!page) {
			mutex_unlock(&kvtier_lock);
			return VM_FAULT_SIGBUS;
		}
		c->pages[slot] = page;
		c->populated++;
	}
	get_page(page);
	lock_page(page);
	b->faults++;
	r->faults++;
	kvtier_counters.faults++;
	node = c->node;
	mutex_unlock(&kvtier_lock);

	trace_kvtier_fault(r->id, r->tags.session_id, b->index, slot, node,
			   !!(vmf->flags & FAULT_FLAG_WRITE));
	vmf->page = page;
	return VM_FAULT_LOCKED;
}

/**
 * kvtier_page_mkwrite() - first write to a mapped page (writenotify).
 * @vmf: fault
 *
 * Shared blocks are read-only: a write raises SIGBUS (KVTIER_IOC_UNSHARE
 * gives a private copy). A page migrated away since it was looked up makes
 * the fault retry against the new page.
 *
 * Return: VM_FAULT_LOCKED, VM_FAULT_NOPAGE (retry) or VM_FAULT_SIGBUS.
 */
vm_fault_t kvtier_page_mkwrite(struct vm_fault *vmf)
{
	struct kvtier_block *b;
	unsigned int slot;
	vm_fault_t ret = VM_FAULT_LOCKED;

	b = kvtier_fault_block(vmf, &slot);
	if (!b)
		return VM_FAULT_SIGBUS;
	mutex_lock(&kvtier_lock);
	if (b->chunk->pages[slot] != vmf->page)
		ret = VM_FAULT_NOPAGE;
	else if (b->chunk->sharers > 1)
		ret = VM_FAULT_SIGBUS;
	else
		lock_page(vmf->page);
	mutex_unlock(&kvtier_lock);
	return ret;
}

/**
 * kvtier_core_init() - settle module parameters.
 *
 * Return: 0.
 */
int kvtier_core_init(void)
{
	if (!kvtier_max_total_bytes)
		kvtier_max_total_bytes = (u64)totalram_pages() << (PAGE_SHIFT - 1);
	kvtier_max_region_bytes = min_t(u64, kvtier_max_region_bytes, 1ULL << KVTIER_MMAP_SHIFT);
	return 0;
}

/**
 * kvtier_core_exit() - nothing may be left: every region holds a module
 * reference through its fd or VMA file.
 */
void kvtier_core_exit(void)
{
	WARN_ON(!xa_empty(&kvtier_regions));
	xa_destroy(&kvtier_regions);
}
