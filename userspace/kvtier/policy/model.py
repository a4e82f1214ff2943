"""Blocks, requests and sessions as the policy engine sees them.

A block is named by its chained prefix hash (parent hash + the block's tokens + tenant salt), so equal ids
mean equal content and a block's id also stands for its whole prefix. Policies keep per-block state keyed
by that id; the types here carry what is known about a block when it is accessed or offered.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

TOKENS_PER_BLOCK = 512  # Mooncake traces hash 512-token blocks


class BlockType(enum.IntEnum):
    """What a block holds, as far as the request stream shows it."""

    PREFIX = 0    # shared prefix: the root block or a prefix node with fan-out (several children seen)
    HISTORY = 1   # conversation history: resident or seen before, reused by this request
    INPUT = 2     # new prompt content of this request, followed by more blocks
    TAIL = 3      # the request's last (usually partial) block: the next turn extends it with new tokens


class Transition(enum.IntEnum):
    """How a request relates to what came before it."""

    FIRST = 0     # new conversation: at most the root block was seen before
    CONTINUE = 1  # later turn or sibling: it extends a prefix seen before


class SessionState(enum.IntEnum):
    PREFILL = 0
    DECODE = 1
    IDLE = 2      # between turns: may resume
    FINISHED = 3  # the engine says: no further turn (its prefix may still be shared)
    RESUME = 4    # idle, and the engine says another turn is coming


@dataclass(slots=True)
class Request:
    """One inference request: a Mooncake trace line plus what the replay derives from it."""

    index: int                 # arrival order, 0-based
    timestamp_ms: float
    input_length: int          # tokens
    output_length: int         # tokens
    hash_ids: list[int]
    session_id: int = -1       # conversation this request continues (inferred from shared prefixes)
    tenant: str = ""
    line: int = 0              # line number in the trace file, for messages

    @property
    def blocks(self) -> int:
        return len(self.hash_ids)


@dataclass(slots=True)
class Session:
    """A conversation: the chain of requests that extend each other's prefix."""

    session_id: int
    tenant: str = ""
    state: SessionState = SessionState.PREFILL
    turns: int = 0
    last_arrival_ms: float = 0.0
    gaps_ms: list[float] = field(default_factory=list)  # between consecutive turns
    blocks: list[int] = field(default_factory=list)     # hash ids of its latest request

    def expected_gap_ms(self) -> float | None:
        """Mean gap between this session's turns so far (None before a second turn)."""
        return sum(self.gaps_ms) / len(self.gaps_ms) if self.gaps_ms else None
