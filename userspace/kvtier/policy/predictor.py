"""kvtier's reuse-predictor expert: online logistic reuse prediction per request, hit-density eviction.

In chat traces a block is reused almost only when its conversation sends another turn (the next turn
re-sends the whole history) or when it is a shared prefix. Whether a request's blocks come back is thus
mostly a property of the request and its session, not of the block, and a per-class Beta-Bernoulli count
spreads that signal over too many sparse classes. This expert instead learns one online logistic model
(AdaGrad, one-hot features, no constants fitted to any trace) of P(block is reused within the horizon)
from what is known when the request is offered:

  - the block: how often it was seen before (0, 1, 2, 3, 4+), whether it is the request's root or tail;
  - the request: prompt size and output size (log2 buckets), the share of new blocks;
  - the session: turn number, time since its previous turn and its mean gap (log2 buckets of seconds);
  - the engine's hint, when it sends one as a turn ends: finished (no further turn) or resume (another is
    coming), alone and by times seen. A hint re-offers the session's blocks with it (session_hint): what the
    engine knows about the session's future is the one signal a request stream lacks, and in chat traces it
    decides most of the reuse. Wrong or useless hints get no weight, since the weight is learned like the rest.

Labels arrive online: a block offered at request i is a positive when it is accessed again before
i + W, a negative when W passes first (W: the ghost horizon, a multiple of the measured cache turnover).
The ages at reuse feed a shared reuse-age histogram per seen-count bucket (quarter-octave buckets).

Eviction ranks blocks by hit density (LHD, Beckmann et al. NSDI'18): for a block with predicted reuse
probability p and age a, with S(a) the learned share of reuses later than a,

    density = p S(a) / (p S(a) E[gap - a | gap > a] + (1 - p)(W - a))

i.e. expected hits per block-request of cache space still to be spent on it. Blocks sit in cohorts of
equal (quantised p, seen bucket), oldest first; the cohort head with the lowest density is the victim,
and an offered block whose density is below every head's is declined (admission control).
"""
from __future__ import annotations

import math
from collections import deque

from kvtier.policy.queues import SESSIONS_KEPT, ClassQueuePolicy, trimmed
from kvtier.policy.model import Request, SessionState

P_LEVELS = 32               # quantisation of the predicted probability into cohorts
AGE_STEPS_PER_OCTAVE = 4
AGE_BUCKETS = 4 * 24
HORIZON_TURNOVERS = 4.0     # ghost horizon W in cache turnovers: with 2, a cache that admits everything never
                            # sees reuse beyond its own reach and keeps admitting everything (a trap)
LEARNING_RATE = 0.1         # AdaGrad step; AdaGrad scales it per feature
DECAY_EVERY_REQUESTS = 2000
REFRESH_EVERY_REQUESTS = 100


def _age_bucket_of(age: float) -> int:
    if age < 1:
        return 0
    return min(AGE_BUCKETS - 1, 1 + int(AGE_STEPS_PER_OCTAVE * math.log2(age)))


_AGE_TABLE = [_age_bucket_of(a) for a in range(1 << 16)]   # ages are request counts: look the usual ones up
_BUCKET_START = [0] * (AGE_BUCKETS + 1)                    # smallest integer age in each bucket (past the last: inf)
for _a in range(len(_AGE_TABLE) - 1, -1, -1):
    _BUCKET_START[_AGE_TABLE[_a]] = _a
_BUCKET_START[AGE_BUCKETS] = math.inf
for _k in range(AGE_BUCKETS - 1, 0, -1):
    if not _BUCKET_START[_k]:   # buckets beyond the table: 2 ** ((k - 1) / steps), checked against the formula
        a = math.ceil(2.0 ** ((_k - 1) / AGE_STEPS_PER_OCTAVE))
        while _age_bucket_of(a) < _k:
            a += 1
        while _age_bucket_of(a - 1) >= _k:
            a -= 1
        _BUCKET_START[_k] = a


def _age_bucket(age) -> int:
    if age.__class__ is int and 0 <= age < 65536:
        return _AGE_TABLE[age]
    return _age_bucket_of(age)


def _bucket_mid(k: int) -> float:
    return 0.5 if k == 0 else 2.0 ** ((k - 0.5) / AGE_STEPS_PER_OCTAVE)


def _log2b(x: float, cap: int) -> int:
    return min(cap, int(max(0.0, x)).bit_length())


# Features are one-hot (name, value) pairs, numbered once here: the model's tables are keyed by small ints, so
# scoring and training a sample hash ints, not tuples (a tuple's hash is recomputed at every lookup).
FEATURE_NAMES: list[tuple] = []


