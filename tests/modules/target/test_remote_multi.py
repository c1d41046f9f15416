"""target.remote: several recipients and domains, partial failure (behaviour.md B.2)."""

import time

import gevent
import pytest

from maddylite.interfaces import MsgMetadata


@pytest.fixture
def two_domains(std_world):
    """two_domains adds example2.test (MX mx.example2.test at 127.0.0.2) to the default world."""
    std_world.domain("example2.test", (10, "mx.example2.test", "127.0.0.2"))
    std_world.mx("127.0.0.2")
    return std_world


def test_two_recipients_one_transaction_B_28(std_world, rh):
    """B-28: two recipients of one domain → one connection, one MAIL, two RCPT, one DATA."""
    srv = std_world.servers[0]
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test", "test2@example.test"])
    assert res == {"test@example.test": None, "test2@example.test": None}
    assert len(srv.sessions) == 1
    verbs = srv.session.verbs
    assert (verbs.count("MAIL"), verbs.count("RCPT"), verbs.count("DATA")) == (1, 2, 1)
    assert srv.messages[0]["rcpts"] == ["test@example.test", "test2@example.test"]


def test_two_domains_two_connections_parallel_data_B_29(two_domains, rh):
    """B-29: one connection per domain, opened in recipient order as recipients are added;
    DATA goes out on both connections in parallel."""
    w = two_domains
    s1, s2 = w.servers

    def slow_dot(_s, _line):
        gevent.sleep(0.6)

    s1.replies["DOT"] = s2.replies["DOT"] = slow_dot
    t = w.target()
    d = t.start_delivery(MsgMetadata(id="m"), "test@example.com")
    d.add_rcpt("test@example.test")
    assert len(s1.sessions) == 1 and s1.session.rcpt_lines == ["RCPT TO:<test@example.test>"]
    assert s2.sessions == []
    d.add_rcpt("test@example2.test")
    assert s2.session.rcpt_lines == ["RCPT TO:<test@example2.test>"]
    start = time.monotonic()
    d.body(rh.HEADER, rh.BODY)
    elapsed = time.monotonic() - start
    d.commit()
    assert elapsed < 1.1, "DATA was not sent in parallel"
    assert len(s1.messages) == 1 and len(s2.messages) == 1
    assert s1.messages[0]["mail"] == s2.messages[0]["mail"] == "MAIL FROM:<test@example.com>"


def test_first_rcpt_rejected_second_delivered_B_30(std_world, rh):
    """B-30: a rejected RCPT fails only that recipient; the other is added on the same
    connection and delivered; the server's transaction holds only the second one."""
    srv = std_world.servers[0]
    srv.rcpt_replies["test@example.test"] = b"550 5.1.2 Hey\r\n"
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test", "test2@example.test"])
    rh.assert_err(res["test@example.test"], 550, "5.1.2", "mx.example.test. said: Hey", False)
    assert res["test2@example.test"] is None
    assert len(srv.sessions) == 1
    assert [m["rcpts"] for m in srv.messages] == [["test2@example.test"]]


def test_rcpt_rejected_in_one_domain_other_delivered_B_31(two_domains, rh):
    """B-31: domain 1's recipient rejected at RCPT, domain 2's accepted → delivered, commit OK."""
    w = two_domains
    s1, s2 = w.servers
    s1.rcpt_replies["test@example.test"] = b"550 5.1.2 Hey\r\n"
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test", "test@example2.test"], atomic=True)
    rh.assert_err(res["test@example.test"], 550, "5.1.2", "mx.example.test. said: Hey", False)
    assert res["test@example2.test"] is None and "<body>" not in res
    assert len(s2.messages) == 1 and s1.messages == []


@pytest.mark.parametrize("reply,expected", [
    (b"452 4.5.3 Too many recipients\r\n", (452, "4.5.3", "mx.example.test. said: Too many recipients", True)),
    (b"552 5.5.3 Too many recipients\r\n", (452, "4.5.3", "mx.example.test. said: Too many recipients", True)),
], ids=["452", "552_rewritten"])
def test_too_many_recipients_B_32(std_world, rh, reply, expected):
    """B-32: from the 101st RCPT on the server answers 452 (or 552, read as 452) → those
    recipients fail temporarily, the accepted ones are delivered."""
    srv = std_world.servers[0]

    def limit(s, _line):
        return reply if s.tx is not None and len(s.tx["rcpts"]) >= 100 else None

    srv.replies["RCPT"] = limit
    t = std_world.target()
    rcpts = [f"u{i}@example.test" for i in range(105)]
    _, res = rh.deliver(t, rcpts)
    assert all(res[r] is None for r in rcpts[:100])
    for r in rcpts[100:]:
        rh.assert_err(res[r], *expected)
    assert srv.messages[0]["rcpts"] == rcpts[:100]


def test_552_after_data_stays_permanent_B_34(std_world, rh):
    """B-34: 552 to the final dot is not rewritten: 552 5.3.4 perm."""
    std_world.servers[0].replies["DOT"] = b"552 5.3.4 Message too big\r\n"
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 552, "5.3.4", "mx.example.test. said: Message too big", False)


