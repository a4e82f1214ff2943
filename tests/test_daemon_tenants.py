"""Tenant isolation of every op, admin ops included: a non-admin uid bound to its tenant sees only its own
sessions, blocks, moves and explanations, and cannot pin, evict or set the policy; [admins] grants the full view."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess

import pytest

from daemon_proc import KVCTL, Daemon, block_bytes, running_daemon, short_dir, wait_for, write_config
from kvtier.client import Client, DaemonError, admin_call

NOBODY = 65534
N = 30


def as_nobody(fn) -> dict:
    """fn() in a child as uid/gid 65534 (group nogroup may connect); its JSON-able result comes back by pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = fn()
        except BaseException as e:
            out = {"child_error": repr(e)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    out = json.loads(data)
    assert "child_error" not in out, out
    return out


def errno_of(fn):
    try:
        fn()
    except DaemonError as e:
        return e.errno
    return 0


@pytest.fixture
def daemon_dir():
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_non_admin_tenant_sees_and_touches_only_its_own(daemon_dir):
    extra = 'group = "nogroup"\n[tenants.alpha]\nuids = [0]\n[tenants.guests]\nuids = [65534]'
    cfg = write_config(daemon_dir, extra=extra)
    d = Daemon(daemon_dir, cfg).start()
    try:
        with Client(d.socket, "alpha") as a:
            sid_a = a.register_session("alpha-chat")
            # 30 x 16 KiB through a 256 KiB first tier: alpha's blocks move, so there are moves to hide
            a.put(sid_a, [(i, "history", block_bytes(i, 16 << 10)) for i in range(N)])
        alpha_keys = {b["block"] for b in admin_call(d.socket, "blocks")["blocks"]}
        assert len(alpha_keys) == N
        victim = sorted(alpha_keys)[0]

        def guest():
            out = {}
            with Client(d.socket, "guests") as kv:
                sid = kv.register_session("guest-chat")
                kv.put(sid, [(i, "history", block_bytes(100 + i, 16 << 10)) for i in range(N)])   # alpha's hashes
                out["sessions"] = kv.call("sessions")["sessions"]
                out["blocks"] = kv.call("blocks")["blocks"]
                out["total"] = kv.call("blocks")["total"]
                out["moves"] = kv.call("moves", limit=1000)["moves"]
                st = kv.call("stats")
                out["stats"] = {k: st.get(k) for k in ("blocks", "sessions", "admin", "counters", "tenant")}
                out["tier_keys"] = sorted(st["tiers"][0])
                # per tier, two rows at most: the totals still count every block of the guest's in that tier
                out["by_tier"] = [kv.call("blocks", tier=t["name"], limit=2) for t in st["tiers"]]
                own = out["blocks"][0]["block"]
                out["explain_own"] = kv.call("explain", block=own)["block"]
                out["explain_other"] = errno_of(lambda: kv.call("explain", block=victim))
                out["blocks_other_session"] = errno_of(lambda: kv.call("blocks", session=sid_a))
                out["pin_other"] = errno_of(lambda: kv.call("pin", block=victim))
                out["pin_other_session"] = errno_of(lambda: kv.call("pin", session=sid_a))
                out["unpin_other"] = errno_of(lambda: kv.call("unpin", block=victim))
                out["evict_other"] = errno_of(lambda: kv.call("evict", block=victim))
                out["evict_own"] = errno_of(lambda: kv.call("evict", block=own))
                out["policy_set"] = errno_of(lambda: kv.call("policy_set", name="lfu"))
                out["policy_set_via_show"] = errno_of(lambda: kv.call("policy", name="lfu"))
                out["policy_show"] = kv.call("policy")["policy"]
                out["contains_alpha"] = kv.contains(range(N, 2 * N))
            # no tenant bound: the all-tenant view is refused to a non-admin
            out["unbound_sessions"] = errno_of(lambda: admin_call(d.socket, "sessions"))
            out["unbound_stats"] = errno_of(lambda: admin_call(d.socket, "stats"))
            out["bind_alpha"] = errno_of(lambda: admin_call(d.socket, "blocks", tenant="alpha"))
            return out

        g = as_nobody(guest)
        assert [s["tenant"] for s in g["sessions"]] == ["guests"] and g["sessions"][0]["name"] == "guest-chat"
        assert g["total"] == N and {b["tenant"] for b in g["blocks"]} == {"guests"}
        assert not ({b["block"] for b in g["blocks"]} & alpha_keys)
        assert g["moves"] and not ({m["block"] for m in g["moves"]} & alpha_keys)
        assert g["stats"] == {"blocks": N, "sessions": 1, "admin": False, "counters": None, "tenant": "guests"}
        assert "used_bytes" not in g["tier_keys"] and "hits" not in g["tier_keys"]
        assert sum(r["total"] for r in g["by_tier"]) == N and max(r["total"] for r in g["by_tier"]) > 2
        assert all(len(r["blocks"]) == min(2, r["total"]) and {b["tenant"] for b in r["blocks"]} <= {"guests"}
                   for r in g["by_tier"])
        assert g["explain_own"] in {b["block"] for b in g["blocks"]}
        assert g["explain_other"] == errno.ENOENT and g["blocks_other_session"] == errno.ENOENT
        for k in ("pin_other", "pin_other_session", "unpin_other", "evict_other", "evict_own", "policy_set",
                  "policy_set_via_show", "unbound_sessions", "unbound_stats"):
            assert g[k] == errno.EPERM, (k, g[k])
        assert g["policy_show"] == "lru" and g["contains_alpha"] == [None] * N
        assert g["bind_alpha"] == errno.EACCES

        # nothing the guest tried changed alpha's blocks or the policy
        st = admin_call(d.socket, "stats")
        assert st["policy"] == "lru" and st["pinned_blocks"] == 0 and st["admin"] is True
        # the guest's own puts demoted alpha's blocks (capacity), but no admin move or pin touched them
        assert not {m["reason"] for m in admin_call(d.socket, "moves", limit=5000)["moves"]
                    if m["block"] in alpha_keys} & {"admin", "pin", "unpin"}
        assert {m["block"] for m in admin_call(d.socket, "moves", limit=1000)["moves"]} & alpha_keys
        # root (kvctl's default) sees both tenants
        assert {s["tenant"] for s in admin_call(d.socket, "sessions")["sessions"]} == {"alpha", "guests"}
        assert admin_call(d.socket, "blocks")["total"] == 2 * N

        # [admins] lists uid 65534 after a reload: now it gets the whole view and may pin
        cfg.write_text(cfg.read_text().replace("[tenants.alpha]", "[admins]\nuids = [65534]\n[tenants.alpha]"))
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded" in d.log.read_text())

        def admin():
            return {"total": admin_call(d.socket, "blocks")["total"],
                    "pin": admin_call(d.socket, "pin", block=victim)["blocks"]}
        assert as_nobody(admin) == {"total": 2 * N, "pin": 1}
        assert admin_call(d.socket, "stats")["pinned_blocks"] == 1
    finally:
        assert d.stop() == 0, d.log.read_text()[-2000:]


def test_kvctl_with_tenant_env_is_scoped(daemon_dir):
    d = Daemon(daemon_dir, write_config(daemon_dir)).start()
    try:
        for tenant in ("alpha", "beta"):
            with Client(d.socket, tenant) as kv:
                kv.put(kv.register_session(tenant), [(1, "input", block_bytes(1, 4096))])

        def kvctl(*args, env=None):
            out = subprocess.run([KVCTL, *args, "--socket", d.socket, "--json"], capture_output=True, text=True,
                                 env={**os.environ, **(env or {})}, timeout=30)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)
        beta = {"KVTIER_TENANT": "beta"}
        assert [s["tenant"] for s in kvctl("sessions", env=beta)["sessions"]] == ["beta"]
        assert kvctl("blocks", env=beta)["total"] == 1 and kvctl("blocks")["total"] == 2
        assert kvctl("status", env=beta)["blocks"] == 1 and kvctl("status")["blocks"] == 2
    finally:
        assert d.stop() == 0


