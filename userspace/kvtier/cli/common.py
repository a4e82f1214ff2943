"""What every kvctl/kvtierd command formats the same way: byte counts, tables, the NVMe directory option."""
from __future__ import annotations

import click

from kvtier.discovery import NVME_DIRS_ENV

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int | float | None) -> str:
    """Bytes in IEC units with three significant figures: 1536 -> '1.5 KiB'; None -> '-'."""
    if n is None:
        return "-"
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    if unit == 0:
        return f"{n:.0f} B"
    return f"{value:.3g} {_UNITS[unit]}" if value < 1000 else f"{value:.0f} {_UNITS[unit]}"


def table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Rows (the first is the header) in aligned columns; columns in `right` are right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(*rows)]
    return "\n".join("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)


# click splits a Path option's environment variable on ':' like $PATH; empty entries ("a::b") are dropped.
nvme_dirs_option = click.option(
    "--nvme-dir", "nvme_dirs", multiple=True, metavar="DIR", envvar=NVME_DIRS_ENV,
    type=click.Path(file_okay=False), show_envvar=True,
    callback=lambda ctx, param, dirs: tuple(d for d in dirs if d),
    help="A directory on an SSD for the NVMe tier (repeatable).")
