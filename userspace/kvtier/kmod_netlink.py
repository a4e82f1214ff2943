"""Client for kvtier.ko's generic netlink family "kvtier" (spec: kmod/netlink/kvtier.yaml).

Lists regions (KVTIER_CMD_REGION_GET dump), reads statistics (KVTIER_CMD_STATS_GET) and follows the
"events" multicast group (REGION_NEW, REGION_DEL, MIGRATED). Command and attribute numbers come from
the uapi header through the cffi binding; only each attribute's wire type is declared here, once.

pyroute2 is imported on first use: its import costs seconds under TCG, and `kvctl --help` or the ioctl
path must not pay for it.
"""
from __future__ import annotations

import asyncio
import errno as _errno
import os
from typing import Iterator

from kvtier._native import lib

FAMILY = "kvtier"                # KVTIER_GENL_NAME
MCGRP_EVENTS = "events"          # KVTIER_GENL_MCGRP_EVENTS

# Wire type of every KVTIER_A_* attribute (the header's comments, in pyroute2's names). A test checks
# that every attribute of the header is listed here.
ATTR_TYPES = {
    "UNSPEC": "none",
    "REGION_ID": "uint64",
    "OWNER_UID": "uint32",
    "TENANT_ID": "uint64",
    "SESSION_ID": "uint64",
    "SIZE_BYTES": "uint64",
    "BLOCK_BYTES": "uint32",
    "NODE": "int32",
    "RESIDENT_BYTES": "uint64",
    "SHARED_BYTES": "uint64",
    "FAULTS": "uint64",
    "MIGRATIONS": "uint64",
    "MIGRATED_BYTES": "uint64",
    "FIRST_BLOCK": "uint32",
    "NR_BLOCKS": "uint32",
    "BYTES_MOVED": "uint64",
    "REGIONS": "uint64",
    "ALLOCATED_BYTES": "uint64",
    "SHARES": "uint64",
    "NODE_STATS": "node_stats",
    "NODE_ID": "uint32",
    "NODE_MIGRATED_IN_BYTES": "uint64",
    "NODE_MIGRATED_OUT_BYTES": "uint64",
    "PAD": "none",
}


def header_attrs() -> dict[str, int]:
    """KVTIER_A_* name (without prefix) -> number, from the header (the __MAX sentinels left out)."""
    return {name[len("KVTIER_A_"):]: getattr(lib, name) for name in dir(lib)
            if name.startswith("KVTIER_A_") and name != "KVTIER_A_MAX"}


def header_cmds() -> dict[int, str]:
    """KVTIER_CMD_* number -> lower-case name (region_get, ..., migrated)."""
    return {getattr(lib, name): name[len("KVTIER_CMD_"):].lower() for name in dir(lib)
            if name.startswith("KVTIER_CMD_") and name != "KVTIER_CMD_MAX"}


CMDS = header_cmds()
EVENT_CMDS = {lib.KVTIER_CMD_REGION_NEW, lib.KVTIER_CMD_REGION_DEL, lib.KVTIER_CMD_MIGRATED}


def _nla_map() -> tuple:
    return tuple((number, f"KVTIER_A_{name}", ATTR_TYPES[name])
                 for name, number in sorted(header_attrs().items(), key=lambda kv: kv[1]))


_msg_class = None


def message_class():
    """The genlmsg subclass for the family, built on first use (it needs pyroute2)."""
    global _msg_class
    if _msg_class is None:
        from pyroute2.netlink import genlmsg, nla

        nla_map = _nla_map()

        class kvtier_msg(genlmsg):
            prefix = "KVTIER_A_"

            class node_stats(nla):
                # The nest reuses the family's attribute space (KVTIER_A_NODE_ID, ...).
                prefix = "KVTIER_A_"

            # No nest inside the nest: there NODE_STATS is opaque.
            node_stats.nla_map = tuple((n, name, "none" if kind == "node_stats" else kind)
                                       for n, name, kind in nla_map)

        kvtier_msg.nla_map = nla_map
        _msg_class = kvtier_msg
    return _msg_class