def _mapped(kv: Client) -> dict[int, bytes]:
    """Everything a client has mapped, by arena id: what a process in the kvtier group could read directly."""
    return {g: bytes(m) for g, m in enumerate(kv._maps) if m is not None}


def test_a_tenant_maps_no_other_tenants_memory():
    """A client is given only its tenant's arenas (per tenant salt), so reading its mappings directly shows none of
    another tenant's bytes, in any memory tier; tenants configured with one salt share arenas and blocks; a
    connection cannot switch tenants; a domain's arenas close once it has no connection and no block."""
    d_dir = short_dir()
    extra = '[tenants.acme]\nsalt = "shared"\n[tenants.acme-batch]\nsalt = "shared"'
    cfg = write_config(d_dir, dram="1MiB", cxl="2MiB", extra=extra)
    with running_daemon(d_dir, cfg) as d:
        mark_a = [block_bytes(7000 + i, 16 << 10) for i in range(90)]   # 1.4 MiB: dram0 and cxl0 both hold some
        mark_b = [block_bytes(8000 + i, 16 << 10) for i in range(90)]
        with Client(d.socket, "alpha") as a, Client(d.socket, "beta") as b:
            a.put(None, [(i, "history", v) for i, v in enumerate(mark_a)])
            b.put(None, [(i, "history", v) for i, v in enumerate(mark_b)])
            tiers = {t for t in a.contains(range(90)) + b.contains(range(90)) if t}
            assert tiers >= {"dram0", "cxl0"}, tiers   # both memory tiers hold blocks (of one tenant or both)
            seen_a, seen_b = _mapped(a), _mapped(b)
            assert seen_a and seen_b and not set(seen_a) & set(seen_b)
            mem_a, mem_b = b"".join(seen_a.values()), b"".join(seen_b.values())
            for kv, mem, mark in ((a, mem_a, mark_a), (b, mem_b, mark_b)):
                in_memory = [i for i, t in enumerate(kv.contains(range(90))) if t in ("dram0", "cxl0")]
                assert in_memory and all(mem.find(mark[i][:4096]) >= 0 for i in in_memory)   # the scan finds bytes
            assert not any(mem_a.find(v[:4096]) >= 0 for v in mark_b)
            assert not any(mem_b.find(v[:4096]) >= 0 for v in mark_a)
            with pytest.raises(DaemonError) as e:
                a.call("hello", tenant="beta")
            assert e.value.errno == errno.EISCONN
            assert a.get(None, [0])[0].tobytes() == mark_a[0]   # still alpha's
        with Client(d.socket, "acme") as c, Client(d.socket, "acme-batch") as c2:
            c.put(None, [(5, "prefix", block_bytes(5, 4096))])
            assert c2.contains([5]) == ["dram0"] and c2.get(None, [5])[0].tobytes() == block_bytes(5, 4096)
            assert set(_mapped(c)) == set(_mapped(c2))
        domains = admin_call(d.socket, "stats")["tiers"][0]["domains"]
        with Client(d.socket, "gamma") as g:
            g.put(None, [(1, "prefix", block_bytes(1, 4096))])
            assert g.delete([1]) == 1
            assert admin_call(d.socket, "stats")["tiers"][0]["domains"] == domains + 1
        assert wait_for(lambda: admin_call(d.socket, "stats")["tiers"][0]["domains"] == domains)
        with Client(d.socket, "alpha") as a:   # alpha's blocks outlived its connection, and so did its arenas
            got = a.get(None, list(range(90)))
            assert all(x is None or x.tobytes() == mark_a[i] for i, x in enumerate(got))
            assert sum(x is not None for x in got) >= 60
