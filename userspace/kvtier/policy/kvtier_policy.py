"""kvtier's default policy: a learned hit-density expert and recency experts, arbitrated online.

The default policy `kvtier` (KvtierPolicy, at the end of this file) runs full shadow simulations of several
experts on the same request stream: the reuse-predictor expert (kvtier.policy.predictor,
`kvtier-predict`: an online logistic model of whether a request's blocks come back, from block, request
and session features, with hit-density eviction), the learned hit-density expert described below
(HitDensityPolicy, `kvtier-density`), LRU, ARC and S3-FIFO. Each shadow counts the hits it would have
had, with exponential decay (half-life: a few cache turnover times, measured). The real cache follows
the expert with the most recent hits (the leader), in the spirit of set dueling (DIP, Qureshi et al.
ISCA'07) and of choosing a policy by miniature simulation (Waldspurger et al. ATC'17): it admits an
offered block when the leader's shadow holds it after the offer, and when it needs room it first evicts
blocks the leader no longer holds (the leader's victims, oldest first; after a switch, what the new
leader does not hold). So when one expert leads for a while the real cache converges to its contents, and
the default is never far behind the best expert on any workload, while keeping the learned expert's lead
where it has one. Work per access is O(1) per expert (plus O(capacity) once per switch, which hysteresis
keeps rare).

The learned expert: learned reuse probabilities and hit density per block class.

Every offered block gets a class (block type x transition type x how often it was seen). For each class
the policy learns online, from a ghost record of every block offered in the last W requests (resident or
not, so declined blocks still teach it):

  - how many blocks of the class were reused, in log2 buckets of their age at reuse (requests since the
    block was last offered), and how many went W requests without reuse;
  - from these, for a block of age a: the Beta-Bernoulli posterior probability that it is still reused
    (prior Beta(1, 1)), and the expected residency it would cost until then (reuse time, or W).

Their ratio is the block's hit density: expected hits per block-request of cache space (in the spirit of
LHD, Beckmann et al. NSDI'18). Within a class, blocks sit in recency order, so the oldest block of each
class is that class's candidate; the candidate with the lowest density is evicted, and an offered block
whose own density is lower than every candidate's is declined (admission control). W is a multiple of the
cache's turnover time, which is measured, so nothing is tuned to one trace. Counts decay so the policy
follows a changing workload.

Sessions: hints (decode, idle, finished, resume) are kept for prefetch: an idle session whose next turn is
due, by the gaps between its earlier turns, has its blocks suggested for prefetch. A decoding session's blocks
are pinned by the tier stack (kvtier.policy.tiers), which takes them out of any policy's reach. Finished and
resume hints also reach the predictor expert, which re-ranks the session's blocks by them (a finished
session's blocks go first, down a tier where there is one; see kvtier.policy.predictor).
"""
from __future__ import annotations

from collections import OrderedDict, deque

from kvtier.policy.base import Policy
from kvtier.policy.queues import SESSIONS_KEPT, ClassQueuePolicy, trimmed
from kvtier.policy.model import BlockType, Request, Session, SessionState, Transition

AGE_BUCKETS = 24          # log2 buckets of age in requests
HORIZON_TURNOVERS = 2.0   # ghost horizon W, in cache turnover times (a structural choice, not a fit)
PRIOR_REUSED, PRIOR_DROPPED = 1.0, 1.0
DECAY_EVERY_REQUESTS = 2000
REFRESH_EVERY_REQUESTS = 200
TRANSITION_IN_CLASS = True  # transition type is part of the class (per the design)


def _bucket(age: float) -> int:
    return min(AGE_BUCKETS - 1, int(age).bit_length())


