// SPDX-License-Identifier: GPL-2.0
/*
 * /dev/kvtier: the ioctl and mmap interface to kvtier's core.
 *
 * Every open file points its f_mapping at one module-wide anonymous inode, so
 * all mappings of all regions live in one address_space and migration can zap
 * a block in every process with unmap_mapping_range() (DRM does the same).
 * Each region is at offset id << KVTIER_MMAP_SHIFT of that address space.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mount.h>
#include <linux/pseudo_fs.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include "kvtier_internal.h"

#define KVTIER_FS_MAGIC	0x6b767469	/* "kvti" */

/* Regions this fd created or attached: index = region id, each holds a ref. */
struct kvtier_file {
	struct xarray regions;
};

static struct vfsmount *kvtier_mnt;
static int kvtier_mnt_count;
static struct inode *kvtier_inode;

/**
 * kvtier_mapping() - the address_space every kvtier VMA belongs to.
 *
 * Return: the module-wide mapping.
 */
struct address_space *kvtier_mapping(void)
{
	return kvtier_inode->i_mapping;
}

static int kvtier_fs_init_fs_context(struct fs_context *fc)
{
	return init_pseudo(fc, KVTIER_FS_MAGIC) ? 0 : -ENOMEM;
}

/* No .owner: a pinned mount must not hold a reference on this module. */
static struct file_system_type kvtier_fs_type = {
	.name = "kvtier",
	.init_fs_context = kvtier_fs_init_fs_context,
	.kill_sb = kill_anon_super,
};

static void kvtier_vm_open(struct vm_area_struct *vma)
{
	kvtier_region_get(vma->vm_private_data);
}

static void kvtier_vm_close(struct vm_area_struct *vma)
{
	kvtier_region_put(vma->vm_private_data);
}

static const struct vm_operations_struct kvtier_vm_ops = {
	.open = kvtier_vm_open,
	.close = kvtier_vm_close,
	.fault = kvtier_fault,
	.page_mkwrite = kvtier_page_mkwrite,
};

static int kvtier_open(struct inode *inode, struct file *filp)
{
	struct kvtier_file *f;

	f = kzalloc(sizeof(*f), GFP_KERNEL);
	if (!f)
		return -ENOMEM;
	xa_init(&f->regions);
	filp->private_data = f;
	filp->f_mapping = kvtier_mapping();
	return 0;
}

static int kvtier_release(struct inode *inode, struct file *filp)
{
	struct kvtier_file *f = filp->private_data;
	struct kvtier_region *r;
	unsigned long id;

	xa_for_each(&f->regions, id, r) {
		xa_erase(&f->regions, id);
		kvtier_region_put(r);
	}
	xa_destroy(&f->regions);
	kfree(f);
	return 0;
}

/* A mapping holds its own reference, so the region outlives its fds. */
static int kvtier_mmap(struct file *filp, struct vm_area_struct *vma)
{
	struct kvtier_file *f = filp->private_data;
	unsigned long id = vma->vm_pgoff >> (KVTIER_MMAP_SHIFT - PAGE_SHIFT);
	u64 offset = (u64)(vma->vm_pgoff & ((1UL << (KVTIER_MMAP_SHIFT - PAGE_SHIFT)) - 1))
		     << PAGE_SHIFT;
	u64 len = vma->vm_end - vma->vm_start;
	struct kvtier_region *r;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	xa_lock(&f->regions);
	r = xa_load(&f->regions, id);
	if (r)
		kvtier_region_get(r);
	xa_unlock(&f->regions);
	if (!r)
		return -EACCES;
	if (offset + len > r->size_bytes) {
		kvtier_region_put(r);
		return -EINVAL;
	}
	vma->vm_flags |= VM_DONTEXPAND | VM_DONTDUMP;
	vma->vm_private_data = r;
	vma->vm_ops = &kvtier_vm_ops;
	return 0;
}

static long kvtier_ioctl_api(void __user *uarg)
{
	struct kvtier_api api = {
		.api_version = KVTIER_API_VERSION,
		.page_size = PAGE_SIZE,
		.features = KVTIER_FEATURE_MIGRATE | KVTIER_FEATURE_SHARE |
			    KVTIER_FEATURE_GRANT | KVTIER_FEATURE_MOVABLE_NODES |
			    KVTIER_FEATURE_ACCESS_RESET | KVTIER_FEATURE_DISCARD,
		.ioctls = GENMASK_ULL(_IOC_NR(KVTIER_IOC_DISCARD), 0),
		.max_region_bytes = kvtier_max_region_bytes,
		.max_total_bytes = kvtier_max_total_bytes,
		.max_nodes = KVTIER_MAX_NODES,
	};

	return copy_to_user(uarg, &api, sizeof(api)) ? -EFAULT : 0;
}

