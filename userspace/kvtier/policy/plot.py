"""Hit rate against capacity for several policies, drawn with matplotlib (imported only here)."""
from __future__ import annotations

from kvtier.policy.model import Request
from kvtier.policy.replay import distinct_blocks, replay_single

PLOT_POLICIES = ("opt", "kvtier", "s3fifo", "arc", "lru")
PLOT_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20)


def hit_rate_curves(requests: list[Request], policies=PLOT_POLICIES, fractions=PLOT_FRACTIONS) -> dict:
    n = distinct_blocks(requests)
    caps = [max(1, int(n * f)) for f in fractions]
    return {"capacity_blocks": caps,
            "hit_rate": {p: [replay_single(requests, p, c).hit_rate for c in caps] for p in policies}}


def plot_hit_rates(requests: list[Request], path: str, title: str = "") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = hit_rate_curves(requests)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rates in curves["hit_rate"].items():
        ax.plot(curves["capacity_blocks"], rates, marker="o", label=name, linestyle="--" if name == "opt" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("cache capacity (blocks)")
    ax.set_ylabel("hit rate (block accesses)")
    ax.set_title(f"hit rate vs capacity: {title}" if title else "hit rate vs capacity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return curves
