"""target.remote: connection reuse and the idle pool (behaviour.md B.4)."""

import logging
import socket

import gevent
import gevent.event
import pytest
from maddylite.modules.target import remote

from maddylite.interfaces import MsgMetadata
from maddylite.policy import MXLevel
from maddylite.smtp import client
from maddylite.smtp.errors import SMTPError


def test_two_deliveries_one_session_B_59(std_world, rh):
    """B-59: conn_reuse_limit 5, two deliveries → one session (one source port), two
    transactions separated by RSET; `reusing cached connection` is logged."""
    srv = std_world.servers[0]
    t = std_world.target("conn_reuse_limit 5")
    rh.deliver(t, ["a@example.test"])
    rh.deliver(t, ["b@example.test"])
    assert len(srv.sessions) == 1
    s = srv.session
    assert [m["rcpts"] for m in s.delivered] == [["a@example.test"], ["b@example.test"]]
    first_dot = s.commands.index("<body>")
    assert "RSET" in s.verbs[first_dot:s.verbs.index("MAIL", first_dot)]
    (log,) = std_world.logs("reusing cached connection")
    assert log["level"] == "info" and log["domain"] == "example.test"
    assert log["transactions_counter"] == 1
    assert log["local_addr"] == f"{s.peer[0]}:{s.peer[1]}"
    assert log["remote_addr"] == f"127.0.0.1:{std_world.port}"


@pytest.mark.parametrize("limit,sessions", [(2, 2), (0, 3), (-1, 3)])
def test_reuse_limit(std_world, rh, limit, sessions):
    """B-59 (Decisions): conn_reuse_limit N allows at most N transactions per connection;
    N ≤ 0 disables reuse."""
    srv = std_world.servers[0]
    t = std_world.target(f"conn_reuse_limit {limit}")
    for i in range(3):
        rh.deliver(t, [f"u{i}@example.test"])
    assert len(srv.sessions) == sessions
    assert len(srv.messages) == 3
    rh.wait_for(lambda: srv.sessions[0].ended)
    assert srv.sessions[0].quit


def _shutdown(session):
    session.sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("exts", [("PIPELINING",), ()], ids=["pipelining", "serial"])
def test_idle_connection_closed_by_server_B_60(std_world, rh, exts):
    """B-60: the server closed the idle connection → the RSET before reuse fails, the
    connection is discarded and a new one opened transparently."""
    srv = std_world.servers[0]
    srv.extensions = exts
    t = std_world.target()
    rh.deliver(t, ["a@example.test"])
    _shutdown(srv.session)
    rh.wait_for(lambda: srv.sessions[0].ended)
    _, res = rh.deliver(t, ["b@example.test"])
    assert res == {"b@example.test": None}
    assert len(srv.sessions) == 2 and len(srv.sessions[1].delivered) == 1


@pytest.mark.parametrize("exts", [("PIPELINING",), ()], ids=["pipelining", "serial"])
def test_rset_421_when_taken_B_60(std_world, rh, exts):
    """B-60: the RSET before reuse is answered 421 → new connection, delivery succeeds.
    Without PIPELINING the parking RSET's reply is read before the next RSET is sent."""
    srv = std_world.servers[0]
    srv.extensions = exts
    srv.replies["RSET"] = lambda s, _l: b"421 4.3.0 Bye\r\n" if s.verbs.count("RSET") > 1 else None
    t = std_world.target()
    rh.deliver(t, ["a@example.test"])
    _, res = rh.deliver(t, ["b@example.test"])
    assert res == {"b@example.test": None}
    assert len(srv.sessions) == 2 and len(srv.sessions[1].delivered) == 1
    first = srv.sessions[0]
    assert first.verbs.count("RSET") == 2
    if not exts:  # no pipelining: each RSET waits for the previous reply, nothing follows the 421
        assert [t for t in first.turns if "RSET" in t] == [["RSET"], ["RSET"]]
        assert "MAIL" not in first.verbs[first.verbs.index("RSET"):]