def _feature_ids(name: str, values) -> dict:
    out = {}
    for v in values:
        out[v] = len(FEATURE_NAMES)
        FEATURE_NAMES.append((name, *v) if isinstance(v, tuple) else (name, v))
    return out


_BIAS = _feature_ids("bias", [()])[()]
_TURN = _feature_ids("turn", range(1, 9))
_SIZE = _feature_ids("size", range(11))
_OUT = _feature_ids("out", range(15))
_NEW = _feature_ids("new", range(5))
_GAP = _feature_ids("gap", range(-1, 15))
_MGAP = _feature_ids("mgap", range(-1, 15))
_SEEN = _feature_ids("seen", range(5))
_ROLE = _feature_ids("role", range(3))
_SEEN_ROLE = _feature_ids("seen-role", [(sb, r) for sb in range(5) for r in range(3)])
_BLOCK_FEATURES = {(sb, r): (_SEEN[sb], _ROLE[r], _SEEN_ROLE[sb, r]) for sb in range(5) for r in range(3)}
# an engine's life-cycle hint, alone and by times seen (a finished conversation's shared prefix still comes back)
_HINTS = {SessionState.FINISHED: 0, SessionState.RESUME: 1}
_HINT = _feature_ids("hint", range(2))
_HINT_SEEN = _feature_ids("hint-seen", [(h, sb) for h in range(2) for sb in range(5)])
_HINT_FEATURES = {(h, sb): (_HINT[h], _HINT_SEEN[h, sb]) for h in range(2) for sb in range(5)}
# the engine's word is believed before there is evidence (log-odds: finished -2, resume +1), so a hint acts from
# the first request instead of a learning horizon later; the weights then move with the labels like any other
_HINT_PRIOR = {_HINT[0]: -2.0, _HINT[1]: 1.0}


def feature_names(feats) -> list[tuple]:
    """A sample's features as (name, value...) tuples."""
    return [FEATURE_NAMES[f] for f in feats]


class _Sample:
    """One labelled example: the blocks of one request that share a feature vector."""

    __slots__ = ("feats", "clock", "n", "reused")

    def __init__(self, feats, clock):
        self.feats, self.clock, self.n, self.reused = feats, clock, 0, 0


