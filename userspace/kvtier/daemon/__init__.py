"""kvtierd: the daemon that holds KV blocks across tiers and serves the engine API.

    kvtierd [--config FILE] [--socket PATH] [--state-dir DIR] [--metrics HOST:PORT|""] [--log-level L] [--check]
    kvtierd --plan [--model M] [--context TOKENS] ...     the start-up capacity plan (kvtier.daemon.plan)

Modules: config (TOML, validated), protocol (the wire format, documented there), engine (blocks over tiers,
policy-driven demotion/promotion/pinning, moves log), server (socket loop, peer checks, signals, sd_notify),
metrics (Prometheus). Tier backends come from kvtier.store.
"""
from __future__ import annotations

import logging
import sys

import click

from kvtier.daemon.plan import plan_sessions  # noqa: F401  (kept importable: tests and callers use it)


@click.command("kvtierd", context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  kvtierd                                   # /etc/kvtier/kvtierd.toml, else the embedded default
  kvtierd --config ./kvtierd.toml --check   # validate a config and exit
  KVTIER_STATE_DIR=/tmp/kv kvtierd --socket /tmp/kv/sock --metrics ""
  kvtierd --plan --model llama-3-70b --context 128k --sessions 8 --nvme-dir /var/tmp
""")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config (default /etc/kvtier/kvtierd.toml if present, else the embedded default).")
@click.option("--socket", "socket_path", default=None, help="Override the config's socket path.")
@click.option("--state-dir", default=None,
              help="State directory where the config sets none (same as $KVTIER_STATE_DIR).")
@click.option("--metrics", default=None, metavar="HOST:PORT", help='Override the metrics address ("" turns it off).')
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--check", is_flag=True, help="Validate the config, print it as JSON and exit.")
def kvtierd(config_path, socket_path, state_dir, metrics, log_level, check):
    """Serve KV blocks across GPU, DRAM, CXL and NVMe tiers to inference engines over a Unix socket."""
    import dataclasses
    import json
    import os

    from kvtier.daemon import config as config_mod

    if state_dir:
        os.environ[config_mod.STATE_ENV] = state_dir
    cfg = config_mod.load(config_path)
    if socket_path:
        cfg.socket = socket_path
    if metrics is not None:
        cfg.metrics_host, cfg.metrics_port = config_mod.parse_metrics(metrics, "--metrics")
    if check:
        d = dataclasses.asdict(cfg)
        for t in d["tenants"].values():
            t["salt"] = t["salt"].decode(errors="replace")
        click.echo(json.dumps(d, indent=2))
        return
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="kvtierd: %(levelname)s: %(message)s")
    from kvtier.daemon.metrics import Metrics
    from kvtier.daemon.server import Server

    srv = Server(cfg, config_path, Metrics())
    srv.listen()
    srv.serve_forever()


def main(args=None) -> None:
    from kvtier.cli import run

    argv = list(sys.argv[1:] if args is None else args)
    if "--plan" in argv:
        from kvtier.daemon.plan import kvtierd as plan_cmd
        argv.remove("--plan")
        raise SystemExit(run(plan_cmd, "kvtierd", argv))
    raise SystemExit(run(kvtierd, "kvtierd", argv))
