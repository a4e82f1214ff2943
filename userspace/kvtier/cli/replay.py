"""kvctl replay: replay a Mooncake-format KV-cache trace against a placement policy."""
from __future__ import annotations

import importlib.util
import json
import sys

import click

from kvtier.errors import InputError

TIERS_HELP = ("Tiers, fastest first: KIND:CAPACITY_BLOCKS[:BANDWIDTH_GBPS[:LATENCY_US]],... with KIND one of "
              "hbm, dram, cxl, nvme, remote (bandwidth/latency default per kind). "
              "Example: dram:1000,cxl:4000,nvme:20000. Runs the multi-tier simulation with overlapping "
              "sessions, decode pinning and a TTFT estimate.")


def _progress(total: int):
    """A progress callback on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty() or total < 2000:
        return None, lambda: None
    bar = click.progressbar(length=total, label="replaying", file=sys.stderr)
    bar.__enter__()
    state = {"done": 0}

    def update(n):
        bar.update(n - state["done"])
        state["done"] = n

    return update, lambda: bar.__exit__(None, None, None)


@click.command("replay", epilog="""\b
Examples:
  kvctl replay trace.jsonl --capacity-blocks 3655 --json
  kvctl replay trace.jsonl --policy lru --tiers dram:3655,cxl:9139,nvme:30000
  kvctl replay trace.jsonl --capacity-blocks 3655 --plot hit_rate.png
  kvctl replay trace.jsonl --capacity-blocks 3655 --hints lifecycle --hint-accuracy 0.9""")
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--policy", "policy_name", default="kvtier", show_default=True,
              help="Placement policy: kvtier, lru, lfu, fifo, arc, s3fifo, opt (offline limit).")
@click.option("--capacity-blocks", type=int, default=None,
              help="Single-tier cache of N blocks: hit_rate = accesses that found their block resident "
                   "on arrival / all accesses; every request's blocks are offered after it.")
@click.option("--tiers", "tier_spec", default=None, help=TIERS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None,
              help="Draw hit rate against capacity (1-20% of distinct blocks) for several policies to FILE.png.")
@click.option("--hints", type=click.Choice(["none", "lifecycle"]), default="none", show_default=True,
              help="lifecycle: after each turn, send the hint an engine that knows its users would (resume if "
                   "the conversation has a later turn in the trace, finished if not). It looks ahead like opt: "
                   "it measures what engine hints are worth, not an online result.")
@click.option("--hint-accuracy", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="Share of lifecycle hints that are right (the others say the opposite; seeded).")
def replay(trace, policy_name, capacity_blocks, tier_spec, as_json, plot_file, hints, hint_accuracy):
    """Replay a KV-cache TRACE (Mooncake JSONL) against a placement policy."""
    from kvtier.policy.registry import policy_class
    from kvtier.policy.replay import distinct_blocks, lifecycle_hints, replay_single
    from kvtier.policy.trace import read_trace

    policy_class(policy_name)  # unknown name -> InputError before reading the trace
    if capacity_blocks is not None and tier_spec is not None:
        raise InputError("give either --capacity-blocks or --tiers, not both")
    if capacity_blocks is not None and capacity_blocks < 0:
        raise InputError(f"--capacity-blocks must not be negative, got {capacity_blocks}")
    if plot_file and importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException("--plot needs matplotlib: pip install 'kvtier[plot]'")
    tiers = None
    if tier_spec is not None:
        from kvtier.policy.tiers import parse_tiers
        tiers = parse_tiers(tier_spec)
    requests = read_trace(trace)
    n_distinct = distinct_blocks(requests)
    if capacity_blocks is None and tiers is None:
        capacity_blocks = max(1, n_distinct // 50)  # 2% of distinct blocks
    hint_list = lifecycle_hints(requests, hint_accuracy) if hints == "lifecycle" else None
    update, close = _progress(len(requests))
    try:
        if tiers is not None:
            from kvtier.policy.tiers import replay_tiers
            out = replay_tiers(requests, policy_name, tiers, progress=update, hints=hint_list).as_dict()
            out["requests"] = len(requests)
            out["distinct_blocks"] = n_distinct
        else:
            out = replay_single(requests, policy_name, capacity_blocks, progress=update, hints=hint_list).as_dict()
    finally:
        close()
    if hint_list is not None:
        out["hints"] = {"kind": hints, "accuracy": hint_accuracy}
    if plot_file:
        from kvtier.policy.plot import plot_hit_rates
        plot_hit_rates(requests, plot_file, title=trace)
        out["plot"] = plot_file
    if as_json:
        click.echo(json.dumps(out))
        return
    if tiers is None:
        click.echo(f"policy {out['policy']}  capacity {out['capacity_blocks']} blocks "
                   f"({100 * out['capacity_blocks'] / max(1, n_distinct):.1f}% of {n_distinct} distinct)")
        click.echo(f"hit rate {out['hit_rate']:.4f}  ({out['hits']} / {out['block_accesses']} block accesses, "
                   f"{out['requests']} requests)")
        click.echo(f"evictions {out['evictions']}  replay {out['replay_seconds']} s "
                   f"({out['blocks_per_second']} blocks/s)")
    else:
        click.echo(f"policy {out['policy']}  {out['requests']} requests, {out['block_accesses']} block accesses")
        click.echo(f"{'TIER':<8}{'CAPACITY_BLOCKS':>16}{'GB/S':>8}{'LAT_US':>8}{'HITS':>10}{'HIT_RATE':>10}")
        for t in out["tiers"]:
            click.echo(f"{t['kind']:<8}{t['capacity_blocks']:>16}{t['bandwidth_gbps']:>8g}{t['latency_us']:>8g}"
                       f"{t['hits']:>10}{t['hit_rate']:>10.4f}")
        click.echo(f"total hit rate {out['hit_rate']:.4f}  demotions {out['demotions']}  promotions "
                   f"{out['promotions']}  dropped {out['drops']}  moved {out['bytes_moved'] / 2**30:.1f} GiB")
        click.echo(f"TTFT estimate: mean {out['ttft_ms_mean']:.1f} ms  p50 {out['ttft_ms_p50']:.1f} ms  "
                   f"p90 {out['ttft_ms_p90']:.1f} ms")
    if plot_file:
        click.echo(f"plot written to {plot_file}")