def test_a_timeout_after_the_reuse_rset_was_answered_fails_the_recipient_B_102_B_60(std_world, rh):
    """B-102 over B-60: on a pooled connection the RSET is answered, then the RCPT reply
    takes longer than command_timeout: the connection was alive, so this is not B-60's
    transparent reconnect: the recipient fails 450 4.4.2 and no other connection is opened.
    (With PIPELINING a server answers the whole batch at once, so a slow RCPT also holds
    back the RSET's reply: that looks like a dead connection and gets B-60's new one.)"""
    srv = std_world.servers[0]
    srv.extensions = ()
    t = std_world.target("command_timeout 300ms")
    rh.deliver(t, ["a@example.test"])
    srv.replies["RCPT"] = lambda _s, _l: gevent.sleep(1)
    _, res = rh.deliver(t, ["b@example.test"])
    rh.assert_err(res["b@example.test"], 450, "4.4.2", "Network I/O error", True)
    assert len(srv.sessions) == 1 and srv.sessions[0].verbs.count("RSET") == 2, [s.verbs for s in srv.sessions]


def test_rset_fails_before_parking_B_60(std_world, rh):
    """B-60: the RSET before parking fails → the connection is discarded and the next
    delivery transparently opens a new one (the parking RSET's reply is read at reuse)."""
    srv = std_world.servers[0]
    srv.replies["RSET"] = b"421 4.3.0 Bye\r\n"
    t = std_world.target()
    _, res = rh.deliver(t, ["a@example.test"])
    assert res == {"a@example.test": None}
    rh.wait_for(lambda: srv.session.verbs[-1:] == ["RSET"])  # the server answered the parking RSET
    gevent.sleep(0.05)
    del srv.replies["RSET"]
    _, res = rh.deliver(t, ["b@example.test"])
    assert res == {"b@example.test": None}
    assert len(srv.sessions) == 2
    assert len(srv.messages) == 2


def test_reused_connection_with_chunking_costs_two_turns_B_59(std_world, rh):
    """B-59, B-60, B-95: an MX offering PIPELINING and CHUNKING gets, for a message on a
    reused connection, the RSET before reuse with MAIL+RCPT, then BDAT and the content in
    one write; no DATA. The RSET that parks the connection again goes alone, once the
    content's reply is in (nothing may stand between the content and its reply, B-62),
    and its own reply is read with the next use."""
    srv = std_world.servers[0]
    srv.extensions = ("PIPELINING", "8BITMIME", "CHUNKING")
    t = std_world.target("conn_reuse_limit 5")
    rh.deliver(t, ["a@example.test"])
    rh.deliver(t, ["b@example.test", "c@example.test"])
    s = srv.session
    assert len(srv.sessions) == 1 and "DATA" not in s.verbs
    assert [m["rcpts"] for m in s.delivered] == [["a@example.test"], ["b@example.test", "c@example.test"]]
    assert s.delivered[1]["data"].endswith(b"\r\n") and b"Subject" in s.delivered[1]["data"]
    rh.wait_for(lambda: s.verbs[-1:] == ["RSET"])
    after_first = s.verbs[s.verbs.index("<CHUNK>") + 1:]
    assert after_first == ["RSET", "RSET", "MAIL", "RCPT", "RCPT", "BDAT", "<CHUNK>", "RSET"]
    assert s.turns[-2:] == [["BDAT", "<CHUNK>"], ["RSET"]]


@pytest.mark.parametrize("failure", ["rejected", "dot_rejected", "network", "timeout",
                                     "bdat_rejected", "bdat_network", "bdat_timeout"])
def test_no_reuse_after_data_failure_B_62(std_world, rh, failure):
    """B-62: after any DATA (or BDAT) failure the connection is closed, never reused."""
    srv = std_world.servers[0]
    if failure.startswith("bdat"):
        srv.extensions = ("PIPELINING", "CHUNKING")
        srv.replies["BDAT"] = {"bdat_rejected": b"554 5.6.0 No\r\n", "bdat_network": rh.CLOSE,
                               "bdat_timeout": lambda _s, _l: gevent.sleep(1)}[failure]
    elif failure == "rejected":
        srv.replies["DATA"] = b"550 5.7.1 No\r\n"
    elif failure == "dot_rejected":
        srv.replies["DOT"] = b"550 5.7.1 No\r\n"
    elif failure == "network":
        srv.replies["DOT"] = rh.CLOSE
    else:
        srv.replies["DOT"] = lambda _s, _l: gevent.sleep(1)
    t = std_world.target("submission_timeout 300ms")
    _, res = rh.deliver(t, ["a@example.test"])
    assert res["a@example.test"] is not None
    assert t.pool.count() == 0
    rh.wait_for(lambda: srv.sessions[0].ended)
    srv.replies.clear()
    _, res = rh.deliver(t, ["b@example.test"])
    assert res == {"b@example.test": None}
    assert len(srv.sessions) == 2