static long kvtier_ioctl_create(struct kvtier_file *f, void __user *uarg)
{
	struct kvtier_region_create req;
	struct kvtier_region *r;
	int err;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	r = kvtier_region_create(&req);
	if (IS_ERR(r))
		return PTR_ERR(r);
	err = xa_insert(&f->regions, r->id, r, GFP_KERNEL);
	if (err)
		goto err_put;
	req.region_id = r->id;
	req.mmap_offset = (u64)r->id << KVTIER_MMAP_SHIFT;
	if (copy_to_user(uarg, &req, sizeof(req))) {
		err = -EFAULT;
		xa_erase(&f->regions, r->id);
		goto err_put;
	}
	return 0;
err_put:
	kvtier_region_put(r);
	return err;
}

static long kvtier_ioctl_attach(struct kvtier_file *f, void __user *uarg)
{
	struct kvtier_region_attach req;
	struct kvtier_region *r;
	int err;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.pad)
		return -EINVAL;
	r = kvtier_region_get_checked(req.region_id, &err);
	if (!r)
		return err;
	err = xa_insert(&f->regions, r->id, r, GFP_KERNEL);
	if (err) {
		err = err == -EBUSY ? -EEXIST : err;
		goto err_put;
	}
	req.mmap_offset = (u64)r->id << KVTIER_MMAP_SHIFT;
	req.size_bytes = r->size_bytes;
	req.block_bytes = r->block_bytes;
	if (copy_to_user(uarg, &req, sizeof(req))) {
		err = -EFAULT;
		xa_erase(&f->regions, r->id);
		goto err_put;
	}
	return 0;
err_put:
	kvtier_region_put(r);
	return err;
}

static long kvtier_ioctl_release(struct kvtier_file *f, void __user *uarg)
{
	struct kvtier_region_release req;
	struct kvtier_region *r;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.region_id > KVTIER_MAX_REGION_ID)
		return -ENOENT;
	r = xa_erase(&f->regions, req.region_id);
	if (!r)
		return -ENOENT;
	kvtier_region_put(r);
	return 0;
}

static long kvtier_ioctl_info(void __user *uarg)
{
	struct kvtier_region_info *info;
	struct kvtier_region *r;
	u64 id;
	int err;

	if (get_user(id, (u64 __user *)uarg))
		return -EFAULT;
	r = kvtier_region_get_checked(id, &err);
	if (!r)
		return err;
	info = kzalloc(sizeof(*info), GFP_KERNEL);
	if (!info) {
		err = -ENOMEM;
		goto out;
	}
	info->region_id = id;
	err = kvtier_region_info(r, info);
	if (!err && copy_to_user(uarg, info, sizeof(*info)))
		err = -EFAULT;
	kfree(info);
out:
	kvtier_region_put(r);
	return err;
}

static long kvtier_ioctl_set_tags(void __user *uarg)
{
	struct kvtier_set_tags req;
	struct kvtier_region *r;
	int err;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	r = kvtier_region_get_checked(req.region_id, &err);
	if (!r)
		return err;
	err = kvtier_set_tags(r, &req);
	kvtier_region_put(r);
	return err;
}

static long kvtier_ioctl_migrate(void __user *uarg)
{
	struct kvtier_migrate req;
	struct kvtier_region *r;
	int err;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	r = kvtier_region_get_checked(req.region_id, &err);
	if (!r)
		return err;
	err = kvtier_migrate(r, &req);
	kvtier_region_put(r);
	if (!err && copy_to_user(uarg, &req, sizeof(req)))
		err = -EFAULT;
	return err;
}

static long kvtier_ioctl_share(void __user *uarg)
{
	struct kvtier_region *dst, *src;
	struct kvtier_share req;
	int err;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	dst = kvtier_region_get_checked(req.dst_region_id, &err);
	if (!dst)
		return err;
	src = kvtier_region_get_checked(req.src_region_id, &err);
	if (src) {
		err = kvtier_share(dst, src, &req);
		kvtier_region_put(src);
	}
	kvtier_region_put(dst);
	return err;
}

/* UNSHARE, ACCESS_RESET, DISCARD: @op on a block range of one region. */
static long kvtier_ioctl_range(void __user *uarg,
			       int (*op)(struct kvtier_region *, const struct kvtier_range *))
{
	struct kvtier_region *r;
	struct kvtier_range req;
	int err;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	r = kvtier_region_get_checked(req.region_id, &err);
	if (!r)
		return err;
	err = op(r, &req);
	kvtier_region_put(r);
	return err;
}

static long kvtier_ioctl_block_query(void __user *uarg)
{
	struct kvtier_block_state *states = NULL;
	struct kvtier_block_query req;
	struct kvtier_region *r;
	int err;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	r = kvtier_region_get_checked(req.region_id, &err);
	if (!r)
		return err;
	err = -EINVAL;
	if (!req.nr_blocks || (u64)req.first_block + req.nr_blocks > r->nr_blocks)
		goto out;
	err = -ENOMEM;
	states = kvmalloc_array(req.nr_blocks, sizeof(*states), GFP_KERNEL);
	if (!states)
		goto out;
	err = kvtier_block_query(r, req.first_block, req.nr_blocks, states);
	if (!err && copy_to_user(u64_to_user_ptr(req.entries_ptr), states,
				 array_size(req.nr_blocks, sizeof(*states))))
		err = -EFAULT;
out:
	kvfree(states);
	kvtier_region_put(r);
	return err;
}

