"""The default's reuse-predictor expert (kvtier.policy.predictor): it learns online which requests come back."""
import pytest

from kvtier.policy.model import Request, SessionState
from kvtier.policy.registry import make_policy, policy_names
from kvtier.policy.predictor import feature_names
from kvtier.policy.replay import lifecycle_hints, replay_single
from kvtier.policy.tiers import parse_tiers, replay_tiers
from kvtier.policy.trace import infer_sessions

GAP = 30  # requests between a kept conversation's turns


def _two_kinds(n=1500, long_output=3000):
    """Alternating requests: 'short answer' ones (output 8 tokens) whose conversation sends a second turn
    GAP requests later, re-sending all but the tail; 'long answer' ones (`long_output` tokens) that never come
    back. Only the output length tells them apart when they arrive (nothing does, with long_output=8)."""
    reqs, nxt = [], [1]

    def fresh(k):
        ids = list(range(nxt[0], nxt[0] + k))
        nxt[0] += k
        return ids

    for i in range(n):
        ids = [0] + fresh(10)
        if i % 2 == 0:
            reqs.append(Request(-1, i * 1000.0, len(ids) * 512, 8, ids))
            # the second turn ends the conversation; it arrives half-way between two first turns
            second = ids[:-1] + fresh(3)
            if i + GAP < n:  # the trace ends first: the latest first turns are still open
                reqs.append(Request(-1, (i + GAP) * 1000.0 + 500, len(second) * 512, 3000, second))
        else:
            reqs.append(Request(-1, i * 1000.0, len(ids) * 512, long_output, ids))
    reqs.sort(key=lambda r: r.timestamp_ms)
    for i, r in enumerate(reqs):
        r.index = i
    infer_sessions(reqs)
    return reqs


def test_registered_and_learns_which_requests_come_back():
    assert "kvtier-predict" in policy_names()
    reqs = _two_kinds()
    policy = make_policy("kvtier-predict", 200)
    replay_single(reqs, "kvtier-predict", 200, policy=policy)
    last = [r for r in reqs if len(r.hash_ids) == 11][-20:]  # the latest first turns, still watched
    keep = [policy.explain(r.hash_ids[3]) for r in last if r.output_length == 8]
    drop = [policy.explain(r.hash_ids[3]) for r in last if r.output_length == 3000]
    assert len(keep) == len(drop) == 10
    p_keep = min(d["predicted_reuse_probability"] for d in keep)
    p_drop = max(d["predicted_reuse_probability"] for d in drop)
    assert p_keep > 0.7 and p_drop < 0.3, (p_keep, p_drop)
    # the resident ones explain their standing
    resident = [d for d in keep if d["resident"]]
    assert resident and all(d["hit_density"] > 0 and d["age_requests"] >= 0 for d in resident)


def test_beats_recency_where_reuse_is_predictable_and_never_beats_opt():
    reqs = _two_kinds()
    cap = 200  # LRU's reach (~20 requests) is shorter than GAP; the kept turns alone need ~270 blocks
    r = {p: replay_single(reqs, p, cap).hit_rate for p in ("lru", "arc", "kvtier-predict", "kvtier", "opt")}
    assert r["kvtier-predict"] > max(r["lru"], r["arc"]) + 0.1, r
    assert r["kvtier"] > max(r["lru"], r["arc"]) + 0.1, r  # the default follows it
    assert r["kvtier-predict"] <= r["opt"] and r["kvtier"] <= r["opt"], r


def test_lifecycle_hints_say_which_conversations_continue():
    reqs = _two_kinds(200)
    hints = lifecycle_hints(reqs)
    for r, h in zip(reqs, hints):
        later = any(q.session_id == r.session_id for q in reqs[r.index + 1:])
        assert h == (SessionState.RESUME if later else SessionState.FINISHED)
    assert 0 < hints.count(SessionState.RESUME) < len(reqs) // 2
    flipped = lifecycle_hints(reqs, accuracy=0.0)
    assert all(a != b for a, b in zip(hints, flipped))
    noisy = lifecycle_hints(reqs, accuracy=0.75, seed=1)
    assert 0.6 < sum(a == b for a, b in zip(hints, noisy)) / len(reqs) < 0.9
    assert noisy == lifecycle_hints(reqs, accuracy=0.75, seed=1)   # seeded
    with pytest.raises(ValueError, match="accuracy"):
        lifecycle_hints(reqs, accuracy=1.5)


def _hint_weights(policy) -> dict:
    return {feature_names([f])[0]: w for f, w in policy._w.items() if feature_names([f])[0][0] == "hint"}


