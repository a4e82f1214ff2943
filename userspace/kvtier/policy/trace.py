"""Mooncake-format KV-cache traces: one JSON object per line.

Fields: `timestamp` (ms from the trace start), `input_length` and `output_length` (tokens), `hash_ids`
(the prompt's KV blocks, each id naming the block and its whole prefix). Blank lines are skipped; anything
else that is not such an object is an InputError naming the file, the line and the problem.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from kvtier.errors import InputError
from kvtier.policy.model import Request

_FIELDS = (("timestamp", (int, float)), ("input_length", int), ("output_length", int), ("hash_ids", list))


def parse_line(text: str, line: int, where: str = "trace") -> Request:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}:{line}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}:{line}: expected a JSON object, got {type(obj).__name__}")
    for name, kind in _FIELDS:
        if name not in obj:
            raise InputError(f"{where}:{line}: missing field '{name}'")
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InputError(f"{where}:{line}: field '{name}' must be {_kind_name(kind)}, got {value!r:.40}")
        if name != "hash_ids" and value < 0:
            raise InputError(f"{where}:{line}: field '{name}' must not be negative, got {value!r}")
    ids = obj["hash_ids"]
    for h in ids:
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise InputError(f"{where}:{line}: field 'hash_ids' must hold non-negative integers, got {h!r:.40}")
    if len(set(ids)) != len(ids):
        raise InputError(f"{where}:{line}: field 'hash_ids' repeats a block id")
    return Request(index=-1, timestamp_ms=float(obj["timestamp"]), input_length=obj["input_length"],
                   output_length=obj["output_length"], hash_ids=ids, tenant=str(obj.get("tenant", "")), line=line)


def _kind_name(kind) -> str:
    if kind is list:
        return "a list"
    if kind is int:
        return "an integer"
    return "a number"


def parse_lines(lines: Iterable[str], where: str = "trace") -> list[Request]:
    """Requests in arrival order (sorted by timestamp, stable), indexed 0.., sessions inferred."""
    reqs = []
    for n, text in enumerate(lines, 1):
        if text.strip():
            reqs.append(parse_line(text, n, where))
    reqs.sort(key=lambda r: r.timestamp_ms)  # stable: equal timestamps keep file order
    for i, r in enumerate(reqs):
        r.index = i
    infer_sessions(reqs)
    return reqs


def read_trace(path: str | os.PathLike) -> list[Request]:
    """Read a Mooncake JSONL trace; InputError for a malformed line, OSError if unreadable."""
    path = os.fspath(path)
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            return parse_lines(f, where=path)
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None


def infer_sessions(reqs: list[Request]) -> None:
    """Give each request the session of the latest request whose blocks it extends the most.

    A conversation's next turn repeats the previous turn's blocks (less the partial last one) and adds
    new ones, so the deepest previously-seen block of a request names its conversation. Requests that
    share only the root (system prompt) block start new sessions.
    """
    owner: dict[int, int] = {}  # block id -> session of the latest request that held it
    next_session = 0
    for r in reqs:
        ids = r.hash_ids
        depth = 0
        while depth < len(ids) and ids[depth] in owner:
            depth += 1
        if depth >= 2:
            r.session_id = owner[ids[depth - 1]]
        else:
            r.session_id = next_session
            next_session += 1
        for h in ids:
            owner[h] = r.session_id


def write_trace(reqs: Iterable[Request], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in reqs:
            f.write(json.dumps({"timestamp": r.timestamp_ms if r.timestamp_ms % 1 else int(r.timestamp_ms),
                                "input_length": r.input_length, "output_length": r.output_length,
                                "hash_ids": r.hash_ids}) + "\n")