@pytest.mark.parametrize("verb", ["MAIL", "RCPT"])
def test_network_error_in_envelope_closes_B_63(std_world, rh, verb):
    """B-63: a network error during MAIL or RCPT → 450 4.4.2 and the connection is closed."""
    srv = std_world.servers[0]
    srv.replies[verb] = rh.CLOSE
    t = std_world.target()
    _, res = rh.deliver(t, ["a@example.test"])
    rh.assert_err(res["a@example.test"], 450, "4.4.2", "Network I/O error", True)
    assert t.pool.count() == 0
    srv.replies.clear()
    _, res = rh.deliver(t, ["b@example.test"])
    assert res == {"b@example.test": None}
    assert len(srv.sessions) == 2


def _rcpt_421_for_b(_s, line):
    return b"421 4.3.0 shutting down\r\n" if "<b@" in line else None


@pytest.mark.parametrize("exts", [("PIPELINING",), ()], ids=["pipelining", "serial"])
def test_recipients_accepted_before_the_server_closes_are_not_delivered_B_63(std_world, rh, exts):
    """B-63: RCPT a is accepted, RCPT b gets 421 and the server closes: nothing was sent,
    so a must fail too (with the server's 421), at RCPT time, and the body step must not
    report it delivered."""
    srv = std_world.servers[0]
    srv.extensions = exts
    srv.replies["RCPT"] = _rcpt_421_for_b
    t = std_world.target()
    d = t.start_delivery(MsgMetadata(id="m1"), "test@example.com")
    added = d.add_rcpts(["a@example.test", "b@example.test"])
    body = d.body_per_rcpt(rh.HEADER, rh.BODY)
    d.commit()
    assert srv.messages == []
    for r in ("a@example.test", "b@example.test"):
        rh.assert_err(added[r], 421, "4.3.0", "mx.example.test. said: shutting down", True)
    assert body == {}


@pytest.mark.parametrize("how", ["421", "drop"])
def test_a_recipient_accepted_by_an_earlier_call_fails_at_the_body_step_B_63(std_world, rh, how):
    """B-63, one add_rcpt at a time (the endpoint's way): a is accepted, then the
    connection is lost at RCPT b. a was never sent: body_per_rcpt reports b's error for
    it, and the atomic body() raises instead of returning (B-36)."""
    srv = std_world.servers[0]
    srv.replies["RCPT"] = _rcpt_421_for_b if how == "421" else (lambda _s, line: rh.CLOSE if "<b@" in line else None)
    t = std_world.target()
    for atomic in (False, True):
        d = t.start_delivery(MsgMetadata(id=f"m{atomic}"), "test@example.com")
        d.add_rcpt("a@example.test")
        with pytest.raises(SMTPError) as b_err:
            d.add_rcpt("b@example.test")
        if atomic:
            with pytest.raises(SMTPError) as body_err:
                d.body(rh.HEADER, rh.BODY)
            assert body_err.value is b_err.value
        else:
            assert d.body_per_rcpt(rh.HEADER, rh.BODY) == {"a@example.test": b_err.value}
        d.commit()
        assert b_err.value.temporary
    assert srv.messages == []


def _concurrent(t, rh, n, rcpt="u{}@example.test", meta=None):
    """_concurrent runs n deliveries that all connect before any of them finishes."""
    go = gevent.event.Event()
    ready = []

    def one(i):
        d = t.start_delivery(meta or MsgMetadata(id=f"m{i}"), "test@example.com")
        d.add_rcpt(rcpt.format(i))
        ready.append(i)
        go.wait()
        res = d.body_per_rcpt(rh.HEADER, rh.BODY)
        d.commit()
        return res

    gs = [gevent.spawn(one, i) for i in range(n)]
    rh.wait_for(lambda: len(ready) == n or any(g.dead for g in gs))
    go.set()
    gevent.joinall(gs, raise_error=True)
    return [g.value for g in gs]


def test_idle_count_B_64(std_world, rh):
    """B-64: default conn_max_idle_count 10: 11 concurrent deliveries → 10 idle, the 11th
    connection closed with QUIT."""
    srv = std_world.servers[0]
    t = std_world.target()
    results = _concurrent(t, rh, 11)
    assert all(all(v is None for v in r.values()) for r in results)
    assert len(srv.sessions) == 11
    assert t.pool.count() == 10
    rh.wait_for(lambda: sum(s.quit for s in srv.sessions) == 1)
    gevent.sleep(0.05)
    assert sum(s.ended for s in srv.sessions) == 1


