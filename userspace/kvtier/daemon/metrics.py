"""Prometheus metrics (prometheus-client), on a registry of the daemon's own.

Families: kvtier_tier_capacity_bytes / kvtier_tier_used_bytes / kvtier_tier_blocks {tier, kind} (read from the
engine at scrape time), kvtier_hits_total {tier} (the tier that served the hit), kvtier_misses_total,
kvtier_bytes_moved_total {src, dst}, kvtier_evictions_total {reason}, kvtier_put_bytes_total,
kvtier_api_latency_seconds {op} (histogram), kvtier_sessions, kvtier_blocks, kvtier_pinned_bytes (blocks of
decoding sessions and kvctl pins, out of every policy); GPU tiers: kvtier_gpu_prefetches and
kvtier_gpu_prefetch_bytes {tier, direction}, kvtier_gpu_moves_in_flight {tier}.
"""
from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

# API ops take microseconds to milliseconds; buckets from 5 µs to 1 s.
LATENCY_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.1, 1.0)


class _TierCollector:
    def __init__(self, engine_ref):
        self.engine_ref = engine_ref

    def collect(self):
        eng = self.engine_ref()
        cap = GaugeMetricFamily("kvtier_tier_capacity_bytes", "Tier capacity", labels=["tier", "kind"])
        used = GaugeMetricFamily("kvtier_tier_used_bytes", "Bytes used in the tier", labels=["tier", "kind"])
        blocks = GaugeMetricFamily("kvtier_tier_blocks", "Blocks held by the tier", labels=["tier", "kind"])
        sessions = GaugeMetricFamily("kvtier_sessions", "Registered sessions")
        total = GaugeMetricFamily("kvtier_blocks", "Blocks stored (all tiers)")
        pinned = GaugeMetricFamily("kvtier_pinned_bytes", "Bytes of pinned blocks (decoding sessions, kvctl pin)")
        qerr = GaugeMetricFamily("kvtier_quant_error", "Quantisation error measured on a tier's quantised blocks "
                                 "(max_abs, rel_rms_max, rel_rms_mean)", labels=["tier", "measure"])
        qblocks = GaugeMetricFamily("kvtier_quant_blocks", "Blocks a tier quantised, or stored exactly because "
                                    "over its error bound", labels=["tier", "outcome"])
        gpu_moves = GaugeMetricFamily("kvtier_gpu_prefetches", "Prefetches a GPU tier issued (cudaMemPrefetchAsync), "
                                      "by direction", labels=["tier", "direction"])
        gpu_bytes = GaugeMetricFamily("kvtier_gpu_prefetch_bytes", "Bytes a GPU tier prefetched, by direction",
                                      labels=["tier", "direction"])
        gpu_flight = GaugeMetricFamily("kvtier_gpu_moves_in_flight", "GPU prefetches whose event has not completed",
                                       labels=["tier"])
        rows = []
        for _ in range(3):   # the engine's loop may change its dicts meanwhile: retry a torn read
            try:
                rows = eng.tier_rows() if eng is not None else []
                break
            except RuntimeError:
                continue
        if eng is not None:
            for row in rows:
                labels = [row["name"], row["kind"]]
                cap.add_metric(labels, row["capacity_bytes"])
                used.add_metric(labels, row["used_bytes"])
                blocks.add_metric(labels, row["blocks"])
                q = row.get("quant")
                if q:
                    for m in ("max_abs", "rel_rms_max", "rel_rms_mean"):
                        qerr.add_metric([row["name"], m], q[m])
                    qblocks.add_metric([row["name"], "quantised"], q["quantised_blocks"])
                    qblocks.add_metric([row["name"], "over_bound"], q["refused_over_bound"])
                g = row.get("gpu")
                if g:
                    for d in ("to_device", "to_host"):
                        gpu_moves.add_metric([row["name"], d], g[d])
                        gpu_bytes.add_metric([row["name"], d], g[d + "_bytes"])
                    gpu_flight.add_metric([row["name"]], g["moves_in_flight"])
            sessions.add_metric([], len(eng.sessions))
            total.add_metric([], len(eng.blocks))
            pinned.add_metric([], eng.pinned_bytes_total)
        yield from (cap, used, blocks, sessions, total, pinned, qerr, qblocks, gpu_moves, gpu_bytes, gpu_flight)


class _LatencyCollector:
    """kvtier_api_latency_seconds {op}: counted in plain lists on the serving thread (a bisect and two adds),
    turned into a histogram at scrape time. prometheus-client's Histogram.observe takes a lock and updates
    several value objects: ~3 µs per op, a sixth of the small-op budget."""

    def __init__(self):
        self.ops: dict[str, list] = {}   # op -> [bucket counts..., +Inf count, sum]

    def observe(self, op: str, seconds: float) -> None:
        row = self.ops.get(op)
        if row is None:
            row = self.ops[op] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        row[bisect_left(LATENCY_BUCKETS, seconds)] += 1   # le: a value equal to a bound falls in its bucket
        row[-1] += seconds

    def collect(self):
        h = HistogramMetricFamily("kvtier_api_latency_seconds", "Engine API latency, by op", labels=["op"])
        for op, row in list(self.ops.items()):
            row = list(row)   # a snapshot: the loop may be counting meanwhile
            acc, buckets = 0, []
            for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], row[:-1]):
                acc += n
                buckets.append((bound, acc))
            h.add_metric([op], buckets, row[-1])
        yield h


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.engine = None
        self.hits = Counter("kvtier_hits", "Block hits, by the tier that served them", ["tier"], registry=r)
        self.misses = Counter("kvtier_misses", "Block lookups that found nothing", registry=r)
        self.moved = Counter("kvtier_bytes_moved", "Bytes moved between tiers", ["src", "dst"], registry=r)
        self.evictions = Counter("kvtier_evictions", "Blocks dropped, by reason", ["reason"], registry=r)
        self.put_bytes = Counter("kvtier_put_bytes", "Bytes stored by puts", registry=r)
        self.latency = _LatencyCollector()
        r.register(self.latency)
        r.register(_TierCollector(lambda: self.engine))
        self.observe = self.latency.observe   # called once per request: no extra call layer
        self.server = None
        self._hit_by_tier = {}

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a thread; returns the bound port (port 0 picks one)."""
        out = start_http_server(port, addr=host, registry=self.registry)
        self.server = out[0] if isinstance(out, tuple) else None
        return self.server.server_port if self.server is not None else port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # engine hooks
    def hit(self, tier: str) -> None:
        c = self._hit_by_tier.get(tier)
        if c is None:   # labels() takes a lock and builds a key: once per tier, not once per hit
            c = self._hit_by_tier[tier] = self.hits.labels(tier)
        c.inc()

    def miss(self) -> None:
        self.misses.inc()

    def moved_bytes(self, nbytes: int, src: str, dst: str) -> None:
        self.moved.labels(src, dst).inc(nbytes)

    def evicted(self, reason: str) -> None:
        self.evictions.labels(reason).inc()

    def bytes_put(self, nbytes: int) -> None:
        self.put_bytes.inc(nbytes)

