"""target.remote: the `limits` block (behaviour.md B.10).

Waits are 5 s by default (checked below); the tests shorten the wait of their limits
instance to keep the suite fast.
"""

import time

import gevent
import pytest
from maddylite.modules import limits as limits_mod

from maddylite.config.errors import ConfigError
from maddylite.interfaces import MsgMetadata
from maddylite.smtp.errors import SMTPError


def limited(w, rules, wait=0.4, **kw):
    """limited starts a target.remote with a limits block and a short wait."""
    t = w.target("limits {\n" + "\n".join(rules) + "\n}", **kw)
    t.limits.wait = wait
    return t


def start(t, sender="test@example.com", **meta):
    """start calls start_delivery and returns the delivery or the SMTPError."""
    try:
        return t.start_delivery(MsgMetadata(id="m", **meta), sender)
    except SMTPError as e:
        return e


def assert_high_load(rh, err, reason=None):
    rh.assert_err(err, 451, "4.4.5", "High load, try again later", True)
    if reason is not None:
        assert err.fields["reason"] == reason


def test_default_wait_is_5s():
    """B-112: a limit wait lasts at most 5 s."""
    assert limits_mod.DEFAULT_WAIT == 5.0 and limits_mod.Limits.wait == 5.0


def test_all_concurrency_B_112(std_world, rh):
    """B-112: `all concurrency 1`: delivery 2 waits at start; when the wait runs out it fails
    451 4.4.5 with reason `Global limit timeout`."""
    t = limited(std_world, ["all concurrency 1"])
    d1 = start(t)
    t0 = time.monotonic()
    err = start(t)
    assert 0.35 <= time.monotonic() - t0 < 1.0
    assert_high_load(rh, err, "Global limit timeout")
    d1.abort()


def test_one_wait_bounds_all_message_scopes_together_B_112(std_world, rh):
    """B-112: the message-level wait (all, ip, source) is one bound for all of them: a
    delivery that waits out most of it for `all` gets only the rest for `source`."""
    t = limited(std_world, ["all concurrency 2", "source concurrency 1"], wait=0.6)
    d1 = start(t, sender="a@one.test")  # all 1/2, source one.test 1/1
    d2 = start(t, sender="b@two.test")  # all 2/2
    gevent.spawn_later(0.4, d2.abort)  # `all` frees after 0.4 s of d3's wait
    t0 = time.monotonic()
    err = start(t, sender="c@one.test")  # then waits for one.test's source slot
    took = time.monotonic() - t0
    assert_high_load(rh, err, "Source limit timeout")
    assert 0.55 <= took < 0.85, took  # not 0.4 + a fresh 0.6
    d1.abort()


def test_all_concurrency_waiter_proceeds_B_112(std_world, rh):
    """B-112: delivery 2 proceeds as soon as delivery 1 finishes within the wait."""
    t = limited(std_world, ["all concurrency 1"], wait=3)
    d1 = start(t)
    d1.add_rcpt("a@example.test")
    g = gevent.spawn(start, t)
    gevent.sleep(0.3)
    assert not g.ready()
    d1.body_per_rcpt(rh.HEADER, rh.BODY)
    d1.commit()
    d2 = g.get(timeout=1)
    d2.add_rcpt("b@example.test")
    assert dict(d2.body_per_rcpt(rh.HEADER, rh.BODY)) == {"b@example.test": None}
    d2.commit()


def test_all_rate_B_113(std_world, rh):
    """B-113: `all rate 2 1s`: the 3rd start within one second waits for the refill."""
    t = limited(std_world, ["all rate 2 1s"], wait=3)
    t0 = time.monotonic()
    ds = [start(t) for _ in range(3)]
    assert all(not isinstance(d, SMTPError) for d in ds)
    assert 0.8 <= time.monotonic() - t0 < 1.6
    for d in ds:
        d.abort()


def test_all_rate_wait_exhausted_B_113(std_world, rh):
    """B-113: the refill comes later than the wait → 451 4.4.5."""
    t = limited(std_world, ["all rate 1 10s"], wait=0.3)
    start(t).abort()
    assert_high_load(rh, start(t), "Global limit timeout")


