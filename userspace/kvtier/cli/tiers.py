"""kvctl tiers: the memory and storage tiers of this machine, fastest first.

Examples:
  kvctl tiers
  kvctl tiers --json
  kvctl tiers --nvme-dir /var/lib/kvtier/cold --nvme-dir /mnt/nvme1/kv
  KVTIER_NVME_DIRS=/var/lib/kvtier/cold kvctl tiers
  kvctl tiers --socket /run/kvtier/kvtierd.sock    # also the running daemon's tiers, cluster tier health
"""
from __future__ import annotations

import json

import click

from kvtier import discovery
from kvtier.cli.common import human_bytes, nvme_dirs_option, table

def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the kernel's list format); '-' when empty."""
    if not ids:
        return "-"
    parts, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def _where(tier: discovery.Tier) -> str:
    if tier.kind in ("dram", "cxl"):
        return f"nodes {_ranges(tier.nodes)}"
    return ", ".join(tier.paths)


def _nvme_note(tier: discovery.Tier) -> str:
    d = tier.details
    rot = {True: "rotational", False: "non-rotational", None: "rotational unknown"}[d.get("rotational")]
    odirect = {True: "O_DIRECT works", None: "O_DIRECT untested"}.get(
        d.get("o_direct"), "O_DIRECT refused")
    if d.get("o_direct_error"):
        odirect += f" ({d['o_direct_error']})"
    return (f"{tier.name}: {tier.paths[0]} on {d.get('fs_type') or '?'} {d.get('source') or '?'} "
            f"mounted at {d.get('mount_point') or '?'}; {rot}; {odirect}")


def render(result: discovery.Survey) -> str:
    tier_rows = [[str(t.rank), t.name, t.kind, _where(t), human_bytes(t.capacity_bytes),
                  human_bytes(t.free_bytes),
                  str(t.memory_tier) if t.memory_tier is not None else "-"]
                 for t in result.tiers]
    out = [table([["RANK", "NAME", "KIND", "WHERE", "CAPACITY", "FREE", "MEMTIER"]] + tier_rows)]
    notes = [_nvme_note(t) for t in result.tiers if t.kind == "nvme"]
    if notes:
        out += [""] + notes

    topo = result.topology
    ids = [n.id for n in topo.nodes]
    node_rows = []
    for n in topo.nodes:
        hmat = n.access.get("access0")
        perf = "-"
        if hmat and hmat.read_latency_ns is not None:
            perf = f"{hmat.read_latency_ns} ns, {hmat.read_bandwidth_mbps} MB/s"
        node_rows.append([str(n.id), _ranges(n.cpus), human_bytes(n.mem_total_bytes),
                          human_bytes(n.mem_free_bytes),
                          str(n.memory_tier) if n.memory_tier is not None else "-",
                          " ".join(str(n.distances.get(i, "-")) for i in ids), perf])
    out += ["", table([["NODE", "CPUS", "MEMORY", "FREE", "MEMTIER", f"DISTANCE TO {_ranges(ids)}",
                        "HMAT READ"]] + node_rows)]

    gpu = result.gpu
    if gpu.present:
        out += [""] + [f"GPU {g.index}: {g.name}, {human_bytes(g.total_bytes)} total, "
                       f"{human_bytes(g.free_bytes)} free" for g in gpu.gpus]
    else:
        out += ["", f"GPU: none ({gpu.reason})"]
    return "\n".join(out)


def render_daemon(d: dict) -> str:
    """The running daemon's tiers (local ones and the cluster tier) with each one's health."""
    rows = [["TIER", "KIND", "USED", "CAPACITY", "BLOCKS", "BACKEND", "HEALTH"]]
    for t in d["tiers"]:
        h = t.get("health") or {"state": "ok", "reason": ""}
        rows.append([t["name"], t["kind"], human_bytes(t["used_bytes"]), human_bytes(t["capacity_bytes"]),
                     str(t["blocks"]), t["backend"], h["state"] + (f": {h['reason']}" if h["reason"] else "")])
    return "\n".join(["", "kvtierd:", table(rows, right={2, 3, 4})])


@click.command("tiers")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tiers, nodes, gpu (and daemon).")
@click.option("--socket", "socket_path", default=None, metavar="PATH",
              help="Also show this running kvtierd's tiers, the cluster tier with its health.")
@nvme_dirs_option
def tiers(as_json: bool, socket_path: str | None, nvme_dirs: tuple[str, ...]) -> None:
    """List the memory and storage tiers of this machine, fastest first.

    GPUs (hbm) rank first, then the kernel's memory tiers (dram, then cxl), then NVMe directories.
    """
    result = discovery.survey(nvme_dirs=list(nvme_dirs))
    daemon = None
    if socket_path is not None:
        from kvtier.cli.status import call
        st = call(socket_path, "stats")
        daemon = {"tiers": st["tiers"], "cluster": st.get("cluster")}
    if as_json:
        out = result.to_dict()
        if daemon is not None:
            out["daemon"] = daemon
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(render(result) + (render_daemon(daemon) if daemon is not None else ""))