def test_engine_hints_are_learned_and_acted_on():
    """Where nothing in the requests says which conversations continue, the engine's hints do: the predictor
    re-ranks a session's blocks by them. Their meaning is learned, not assumed: inverted hints are learned
    inverted (against the prior) and still help; random ones cost little; baselines ignore hints."""
    reqs = _two_kinds(long_output=8)
    cap = 200
    right, wrong, noise = (lifecycle_hints(reqs, a) for a in (1.0, 0.0, 0.5))
    for name in ("kvtier-predict", "kvtier"):
        none = replay_single(reqs, name, cap).hit_rate
        told = replay_single(reqs, name, cap, hints=right).hit_rate
        misled = make_policy(name, cap)
        inverted = replay_single(reqs, name, cap, policy=misled, hints=wrong).hit_rate
        random_ = replay_single(reqs, name, cap, hints=noise).hit_rate
        assert told > none + 0.1 and inverted > none + 0.05, (name, none, told, inverted)
        assert random_ > none - 0.05, (name, none, random_)
        assert told <= replay_single(reqs, "opt", cap).hit_rate
        if name == "kvtier-predict":
            w = _hint_weights(misled)
            assert w[("hint", 0)] > w[("hint", 1)], w   # the prior says the opposite (-2 and +1)
    lru = {replay_single(reqs, "lru", cap, hints=h).hit_rate for h in (None, right, wrong)}
    assert len(lru) == 1


def test_a_flood_of_hints_between_requests_costs_no_memory_and_the_last_word_labels():
    # A daemon's client may send hints as fast as it likes; the policy's clock moves only with requests.
    reqs = _two_kinds(300, long_output=8)
    p = make_policy("kvtier-predict", 100)
    replay_single(reqs, "kvtier-predict", 100, policy=p)
    sid = reqs[-1].session_id
    p.session_hint(sid, SessionState.FINISHED)
    sizes = len(p._pending), len(p._ghost_q), len(p._heads or ()), len(p._crossings)
    for i in range(4000):
        p.session_hint(sid, SessionState.RESUME if i % 2 == 0 else SessionState.FINISHED)
    p.session_hint(sid, SessionState.RESUME)
    assert (len(p._pending), len(p._ghost_q), len(p._heads or ()), len(p._crossings)) == sizes
    labelled = {p._ghost[b][0] for b in reqs[-1].hash_ids}
    assert labelled and all(("hint", 1) in feature_names(s.feats) and ("hint", 0) not in feature_names(s.feats)
                            for s in labelled)
    # the next request moves the clock: the session is re-ranked again
    nxt = Request(index=reqs[-1].index + 1, timestamp_ms=reqs[-1].timestamp_ms + 1, input_length=16,
                  output_length=1, hash_ids=[10**9], session_id=-1)
    p.begin_request(nxt)
    p.end_request(nxt, [False])
    before = len(p._pending)
    p.session_hint(sid, SessionState.FINISHED)
    assert len(p._pending) > before


def test_hints_pay_off_in_a_tier_stack():
    reqs = _two_kinds(long_output=8)
    tiers = parse_tiers("dram:120,cxl:400")
    plain = replay_tiers(reqs, "kvtier", tiers)
    told = replay_tiers(reqs, "kvtier", tiers, hints=lifecycle_hints(reqs))
    # the first tier is too small to keep a conversation for GAP requests: the hints pay off in the second
    assert sum(told.hits_per_tier) > 1.5 * sum(plain.hits_per_tier), (plain.hits_per_tier, told.hits_per_tier)


def test_demotes_into_lower_tiers_and_keeps_the_capacity_contract():
    reqs = _two_kinds(600)
    d = replay_tiers(reqs, "kvtier-predict", parse_tiers("dram:60,nvme:400"), urgency=False).as_dict()
    assert d["demotions"] > 0 and d["tiers"][1]["hits"] > 0
    policy = make_policy("kvtier-predict", 100)
    replay_single(reqs, "kvtier-predict", 100, policy=policy)
    assert len(policy) == 100
    evicted = policy.resize(40)
    assert len(evicted) == 60 and len(policy) == 40 and not any(policy.contains(b) for b in evicted)
    victim = policy.pop_victim()
    meta = policy.export_meta(next(b for r in reqs[-5:] for b in r.hash_ids if policy.contains(b)))
    assert victim is not None and not policy.contains(victim) and meta is not None
    assert policy.admit_demoted(victim, None) == [] and policy.contains(victim)  # there was room


def _heads_by_scan(p):
    """The eviction candidate computed from scratch: the lowest (density, block, class) over class heads."""
    best = None
    for cls, q in p._queues.items():
        if q:
            b, t = next(iter(q.items()))
            cand = (p._hit_density(cls, p._clock - t), b)
            best = cand if best is None or cand < best else best
    return None if best is None else best[1]