def test_idle_time_stale_connection_B_65(std_world, rh):
    """B-65: a connection idle longer than conn_max_idle_time is not reused; QUIT."""
    srv = std_world.servers[0]
    t = std_world.target("conn_max_idle_time 1")
    rh.deliver(t, ["a@example.test"])
    gevent.sleep(1.2)
    rh.deliver(t, ["b@example.test"])
    assert len(srv.sessions) == 2
    rh.wait_for(lambda: srv.sessions[0].ended)
    assert srv.sessions[0].quit


def test_idle_time_sweep_B_65(std_world, rh, monkeypatch):
    """B-65: a periodic sweep closes stale idle connections with QUIT."""
    monkeypatch.setattr(remote, "SWEEP_INTERVAL", 0.2)
    srv = std_world.servers[0]
    t = std_world.target("conn_max_idle_time 1")
    rh.deliver(t, ["a@example.test"])
    rh.wait_for(lambda: srv.session.quit, timeout=3)
    assert t.pool.count() == 0


def test_sweep_interval_default_B_65():
    """B-65: the sweep runs about once a minute."""
    assert remote.SWEEP_INTERVAL == 60


def test_idle_time_zero_no_reuse_B_65(std_world, rh):
    """B-65: conn_max_idle_time 0 → effectively no reuse."""
    srv = std_world.servers[0]
    t = std_world.target("conn_max_idle_time 0")
    rh.deliver(t, ["a@example.test"])
    rh.wait_for(lambda: srv.session.quit)
    rh.deliver(t, ["b@example.test"])
    assert len(srv.sessions) == 2


def test_busy_connection_stays_usable_B_65(std_world, rh):
    """B-65: a connection kept busy stays usable beyond conn_max_idle_time in total."""
    srv = std_world.servers[0]
    t = std_world.target("conn_max_idle_time 1")
    for i in range(4):
        rh.deliver(t, [f"u{i}@example.test"])
        gevent.sleep(0.45)
    assert len(srv.sessions) == 1 and len(srv.messages) == 4


