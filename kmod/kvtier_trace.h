/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kvtier tracepoints: every event names the region, the session it belongs
 * to and the block(s) concerned, so a probe can attribute it to a KV cache.
 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM kvtier

#if !defined(_KVTIER_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _KVTIER_TRACE_H

#include <linux/tracepoint.h>

TRACE_EVENT(kvtier_region_create,
	TP_PROTO(u32 region_id, u64 session_id, u64 tenant_id, u64 size_bytes,
		 u32 block_bytes, int node),
	TP_ARGS(region_id, session_id, tenant_id, size_bytes, block_bytes, node),
	TP_STRUCT__entry(
		__field(u32, region_id)
		__field(u64, session_id)
		__field(u64, tenant_id)
		__field(u64, size_bytes)
		__field(u32, block_bytes)
		__field(int, node)
	),
	TP_fast_assign(
		__entry->region_id = region_id;
		__entry->session_id = session_id;
		__entry->tenant_id = tenant_id;
		__entry->size_bytes = size_bytes;
		__entry->block_bytes = block_bytes;
		__entry->node = node;
	),
	TP_printk("region=%u session=%llu tenant=%llu size_bytes=%llu block_bytes=%u node=%d",
		  __entry->region_id, __entry->session_id, __entry->tenant_id,
		  __entry->size_bytes, __entry->block_bytes, __entry->node)
);

TRACE_EVENT(kvtier_region_destroy,
	TP_PROTO(u32 region_id, u64 session_id, u32 nr_blocks),
	TP_ARGS(region_id, session_id, nr_blocks),
	TP_STRUCT__entry(
		__field(u32, region_id)
		__field(u64, session_id)
		__field(u32, nr_blocks)
	),
	TP_fast_assign(
		__entry->region_id = region_id;
		__entry->session_id = session_id;
		__entry->nr_blocks = nr_blocks;
	),
	TP_printk("region=%u session=%llu blocks=0-%u", __entry->region_id,
		  __entry->session_id, __entry->nr_blocks)
);

TRACE_EVENT(kvtier_fault,
	TP_PROTO(u32 region_id, u64 session_id, u32 block, u32 page, int node, bool write),
	TP_ARGS(region_id, session_id, block, page, node, write),
	TP_STRUCT__entry(
		__field(u32, region_id)
		__field(u64, session_id)
		__field(u32, block)
		__field(u32, page)
		__field(int, node)
		__field(bool, write)
	),
	TP_fast_assign(
		__entry->region_id = region_id;
		__entry->session_id = session_id;
		__entry->block = block;
		__entry->page = page;
		__entry->node = node;
		__entry->write = write;
	),
	TP_printk("region=%u session=%llu block=%u page=%u node=%d write=%d",
		  __entry->region_id, __entry->session_id, __entry->block,
		  __entry->page, __entry->node, __entry->write)
);

/*
 * One block moved: from_node and duration_ns (copy, zap and page locking, measured
 * around the block's move) let probes keep latency histograms per node pair.
 */
TRACE_EVENT(kvtier_migrate,
	TP_PROTO(u32 region_id, u64 session_id, u32 block, int node, u64 bytes,
		 int from_node, u64 duration_ns),
	TP_ARGS(region_id, session_id, block, node, bytes, from_node, duration_ns),
	TP_STRUCT__entry(
		__field(u32, region_id)
		__field(u64, session_id)
		__field(u32, block)
		__field(int, node)
		__field(u64, bytes)
		__field(int, from_node)
		__field(u64, duration_ns)
	),
	TP_fast_assign(
		__entry->region_id = region_id;
		__entry->session_id = session_id;
		__entry->block = block;
		__entry->node = node;
		__entry->bytes = bytes;
		__entry->from_node = from_node;
		__entry->duration_ns = duration_ns;
	),
	TP_printk("region=%u session=%llu block=%u to_node=%d bytes=%llu from_node=%d duration_ns=%llu",
		  __entry->region_id, __entry->session_id, __entry->block,
		  __entry->node, __entry->bytes, __entry->from_node, __entry->duration_ns)
);

TRACE_EVENT(kvtier_share,
	TP_PROTO(u32 dst_region_id, u32 src_region_id, u64 session_id, u32 dst_block,
		 u32 src_block, u32 nr_blocks),
	TP_ARGS(dst_region_id, src_region_id, session_id, dst_block, src_block, nr_blocks),
	TP_STRUCT__entry(
		__field(u32, dst_region_id)
		__field(u32, src_region_id)
		__field(u64, session_id)
		__field(u32, dst_block)
		__field(u32, src_block)
		__field(u32, nr_blocks)
	),
	TP_fast_assign(
		__entry->dst_region_id = dst_region_id;
		__entry->src_region_id = src_region_id;
		__entry->session_id = session_id;
		__entry->dst_block = dst_block;
		__entry->src_block = src_block;
		__entry->nr_blocks = nr_blocks;
	),
	TP_printk("dst_region=%u src_region=%u session=%llu dst_block=%u src_block=%u nr_blocks=%u",
		  __entry->dst_region_id, __entry->src_region_id, __entry->session_id,
		  __entry->dst_block, __entry->src_block, __entry->nr_blocks)
);

#endif /* _KVTIER_TRACE_H */

#undef TRACE_INCLUDE_PATH
#define TRACE_INCLUDE_PATH .
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_FILE kvtier_trace
#include <trace/define_trace.h>
