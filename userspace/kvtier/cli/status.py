"""kvctl status: the running kvtierd's tiers (used / capacity, blocks, hits), sessions, policy, module state.

Examples:
  kvctl status
  kvctl status --socket /run/kvtier/kvtierd.sock --json
  KVTIER_TENANT=acme kvctl blocks     # a non-admin user: bind tenant acme, see only its blocks and sessions

kvctl's daemon commands connect without a tenant, which only an admin may (root, the daemon's user, or [admins]
of the config): admins see every tenant. Anyone else sets $KVTIER_TENANT and sees that tenant only.
"""
from __future__ import annotations

import errno
import json
import os

import click

from kvtier.cli.common import human_bytes, table


TENANT_ENV = "KVTIER_TENANT"


def default_socket() -> str:
    from kvtier.daemon import config
    env = os.environ.get(config.SOCKET_ENV)
    if env:
        return env
    try:
        return config.load(None).socket   # /etc/kvtier/kvtierd.toml when present
    except Exception:   # a broken system config must not stop kvctl from reaching a daemon on the default path
        return config.DEFAULT_SOCKET


socket_option = click.option("--socket", "socket_path", default=None, metavar="PATH",
                             help="kvtierd's socket (default: $KVTIER_SOCKET, the config's, /run/kvtier/kvtierd.sock).")
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")


def call(socket_path: str | None, op: str, **fields) -> dict:
    """One request to the daemon; a daemon that is not there is one OSError line (exit 1)."""
    from kvtier.client import admin_call
    path = socket_path or default_socket()
    try:
        reply = admin_call(path, op, tenant=os.environ.get(TENANT_ENV) or None, **fields)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise OSError(e.errno, f"kvtierd is not running (no daemon at {path})") from None
    except PermissionError:
        raise OSError(errno.EACCES, f"{path}: permission denied (are you in the daemon's group?)") from None
    reply.pop("ok", None)
    reply.pop("id", None)
    return reply


def emit(as_json: bool, obj, human) -> None:
    click.echo(json.dumps(obj) if as_json else human(obj))


