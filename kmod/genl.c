// SPDX-License-Identifier: GPL-2.0
/*
 * Generic netlink family "kvtier" (spec: netlink/kvtier.yaml): REGION_GET
 * dumps regions, STATS_GET reads counters, and the "events" multicast group
 * announces REGION_NEW, REGION_DEL and MIGRATED.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/capability.h>
#include <linux/slab.h>
#include <net/genetlink.h>
#include <net/netlink.h>

#include "kvtier_internal.h"

static struct genl_family kvtier_genl_family;

enum { KVTIER_MCGRP_EVENTS_IDX };

static const struct genl_multicast_group kvtier_mcgrps[] = {
	[KVTIER_MCGRP_EVENTS_IDX] = { .name = KVTIER_GENL_MCGRP_EVENTS },
};

/* Requests carry no attributes; anything sent is rejected by the policy. */
static const struct nla_policy kvtier_genl_policy[KVTIER_A_MAX + 1] = {
	[KVTIER_A_REGION_ID] = { .type = NLA_U64 },
};

static int kvtier_put_u64(struct sk_buff *skb, int attr, u64 value)
{
	return nla_put_u64_64bit(skb, attr, value, KVTIER_A_PAD);
}

/* Region attributes; kvtier_lock held (usage walks the blocks). */
static int kvtier_fill_region(struct sk_buff *skb, const struct kvtier_region *r, bool usage)
{
	u64 resident = 0, shared = 0;

	if (usage)
		kvtier_region_usage(r, &resident, &shared, NULL);
	if (kvtier_put_u64(skb, KVTIER_A_REGION_ID, r->id) ||
	    nla_put_u32(skb, KVTIER_A_OWNER_UID, from_kuid_munged(&init_user_ns, r->owner)) ||
	    kvtier_put_u64(skb, KVTIER_A_TENANT_ID, r->tags.tenant_id) ||
	    kvtier_put_u64(skb, KVTIER_A_SESSION_ID, r->tags.session_id) ||
	    kvtier_put_u64(skb, KVTIER_A_SIZE_BYTES, r->size_bytes) ||
	    nla_put_u32(skb, KVTIER_A_BLOCK_BYTES, r->block_bytes) ||
	    nla_put_s32(skb, KVTIER_A_NODE, r->node))
		return -EMSGSIZE;
	if (!usage)
		return 0;
	if (kvtier_put_u64(skb, KVTIER_A_RESIDENT_BYTES, resident) ||
	    kvtier_put_u64(skb, KVTIER_A_SHARED_BYTES, shared) ||
	    kvtier_put_u64(skb, KVTIER_A_FAULTS, r->faults) ||
	    kvtier_put_u64(skb, KVTIER_A_MIGRATIONS, r->migrations) ||
	    kvtier_put_u64(skb, KVTIER_A_MIGRATED_BYTES, r->migrated_bytes))
		return -EMSGSIZE;
	return 0;
}

/*
 * One message per region, resuming from cb->args[0] (next id). A caller
 * without CAP_SYS_ADMIN sees only its own uid's regions.
 */
static int kvtier_genl_region_dump(struct sk_buff *skb, struct netlink_callback *cb)
{
	bool admin = netlink_capable(cb->skb, CAP_SYS_ADMIN);
	kuid_t uid = NETLINK_CB(cb->skb).creds.uid;
	struct kvtier_region *r;
	unsigned long id, next = KVTIER_MAX_REGION_ID + 1UL;
	int err = 0;

	mutex_lock(&kvtier_lock);
	xa_for_each_start(&kvtier_regions, id, r, cb->args[0]) {
		void *hdr;

		if (!admin && !uid_eq(uid, r->owner))
			continue;
		hdr = genlmsg_put(skb, NETLINK_CB(cb->skb).portid, cb->nlh->nlmsg_seq,
				  &kvtier_genl_family, NLM_F_MULTI, KVTIER_CMD_REGION_GET);
		if (!hdr) {
			next = id;
			err = -EMSGSIZE;
			break;
		}
		if (kvtier_fill_region(skb, r, true)) {
			genlmsg_cancel(skb, hdr);
			next = id;
			err = -EMSGSIZE;
			break;
		}
		genlmsg_end(skb, hdr);
	}
	mutex_unlock(&kvtier_lock);
	cb->args[0] = next;
	/* A full skb ends this round; the next call resumes at this id. */
	if (err == -EMSGSIZE && skb->len)
		return skb->len;
	return err ? err : skb->len;
}

