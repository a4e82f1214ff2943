"""The daemon answers a put or a first-tier hit before its policy does the bookkeeping (Engine.defer_policy,
run_deferred after the reply). The policy must see the same events in the same order, so deferring may change
when a decision is made, never which."""
from __future__ import annotations

import random

import pytest

from daemon_proc import engine, short_dir, write_config
from kvtier.daemon.engine import Engine

BLOCK = 1024


def make_engine(d, defer: bool, policy="kvtier") -> Engine:
    cfg = write_config(d, dram="32KiB", cxl="32KiB", nominal="1KiB", policy=policy)
    text = cfg.read_text()
    cfg.write_text(text[:text.index('[[tiers]]\nname = "nvme0"')])   # memory tiers only: no disk in the way
    return engine(cfg, defer_policy=defer)


def put(e: Engine, tenant: str, sid, hashes) -> int:
    txn, slots = e.put_reserve(tenant, sid, [[h, "input", BLOCK, None] for h in hashes], False)
    return e.put_commit(txn)


def placement(e: Engine) -> dict:
    return {b.bid: b.tier for b in e.blocks.values()}


def test_put_answered_before_the_policy_admits():
    e = make_engine(short_dir(), defer=True)
    put(e, "t", None, [1, 2])
    bids = [b.bid for b in e.blocks.values()]
    assert len(bids) == 2
    assert not any(e.policies[0].contains(b) for b in bids)   # the reply would go out here
    assert all(b.out_of_policy for b in e.blocks.values())
    e.run_deferred()
    assert all(e.policies[0].contains(b) for b in bids)
    assert not any(b.out_of_policy for b in e.blocks.values())
    e.close()


@pytest.mark.parametrize("policy", ["kvtier", "lru", "arc"])
def test_deferred_decisions_match_immediate_ones(policy):
    """The same mixed workload (puts, hits, misses, deletes; far more blocks than the tiers hold) with and without
    deferral, draining after every request as the server does: the same blocks end on the same tiers."""
    runs = []
    for defer in (False, True):
        e = make_engine(short_dir(), defer, policy)
        rng = random.Random(7)
        for step in range(1500):
            r = rng.random()
            if r < 0.5:
                put(e, "t", None, [rng.randrange(400) for _ in range(rng.randrange(1, 4))])
            elif r < 0.9:
                lease, _, _ = e.get("t", None, [rng.randrange(400) for _ in range(rng.randrange(1, 4))])
                e.run_deferred()
                e.release(lease)
            else:
                e.delete("t", [rng.randrange(400)])
            e.run_deferred()
        runs.append((placement(e), dict(e.evictions), e.hits_by_tier[:], e.counters["misses"]))
        e.close()
    assert runs[0][0], "nothing stored"
    assert runs[0] == runs[1]


@pytest.mark.parametrize("defer", [False, True])
def test_the_policy_learns_from_every_request(defer):
    """Each put and get is one request to the policy, and it learns from each what replay's end_request teaches
    (Policy.request_done): the learned experts count a block seen once per request that touched it."""
    e = make_engine(short_dir(), defer)
    put(e, "t", None, [5, 6])
    e.run_deferred()
    for _ in range(2):
        lease, _, _ = e.get("t", None, [5])
        e.run_deferred()
        e.release(lease)
    b5, b6 = e.blocks.values()   # in put order
    ex = e.policies[0].explain(b5.bid)
    assert ex["density_expert"]["times_seen"] == 3
    assert e.policies[0]._shadows["predict"]._seen == {b5.bid: 3, b6.bid: 1}
    e.close()


def test_decoding_session_pinned_at_commit():
    """A decoding session's blocks are pinned before the reply, not when the deferred work runs."""
    e = make_engine(short_dir(), defer=True)
    sid = e.register_session("t", "s")
    e.hint("t", sid, "decoding")
    put(e, "t", sid, [10, 11])
    assert all(b.pins == 1 for b in e.blocks.values())
    e.run_deferred()
    assert all(b.pins == 1 and not e.policies[b.tier].contains(b.bid) for b in e.blocks.values())
    e.hint("t", sid, "idle")
    assert all(b.pins == 0 and e.policies[b.tier].contains(b.bid) for b in e.blocks.values())
    e.close()


def test_deferred_failure_is_logged_not_raised(caplog):
    e = make_engine(short_dir(), defer=True)
    order = []
    e._deferred.extend([lambda: order.append(1), lambda: 1 / 0, lambda: order.append(3)])
    e.run_deferred()
    assert order == [1, 3]
    assert "deferred policy work" in caplog.text
    e.close()


def test_domain_limit_closes_idle_domains_and_forgets_their_tenants(monkeypatch):
    """At a tier's domain limit, opening another tenant's domain closes idle empty ones (no connection holds them,
    nothing stored), and the engine forgets which tenants bound those: the record stays as small as the domains."""
    from kvtier.store import memory
    monkeypatch.setattr(memory, "MAX_DOMAINS", 3)
    d = short_dir()
    e = make_engine(d, defer=False)
    for i in range(3):
        e.open_domain(f"t{i}", busy=set())
    assert put(e, "t1", None, [7]) == 1   # t1 stores a block: it stays
    e.open_domain("t9", busy={e.salt("t2")})   # t2 is held by a connection: it stays too
    held = set(e.tiers[0].domains)
    assert held == {e.salt("t1"), e.salt("t2"), e.salt("t9")}
    assert set(e.domain_tenants) == held and e.domain_tenants[e.salt("t9")] == {"t9"}