def test_head_heap_matches_a_full_scan_as_ages_cross_buckets():
    """Heads are re-ranked one by one, as they change or their age enters its next bucket; at every
    request its victim must still be the one a full scan of the class heads finds (one-block requests too,
    where nearly all of a request's work is this)."""
    from kvtier.policy.synth import generate

    reqs = generate("chat", 900, seed=5)
    for name in ("kvtier-predict", "kvtier-density"):
        for blocks_per_request in (None, 1):
            p = make_policy(name, 120)
            checked = agree = 0
            for i, r in enumerate(reqs):
                ids = r.hash_ids if blocks_per_request is None else r.hash_ids[i % len(r.hash_ids):][:1]
                r = Request(i, r.timestamp_ms, r.input_length, r.output_length, ids, r.session_id)
                p.begin_request(r)
                mask = [p.contains(b) for b in ids]
                if len(p):
                    checked += 1
                    agree += p._victim() == _heads_by_scan(p)
                p.end_request(r, mask)
            assert checked > 600
            assert agree == checked, (name, blocks_per_request, agree, checked)


def test_an_offer_after_later_requests_began_uses_its_own_requests_features():
    """A tier stack pins a decoding session's blocks and offers them when its decode ends, after later
    requests began: each block must be labelled with its own request's features, not the latest one's."""
    for name in ("kvtier-predict", "kvtier-density"):
        p = make_policy(name, 50)
        a = Request(0, 0.0, 512 * 3, 8, [1, 2, 3], session_id=1)
        b = Request(1, 10.0, 512 * 900, 4000, [1, 2] + list(range(100, 1000)), session_id=1)
        p.begin_request(a)
        p.request_done(a)    # as a tier stack does at the request's arrival; its blocks stay pinned
        p.begin_request(b)   # b continues a's conversation: a CONTINUE transition, 902 blocks
        p.request_done(b)
        p.offer(3, a, 2, False)
        p.offer(500, b, 400, False)
        if name == "kvtier-predict":
            fa, fb = (feature_names(p._ghost[b][0].feats) for b in (3, 500))
            assert ("size", 2) in fa and ("out", 4) in fa, fa
            assert ("size", 10) in fb and ("out", 12) in fb, fb
        else:
            assert p._ghost[3][0][1] == 0 and p._ghost[500][0][1] == 1   # FIRST, CONTINUE


def test_per_block_and_session_history_stays_bounded_and_keeps_what_is_in_use():
    """A daemon runs for months while blocks and sessions come and go: the learned experts keep the history
    (times seen, first child, sessions' turns) of the most recently used blocks and sessions only, a bounded
    number, and a block in use all along keeps its count."""
    from kvtier.policy.queues import HISTORY_PER_BLOCK, SESSIONS_KEPT

    p = make_policy("kvtier", 10)
    n = SESSIONS_KEPT + 30_000
    for i in range(n):   # every request: the shared root block and one new block, in a session of its own
        r = Request(i, float(i), 1024, 8, [0, 1_000_000 + i], session_id=i)
        p.begin_request(r)
        p.end_request(r, [p.contains(b) for b in r.hash_ids])
    density, predict = p._shadows["density"], p._shadows["predict"]
    limit = HISTORY_PER_BLOCK * 1024
    for e in (density, predict):
        assert e.history_blocks == limit and len(e._seen) <= limit * 5 // 4
        assert e._seen[0] == n and e._seen[1_000_000 + n - 1] == 1
    assert len(density._children) <= limit * 5 // 4
    assert len(density.sessions) <= SESSIONS_KEPT * 5 // 4 and n - 1 in density.sessions
    assert len(predict._sess) <= SESSIONS_KEPT * 5 // 4 and predict._sess[n - 1][0] == 1


def test_room_asked_for_is_made_by_the_leaders_victims_not_recency():
    """A daemon asks for room (pop_victim) before the default's leader is full: what goes is what the leader
    gives up first (here a finished session's blocks, the most recent ones), not the least recently used."""
    policy = make_policy("kvtier", 8)
    for i, (sid, ids) in enumerate(((1, [1, 2, 3]), (2, [11, 12, 13]))):
        r = Request(i, i * 1000.0, len(ids) * 512, 10, ids, session_id=sid)
        policy.begin_request(r)
        policy.end_request(r, [False] * len(ids))
    assert policy.leader == "predict" and len(policy) == 6
    policy.session_hint(2, SessionState.FINISHED)
    assert sorted(policy.pop_victim() for _ in range(3)) == [11, 12, 13]
    assert len(policy) == 3 and all(policy.contains(b) for b in (1, 2, 3))
