"""Structured fuzzing of the engine API: every op with field values of every shape. Each reply is an error
with an errno other than EIO (malformed input is the client's fault, never an internal error), the daemon logs
no traceback, and it keeps serving with its blocks intact."""
from __future__ import annotations

import errno
import re
import socket
from pathlib import Path

import msgpack
import numpy as np

import kvtier.daemon.server as server_mod
from daemon_proc import block_bytes, running_daemon, short_dir, write_config
from kvtier.client import Client

BLOCK = 16 << 10
MESSAGES = 5000
# The field names the server reads (msg.get("x"), _int(msg, "x"), _list(msg, "x")), found in its source, so a
# field added later is fuzzed too.
SOURCE = Path(server_mod.__file__).read_text()
FIELDS = sorted(set(re.findall(r'msg(?:\.get\(|\[)"([a-z_]+)"', SOURCE)) |
                set(re.findall(r'_(?:int|list)\(msg, "([a-z_]+)"', SOURCE)) | {"blocks", "session", "txn", "lease"})
FIELDS = [f for f in FIELDS if f not in ("op", "id")]   # kept valid: the reply is matched by id
OPS = sorted(set(re.findall(r'"([a-z_]+)": self\.op_', SOURCE)))


def value(rng, depth=0):
    kind = rng.integers(0, 11 if depth < 2 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        edges = [0, 1, -1, 7, 2**31, 2**63 - 1, -2**63, 2**64 - 1]
        return edges[int(rng.integers(0, len(edges)))]
    if kind == 3:
        return int(rng.integers(-1000, 1000))
    if kind == 4:
        return [0.5, -1.0, 1e300, float("nan"), float("inf")][int(rng.integers(0, 5))]
    if kind == 5:
        words = ["", "x", "decoding", "finished", "resume", "idle", "input", "history", "lru", "zz", "\ufffd",
                 "a" * 300, "dram0", "nvme0"]
        return words[int(rng.integers(0, len(words)))]
    if kind == 6:
        return rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes()
    if kind == 7:
        return str(rng.integers(0, 10**6))
    if kind == 8:   # a block item, maybe wrong in one place: [hash, type, nbytes, layout]
        item = [int(rng.integers(0, 50)), "input", BLOCK, None]
        item[int(rng.integers(0, 4))] = value(rng, depth + 1)
        return [item] if rng.integers(0, 2) else item
    if kind == 9:
        return [value(rng, depth + 1) for _ in range(int(rng.integers(0, 5)))]
    return {str(value(rng, depth + 1)): value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def test_every_op_with_fuzzed_fields():
    d_dir = short_dir()
    with running_daemon(d_dir, write_config(d_dir)) as d:
        with Client(d.socket, "keeper") as kv:
            kv.put(None, [(i, "input", block_bytes(i, BLOCK)) for i in range(8)], durable=True)
        rng = np.random.default_rng(7)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        s.connect(d.socket)
        s.send(msgpack.packb({"op": "hello", "id": 1, "tenant": "fuzz"}))
        hello = msgpack.unpackb(s.recv(1 << 20), strict_map_key=False)
        assert hello["ok"], hello
        replies = {"ok": 0, "error": 0, "stray": 0, "nowait_failed": 0}
        for i in range(MESSAGES):
            msg = {"op": str(rng.choice(OPS)), "id": i + 2}
            for f in rng.choice(FIELDS, size=int(rng.integers(0, 5)), replace=False):
                msg[str(f)] = value(rng)
            if msg["op"] == "hello":
                continue   # a second hello re-binds the connection's tenant: tested in test_daemon_tenants
            if i % 10 == 0:   # a put sent without id (put(wait=False) of small blocks): it must get no reply at all
                del msg["id"]
                msg.update(op="put", nowait=True, spared=True)
                s.send(msgpack.packb(msg))
                continue
            s.send(msgpack.packb(msg))
            while True:
                data, fds, _, _ = socket.recv_fds(s, 1 << 20, 16)
                for fd in fds:
                    __import__("os").close(fd)
                reply = msgpack.unpackb(data, strict_map_key=False)
                nowait = reply.get("nowait")
                if nowait and nowait[1]:   # what the puts without id did, on the next reply: never an internal error
                    replies["nowait_failed"] += nowait[3]
                    assert nowait[1] != errno.EIO, (nowait, reply)
                if reply.get("id") == i + 2:
                    break
                replies["stray"] += 1
            if reply["ok"]:
                replies["ok"] += 1
            else:
                replies["error"] += 1
                assert reply["errno"] > 0 and reply["errno"] != errno.EIO, (msg, reply)
        s.close()
        assert replies["error"] > 1000 and replies["nowait_failed"] > 100 and replies["stray"] == 0, replies
        log = d.log.read_text()
        assert "Traceback" not in log and "failed" not in log, log[-3000:]
        with Client(d.socket, "keeper") as kv:   # nothing lost
            got = kv.get(None, list(range(8)))
            for i, g in enumerate(got):
                assert g is not None and g.tobytes() == block_bytes(i, BLOCK), i