class HitDensityPolicy(ClassQueuePolicy):
    """The learned expert: Beta-Bernoulli reuse probability / expected residency per block class."""

    name = "kvtier-density"

    def __init__(self, capacity_blocks: int):
        super().__init__(capacity_blocks)                     # _where, _queues, _heads, _clock: see queues.py
        self._reused: dict[tuple, list[float]] = {}           # class -> reuse counts per age bucket
        self._dropped: dict[tuple, float] = {}                # class -> blocks not reused within W
        self._seen: dict[int, int] = {}                       # block -> times accessed
        self._children: dict[int, int] = {}                   # block -> first child seen (-1: several)
        self._density: dict[tuple, float] = {}                # (class, bucket) -> cached hit density
        self.sessions: dict[int, Session] = {}
        self._learner: HitDensityPolicy | None = None

    @property
    def learner(self) -> HitDensityPolicy:
        """Whose statistics score this policy's classes: its own, or (lower tiers of a stack, which see only
        demotions) the first tier's. Kept as None for itself: a reference to itself would make the policy a
        cycle, which the daemon's collector frees only on a full walk (see daemon.server.Collector)."""
        return self._learner if self._learner is not None else self

    @learner.setter
    def learner(self, top: HitDensityPolicy) -> None:
        self._learner = None if top is self else top

    # -- learning ---------------------------------------------------------------------------------
    @property
    def horizon_requests(self) -> float:
        return HORIZON_TURNOVERS * self.capacity_blocks / max(1.0, self._admit_rate)

    def _reuse_stats(self, cls, age: float):
        """(P(reused | class, age), expected residency until reuse or horizon) for a block of that age."""
        learner = self.learner
        counts = learner._reused.get(cls)
        k = _bucket(age)
        horizon = learner.horizon_requests
        dropped = learner._dropped.get(cls, 0.0) + PRIOR_DROPPED
        if counts is None:
            later, wait = PRIOR_REUSED, PRIOR_REUSED * max(1.0, horizon / 2 - age)
        else:
            later = PRIOR_REUSED + sum(counts[k:])
            # midpoint of bucket j is 0.75 * 2**j requests
            wait = PRIOR_REUSED * max(1.0, horizon / 2 - age) + sum(
                c * max(1.0, 0.75 * (1 << j) - age) for j, c in enumerate(counts[k:], k) if c)
        total = later + dropped
        p = later / total
        residency = (wait + dropped * max(1.0, horizon - age)) / total
        return p, residency

    def _freshness(self):
        # a lower tier of a stack scores with the top tier's statistics, which move with the top tier's clock
        if self.learner is self:
            return None
        stamp = (self._clock, self.learner._clock)
        if stamp != self._heads_stamp:
            self._density.clear()
        return stamp

    def _bucket_end(self, age: float) -> float:
        k = _bucket(age)
        return float("inf") if k >= AGE_BUCKETS - 1 else 1 << k

    def _hit_density(self, cls, age: float) -> float:
        key = (cls, _bucket(age))
        v = self._density.get(key)
        if v is None:
            p, residency = self._reuse_stats(cls, age)
            v = self._density[key] = p / residency
        return v

    def _learn(self, req: Request) -> None:
        now = self._clock
        ghost = self._ghost
        for b in req.hash_ids:
            g = ghost.pop(b, None)
            if g is not None:
                counts = self._reused.get(g[0])
                if counts is None:
                    counts = self._reused[g[0]] = [0.0] * AGE_BUCKETS
                counts[_bucket(now - g[1])] += 1.0
        limit = now - self.horizon_requests
        for g in self._expire_ghosts(limit):
            self._dropped[g[0]] = self._dropped.get(g[0], 0.0) + 1.0
        if now % DECAY_EVERY_REQUESTS == 0:
            for counts in self._reused.values():
                counts[:] = [c * 0.5 for c in counts]
            for c in self._dropped:
                self._dropped[c] *= 0.5
        if now % REFRESH_EVERY_REQUESTS == 0:
            self._density.clear()
            self._stale()

    # -- classification ---------------------------------------------------------------------------
    def _classify(self, req: Request, pos: int, hit: bool) -> tuple:
        ids = req.hash_ids
        block = ids[pos]
        if pos == len(ids) - 1:
            btype = BlockType.TAIL
        elif pos == 0 or self._children.get(block) == -1:
            btype = BlockType.PREFIX
        elif hit or self._seen.get(block, 0):
            btype = BlockType.HISTORY
        else:
            btype = BlockType.INPUT
        transition = self._state_of(req) if TRANSITION_IN_CLASS else 0
        if transition is None:   # offered after its request's state was forgotten
            transition = int(Transition.CONTINUE)
        return (int(btype), transition, min(self._seen.get(block, 0), 3))

    # -- the Policy interface ---------------------------------------------------------------------
    def begin_request(self, req):
        self._clock = req.index if req.index >= 0 else self._clock + 1
        self._learn(req)
        ids = req.hash_ids
        depth = 0
        seen = self._seen
        while depth < len(ids) and ids[depth] in seen:
            depth += 1
        self._begin(req, int(Transition.CONTINUE if depth >= 2 else Transition.FIRST))
        s = self.sessions.pop(req.session_id, None)
        if s is None and req.session_id >= 0:
            s = Session(req.session_id, tenant=req.tenant)
        if s is not None:
            self.sessions[req.session_id] = s   # last: the sessions kept are the most recently active
            self.sessions = trimmed(self.sessions, SESSIONS_KEPT)
            if s.turns:
                s.gaps_ms.append(req.timestamp_ms - s.last_arrival_ms)
                del s.gaps_ms[:-8]
            s.turns += 1
            s.last_arrival_ms = req.timestamp_ms
            s.state = SessionState.PREFILL
            s.blocks = ids

    def request_done(self, req):
        seen, children = self._seen, self._children
        prev = None
        for b in req.hash_ids:
            seen[b] = seen.pop(b, 0) + 1
            if prev is not None:
                c = children.get(prev)
                if c is None:
                    children[prev] = b
                elif c != b:
                    children[prev] = -1
            prev = b
        keep = self.history_blocks
        self._seen, self._children = trimmed(seen, keep), trimmed(children, keep)
        self._count_admitted(req)

    def offer(self, block, req, pos, hit):
        cls = self._classify(req, pos, hit)
        now = self._clock
        self._ghost[block] = (cls, now)
        self._ghost_q.append((block, now))
        return self._admit(block, cls, now)

    def export_meta(self, block):
        cls = self._where.get(block)
        return self._ghost.get(block) if cls is None else (cls, self._queues[cls][block])

    def admit_demoted(self, block, meta, req=None) -> list[int]:
        """A demoted block is admitted (demoted, not dropped); the lowest-density block here makes room."""
        if meta is None:
            meta = ((int(BlockType.HISTORY), int(Transition.CONTINUE), 1), self._clock)
        cls, t = meta
        return self._admit_demoted(block, cls, t)

    # -- hints and introspection ------------------------------------------------------------------
    def session_hint(self, session_id, state, now_ms=0.0, blocks=None):
        s = self.sessions.get(session_id)
        if s is None:
            s = self.sessions[session_id] = Session(session_id)
            self.sessions = trimmed(self.sessions, SESSIONS_KEPT)
        s.state = SessionState.IDLE if state == SessionState.RESUME else state
        if state == SessionState.FINISHED:
            s.blocks = []

    def prefetch_suggestions(self, limit=16, now_ms: float | None = None, resident=None) -> list[int]:
        """Blocks of idle sessions whose next turn is due (by their mean inter-turn gap), soonest first.

        `resident(block)` says what is already in the cache (default: this policy's own contents).
        """
        resident = resident or self._where.__contains__
        due = []
        for s in self.sessions.values():
            gap = s.expected_gap_ms()
            if s.state == SessionState.IDLE and gap is not None and s.blocks:
                due.append((s.last_arrival_ms + gap, s.session_id, s.blocks))
        due.sort()
        out: list[int] = []
        for _, _, blocks in due:
            for b in blocks[:-1]:  # the tail block changes on the next turn
                if not resident(b):
                    out.append(b)
                    if len(out) >= limit:
                        return out
        return out

    def explain(self, block):
        d = super().explain(block)
        cls = self._where.get(block)
        if cls is None:
            g = self._ghost.get(block)
            if g is None:
                return d
            cls, t = g
        else:
            t = self._queues[cls][block]
        age = self._clock - t
        p, residency = self._reuse_stats(cls, age)
        d.update({"block_type": BlockType(cls[0]).name.lower(), "transition": Transition(cls[1]).name.lower(),
                  "times_seen": self._seen.get(block, 0), "age_requests": age, "reuse_probability": round(p, 4),
                  "expected_residency_requests": round(residency, 1), "hit_density": p / residency,
                  "horizon_requests": round(self.horizon_requests, 1)})
        if cls is not None and block in self._where:
            cand = self._victim()
            if cand is not None:
                cls = self._where[cand]
                d["next_victim_hit_density"] = self._hit_density(cls, self._clock - self._queues[cls][cand])
        return d