static long kvtier_ioctl_grant(void __user *uarg)
{
	struct kvtier_region *r;
	struct kvtier_grant req;
	int err;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	r = kvtier_region_get_checked(req.region_id, &err);
	if (!r)
		return err;
	err = kvtier_grant(r, &req);
	kvtier_region_put(r);
	return err;
}

static long kvtier_ioctl_stats(void __user *uarg)
{
	struct kvtier_stats *st;
	long err = 0;

	st = kmalloc(sizeof(*st), GFP_KERNEL);
	if (!st)
		return -ENOMEM;
	kvtier_stats(st);
	if (copy_to_user(uarg, st, sizeof(*st)))
		err = -EFAULT;
	kfree(st);
	return err;
}

static long kvtier_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct kvtier_file *f = filp->private_data;
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case KVTIER_IOC_API:
		return kvtier_ioctl_api(uarg);
	case KVTIER_IOC_REGION_CREATE:
		return kvtier_ioctl_create(f, uarg);
	case KVTIER_IOC_REGION_ATTACH:
		return kvtier_ioctl_attach(f, uarg);
	case KVTIER_IOC_REGION_RELEASE:
		return kvtier_ioctl_release(f, uarg);
	case KVTIER_IOC_REGION_INFO:
		return kvtier_ioctl_info(uarg);
	case KVTIER_IOC_SET_TAGS:
		return kvtier_ioctl_set_tags(uarg);
	case KVTIER_IOC_MIGRATE:
		return kvtier_ioctl_migrate(uarg);
	case KVTIER_IOC_SHARE:
		return kvtier_ioctl_share(uarg);
	case KVTIER_IOC_UNSHARE:
		return kvtier_ioctl_range(uarg, kvtier_unshare);
	case KVTIER_IOC_BLOCK_QUERY:
		return kvtier_ioctl_block_query(uarg);
	case KVTIER_IOC_GRANT:
		return kvtier_ioctl_grant(uarg);
	case KVTIER_IOC_STATS:
		return kvtier_ioctl_stats(uarg);
	case KVTIER_IOC_ACCESS_RESET:
		return kvtier_ioctl_range(uarg, kvtier_access_reset);
	case KVTIER_IOC_DISCARD:
		return kvtier_ioctl_range(uarg, kvtier_discard);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations kvtier_fops = {
	.owner = THIS_MODULE,
	.open = kvtier_open,
	.release = kvtier_release,
	.unlocked_ioctl = kvtier_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = kvtier_mmap,
	.llseek = noop_llseek,
};

static struct miscdevice kvtier_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = KVTIER_DEVICE_NAME,
	.fops = &kvtier_fops,
	.mode = 0600,
};

/**
 * kvtier_chardev_init() - mount the private pseudo fs, create the shared
 * inode and register /dev/kvtier.
 *
 * Return: 0 or a negative errno.
 */
int kvtier_chardev_init(void)
{
	int err;

	err = simple_pin_fs(&kvtier_fs_type, &kvtier_mnt, &kvtier_mnt_count);
	if (err)
		return err;
	kvtier_inode = alloc_anon_inode(kvtier_mnt->mnt_sb);
	if (IS_ERR(kvtier_inode)) {
		err = PTR_ERR(kvtier_inode);
		goto err_fs;
	}
	err = misc_register(&kvtier_misc);
	if (err)
		goto err_inode;
	return 0;

err_inode:
	iput(kvtier_inode);
err_fs:
	simple_release_fs(&kvtier_mnt, &kvtier_mnt_count);
	return err;
}

/**
 * kvtier_chardev_exit() - undo kvtier_chardev_init(); no file is open.
 */
void kvtier_chardev_exit(void)
{
	misc_deregister(&kvtier_misc);
	iput(kvtier_inode);
	simple_release_fs(&kvtier_mnt, &kvtier_mnt_count);
}

static int __init kvtier_init(void)
{
	int err;

	err = kvtier_core_init();
	if (err)
		return err;
	err = kvtier_genl_init();
	if (err)
		goto err_core;
	err = kvtier_sysfs_init();
	if (err)
		goto err_genl;
	/* Last: /dev/kvtier appears only when everything behind it works. */
	err = kvtier_chardev_init();
	if (err)
		goto err_sysfs;
	pr_info("loaded: max_region_bytes=%llu max_total_bytes=%llu\n",
		kvtier_max_region_bytes, kvtier_max_total_bytes);
	return 0;

err_sysfs:
	kvtier_sysfs_exit();
err_genl:
	kvtier_genl_exit();
err_core:
	kvtier_core_exit();
	return err;
}

static void __exit kvtier_exit(void)
{
	kvtier_chardev_exit();
	kvtier_sysfs_exit();
	kvtier_genl_exit();
	kvtier_core_exit();
}

module_init(kvtier_init);
module_exit(kvtier_exit);
MODULE_DESCRIPTION("kvtier: KV-cache regions as tagged memory on DRAM and CXL/NUMA nodes");
MODULE_AUTHOR("kvtier developers");
MODULE_LICENSE("GPL");
