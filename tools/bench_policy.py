#!/usr/bin/env python3
"""Benchmark kvtier's placement policies: ratio to OPT, multi-tier TTFT against LRU, replay speed.

Usage: .venv/bin/python tools/bench_policy.py [TRACE] [--synthetic-requests N] [--seed S]
Every number is measured in this run: hit rate of each policy as a fraction of OPT's at 1%, 2%, 5% and 10%
of the trace's distinct blocks, on the bundled Mooncake trace (default ../shared/traces/...) and on
synthetic traces with other structure (kvtier.policy.synth); the TTFT estimate of a three-tier stack for
the default policy against LRU; and the default policy's single-tier replay rate in blocks per second.
`kvtier-predict` (online logistic reuse predictor + hit-density eviction) and `kvtier-density` (per-class
Beta-Bernoulli hit density) are the default's learned experts alone; the default follows whichever of its
experts (those two, LRU, ARC, S3-FIFO) has had the most hits recently; the last column is its margin over
the better of LRU and ARC. The synthetic traces include kinds the policies were not developed on
(prefix, longchat); pass --seed to draw other instances.
The hints table replays the default with the life-cycle hints an engine would send as each turn ends (resume
or finished, from the trace's future like OPT: what such hints are worth, not an online result), right with
probability 1.0 / 0.9 / 0.75 / 0.5 (0.5: noise), against no hints; the three-tier table has a row with them.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "userspace"))

from kvtier.policy import DEFAULT_POLICY, policy_names  # noqa: E402
from kvtier.policy.replay import distinct_blocks, lifecycle_hints, replay_single  # noqa: E402
from kvtier.policy.synth import KINDS, generate  # noqa: E402
from kvtier.policy.tiers import TierSpec, DEFAULT_LINKS, replay_tiers  # noqa: E402
from kvtier.policy.trace import read_trace  # noqa: E402

FRACTIONS = (0.01, 0.02, 0.05, 0.10)
DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared/traces/mooncake_conversation_trace.jsonl"


def ratio_table(name, reqs):
    n = distinct_blocks(reqs)
    print(f"\n== {name}: {len(reqs)} requests, {sum(r.blocks for r in reqs)} accesses, {n} distinct blocks")
    pols = [p for p in policy_names() if p != "opt"]
    print(f"{'capacity':>16} {'opt_hit_rate':>12} " + " ".join(f"{p:>7}" for p in pols)
          + f" {DEFAULT_POLICY + '-best(lru,arc)':>22}")
    for f in FRACTIONS:
        cap = max(1, int(n * f))
        opt = replay_single(reqs, "opt", cap).hit_rate
        row = [replay_single(reqs, p, cap).hit_rate / opt if opt else 0.0 for p in pols]
        r = dict(zip(pols, row))
        print(f"{f:>5.0%} {cap:>10} {opt:>12.4f} " + " ".join(f"{x:>7.3f}" for x in row)
              + f" {r[DEFAULT_POLICY] - max(r['lru'], r['arc']):>+22.3f}")


def bound_table(name, reqs):
    """What an online policy could reach if it knew perfectly WHICH blocks are used again but not WHEN:
    admit only those, evict least recently used. Where this is below 0.9 of OPT, no online reuse
    predictor alone reaches 0.9 with recency eviction; the timing of the next turn is the rest."""
    from collections import OrderedDict

    from kvtier.policy.opt import NEVER, next_uses

    nu = next_uses(reqs)
    n = distinct_blocks(reqs)
    print(f"\n== {name}: oracle reuse knowledge without timing (admit iff used again, LRU), ratio to OPT")
    for f in FRACTIONS:
        cap = max(1, int(n * f))
        res, hits, acc = OrderedDict(), 0, 0
        for r in reqs:
            hits += sum(1 for b in r.hash_ids if b in res)
            acc += len(r.hash_ids)
            for b, nxt in zip(r.hash_ids, nu[r.index]):
                if nxt >= NEVER:
                    res.pop(b, None)
                elif b in res:
                    res.move_to_end(b)
                else:
                    if len(res) >= cap:
                        res.popitem(last=False)
                    res[b] = None
        opt = replay_single(reqs, "opt", cap).hit_rate
        print(f"{f:>5.0%} {cap:>10} {hits / acc / opt if opt else 0.0:>7.3f}")


HINT_ACCURACY = (1.0, 0.9, 0.75, 0.5)


def hint_table(name, reqs):
    print(f"\n== {name}: {DEFAULT_POLICY} with engine life-cycle hints of given accuracy, ratio to OPT")
    print(f"{'capacity':>16} {'none':>7} " + " ".join(f"{a:>7}" for a in HINT_ACCURACY))
    n = distinct_blocks(reqs)
    hints = {a: lifecycle_hints(reqs, a) for a in HINT_ACCURACY}
    for f in FRACTIONS:
        cap = max(1, int(n * f))
        opt = replay_single(reqs, "opt", cap).hit_rate or 1.0
        row = [replay_single(reqs, DEFAULT_POLICY, cap).hit_rate]
        row += [replay_single(reqs, DEFAULT_POLICY, cap, hints=hints[a]).hit_rate for a in HINT_ACCURACY]
        print(f"{f:>5.0%} {cap:>10} " + " ".join(f"{x / opt:>7.3f}" for x in row))


def tier_table(name, reqs):
    n = distinct_blocks(reqs)
    tiers = [TierSpec("dram", int(n * 0.02), *DEFAULT_LINKS["dram"]),
             TierSpec("cxl", int(n * 0.05), *DEFAULT_LINKS["cxl"]),
             TierSpec("nvme", int(n * 0.20), *DEFAULT_LINKS["nvme"])]
    print(f"\n== multi-tier {name}: " + ",".join(f"{t.kind}:{t.capacity_blocks}" for t in tiers)
          + " (urgency on: decoding sessions pinned)")
    print(f"{'policy':>8} {'hit_rate':>9} {'dram':>7} {'cxl':>7} {'nvme':>7} {'ttft_mean_ms':>13} "
          f"{'ttft_p90_ms':>12} {'vs_lru':>7}")
    base = None
    hints = lifecycle_hints(reqs)
    for p, h in (("lru", None), (DEFAULT_POLICY, None), (DEFAULT_POLICY, hints), ("opt", None)):
        d = replay_tiers(reqs, p, tiers, hints=h).as_dict()
        base = base or d["ttft_ms_mean"]
        label = p if h is None else "+hints"
        print(f"{label:>8} {d['hit_rate']:>9.4f} " + " ".join(f"{t['hit_rate']:>7.4f}" for t in d["tiers"])
              + f" {d['ttft_ms_mean']:>13.1f} {d['ttft_ms_p90']:>12.1f} {d['ttft_ms_mean'] / base:>7.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="?", default=str(DEFAULT_TRACE))
    ap.add_argument("--synthetic-requests", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=7, help="seed of the synthetic traces")
    args = ap.parse_args()
    traces = []
    if Path(args.trace).exists():
        traces.append(("mooncake", read_trace(args.trace)))
    else:
        print(f"(trace {args.trace} not found: synthetic traces only)")
    traces += [(f"synthetic-{k}", generate(k, args.synthetic_requests, seed=args.seed)) for k in KINDS]
    print("hit rate as a fraction of OPT's (Belady with bypass), single-tier contract")
    for name, reqs in traces:
        ratio_table(name, reqs)
    bound_table(*traces[0])
    for name, reqs in traces:
        if name in ("mooncake", "synthetic-chat"):
            hint_table(name, reqs)
    tier_table(*traces[0])
    name, reqs = traces[0]
    cap = max(1, distinct_blocks(reqs) // 50)
    best = min((replay_single(reqs, DEFAULT_POLICY, cap) for _ in range(3)), key=lambda r: r.seconds)
    print(f"\n== speed: {DEFAULT_POLICY} on {name} at 2%: {best.seconds:.2f} s for {best.accesses} accesses, "
          f"{best.blocks_per_second:,.0f} blocks/s (best of 3)")


if __name__ == "__main__":
    main()