static int kvtier_genl_stats_get(struct sk_buff *skb, struct genl_info *info)
{
	struct kvtier_stats *st;
	struct sk_buff *msg;
	void *hdr;
	int n, err = -EMSGSIZE;

	st = kmalloc(sizeof(*st), GFP_KERNEL);
	if (!st)
		return -ENOMEM;
	kvtier_stats(st);
	msg = genlmsg_new(NLMSG_GOODSIZE, GFP_KERNEL);
	if (!msg) {
		kfree(st);
		return -ENOMEM;
	}
	hdr = genlmsg_put_reply(msg, info, &kvtier_genl_family, 0, KVTIER_CMD_STATS_GET);
	if (!hdr)
		goto err_free;
	if (kvtier_put_u64(msg, KVTIER_A_REGIONS, st->regions) ||
	    kvtier_put_u64(msg, KVTIER_A_ALLOCATED_BYTES, st->allocated_bytes) ||
	    kvtier_put_u64(msg, KVTIER_A_SHARED_BYTES, st->shared_bytes) ||
	    kvtier_put_u64(msg, KVTIER_A_FAULTS, st->faults) ||
	    kvtier_put_u64(msg, KVTIER_A_MIGRATIONS, st->migrations) ||
	    kvtier_put_u64(msg, KVTIER_A_MIGRATED_BYTES, st->migrated_bytes) ||
	    kvtier_put_u64(msg, KVTIER_A_SHARES, st->shares))
		goto err_free;
	for (n = 0; n < KVTIER_MAX_NODES && n < MAX_NUMNODES; n++) {
		struct nlattr *nest;

		if (!node_state(n, N_MEMORY) && !st->nodes[n].allocated_bytes &&
		    !st->nodes[n].migrated_in_bytes && !st->nodes[n].migrated_out_bytes)
			continue;
		nest = nla_nest_start(msg, KVTIER_A_NODE_STATS);
		if (!nest ||
		    nla_put_u32(msg, KVTIER_A_NODE_ID, n) ||
		    kvtier_put_u64(msg, KVTIER_A_ALLOCATED_BYTES, st->nodes[n].allocated_bytes) ||
		    kvtier_put_u64(msg, KVTIER_A_NODE_MIGRATED_IN_BYTES,
				   st->nodes[n].migrated_in_bytes) ||
		    kvtier_put_u64(msg, KVTIER_A_NODE_MIGRATED_OUT_BYTES,
				   st->nodes[n].migrated_out_bytes))
			goto err_free;
		nla_nest_end(msg, nest);
	}
	genlmsg_end(msg, hdr);
	kfree(st);
	return genlmsg_reply(msg, info);

err_free:
	nlmsg_free(msg);
	kfree(st);
	return err;
}

static const struct genl_ops kvtier_genl_ops[] = {
	{
		.cmd = KVTIER_CMD_REGION_GET,
		.dumpit = kvtier_genl_region_dump,
	},
	{
		.cmd = KVTIER_CMD_STATS_GET,
		.doit = kvtier_genl_stats_get,
	},
};

static struct genl_family kvtier_genl_family __ro_after_init = {
	.name = KVTIER_GENL_NAME,
	.version = KVTIER_GENL_VERSION,
	.maxattr = KVTIER_A_MAX,
	.policy = kvtier_genl_policy,
	.netnsok = false,
	.module = THIS_MODULE,
	.ops = kvtier_genl_ops,
	.n_ops = ARRAY_SIZE(kvtier_genl_ops),
	.resv_start_op = KVTIER_CMD_MAX + 1,
	.mcgrps = kvtier_mcgrps,
	.n_mcgrps = ARRAY_SIZE(kvtier_mcgrps),
};

static void kvtier_genl_notify(struct sk_buff *msg, void *hdr)
{
	genlmsg_end(msg, hdr);
	genlmsg_multicast(&kvtier_genl_family, msg, 0, KVTIER_MCGRP_EVENTS_IDX, GFP_KERNEL);
}

/*
 * An "events" notification with its genl header, or NULL when nobody
 * listens (the common case: skip building it) or memory is short.
 */
static struct sk_buff *kvtier_event_new(u8 cmd, void **hdr)
{
	struct sk_buff *msg;

	if (!genl_has_listeners(&kvtier_genl_family, &init_net, KVTIER_MCGRP_EVENTS_IDX))
		return NULL;
	msg = genlmsg_new(NLMSG_GOODSIZE, GFP_KERNEL);
	if (!msg)
		return NULL;
	*hdr = genlmsg_put(msg, 0, 0, &kvtier_genl_family, 0, cmd);
	if (!*hdr) {
		nlmsg_free(msg);
		return NULL;
	}
	return msg;
}

/**
 * kvtier_genl_region_event() - announce a region's creation or destruction.
 * @cmd: KVTIER_CMD_REGION_NEW or KVTIER_CMD_REGION_DEL
 * @r: the region (its tags and sizes; blocks are not read)
 */
void kvtier_genl_region_event(u8 cmd, const struct kvtier_region *r)
{
	struct sk_buff *msg;
	void *hdr;

	msg = kvtier_event_new(cmd, &hdr);
	if (!msg)
		return;
	if (kvtier_fill_region(msg, r, false)) {
		nlmsg_free(msg);
		return;
	}
	kvtier_genl_notify(msg, hdr);
}

/**
 * kvtier_genl_migrated() - announce a completed KVTIER_IOC_MIGRATE.
 * @r: region
 * @first: first block
 * @nr: number of blocks
 * @node: target node
 * @bytes_moved: bytes copied
 */
void kvtier_genl_migrated(const struct kvtier_region *r, u32 first, u32 nr, int node,
			  u64 bytes_moved)
{
	struct sk_buff *msg;
	void *hdr;

	msg = kvtier_event_new(KVTIER_CMD_MIGRATED, &hdr);
	if (!msg)
		return;
	if (kvtier_put_u64(msg, KVTIER_A_REGION_ID, r->id) ||
	    kvtier_put_u64(msg, KVTIER_A_SESSION_ID, r->tags.session_id) ||
	    nla_put_u32(msg, KVTIER_A_FIRST_BLOCK, first) ||
	    nla_put_u32(msg, KVTIER_A_NR_BLOCKS, nr) ||
	    nla_put_s32(msg, KVTIER_A_NODE, node) ||
	    kvtier_put_u64(msg, KVTIER_A_BYTES_MOVED, bytes_moved)) {
		nlmsg_free(msg);
		return;
	}
	kvtier_genl_notify(msg, hdr);
}

/**
 * kvtier_genl_init() - register the family.
 *
 * Return: 0 or a negative errno.
 */
int kvtier_genl_init(void)
{
	return genl_register_family(&kvtier_genl_family);
}

/**
 * kvtier_genl_exit() - unregister the family.
 */
void kvtier_genl_exit(void)
{
	genl_unregister_family(&kvtier_genl_family);
}
