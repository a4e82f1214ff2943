"""kvctl: inspect and tune kvtier's tiers.

One module per subcommand, listed in COMMANDS and imported only when used, so `kvctl --help` stays fast.
Errors are handled once, here at the outer edge: bad input prints one line and exits 2; an OSError
from the kernel prints its errno and exits 1.
"""
from __future__ import annotations

import importlib
import sys

import click

from kvtier.errors import InputError

# name -> (module, attribute, one-line help shown by `kvctl --help`)
COMMANDS = {
    "tiers": ("kvtier.cli.tiers", "tiers", "List the memory and storage tiers of this machine."),
    "size": ("kvtier.cli.size", "size", "Exact KV-cache memory for a model, and how many sessions fit per tier."),
    "replay": ("kvtier.cli.replay", "replay", "Replay a KV-cache trace against a placement policy."),
    "regions": ("kvtier.cli.regions", "regions", "List kvtier.ko's KV regions (owner, tags, node, residency)."),
    "migrate": ("kvtier.cli.migrate", "migrate", "Move a kvtier.ko region's blocks to another NUMA node."),
    "stats": ("kvtier.cli.stats", "stats", "kvtier.ko's global and per-node counters."),
    "status": ("kvtier.cli.status", "status", "The running kvtierd: tiers used/capacity, sessions, hit rates, policy."),
    "sessions": ("kvtier.cli.sessions", "sessions", "The running kvtierd's sessions and where their blocks are."),
    "blocks": ("kvtier.cli.blocks", "blocks", "Blocks held by kvtierd (filter by --session, --tier)."),
    "explain": ("kvtier.cli.explain", "explain", "Why a block is in its tier: pins and the policy's scores."),
    "pin": ("kvtier.cli.pin", "pin", "Pin a block or a session's blocks where they are."),
    "unpin": ("kvtier.cli.pin", "unpin", "Unpin a block or a session's blocks."),
    "evict": ("kvtier.cli.evict", "evict", "Demote one block a tier down now."),
    "policy": ("kvtier.cli.policy", "policy", "Show or set kvtierd's placement policy."),
    "top": ("kvtier.cli.top", "top", "Live view: tiers, hottest sessions/blocks, migration rates and latency."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvtier", prog_name="kvctl")
def cli():
    """Inspect and tune kvtier's tiers.

    Every listing takes --json. Bad input exits 2 with one line on stderr.
    """


def run(group: click.Group, prog: str, args=None) -> int:
    """Run a click command with kvtier's error conventions; returns the exit status."""
    try:
        # Without standalone mode click returns a ctx.exit(N) status instead of raising it.
        status = group.main(args=args, prog_name=prog, standalone_mode=False)
        return status if isinstance(status, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        return 1
    except click.ClickException as e:
        click.echo(f"{prog}: error: {e.format_message()}", err=True)
        return e.exit_code
    except InputError as e:
        click.echo(f"{prog}: error: {e}", err=True)
        return e.exit_code
    except BrokenPipeError:
        return 0
    except OSError as e:
        if e.errno is None:
            raise
        click.echo(f"{prog}: error: {e}", err=True)
        return 1


def main(args=None) -> None:
    sys.exit(run(cli, "kvctl", args))