# -- the default: online arbitration between experts ------------------------------------------------------

EXPERTS = ("predict", "density", "lru", "arc", "s3fifo")   # the learned experts first: they lead until beaten
HALF_LIFE_TURNOVERS = 4.0   # score half-life, in cache turnover times (measured, not fitted)
SWITCH_MARGIN = 0.02        # hysteresis: a challenger must lead by this fraction of the leader's score


class KvtierPolicy(Policy):
    """Follow-the-leader over shadow simulations of the learned expert and recency experts (see the top)."""

    name = "kvtier"

    def __init__(self, capacity_blocks: int, experts: tuple[str, ...] = EXPERTS):
        from kvtier.policy.baselines import ARC, LRU, S3FIFO
        from kvtier.policy.predictor import ReusePredictorPolicy

        self._shadows: dict[str, Policy] = {}
        self.density = HitDensityPolicy(capacity_blocks)
        make = {"predict": ReusePredictorPolicy, "density": lambda c: self.density, "lru": LRU, "arc": ARC,
                "s3fifo": S3FIFO}
        for e in experts:
            self._shadows[e] = make[e](capacity_blocks)
        self._names = list(self._shadows)
        self._list = list(self._shadows.values())
        # the experts that learn from request_done (the recency ones do not: no call per request for them)
        self._learners = [s.request_done for s in self._list if type(s).request_done is not Policy.request_done]
        # the experts that use hints, and the density expert whatever the experts (its sessions drive prefetch)
        self._hinted = [s for s in self._list if type(s).session_hint is not Policy.session_hint]
        if self.density not in self._hinted:
            self._hinted.append(self.density)
        super().__init__(capacity_blocks)
        self._res: OrderedDict[int, None] = OrderedDict()   # resident blocks, least recently used first
        self._stale: deque[int] = deque()                  # resident blocks the leader no longer holds
        self.leader = self._names[0]
        self._lead = self._shadows[self.leader]
        self._lead_i = 0
        self._lru_i = self._names.index("lru") if "lru" in self._names else None   # its misses: the turnover
        self.scores = [0.0] * len(self._list)              # decayed hits per expert
        self._miss_rate = 16.0                             # EMA of LRU-shadow misses (admissions) per request
        self.switches = 0
        self._last_switch = 0
        self._masks: list[list[bool]] = []

    # capacity changes (tier stacks shrink the working tier around pinned blocks) reach every shadow
    @property
    def capacity_blocks(self):
        return self._cap

    @capacity_blocks.setter
    def capacity_blocks(self, value):
        self._cap = value
        for s in self._shadows.values():
            if s.capacity_blocks != value:
                if value < len(s):
                    ev = s.resize(value)
                    if s is getattr(self, "_lead", None):
                        self._stale.extend(ev)
                s.capacity_blocks = value

    @property
    def learner(self):
        return self.density

    @learner.setter
    def learner(self, top):
        self.density.learner = getattr(top, "density", top)

    @property
    def half_life_requests(self) -> float:
        return max(8.0, HALF_LIFE_TURNOVERS * self._cap / max(1.0, self._miss_rate))

    # -- the Policy interface ---------------------------------------------------------------------
    def contains(self, block):
        return block in self._res

    def __len__(self):
        return len(self._res)

    def begin_request(self, req):
        ids = req.hash_ids
        decay = 0.5 ** (1.0 / self.half_life_requests)
        scores = self.scores
        masks = self._masks = []
        for i, s in enumerate(self._list):
            s.begin_request(req)
            m = list(map(s.contains, ids))
            masks.append(m)
            scores[i] = scores[i] * decay + m.count(True)
        if self._lru_i is not None:
            self._miss_rate = 0.99 * self._miss_rate + 0.01 * masks[self._lru_i].count(False)
        top = max(scores)
        if top > scores[self._lead_i] * (1.0 + SWITCH_MARGIN) + 1.0:
            self._switch(self._names[scores.index(top)], req.index)

    def _switch(self, name: str, when: int) -> None:
        self.leader = name
        self._lead_i = self._names.index(name)
        self._lead = lead = self._shadows[name]
        self.switches += 1
        self._last_switch = when
        # what the new leader does not hold goes first when room is needed (least recently used first)
        self._stale = deque(b for b in self._res if not lead.contains(b))

    def on_hit(self, block, req, pos):
        self._res.move_to_end(block)

    def touch(self, block, count, now_ms=0.0):
        """Direct access (eBPF heat): recency for the real cache and every recency expert."""
        if count > 0 and block in self._res:
            self._res.move_to_end(block)
            for s in self._list:
                s.touch(block, count, now_ms)

    def end_request(self, req, hits):
        """Every expert sees the whole request (its own hits); then the real cache follows the leader."""
        lead, stale = self._lead, self._stale
        for s, m in zip(self._list, self._masks):
            ev = s.end_request(req, m)
            if s is lead and ev:
                stale.extend(ev)
        out = []
        follow = self._follow
        for b in req.hash_ids:
            out.extend(follow(b))
        return out

    def request_done(self, req):
        for done in self._learners:
            done(req)

    def offer(self, block, req, pos, hit):
        lead = self._lead
        for s in self._list:
            ev = s.offer(block, req, pos, s.contains(block) if s is not self.density else hit)
            if s is lead and ev:
                self._stale.extend(ev)
        return self._follow(block)

    def _follow(self, block) -> list[int]:
        res = self._res
        if not self._lead.contains(block):
            # the leader declined or dropped it: it stays only while there is room, first to go
            if block in res:
                self._stale.append(block)
            return []
        if block in res:
            res.move_to_end(block)
            return []
        if self._cap == 0:
            return []
        out = []
        while len(res) >= self._cap:
            out.append(self._evict_one())
        res[block] = None
        return out

    def _evict_one(self, ask_leader: bool = False) -> int:
        res, stale, lead = self._res, self._stale, self._lead
        while stale:
            v = stale.popleft()
            if v in res and not lead.contains(v):
                del res[v]
                return v
        if ask_leader:
            # The leader holds all of ours: what it gives up first goes. A daemon asks for room (reclaim) before
            # the leader is full; the leader drops each victim too, as the real cache no longer holds it.
            while (v := lead.pop_victim()) is not None:
                if v in res:
                    del res[v]
                    return v
        return res.popitem(last=False)[0]  # least recently used

    def remove(self, block):
        for s in self._list:
            s.remove(block)
        return self._res.pop(block, 0) is None

    def pop_victim(self):
        return self._evict_one(ask_leader=True) if self._res else None

    def resize(self, capacity_blocks):
        self.capacity_blocks = max(0, capacity_blocks)
        out = []
        while len(self._res) > self._cap:
            out.append(self._evict_one())
        return out

    def export_meta(self, block):
        return self.density.export_meta(block)

    def admit_demoted(self, block, meta, req=None):
        lead = self._lead
        for s in self._list:
            ev = s.admit_demoted(block, meta, req)
            if s is lead and ev:
                self._stale.extend(ev)
        return self._follow(block)

    # -- hints and introspection ------------------------------------------------------------------
    @property
    def sessions(self):
        return self.density.sessions

    def session_hint(self, session_id, state, now_ms=0.0, blocks=None):
        for s in self._hinted:
            s.session_hint(session_id, state, now_ms, blocks)

    def prefetch_suggestions(self, limit=16, now_ms: float | None = None) -> list[int]:
        """The density expert's session model decides what is due; the real cache says what is missing."""
        return self.density.prefetch_suggestions(limit, now_ms, resident=self._res.__contains__)

    def explain(self, block):
        d = Policy.explain(self, block)
        total = sum(self.scores) or 1.0
        d.update({
            "decided_by": self.leader,
            "expert_weights": {n: round(s / total, 4) for n, s in zip(self._names, self.scores)},
            "expert_recent_hits": {n: round(s, 1) for n, s in zip(self._names, self.scores)},
            "held_by_expert": {n: s.contains(block) for n, s in self._shadows.items()},
            "leader_dropped_it": block in self._res and not self._lead.contains(block),
            "score_half_life_requests": round(self.half_life_requests, 1),
            "switches": self.switches,
            "density_expert": {k: v for k, v in self.density.explain(block).items()
                               if k not in ("policy", "block", "resident")},
        })
        return d