def _attrs(msg) -> dict:
    """A message's attributes as {lower_case_name: value}; NODE_STATS nests become {node: {...}}."""
    out = {}
    for name, value in msg["attrs"]:
        key = name[len("KVTIER_A_"):].lower() if name.startswith("KVTIER_A_") else name
        if key in ("unspec", "pad"):
            continue
        if key == "node_stats":
            row = _attrs(value)
            node = row.pop("node_id")
            out.setdefault("nodes", {})[node] = {k.removeprefix("node_"): v for k, v in row.items()}
            continue
        out[key] = value
    return out


def _not_loaded() -> OSError:
    return OSError(_errno.ENOENT, f"kvtier.ko is not loaded (no generic netlink family '{FAMILY}')")


def _as_oserror(err, what: str) -> OSError:
    code = getattr(err, "code", None) or _errno.EIO
    return OSError(code, f"netlink {what}: {os.strerror(code)}")


class Netlink:
    """A socket bound to the "kvtier" family. Use as a context manager."""

    def __init__(self):
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.generic import GenericNetlinkSocket

        class _Socket(GenericNetlinkSocket):
            pass

        # pyroute2 logs "protocol not found" at error level; we raise a clear error instead.
        _Socket.async_class = type("_AsyncSocket", (GenericNetlinkSocket.async_class,),
                                   {"module_err_level": "debug"})
        self._NetlinkError = NetlinkError
        self._sock = _Socket()
        try:
            self._sock.bind(FAMILY, message_class())
        except NetlinkError as err:
            self._sock.close()
            if err.code == _errno.ENOENT:
                raise _not_loaded() from None
            raise _as_oserror(err, "family lookup") from None
        except BaseException:
            self._sock.close()
            raise
        self._subscribed = False

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, cmd: int, dump: bool) -> list:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST

        msg = message_class()()
        msg["cmd"] = cmd
        msg["version"] = lib.KVTIER_GENL_VERSION
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        try:
            return [m for m in self._sock.nlm_request(msg, msg_type=self._sock.prid, msg_flags=flags)
                    if m["header"]["type"] == self._sock.prid]
        except self._NetlinkError as err:
            raise _as_oserror(err, CMDS.get(cmd, str(cmd))) from None

    def list_regions(self) -> list[dict]:
        """Every region the caller may see (root: all; others: their own), as attribute dicts."""
        regions = [_attrs(m) for m in self._request(lib.KVTIER_CMD_REGION_GET, dump=True)]
        return sorted(regions, key=lambda r: r.get("region_id", 0))

    def stats(self) -> dict:
        """Module-wide counters and per-node counters ({node: {...}} under "nodes")."""
        replies = self._request(lib.KVTIER_CMD_STATS_GET, dump=False)
        out = {"nodes": {}}
        for m in replies:
            row = _attrs(m)
            out["nodes"].update(row.pop("nodes", {}))
            out.update(row)
        return out

    def subscribe(self) -> None:
        """Join the "events" multicast group; later events() calls yield what arrives from now on."""
        if not self._subscribed:
            if MCGRP_EVENTS not in self._sock.mcast_groups:
                raise OSError(_errno.ENOENT, f"generic netlink family '{FAMILY}' has no "
                                             f"'{MCGRP_EVENTS}' multicast group")
            self._sock.add_membership(MCGRP_EVENTS)
            self._subscribed = True

    def events(self, timeout_s: float | None = None) -> Iterator[dict]:
        """Yield events as {"event": "region_new" | "region_del" | "migrated", attributes...}.

        Subscribes first if needed. Stops when no event arrives within timeout_s (None: wait forever).
        """
        self.subscribe()
        prid = self._sock.prid
        asyncore = self._sock.asyncore

        async def one_datagram():
            return [m async for m in asyncore.get()]

        async def next_batch():
            return await asyncio.wait_for(one_datagram(), timeout_s)

        while True:
            try:
                batch = self._sock._run_with_cleanup(next_batch)
            except asyncio.TimeoutError:
                return
            except self._NetlinkError as err:
                raise _as_oserror(err, "events") from None
            for m in batch:
                if m["header"]["type"] != prid or m["cmd"] not in EVENT_CMDS:
                    continue
                yield {"event": CMDS[m["cmd"]], **_attrs(m)}


def list_regions() -> list[dict]:
    with Netlink() as nl:
        return nl.list_regions()


def stats() -> dict:
    with Netlink() as nl:
        return nl.stats()