def test_destination_concurrency_B_114(mxworld, rh):
    """B-114: `destination concurrency 1`: the second delivery to example.test connects, then
    waits for the slot before MAIL; on expiry it closes the connection and fails 451 4.4.5.
    Another domain is not affected."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "127.0.0.1"))
    w.domain("example2.test", (10, "mx.example2.test", "127.0.0.2"))
    s1, s2 = w.mx("127.0.0.1"), w.mx("127.0.0.2")
    t = limited(w, ["destination concurrency 1"])
    d1 = start(t)
    d1.add_rcpt("a@example.test")
    d2 = start(t)
    t0 = time.monotonic()
    with pytest.raises(SMTPError) as ei:
        d2.add_rcpt("b@example.test")
    assert time.monotonic() - t0 >= 0.35
    assert_high_load(rh, ei.value)
    d2.abort()
    rh.wait_for(lambda: len(s1.sessions) == 2 and s1.sessions[1].ended)
    assert s1.sessions[1].verbs == ["EHLO", "QUIT"]
    d3 = start(t)
    t0 = time.monotonic()
    d3.add_rcpt("c@example2.test")
    assert time.monotonic() - t0 < 0.3
    assert dict(d3.body_per_rcpt(rh.HEADER, rh.BODY)) == {"c@example2.test": None}
    d3.commit()
    d1.abort()
    assert len(s2.messages) == 1


def test_destination_rate_per_domain_B_115(mxworld, rh):
    """B-115: `destination rate` counts transactions per recipient domain; domains have
    independent buckets."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "127.0.0.1"))
    w.domain("example2.test", (10, "mx.example2.test", "127.0.0.2"))
    w.mx("127.0.0.1")
    w.mx("127.0.0.2")
    t = limited(w, ["destination rate 1 10s"], wait=0.3)
    _, res = rh.deliver(t, ["a@example.test"])
    assert res == {"a@example.test": None}
    _, res = rh.deliver(t, ["b@example.test"])
    assert_high_load(rh, res["b@example.test"], "Destination limit timeout")
    _, res = rh.deliver(t, ["c@example2.test"])
    assert res == {"c@example2.test": None}


def test_ip_scope_B_116(std_world, rh):
    """B-116: the `ip` scope keys on the submitting client's address; unknown → 127.0.0.1."""
    t = limited(std_world, ["ip concurrency 1"], wait=0.3)
    held = start(t, src_ip="10.0.0.1")
    other = start(t, src_ip="10.0.0.2")
    assert not isinstance(other, SMTPError)
    assert_high_load(rh, start(t, src_ip="10.0.0.1"), "IP limit timeout")
    local = start(t)  # unknown client (local message, queue retry after restart)
    assert not isinstance(local, SMTPError)
    assert_high_load(rh, start(t, src_ip="127.0.0.1"), "IP limit timeout")
    for d in (held, other, local):
        d.abort()


def test_source_scope_B_117(std_world, rh):
    """B-117: the `source` scope keys on the sender's domain; null senders share a bucket."""
    t = limited(std_world, ["source concurrency 1"], wait=0.3)
    held = start(t, "a@x.test")
    assert_high_load(rh, start(t, "b@x.test"), "Source limit timeout")
    other = start(t, "c@y.test")
    assert not isinstance(other, SMTPError)
    bounce = start(t, "")
    assert not isinstance(bounce, SMTPError)
    assert_high_load(rh, start(t, ""), "Source limit timeout")
    for d in (held, other, bounce):
        d.abort()


def test_message_slots_held_until_finish_B_118(std_world, rh):
    """B-118: message-level slots are held from start until commit/abort."""
    t = limited(std_world, ["all concurrency 1"], wait=0.3)
    d1 = start(t)
    d1.add_rcpt("a@example.test")
    assert isinstance(start(t), SMTPError)
    d1.abort()
    d2 = start(t)
    assert not isinstance(d2, SMTPError)
    d2.commit()
    start(t).commit()