@pytest.mark.parametrize("verb", ["DATA", "DOT"])
def test_message_rejected_after_data_B_35(std_world, rh, verb):
    """B-35: the server rejects the message (DATA reply or final dot) → the body step
    fails with that error for the recipients on that connection."""
    std_world.servers[0].replies[verb] = b"550 5.1.2 Hey\r\n"
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test", "test2@example.test"])
    for r in ("test@example.test", "test2@example.test"):
        rh.assert_err(res[r], 550, "5.1.2", "mx.example.test. said: Hey", False)


def test_atomic_body_partial_temporary_B_36(two_domains, rh):
    """B-36: domain 1 answers the message 421, domain 2 accepts → 451 4.0.0 partial."""
    w = two_domains
    w.servers[0].replies["DOT"] = b"421 4.1.2 Hey\r\n"
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test", "test@example2.test"], atomic=True)
    rh.assert_err(res["<body>"], 451, "4.0.0",
                  "Partial delivery failure, additional attempts may result in duplicates", True)
    assert len(w.servers[1].messages) == 1


def test_atomic_body_partial_permanent_B_37(two_domains, rh):
    """B-37: every per-recipient error permanent → 550 5.0.0 with the same message."""
    w = two_domains
    w.servers[0].replies["DOT"] = b"550 5.1.2 Hey\r\n"
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test", "test@example2.test"], atomic=True)
    rh.assert_err(res["<body>"], 550, "5.0.0",
                  "Partial delivery failure, additional attempts may result in duplicates", False)


def test_atomic_body_single_recipient_own_error_B_37(std_world, rh):
    """B-37: with a single recipient, its own error is returned."""
    std_world.servers[0].replies["DOT"] = b"550 5.1.2 Hey\r\n"
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test"], atomic=True)
    rh.assert_err(res["<body>"], 550, "5.1.2", "mx.example.test. said: Hey", False)


def test_per_recipient_body_B_38(two_domains, rh):
    """B-38: per-recipient body: the failing server's recipients each get its error; the
    other domain's recipient succeeds."""
    w = two_domains
    w.servers[0].replies["DATA"] = b"550 5.1.2 Hey\r\n"
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test", "test2@example.test", "test@example2.test"])
    for r in ("test@example.test", "test2@example.test"):
        rh.assert_err(res[r], 550, "5.1.2", "mx.example.test. said: Hey", False)
    assert res["test@example2.test"] is None
    assert len(w.servers[1].messages) == 1


def test_per_recipient_body_all_ok_B_39(two_domains, rh):
    """B-39: per-recipient body, everything works → success for each recipient."""
    w = two_domains
    t = w.target()
    d = t.start_delivery(MsgMetadata(id="m"), "test@example.com")
    for r in ("test@example.test", "test2@example.test", "test@example2.test"):
        d.add_rcpt(r)
    res = d.body_per_rcpt(rh.HEADER, rh.BODY)
    d.commit()
    assert dict(res) == {"test@example.test": None, "test2@example.test": None, "test@example2.test": None}


def test_no_data_without_accepted_recipients_B_40(two_domains, rh):
    """B-40: a domain whose RCPTs were all rejected gets no DATA; its connection is reset and
    pooled; the other domain is delivered."""
    w = two_domains
    s1, s2 = w.servers
    s1.replies["RCPT"] = b"550 5.1.1 No such user\r\n"
    t = w.target()
    _, res = rh.deliver(t, ["a@example.test", "b@example.test", "test@example2.test"])
    assert res["test@example2.test"] is None
    assert "DATA" not in s1.session.verbs
    rh.wait_for(lambda: s1.session.verbs[-1:] == ["RSET"])  # the parking RSET's reply is read later
    assert not s1.session.ended
    assert len(s2.messages) == 1
    del s1.replies["RCPT"]
    _, res = rh.deliver(t, ["c@example.test"])
    assert res == {"c@example.test": None}
    assert len(s1.sessions) == 1 and len(s1.messages) == 1


def test_commit_without_body_B_41(std_world, rh):
    """B-41: recipients added, commit without body → no DATA; reset and pooled."""
    srv = std_world.servers[0]
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test"], body=None)
    assert res == {"test@example.test": None}
    rh.wait_for(lambda: srv.session.verbs[-1:] == ["RSET"])
    assert "DATA" not in srv.session.verbs
    assert t.pool.count() == 1


def test_abort_B_42(std_world, rh):
    """B-42: abort → no DATA; reset and pooled; QUIT at stop, nothing leaks."""
    srv = std_world.servers[0]
    t = std_world.target()
    rh.deliver(t, ["test@example.test"], body=None, finish="abort")
    rh.wait_for(lambda: srv.session.verbs[-1:] == ["RSET"])
    assert "DATA" not in srv.session.verbs
    assert t.pool.count() == 1
    t.stop(1)
    rh.wait_for(lambda: srv.session.ended)
    assert srv.session.quit and t.pool.count() == 0