def render(st: dict) -> str:
    if not st.get("admin", True):
        return render_tenant(st)
    rows = [["TIER", "KIND", "USED", "CAPACITY", "USE%", "BLOCKS", "HITS", "BACKEND"]]
    for t in st["tiers"]:
        pct = 100.0 * t["used_bytes"] / t["capacity_bytes"] if t["capacity_bytes"] else 0.0
        rows.append([t["name"], t["kind"], human_bytes(t["used_bytes"]), human_bytes(t["capacity_bytes"]),
                     f"{pct:.1f}", str(t["blocks"]), str(t["hits"]), t["backend"]])
    c = st["counters"]
    lines = [f"kvtierd pid {st['pid']} on {st['socket']} ({st['config']}), policy {st['policy']}, "
             f"up {st['uptime_s']:.0f} s",
             table(rows, right={2, 3, 4, 5, 6}),
             f"sessions {st['sessions']}, blocks {st['blocks']} ({st['pinned_blocks']} pinned"
             f"{', ' + human_bytes(st['pinned_bytes']) if st.get('pinned_bytes') else ''}"
             f"{', %d being unpinned' % st['unpinning_blocks'] if st.get('unpinning_blocks') else ''}"
             f"{', %d pins refused over quota' % c['pins_over_quota'] if c.get('pins_over_quota') else ''}), "
             f"hit rate {100 * st['hit_rate']:.1f}% of {c['gets']} lookups "
             f"({', '.join(f'{k} {100 * v:.1f}%' for k, v in st['hit_rate_by_tier'].items())})",
             f"puts {c['puts']} (+{c['dedup_puts']} deduplicated), demotions {c['demotions']}, promotions "
             f"{c['promotions']}, prefetches {c['prefetches']}, dropped {c['drops']}, moved "
             f"{human_bytes(c['bytes_moved'])}",
             f"kvtier.ko: {'loaded' if st['module']['loaded'] else 'not loaded'}; probes: "
             f"{probes_line(st['probes'])}; metrics: "
             f"{'port ' + str(st['metrics_port']) if st['metrics_port'] else 'off'}"]
    for t in st["tiers"]:   # GPU tiers: prefetches each way and moves still in flight
        g = t.get("gpu")
        if g:
            lines.append(f"{t['name']}: GPU {g['device']}, prefetched to GPU {g['to_device']} "
                         f"({human_bytes(g['to_device_bytes'])}), to host {g['to_host']} "
                         f"({human_bytes(g['to_host_bytes'])}), {g['moves_in_flight']} in flight, "
                         f"{g['shared_blocks']} read-mostly, {g.get('staged_gets', 0)} gets staged to host")
    lines += [f"{t['name']} ({t['kind']}): absent ({t['reason']})" for t in st.get("absent_tiers", [])]
    g = st.get("collector")
    if g:   # Python's cycle collector in the daemon: its pauses stall every client
        lines.append(f"collector: {'survivors frozen' if g['freeze'] else 'CPython default (gc_freeze = false)'}, "
                     f"{'/'.join(map(str, g['collections']))} collections (gen 0/1/2), longest pause "
                     f"{g['pause_max_ms']:.1f} ms, {g['pause_total_ms']:.0f} ms in all, "
                     f"{g['frozen_objects']:,} objects frozen")
    dr = st.get("directory")
    if dr:   # block directories: gets that clients served themselves, without a round trip
        lines.append(f"block directory: {'on' if dr['on'] else 'off'}, {dr['listed']} blocks listed in "
                     f"{dr['domains']} domains ({dr['bucket_full']} listings refused: bucket full), "
                     f"{dr['touched']} hits read by clients directly")
    cl = st.get("cluster")
    if cl:   # the Mooncake cluster tier: health, what it measured, what it did
        h, c = cl["health"], cl["counters"]
        bw = cl["bandwidth_bytes_per_s"]
        lines.append(f"cluster {cl['name']} ({cl['local_hostname']} -> master {cl['master']}): {h['state']}"
                     f"{': ' + h['reason'] if h['reason'] else ''}; published {c['publishes']} "
                     f"({c['publish_failures']} failed), fetched {c['fetches']}, checksum failures "
                     f"{c['checksum_failures']}, skipped for recompute {c['fetch_skipped_recompute']}, "
                     f"bandwidth {human_bytes(bw) + '/s' if bw else 'unmeasured'}")
    return "\n".join(lines)


def probes_line(p: dict) -> str:
    """eBPF probes: on (with the heat they saw), or why the daemon runs on API signals alone."""
    if p.get("loaded"):
        waiting = p.get("ranges", 0) - p.get("ranges_counted", p.get("ranges", 0))
        return (f"on ({p.get('touches', 0)} direct touches over {p.get('samples', 0)} samples"
                + (f"; {waiting} registered ranges wait for a probe slot" if waiting > 0 else "")
                + (f"; {p['note']}" if p.get("note") else "") + ")")
    return f"{p.get('state', 'off')} ({p.get('note') or 'not loaded'}; API signals only)"


def render_tenant(st: dict) -> str:
    """A tenant's view: tier sizes and its own counts (other tenants' use is not shown to it)."""
    rows = [["TIER", "KIND", "CAPACITY", "BACKEND"]]
    rows += [[t["name"], t["kind"], human_bytes(t["capacity_bytes"]), t["backend"]] for t in st["tiers"]]
    return "\n".join([f"kvtierd pid {st['pid']} on {st['socket']}, policy {st['policy']}, tenant {st['tenant']}",
                      table(rows, right={2}),
                      f"sessions {st['sessions']}, blocks {st['blocks']} ({st['pinned_blocks']} pinned"
                      + (f", {human_bytes(st['pinned_bytes'])} of {human_bytes(st['max_pinned_bytes'])} allowed"
                         if "max_pinned_bytes" in st else "") + ")"])


@click.command("status", epilog="\b\n" + __doc__[__doc__.index("Examples:"):])
@socket_option
@json_option
def status(socket_path, as_json):
    """The running daemon: tiers with used/capacity, sessions, blocks, hit rates, policy, module state."""
    emit(as_json, call(socket_path, "stats"), render)