def test_destination_slots_from_mail_until_finish_B_118(mxworld, rh):
    """B-118: a destination slot is held from MAIL until commit/abort, one per domain
    connection; a delivery that never reached MAIL holds none."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "127.0.0.1"))
    w.domain("example2.test", (10, "mx.example2.test", "127.0.0.2"))
    w.mx("127.0.0.1")
    w.mx("127.0.0.2")
    t = limited(w, ["destination concurrency 1"], wait=3)
    d0 = start(t)
    with pytest.raises(SMTPError):
        d0.add_rcpt("x@nxdomain.test")  # no MAIL: no slot
    d1 = start(t)
    d1.add_rcpt("a@example.test")
    d1.add_rcpt("a@example2.test")
    d0.abort()

    def second():
        d = start(t)
        d.add_rcpt("b@example2.test")
        res = d.body_per_rcpt(rh.HEADER, rh.BODY)
        d.commit()
        return res

    g = gevent.spawn(second)
    gevent.sleep(0.4)
    assert not g.ready()
    d1.body_per_rcpt(rh.HEADER, rh.BODY)
    t0 = time.monotonic()
    d1.commit()
    assert dict(g.get(timeout=2)) == {"b@example2.test": None}
    assert time.monotonic() - t0 < 0.5


def test_wait_at_shutdown_gets_high_load_B_119(std_world, rh):
    """B-119: a delivery waiting for a slot when the server shuts down (the limits module
    stops) ends at once with 451 4.4.5, as on a timeout."""
    t = limited(std_world, ["all concurrency 1"], wait=5)
    d1 = start(t)
    waiter = gevent.spawn(start, t)
    gevent.sleep(0.1)
    t0 = time.monotonic()
    t.limits.stop(1)
    assert_high_load(rh, waiter.get(timeout=2), "Global limit timeout")
    assert time.monotonic() - t0 < 0.5
    d1.abort()


def test_cancelled_waiter_leaks_no_slot_B_119(std_world, rh):
    """B-119: a waiter cancelled by killing its greenlet leaves no slot taken."""
    t = limited(std_world, ["all concurrency 1"], wait=5)
    d1 = start(t)
    killed = gevent.spawn(start, t)
    gevent.sleep(0.1)
    killed.kill(block=True, timeout=1)
    d1.abort()
    d3 = start(t)
    assert not isinstance(d3, SMTPError)
    d3.abort()


def test_cancelled_wait_gets_high_load_B_119(std_world, rh):
    """B-119: a delivery cancelled while it waits gets the same error as a timeout."""
    t = limited(std_world, ["all concurrency 1"], wait=5)
    d1 = start(t)
    waiter = gevent.spawn(start, t)
    gevent.sleep(0.1)
    waiter.kill(block=True, timeout=1)
    d1.abort()
    assert_high_load(rh, waiter.value, "Global limit timeout")


def test_shared_limits_B_120(mxworld, rh):
    """B-120: `limits &shared` in two target.remote blocks → one set of counters."""
    w = mxworld
    rt = w.config("limits shared {\n all concurrency 1\n}\n"
                  "target.remote r1 {\n hostname mx.sender.test\n limits &shared\n}\n"
                  "target.remote r2 {\n hostname mx.sender.test\n limits &shared\n}\n")
    r1, r2 = w.wire(rt.instance("r1")), w.wire(rt.instance("r2"))
    assert r1.limits is r2.limits
    r1.limits.wait = 0.3
    d = start(r1)
    assert_high_load(rh, start(r2), "Global limit timeout")
    d.abort()
    start(r2).abort()


@pytest.mark.parametrize("rule", ["all concurrency 0", "all rate 0", "all rate 0 1s"])
def test_zero_means_no_limit_B_121(std_world, rh, rule):
    """B-121: `rate 0` and `concurrency 0` mean no limit."""
    t = limited(std_world, [rule], wait=0.2)
    ds = [start(t) for _ in range(5)]
    assert all(not isinstance(d, SMTPError) for d in ds)
    for d in ds:
        d.abort()


@pytest.mark.parametrize("rule", ["all concurrency -1", "destination rate -2 1s"])
def test_negative_is_config_error_B_121(mxworld, rule):
    """B-121: negative values are configuration errors, at the rule's position."""
    with pytest.raises(ConfigError) as ei:
        mxworld.config("target.remote r {\n hostname mx.sender.test\n limits {\n  " + rule + "\n }\n}\n")
    assert (ei.value.line, ei.value.column) == (6, 3)


def test_only_source_rules_B_121(std_world, rh):
    """B-121: a limits block with only `source` rules works, including when a wait times out."""
    t = limited(std_world, ["source rate 1 10s"], wait=0.2)
    _, res = rh.deliver(t, ["a@example.test"])
    assert res == {"a@example.test": None}
    assert_high_load(rh, start(t), "Source limit timeout")
    _, res = rh.deliver(t, ["b@example.test"], sender="other@example.org")
    assert res == {"b@example.test": None}


def test_slots_are_released_when_finishing_fails_B_112(std_world, rh, monkeypatch):
    """B-112: whatever fails while a delivery finishes (here parking its connection), its
    message slot is given back, so the next delivery does not wait for it."""
    t = limited(std_world, ["all concurrency 1", "destination concurrency 1"], wait=0.3)
    d = start(t)
    d.add_rcpt("a@example.test")
    d.body_per_rcpt(rh.HEADER, rh.BODY)

    def broken(*_a):
        raise RuntimeError("boom")

    monkeypatch.setattr(t.pool, "put", broken)
    with pytest.raises(RuntimeError):
        d.commit()
    monkeypatch.undo()
    _, res = rh.deliver(t, ["b@example.test"])
    assert res == {"b@example.test": None}