def test_pool_key_is_recipient_domain_B_66(mxworld, rh):
    """B-66: two domains with the same MX host never share a connection."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "127.0.0.1"))
    w.domain("example2.test", (10, "mx.example.test", None))
    srv = w.mx("127.0.0.1")
    t = w.target()
    rh.deliver(t, ["a@example.test"])
    rh.deliver(t, ["a@example2.test"])
    assert len(srv.sessions) == 2
    rh.deliver(t, ["b@example2.test"])
    rh.deliver(t, ["b@example.test"])
    assert len(srv.sessions) == 2
    assert [len(s.delivered) for s in srv.sessions] == [2, 2]


def test_reuse_keeps_levels_no_reevaluation_B_66(std_world, rh):
    """B-66: a reused connection keeps the MX and TLS levels; policies are not re-evaluated."""
    w = std_world
    w.servers[0].stop()
    srv = w.mx("127.0.0.1", tls=w.pki.ctx("valid"))
    calls = []

    def check_mx(cand):
        calls.append(cand.host)
        return MXLevel.MTASTS

    t = w.target()
    t.mx_auth = rh.StubGroup(rh.StubPolicy(check_mx))
    d1, _ = rh.deliver(t, ["a@example.test"])
    d2, res = rh.deliver(t, ["b@example.test"])
    assert res == {"b@example.test": None}
    assert len(srv.sessions) == 1 and calls == ["mx.example.test."]
    assert d2.describe("b@example.test") == d1.describe("a@example.test") == {
        "mx": "mx.example.test.", "tls_level": "authenticated", "mx_level": "mtasts"}


def test_tls_required_no_connection_not_pooled_B_66(std_world, rh):
    """B-66: a connection opened with policies skipped (`TLS-Required: No`) is closed with
    QUIT after its transaction; later messages get a new one."""
    srv = std_world.servers[0]
    t = std_world.target("mx_auth {\n local_policy\n}")
    rh.deliver(t, ["a@example.test"], meta=MsgMetadata(id="n", tls_required_no=True))
    rh.wait_for(lambda: srv.session.quit)
    assert t.pool.count() == 0
    rh.deliver(t, ["b@example.test"])
    assert len(srv.sessions) == 2


def test_idle_connection_handed_to_one_delivery_B_67(std_world, rh):
    """B-67: two simultaneous deliveries to one domain each get their own connection."""
    srv = std_world.servers[0]
    t = std_world.target()
    rh.deliver(t, ["warm@example.test"])
    _concurrent(t, rh, 2)
    assert len(srv.sessions) == 2
    assert sorted(len(s.delivered) for s in srv.sessions) == [1, 2]
    assert t.pool.count() == 2


def test_requiretls_never_uses_pool_B_68(std_world, rh):
    """B-68: a REQUIRETLS message opens and checks a new connection; the idle one it passed
    over stays pooled; its own may be pooled afterwards."""
    w = std_world
    w.servers[0].stop()
    srv = w.mx("127.0.0.1", tls=w.pki.ctx("valid"), tls_extensions=("REQUIRETLS",))
    t = w.target()
    t.mx_auth = rh.StubGroup(rh.sts_stub("testing"))
    rh.deliver(t, ["a@example.test"])
    assert t.pool.count() == 1
    _, res = rh.deliver(t, ["b@example.test"], meta=MsgMetadata(id="r", requiretls=True))
    assert res == {"b@example.test": None}
    assert len(srv.sessions) == 2
    assert srv.sessions[1].mail_lines == ["MAIL FROM:<test@example.com> REQUIRETLS"]
    assert t.pool.count() == 2
    rh.deliver(t, ["c@example.test"])
    rh.deliver(t, ["d@example.test"])
    assert len(srv.sessions) == 2


@pytest.mark.parametrize("quit_reply", ["221", "421", "reset"])
def test_stop_quits_idle_connections_B_70(std_world, rh, caplog, quit_reply):
    """B-70: stop sends QUIT to every idle connection (5 s timeout); a 421 or a reset during
    QUIT is logged at debug level only."""
    assert client.QUIT_TIMEOUT == 5.0
    assert client.SMTPConnection.quit.__defaults__ == (5.0,)
    srv = std_world.servers[0]
    if quit_reply == "421":
        srv.replies["QUIT"] = b"421 4.3.0 Going down\r\n"
    elif quit_reply == "reset":
        srv.replies["QUIT"] = rh.CLOSE
    t = std_world.target()
    std_world.domain("example2.test", (10, "mx.example.test", None))
    rh.deliver(t, ["a@example.test"])
    rh.deliver(t, ["a@example2.test"])
    assert t.pool.count() == 2
    caplog.set_level(logging.DEBUG)
    t.stop(1)
    rh.wait_for(lambda: all(s.ended for s in srv.sessions))
    assert all(s.commands[-1] == "QUIT" for s in srv.sessions)
    assert t.pool.count() == 0
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []
    assert [r for r in std_world.logs() if r["level"] != "debug"] == []


def test_a_delivery_finishing_after_stop_parks_nothing_B_1_B_70(std_world, rh):
    """B-1/B-70: after stop no connection is left open, even one whose delivery was still
    running when the pool was closed: it gets QUIT when it finishes instead of being parked."""
    srv = std_world.servers[0]
    t = std_world.target()
    d = t.start_delivery(MsgMetadata(id="m1"), "test@example.com")
    d.add_rcpt("a@example.test")
    t.stop(1)
    assert d.body_per_rcpt(rh.HEADER, rh.BODY) == {"a@example.test": None}
    d.commit()
    assert t.pool.count() == 0
    rh.wait_for(lambda: srv.sessions[0].ended)
    assert srv.sessions[0].commands[-1] == "QUIT"


def test_a_crash_sending_to_one_domain_is_raised_not_taken_for_delivery_B_36(std_world, rh, monkeypatch):
    """B-36 (per recipient results): when sending to one of two domains crashes (not an
    SMTP error), body_per_rcpt raises it (the queue then sets the message aside, D-21)
    rather than returning results in which that domain's recipient is missing."""
    std_world.domain("example2.test", (10, "mx.example.test", None))
    real = client.SMTPConnection.send_message
    calls = []

    def crash_once(self, *parts):
        calls.append(self)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(self, *parts)

    monkeypatch.setattr(client.SMTPConnection, "send_message", crash_once)
    t = std_world.target()
    d = t.start_delivery(MsgMetadata(id="m1"), "test@example.com")
    assert d.add_rcpts(["a@example.test", "b@example2.test"]) == {"a@example.test": None, "b@example2.test": None}
    with pytest.raises(RuntimeError, match="boom"):
        d.body_per_rcpt(rh.HEADER, rh.BODY)
    assert len(calls) == 2