class ReusePredictorPolicy(ClassQueuePolicy):
    name = "kvtier-predict"

    def __init__(self, capacity_blocks: int):
        super().__init__(capacity_blocks)
        self._w: dict = dict(_HINT_PRIOR)       # feature -> weight
        self._g2: dict = {}                     # feature -> AdaGrad sum of squared gradients
        self._seen: dict[int, int] = {}         # block -> times accessed
        self._sess: dict[int, list] = {}        # session -> [turns, last arrival ms, mean gap s or None,
                                                #             its latest request's features and blocks]
        self._pending: deque = deque()          # samples waiting for their label, oldest first
        self._hinted: dict[int, tuple] = {}     # session -> (clock of its last re-rank,
                                                #             {block key: (sample, cohort)} of that re-rank)
        self._gaps = [[0.0] * AGE_BUCKETS for _ in range(5)]  # per seen bucket: reuses per age bucket
        self._dropped = [0.0] * 5               # per seen bucket: blocks not reused within W
        self._density: dict[tuple, float] = {}
        self._tail: dict = {}                   # per seen bucket: cached S(a) and residual-gap tables

    # -- the model ------------------------------------------------------------------------------------
    @property
    def horizon_requests(self) -> float:
        return max(16.0, HORIZON_TURNOVERS * self.capacity_blocks / max(1.0, self._admit_rate))

    def _predict(self, feats) -> float:
        w = self._w
        z = sum(w.get(f, 0.0) for f in feats)
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def _train(self, s: _Sample) -> None:
        if not s.n:
            return
        grad = (self._predict(s.feats) - s.reused / s.n) * math.sqrt(s.n)
        w, g2 = self._w, self._g2
        for f in s.feats:
            acc = g2.get(f, 1e-6) + grad * grad
            g2[f] = acc
            w[f] = w.get(f, 0.0) - LEARNING_RATE * grad / math.sqrt(acc)

    def _learn(self, req: Request) -> None:
        now = self._clock
        ghost = self._ghost
        for b in req.hash_ids:
            g = ghost.pop(b, None)
            if g is not None:
                g[0].reused += 1
                self._gaps[g[2]][_age_bucket(now - g[1])] += 1.0
        limit = now - self.horizon_requests
        q = self._pending
        while q and q[0].clock < limit:
            s = q.popleft()
            self._train(s)
        # ghosts older than W are negatives for the reuse-age statistics
        for g in self._expire_ghosts(limit):
            self._dropped[g[2]] += 1.0
        if now % DECAY_EVERY_REQUESTS == 0:
            for row in self._gaps:
                row[:] = [c * 0.5 for c in row]
            self._dropped = [c * 0.5 for c in self._dropped]
        if now % REFRESH_EVERY_REQUESTS == 0:
            self._density.clear()
            self._tail.clear()
            self._stale()

    def _tail_tables(self, sb: int):
        """For ages in each bucket: (S(a): share of reuses at or after it, E[gap - a | gap >= a])."""
        t = self._tail.get(sb)
        if t is None:
            row = self._gaps[sb]
            surv, resid = [0.0] * AGE_BUCKETS, [0.0] * AGE_BUCKETS
            total = sum(row) + 1.0  # one prior reuse at the horizon's middle keeps unseen classes sane
            later = 1.0
            weighted = 1.0 * self.horizon_requests / 2
            for k in range(AGE_BUCKETS - 1, -1, -1):
                later += row[k]
                weighted += row[k] * _bucket_mid(k)
                surv[k] = later / total
                resid[k] = weighted / later
            t = self._tail[sb] = (surv, resid)
        return t

    def _bucket_end(self, age: float) -> float:
        return _BUCKET_START[_age_bucket(age) + 1]

    def _hit_density(self, cohort, age: float) -> float:
        k = _age_bucket(age)
        key = (cohort, k)
        v = self._density.get(key)
        if v is None:
            pq, sb = cohort
            p = (pq + 0.5) / P_LEVELS
            surv, resid = self._tail_tables(sb)
            horizon = self.horizon_requests
            mid = _bucket_mid(k)
            ps = p * surv[k] if mid < horizon else 0.0
            cost = ps * max(1.0, resid[k] - mid) + (1.0 - p) * max(1.0, horizon - mid)
            v = self._density[key] = ps / cost
        return v

    # -- features -------------------------------------------------------------------------------------
    def _request_features(self, req: Request, depth: int) -> tuple:
        ids = req.hash_ids
        s = self._sess.get(req.session_id)
        turns, gap_s, mean_gap_s = 1, None, None
        if s is not None:
            turns = s[0] + 1
            gap_s = (req.timestamp_ms - s[1]) / 1000.0
            mean_gap_s = s[2]
        new_share = (len(ids) - depth) / len(ids) if ids else 0.0
        return (_BIAS, _TURN[min(turns, 8)], _SIZE[_log2b(len(ids), 10)], _OUT[_log2b(req.output_length, 14)],
                _NEW[round(4 * new_share)], _GAP[-1 if gap_s is None else _log2b(gap_s, 14)],
                _MGAP[-1 if mean_gap_s is None else _log2b(mean_gap_s, 14)])

    def _group(self, req: Request, pos: int):
        """(sample, cohort) for the block at pos: blocks of a request with equal features share both."""
        ids = req.hash_ids
        sb = min(self._seen.get(ids[pos], 0), 4)
        role = 0 if pos == 0 else (2 if pos == len(ids) - 1 else 1)
        key = (sb, role)
        st = self._state_of(req)   # (request features, {(seen bucket, role): (sample, cohort)})
        if st is None:             # offered long after its request: known blocks, the session as it is now
            st = (self._request_features(req, len(ids)), {})
        g = st[1].get(key)
        if g is None:
            feats = st[0] + _BLOCK_FEATURES[key]
            s = _Sample(feats, self._clock)
            self._pending.append(s)
            pq = min(P_LEVELS - 1, int(self._predict(feats) * P_LEVELS))
            g = st[1][key] = (s, (pq, sb))
        return g

    # -- the Policy interface -------------------------------------------------------------------------
    def begin_request(self, req):
        self._clock = req.index if req.index >= 0 else self._clock + 1
        self._learn(req)
        ids = req.hash_ids
        depth = 0
        while depth < len(ids) and ids[depth] in self._seen:
            depth += 1
        self._begin(req, (self._request_features(req, depth), {}))

    def request_done(self, req):
        seen = self._seen
        for b in req.hash_ids:
            seen[b] = seen.pop(b, 0) + 1
        self._seen = trimmed(seen, self.history_blocks)
        sid = req.session_id
        if sid >= 0:
            st = self._state_of(req)
            feats = st[0] if st is not None else self._request_features(req, len(req.hash_ids))
            s = self._sess.pop(sid, None)
            if s is None:
                s = [1, req.timestamp_ms, None, feats, req.hash_ids]
            else:
                gap_s = (req.timestamp_ms - s[1]) / 1000.0
                s[2] = gap_s if s[2] is None else 0.5 * s[2] + 0.5 * gap_s
                s[0] += 1
                s[1] = req.timestamp_ms
                s[3], s[4] = feats, req.hash_ids
            self._sess[sid] = s
            self._sess = trimmed(self._sess, SESSIONS_KEPT)
        self._count_admitted(req)

    def offer(self, block, req, pos, hit):
        if pos < 0:  # a demotion without a request position: keep it as a once-seen history block
            return self._admit(block, (P_LEVELS // 2, 1), self._clock)
        sample, cohort = self._group(req, pos)
        sample.n += 1
        now = self._clock
        self._ghost[block] = (sample, now, cohort[1])
        self._ghost_q.append((block, now))
        return self._admit(block, cohort, now)

    def session_hint(self, session_id, state, now_ms=0.0, blocks=None):
        """A finished or resuming session: its blocks are offered again, described by what the engine now says.

        Each block's features become its latest request's plus the hint (by times seen), and it moves to the
        cohort the model predicts for them, aged from now; its ghost now labels the new sample (and no longer
        the old one), so the model learns online what each hint is worth: a wrong or useless hint earns no
        weight. Blocks not resident keep teaching through their ghosts; nothing is admitted or evicted.
        A session is re-ranked once per clock tick: a later hint in the same tick only changes what its samples
        say, so a flood of hints between requests costs neither memory nor queue moves."""
        h = _HINTS.get(state)
        if h is None:
            return
        now = self._clock
        last = self._hinted.get(session_id)
        if last is not None and last[0] == now:
            for (sb, role), (sample, _) in last[1].items():
                sample.feats = sample.feats[:-len(_HINT_FEATURES[h, sb])] + _HINT_FEATURES[h, sb]
            return
        s = self._sess.get(session_id)
        if s is not None:
            base = s[3]
            if blocks is None:
                blocks = s[4]
        elif blocks is not None:
            base = (_BIAS,)
        else:
            return
        seen, ghost, ghost_q, where = self._seen, self._ghost, self._ghost_q, self._where
        self._hinted.pop(session_id, None)
        self._hinted[session_id] = (now, groups := {})
        self._hinted = trimmed(self._hinted, SESSIONS_KEPT)
        last = len(blocks) - 1
        for pos, b in enumerate(blocks):
            sb = min(seen.get(b, 0), 4)
            key = (sb, 0 if pos == 0 else (2 if pos == last else 1))
            g = groups.get(key)
            if g is None:
                feats = base + _BLOCK_FEATURES[key] + _HINT_FEATURES[h, sb]
                sample = _Sample(feats, now)
                self._pending.append(sample)
                g = groups[key] = (sample, (min(P_LEVELS - 1, int(self._predict(feats) * P_LEVELS)), sb))
            sample, cohort = g
            old = ghost.get(b)
            if old is not None:
                old[0].n -= 1
            sample.n += 1
            ghost[b] = (sample, now, sb)
            ghost_q.append((b, now))
            if b in where:
                self._admit(b, cohort, now)

    def export_meta(self, block):
        cohort = self._where.get(block)
        return None if cohort is None else (cohort, self._queues[cohort][block])

    def admit_demoted(self, block, meta, req=None) -> list[int]:
        """Demoted, not dropped: the block keeps its cohort and age; the lowest-density block makes room."""
        if isinstance(meta, tuple) and len(meta) == 2 and isinstance(meta[0], tuple) and len(meta[0]) == 2:
            cohort, t = meta
        else:  # no meta, or another policy's (the default hands every expert the density expert's)
            cohort, t = (P_LEVELS // 2, 1), self._clock
        return self._admit_demoted(block, cohort, t)

    def explain(self, block):
        d = super().explain(block)
        cohort = self._where.get(block)
        if cohort is None:
            g = self._ghost.get(block)  # declined or evicted, but its request is still being watched
            if g is not None:
                d.update({"predicted_reuse_probability": round(self._predict(g[0].feats), 3),
                          "times_seen_bucket": g[2], "age_requests": self._clock - g[1]})
            return d
        age = self._clock - self._queues[cohort][block]
        d.update({"predicted_reuse_probability": round((cohort[0] + 0.5) / P_LEVELS, 3),
                  "times_seen_bucket": cohort[1], "age_requests": age,
                  "hit_density": self._hit_density(cohort, age),
                  "horizon_requests": round(self.horizon_requests, 1)})
        return d
