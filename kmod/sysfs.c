// SPDX-License-Identifier: GPL-2.0
/*
 * /sys/kernel/kvtier: module-wide counters, and per-node counters under
 * nodes/nodeN/ for every possible node below KVTIER_MAX_NODES. Units are in
 * the file names; Documentation/ABI/sysfs-kernel-kvtier describes each file.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kobject.h>
#include <linux/nodemask.h>
#include <linux/slab.h>
#include <linux/sysfs.h>

#include "kvtier_internal.h"

static struct kobject *kvtier_kobj;
static struct kobject *kvtier_nodes_kobj;
static struct kobject *kvtier_node_kobjs[KVTIER_MAX_NODES];

/* Plain counters: a racy 64-bit read is fine for statistics. */
#define KVTIER_COUNTER_ATTR(_name)						\
static ssize_t _name##_show(struct kobject *kobj, struct kobj_attribute *attr,	\
			    char *buf)						\
{										\
	return sysfs_emit(buf, "%llu\n", READ_ONCE(kvtier_counters._name));	\
}										\
static struct kobj_attribute _name##_attr = __ATTR_RO(_name)

KVTIER_COUNTER_ATTR(regions);
KVTIER_COUNTER_ATTR(reserved_bytes);
KVTIER_COUNTER_ATTR(allocated_bytes);
KVTIER_COUNTER_ATTR(faults);
KVTIER_COUNTER_ATTR(migrations);
KVTIER_COUNTER_ATTR(migrated_bytes);
KVTIER_COUNTER_ATTR(shares);
KVTIER_COUNTER_ATTR(cow_copies);

static ssize_t shared_bytes_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct kvtier_stats *st = kmalloc(sizeof(*st), GFP_KERNEL);
	ssize_t len;

	if (!st)
		return -ENOMEM;
	kvtier_stats(st);
	len = sysfs_emit(buf, "%llu\n", st->shared_bytes);
	kfree(st);
	return len;
}
static struct kobj_attribute shared_bytes_attr = __ATTR_RO(shared_bytes);

static struct attribute *kvtier_attrs[] = {
	&regions_attr.attr,
	&reserved_bytes_attr.attr,
	&allocated_bytes_attr.attr,
	&shared_bytes_attr.attr,
	&faults_attr.attr,
	&migrations_attr.attr,
	&migrated_bytes_attr.attr,
	&shares_attr.attr,
	&cow_copies_attr.attr,
	NULL,
};

static const struct attribute_group kvtier_group = {
	.attrs = kvtier_attrs,
};

/* The node id is the number in the kobject's name ("node%d"). */
static int kvtier_kobj_node(struct kobject *kobj)
{
	int node;

	if (kstrtoint(kobject_name(kobj) + 4, 10, &node) || node < 0 || node >= KVTIER_MAX_NODES)
		return 0;
	return node;
}

#define KVTIER_NODE_ATTR(_name, _field)						\
static ssize_t node_##_name##_show(struct kobject *kobj,			\
				   struct kobj_attribute *attr, char *buf)	\
{										\
	return sysfs_emit(buf, "%llu\n",					\
			  READ_ONCE(kvtier_counters._field[kvtier_kobj_node(kobj)])); \
}										\
static struct kobj_attribute node_##_name##_attr =				\
	__ATTR(_name, 0444, node_##_name##_show, NULL)

KVTIER_NODE_ATTR(allocated_bytes, node_allocated_bytes);
KVTIER_NODE_ATTR(migrated_in_bytes, node_migrated_in_bytes);
KVTIER_NODE_ATTR(migrated_out_bytes, node_migrated_out_bytes);

static struct attribute *kvtier_node_attrs[] = {
	&node_allocated_bytes_attr.attr,
	&node_migrated_in_bytes_attr.attr,
	&node_migrated_out_bytes_attr.attr,
	NULL,
};

static const struct attribute_group kvtier_node_group = {
	.attrs = kvtier_node_attrs,
};

/**
 * kvtier_sysfs_exit() - remove /sys/kernel/kvtier (safe on a partial init).
 */
void kvtier_sysfs_exit(void)
{
	int n;

	for (n = 0; n < KVTIER_MAX_NODES; n++) {
		if (!kvtier_node_kobjs[n])
			continue;
		sysfs_remove_group(kvtier_node_kobjs[n], &kvtier_node_group);
		kobject_put(kvtier_node_kobjs[n]);
		kvtier_node_kobjs[n] = NULL;
	}
	kobject_put(kvtier_nodes_kobj);
	kvtier_nodes_kobj = NULL;
	if (kvtier_kobj)
		sysfs_remove_group(kvtier_kobj, &kvtier_group);
	kobject_put(kvtier_kobj);
	kvtier_kobj = NULL;
}

/**
 * kvtier_sysfs_init() - create /sys/kernel/kvtier and its node directories.
 *
 * Return: 0 or a negative errno.
 */
int kvtier_sysfs_init(void)
{
	char name[16];
	int n, err;

	kvtier_kobj = kobject_create_and_add("kvtier", kernel_kobj);
	if (!kvtier_kobj)
		return -ENOMEM;
	err = sysfs_create_group(kvtier_kobj, &kvtier_group);
	if (err) {
		kobject_put(kvtier_kobj);
		kvtier_kobj = NULL;
		return err;
	}
	kvtier_nodes_kobj = kobject_create_and_add("nodes", kvtier_kobj);
	if (!kvtier_nodes_kobj) {
		err = -ENOMEM;
		goto err;
	}
	for_each_node(n) {
		struct kobject *kobj;

		if (n >= KVTIER_MAX_NODES)
			break;
		snprintf(name, sizeof(name), "node%d", n);
		kobj = kobject_create_and_add(name, kvtier_nodes_kobj);
		if (!kobj) {
			err = -ENOMEM;
			goto err;
		}
		err = sysfs_create_group(kobj, &kvtier_node_group);
		if (err) {
			kobject_put(kobj);
			goto err;
		}
		kvtier_node_kobjs[n] = kobj;
	}
	return 0;
err:
	kvtier_sysfs_exit();
	return err;
}
