"""target.remote: SMTPUTF8, 8BITMIME, SIZE and protocol details, timeouts, hostname,
local_ip and address families (behaviour.md B.7, B.8, B.9)."""

import re
import time

import gevent
import pytest

from maddylite.config.errors import ConfigError
from maddylite.interfaces import MsgMetadata
from maddylite.smtp import client

UTF8 = ("PIPELINING", "8BITMIME", "SMTPUTF8")


def u8(**kw):
    """u8 is a message received with SMTPUTF8."""
    return MsgMetadata(id="u", smtputf8=True, **kw)


# --- B.7 ------------------------------------------------------------------------------------


def test_smtputf8_supported_B_85(std_world, rh):
    """B-85: SMTPUTF8 message and server → MAIL ... SMTPUTF8, addresses sent as UTF-8."""
    w = std_world
    srv = w.servers[0]
    srv.extensions = UTF8
    w.domain("example.org", (10, "mx.example.test", None))
    _, res = rh.deliver(w.target(), ["тест@example.org"], sender="test@тест.org", meta=u8())
    assert res == {"тест@example.org": None}
    assert srv.session.mail_lines == ["MAIL FROM:<test@тест.org> SMTPUTF8"]
    assert srv.session.rcpt_lines == ["RCPT TO:<тест@example.org>"]


def test_smtputf8_unsupported_sender_domain_converted_B_86(std_world, rh):
    """B-86: server without SMTPUTF8 → the sender's domain in A-labels, no SMTPUTF8 keyword."""
    srv = std_world.servers[0]
    _, res = rh.deliver(std_world.target(), ["test@example.test"], sender="test@тест.example.org", meta=u8())
    assert res == {"test@example.test": None}
    assert srv.session.mail_lines == ["MAIL FROM:<test@xn--e1aybc.example.org>"]


def test_smtputf8_unsupported_recipient_domain_converted_B_87(std_world, rh):
    """B-87: the recipient's domain is sent in A-labels (and looked up in A-labels)."""
    w = std_world
    srv = w.servers[0]
    w.domain("xn--e1aybc.example.invalid", (10, "mx.example.test", None))
    _, res = rh.deliver(w.target(), ["test@тест.example.invalid"], meta=u8())
    assert res == {"test@тест.example.invalid": None}
    assert srv.session.rcpt_lines == ["RCPT TO:<test@xn--e1aybc.example.invalid>"]
    assert ("xn--e1aybc.example.invalid.", "MX") in w.dns.queries


def test_smtputf8_unsupported_sender_local_part_B_88(std_world, rh):
    """B-88: non-ASCII sender local part, server without SMTPUTF8 → 550 5.6.7; no MAIL."""
    srv = std_world.servers[0]
    _, res = rh.deliver(std_world.target(), ["test@example.test"], sender="тест@example.org", meta=u8())
    rh.assert_err(res["test@example.test"], 550, "5.6.7",
                  "SMTPUTF8 is unsupported, cannot convert sender address", False)
    assert srv.mail_lines == []


def test_smtputf8_unsupported_recipient_local_part_B_89(std_world, rh):
    """B-89: non-ASCII recipient local part → 553 5.6.7 for it; MAIL was sent; the others
    continue."""
    srv = std_world.servers[0]
    _, res = rh.deliver(std_world.target(), ["тест@example.test", "test@example.test"], meta=u8())
    rh.assert_err(res["тест@example.test"], 553, "5.6.7",
                  "SMTPUTF8 is unsupported, cannot convert recipient address", False)
    assert res["test@example.test"] is None
    assert len(srv.mail_lines) == 1
    assert srv.messages[0]["rcpts"] == ["test@example.test"]


def test_smtputf8_not_requested_B_90(std_world, rh):
    """B-90: message without SMTPUTF8, server supports it → no SMTPUTF8 keyword."""
    srv = std_world.servers[0]
    srv.extensions = UTF8
    rh.deliver(std_world.target(), ["test@example.test"])
    assert srv.mail_lines == ["MAIL FROM:<test@example.com>"]


@pytest.mark.parametrize("atomic", [False, True], ids=["body_per_rcpt", "body"])
def test_smtputf8_header_unsupported_B_91(std_world, rh, atomic):
    """B-91: UTF-8 header, server without SMTPUTF8 → 554 5.6.7 for every recipient of that
    connection; no DATA; the connection is reset and stays reusable."""
    srv = std_world.servers[0]
    t = std_world.target()
    header = "Subject: тест\r\n".encode()
    _, res = rh.deliver(t, ["a@example.test", "b@example.test"], meta=u8(), header=header, atomic=atomic)
    if atomic:
        rh.assert_err(res["<body>"], 550, "5.0.0",
                      "Partial delivery failure, additional attempts may result in duplicates", False)
        d = t.start_delivery(u8(), "test@example.com")
        d.add_rcpt("c@example.test")
        with pytest.raises(Exception) as ei:
            d.body(header, rh.BODY)
        d.abort()
        res = {"c@example.test": ei.value}
    for err in res.values():
        rh.assert_err(err, 554, "5.6.7", "SMTPUTF8 is unsupported, cannot send a UTF-8 header", False)
    assert "DATA" not in srv.session.verbs
    assert srv.session.verbs[-1] == "RSET" and len(srv.sessions) == 1
    assert t.pool.count() == 1


@pytest.mark.parametrize("flag,expected", [(True, "MAIL FROM:<test@example.com> BODY=8BITMIME"),
                                           (False, "MAIL FROM:<test@example.com>")])
def test_8bitmime_parameter_B_92(std_world, rh, flag, expected):
    """B-92: BODY=8BITMIME only when the message was received with it (server has 8BITMIME)."""
    srv = std_world.servers[0]
    body = "Grüße\r\n".encode() if flag else rh.BODY
    _, res = rh.deliver(std_world.target(), ["test@example.test"], meta=MsgMetadata(id="m", body_8bit=flag),
                        body=body)
    assert res == {"test@example.test": None}
    assert srv.mail_lines == [expected]


@pytest.mark.parametrize("where", ["body", "header"])
def test_8bit_content_without_8bitmime_B_92(std_world, rh, where):
    """B-92: server without 8BITMIME and a byte ≥ 0x80 → 554 5.6.3 for every recipient on
    that connection; no DATA, no conversion."""
    srv = std_world.servers[0]
    srv.extensions = ("PIPELINING",)
    header, body = rh.HEADER, rh.BODY
    if where == "body":
        body = b"caf\xe9\r\n"
    else:
        header = b"Subject: caf\xe9\r\n"
    _, res = rh.deliver(std_world.target(), ["a@example.test", "b@example.test"],
                        meta=MsgMetadata(id="m", body_8bit=True), header=header, body=body)
    for r in ("a@example.test", "b@example.test"):
        rh.assert_err(res[r], 554, "5.6.3", "8BITMIME is unsupported, cannot send 8-bit content", False)
    assert "DATA" not in srv.session.verbs
    assert srv.mail_lines == ["MAIL FROM:<test@example.com>"]


@pytest.mark.parametrize("ext", ["SIZE 100000", "SIZE", "SIZE 0"])
def test_size_parameter_B_93(std_world, rh, ext):
    """B-93: SIZE=<size of the message as sent> when the server advertises SIZE."""
    srv = std_world.servers[0]
    srv.extensions = ("PIPELINING", ext)
    n = len(rh.HEADER + b"\r\n" + rh.BODY)
    _, res = rh.deliver(std_world.target(), ["test@example.test"], meta=MsgMetadata(id="m", size=n))
    assert res == {"test@example.test": None}
    assert srv.mail_lines == [f"MAIL FROM:<test@example.com> SIZE={n}"]
    assert len(srv.messages[0]["data"]) == n


def test_size_unknown_or_not_advertised_B_93(std_world, rh):
    """B-93: no SIZE parameter when the server lacks SIZE."""
    srv = std_world.servers[0]
    rh.deliver(std_world.target(), ["test@example.test"], meta=MsgMetadata(id="m", size=50))
    assert srv.mail_lines == ["MAIL FROM:<test@example.com>"]


def test_size_over_server_maximum_B_93(std_world, rh):
    """B-93: the message exceeds the advertised maximum → 552 5.3.4 for the domain's
    recipients; MAIL not issued."""
    srv = std_world.servers[0]
    srv.extensions = ("PIPELINING", "SIZE 1000")
    _, res = rh.deliver(std_world.target(), ["a@example.test", "b@example.test"],
                        meta=MsgMetadata(id="m", size=1001))
    for r in ("a@example.test", "b@example.test"):
        rh.assert_err(res[r], 552, "5.3.4", "Message is too big for the recipient server", False)
    assert srv.mail_lines == []


def test_dsn_and_auth_not_forwarded_B_94(std_world, rh):
    """B-94: no RET, ENVID, NOTIFY, ORCPT or AUTH= parameters go onward."""
    srv = std_world.servers[0]
    srv.extensions = ("PIPELINING", "DSN", "AUTH PLAIN LOGIN", "8BITMIME")
    meta = MsgMetadata(id="m", original_rcpts={"test@example.test": "Test@Example.test"})
    rh.deliver(std_world.target(), ["test@example.test"], meta=meta)
    assert srv.session.mail_lines == ["MAIL FROM:<test@example.com>"]
    assert srv.session.rcpt_lines == ["RCPT TO:<test@example.test>"]


@pytest.mark.parametrize("pipelining", [True, False])
def test_pipelining_replies_in_order_B_95(std_world, rh, pipelining):
    """B-95: RCPT replies map to their recipients (as B-30) with or without PIPELINING;
    DATA is sent only after a RCPT is known to have succeeded."""
    srv = std_world.servers[0]
    srv.extensions = ("PIPELINING",) if pipelining else ()

    def slow_rcpt(s, line):
        gevent.sleep(0.02)
        return b"550 5.1.2 Hey\r\n" if "<a@" in line else None

    srv.replies["RCPT"] = slow_rcpt
    d = std_world.target().start_delivery(MsgMetadata(id="m"), "test@example.com")
    res = d.add_rcpts(["a@example.test", "b@example.test", "c@example.test"])
    body = d.body_per_rcpt(rh.HEADER, rh.BODY)
    d.commit()
    rh.assert_err(res["a@example.test"], 550, "5.1.2", "mx.example.test. said: Hey", False)
    assert res["b@example.test"] is None and res["c@example.test"] is None
    assert dict(body) == {"b@example.test": None, "c@example.test": None}
    assert srv.messages[0]["rcpts"] == ["b@example.test", "c@example.test"]
    s = srv.session
    data_at = s.verbs.index("DATA")
    assert s.times[data_at] - max(s.times[: data_at]) >= 0.015, "DATA sent before the RCPT replies"
    if pipelining:
        assert ["MAIL", "RCPT", "RCPT", "RCPT"] in s.turns
    else:
        assert ["MAIL"] in s.turns and ["RCPT"] in s.turns
    assert ["DATA"] in s.turns


@pytest.mark.parametrize("reply", [b"251 2.1.5 Will forward\r\n", b"252 2.1.5 Cannot verify\r\n"])
def test_rcpt_25x_accepted_B_97(std_world, rh, reply):
    """B-97: RCPT succeeds with any 25x."""
    srv = std_world.servers[0]
    srv.replies["RCPT"] = reply
    _, res = rh.deliver(std_world.target(), ["test@example.test"])
    assert res == {"test@example.test": None}
    assert "DATA" in srv.session.verbs


def test_mail_needs_250_B_97(std_world, rh):
    """B-97: MAIL needs 250: another positive reply is not accepted; nothing is sent."""
    srv = std_world.servers[0]
    srv.replies["MAIL"] = b"251 2.1.0 Odd\r\n"
    _, res = rh.deliver(std_world.target(), ["test@example.test"])
    assert res["test@example.test"] is not None
    assert "DATA" not in srv.session.verbs


def test_multiline_error_B_97(std_world, rh):
    """B-97: a multi-line error reply carries the text of all lines joined by newlines, and
    the enhanced code from the start of the first line."""
    srv = std_world.servers[0]
    srv.replies["RCPT"] = b"550-5.7.1 first line\r\n550-second line\r\n550 third line\r\n"
    _, res = rh.deliver(std_world.target(), ["test@example.test"])
    rh.assert_err(res["test@example.test"], 550, "5.7.1",
                  "mx.example.test. said: first line\nsecond line\nthird line", False)


@pytest.mark.parametrize("reply,expected", [
    (b"550 no such user\r\n", (550, "5.0.0", "mx.example.test. said: no such user", False)),
    (b"450 try later\r\n", (450, "4.0.0", "mx.example.test. said: try later", True)),
])
def test_reply_without_enhanced_code_B_98(std_world, rh, reply, expected):
    """B-98: a reply without enhanced code gets X.0.0 of its class."""
    std_world.servers[0].replies["RCPT"] = reply
    _, res = rh.deliver(std_world.target(), ["test@example.test"])
    rh.assert_err(res["test@example.test"], *expected)


def test_reply_line_too_long_B_99(std_world, rh):
    """B-99: a reply line longer than 2000 bytes → 450 4.4.2 temp; connection closed."""
    srv = std_world.servers[0]
    srv.replies["RCPT"] = b"250 " + b"x" * 3000 + b"\r\n"
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 450, "4.4.2", "Network I/O error", True)
    rh.wait_for(lambda: srv.session.ended)
    assert t.pool.count() == 0 and "DATA" not in srv.session.verbs


# --- B.8 ------------------------------------------------------------------------------------


def test_connect_timeout_blackholed_mx_B_100(mxworld, rh):
    """B-100: a blackholed MX1 fails after connect_timeout with 450 4.4.2; MX2 is tried."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.7"), (20, "mx2.example.test", "127.0.0.1"))
    w.blackhole("127.0.0.7")
    srv = w.mx("127.0.0.1")
    t = w.target("connect_timeout 1s")
    start = time.monotonic()
    _, res = rh.deliver(t, ["test@example.test"])
    elapsed = time.monotonic() - start
    assert res == {"test@example.test": None} and len(srv.messages) == 1
    assert 0.9 <= elapsed < 1.8
    (log,) = w.logs("cannot use MX")
    assert (log["remote_server"], log["reason"]) == ("mx1.example.test.", "450 4.4.2 Network I/O error")


def test_connect_timeout_per_mx_B_100(mxworld, rh):
    """B-100: each MX gets the full connect_timeout."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.7"), (20, "mx2.example.test", "127.0.0.8"))
    w.blackhole("127.0.0.7")
    w.blackhole("127.0.0.8")
    t = w.target("connect_timeout 700ms")
    start = time.monotonic()
    _, res = rh.deliver(t, ["test@example.test"])
    elapsed = time.monotonic() - start
    rh.assert_err(res["test@example.test"], 451, "4.4.0", "No usable MXs, last err: Network I/O error", True)
    assert 1.35 <= elapsed < 2.2


def test_connect_timeout_bounds_address_lookup_B_100(mxworld, rh):
    """B-100: connect_timeout also bounds the lookup of the MX host's addresses."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.2"), (20, "mx2.example.test", "127.0.0.1"))
    w.dns.set_delay("mx1.example.test", 3)
    srv = w.mx("127.0.0.1")
    t = w.target("connect_timeout 1s", resolver=w.resolver(timeout=5))
    start = time.monotonic()
    _, res = rh.deliver(t, ["test@example.test"])
    elapsed = time.monotonic() - start
    assert res == {"test@example.test": None} and len(srv.messages) == 1
    assert elapsed < 1.8
    (log,) = w.logs("cannot use MX")
    assert log["remote_server"] == "mx1.example.test." and log["reason"].startswith("450 4.4.")


def test_greeting_wait_fixed_B_101(mxworld, rh, monkeypatch):
    """B-101: the greeting wait is fixed (5 minutes; shortened here), neither
    connect_timeout nor command_timeout: a silent MX1 fails 450 4.4.2 after it, MX2 is
    tried; a greeting slower than both timeouts is still accepted."""
    assert client.GREETING_TIMEOUT == 300
    assert client.SMTPConnection.greet.__defaults__ == (300,)
    monkeypatch.setattr(client.SMTPConnection.greet, "__defaults__", (1.0,))
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.1"), (20, "mx2.example.test", "127.0.0.2"))
    mx1 = w.mx("127.0.0.1", greeting=None)

    def slow_greeting(_s, _l):
        gevent.sleep(0.5)

    mx2 = w.mx("127.0.0.2", replies={"GREETING": slow_greeting})
    t = w.target("connect_timeout 200ms\ncommand_timeout 200ms")
    start = time.monotonic()
    _, res = rh.deliver(t, ["test@example.test"])
    elapsed = time.monotonic() - start
    assert res == {"test@example.test": None}
    assert len(mx1.sessions) == 1 and mx1.session.commands == []
    assert len(mx2.messages) == 1
    assert 1.4 <= elapsed < 2.5
    (log,) = w.logs("cannot use MX")
    assert log["reason"] == "450 4.4.2 Network I/O error"


def test_command_timeout_rcpt_B_102(std_world, rh):
    """B-102: a RCPT reply slower than command_timeout → 450 4.4.2; the connection is closed."""
    srv = std_world.servers[0]
    srv.replies["RCPT"] = lambda _s, _l: gevent.sleep(1)
    t = std_world.target("command_timeout 300ms")
    start = time.monotonic()
    _, res = rh.deliver(t, ["test@example.test"])
    assert time.monotonic() - start < 0.9
    rh.assert_err(res["test@example.test"], 450, "4.4.2", "Network I/O error", True)
    rh.wait_for(lambda: srv.session.ended)
    assert not srv.session.quit and t.pool.count() == 0


@pytest.mark.parametrize("verb", ["EHLO", "MAIL", "DATA", "RSET"])
def test_command_timeout_other_replies_B_102(std_world, rh, verb):
    """B-102: command_timeout bounds the EHLO, MAIL, DATA (354) and RSET replies too."""
    srv = std_world.servers[0]
    if verb == "RSET":  # the RSET before reuse (the session's second; the first parks it)
        srv.replies[verb] = lambda s, _l: gevent.sleep(1) if s.verbs.count("RSET") >= 2 else None
    else:
        srv.replies[verb] = lambda _s, _l: gevent.sleep(1)
    t = std_world.target("command_timeout 300ms")
    start = time.monotonic()
    d, res = rh.deliver(t, ["test@example.test"])
    assert time.monotonic() - start < 0.9
    if verb == "RSET":  # the parking RSET went with the message; at reuse the RSET reply
        # times out, the connection is discarded and a new one opened transparently (B-60)
        assert res == {"test@example.test": None}
        start = time.monotonic()
        _, res = rh.deliver(t, ["test@example.test"])
        assert res == {"test@example.test": None} and time.monotonic() - start < 2
        assert len(srv.sessions) == 2 and srv.sessions[0].verbs.count("RSET") == 2
        return
    expected = ("No usable MXs, last err: Network I/O error", 451, "4.4.0") if verb == "EHLO" else \
        ("Network I/O error", 450, "4.4.2")
    rh.assert_err(res["test@example.test"], expected[1], expected[2], expected[0], True)


def test_command_timeout_tls_handshake_B_102(std_world, rh):
    """B-102: command_timeout bounds the TLS handshake (then the ladder goes on: B-48)."""
    w = std_world
    srv = w.servers[0]
    srv.tls = w.pki.ctx("valid")

    def stall(s, _l):
        if s.index == 0:
            s.send(b"220 2.0.0 Go ahead\r\n")
            gevent.sleep(2)
            return rh.CLOSE
        return None

    srv.replies["STARTTLS"] = stall
    t = w.target("command_timeout 300ms")
    start = time.monotonic()
    d, res = rh.deliver(t, ["test@example.test"])
    assert time.monotonic() - start < 1.2
    assert res == {"test@example.test": None}
    assert d.describe("test@example.test")["tls_level"] == "none"
    assert len(w.logs("TLS error, trying plaintext")) == 1


def test_submission_timeout_B_103(std_world, rh):
    """B-103: no reply to the final dot within submission_timeout → 450 4.4.2 for every
    recipient of that connection; connection closed."""
    srv = std_world.servers[0]
    srv.replies["DOT"] = lambda _s, _l: gevent.sleep(1.5)
    t = std_world.target("submission_timeout 400ms")
    start = time.monotonic()
    _, res = rh.deliver(t, ["a@example.test", "b@example.test"])
    assert time.monotonic() - start < 1.2
    for r in ("a@example.test", "b@example.test"):
        rh.assert_err(res[r], 450, "4.4.2", "Network I/O error", True)
    assert t.pool.count() == 0


def test_submission_timeout_not_command_timeout_B_103(std_world, rh):
    """B-103: the final dot waits submission_timeout (default 12m), not command_timeout."""
    assert std_world.target().submission_timeout == 720
    srv = std_world.servers[0]
    srv.replies["DOT"] = lambda _s, _l: gevent.sleep(0.6)
    t = std_world.target("command_timeout 200ms\nsubmission_timeout 3s")
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}


def test_body_write_timeout_B_104(std_world, rh):
    """B-104: a server that stops reading during the body → each write is bounded by
    command_timeout: 450 4.4.2 for the connection's recipients; connection closed."""
    srv = std_world.servers[0]

    def stop_reading(s, _l):
        s.send(b"354 Go ahead\r\n")
        gevent.sleep(10)
        return rh.CLOSE

    srv.replies["DATA"] = stop_reading
    t = std_world.target("command_timeout 500ms")
    body = (b"x" * 998 + b"\r\n") * (24 * 1024)
    start = time.monotonic()
    _, res = rh.deliver(t, ["a@example.test", "b@example.test"], body=body)
    assert time.monotonic() - start < 4
    for r in ("a@example.test", "b@example.test"):
        rh.assert_err(res[r], 450, "4.4.2", "Network I/O error", True)
    assert t.pool.count() == 0


def test_zero_timeouts_mean_defaults_B_105(mxworld):
    """B-105: a timeout of 0 means the built-in value."""
    t = mxworld.target("connect_timeout 0\ncommand_timeout 0\nsubmission_timeout 0", start=False)
    assert (t.connect_timeout, t.command_timeout, t.submission_timeout) == (300, 300, 720)
    t = mxworld.target(start=False)
    assert (t.connect_timeout, t.command_timeout, t.submission_timeout) == (300, 300, 720)


@pytest.mark.parametrize("directive", ["connect_timeout", "command_timeout", "submission_timeout"])
def test_negative_timeout_is_config_error_B_105(mxworld, directive):
    """B-105: negative timeouts are configuration errors, at the directive's position."""
    with pytest.raises(ConfigError) as ei:
        mxworld.config(f"target.remote r {{\n hostname mx.sender.test\n {directive} -1s\n}}\n")
    assert ei.value.line == 5 and ei.value.column == 2


def test_quit_timeout_fixed_B_106(std_world, rh):
    """B-106: QUIT waits 5 s for its reply whatever command_timeout says."""
    assert client.QUIT_TIMEOUT == 5.0
    srv = std_world.servers[0]

    def slow_quit(_s, _l):
        gevent.sleep(0.8)

    srv.replies["QUIT"] = slow_quit
    t = std_world.target("command_timeout 200ms")
    rh.deliver(t, ["test@example.test"])
    start = time.monotonic()
    t.stop(1)
    assert time.monotonic() - start >= 0.7
    assert srv.session.quit


# --- B.9 ------------------------------------------------------------------------------------


def test_hostname_a_label_B_107(std_world, rh):
    """B-107: the EHLO name is the hostname in A-labels."""
    srv = std_world.servers[0]
    rh.deliver(std_world.target(hostname="тест.example"), ["test@example.test"])
    assert srv.session.commands[0] == "EHLO xn--e1aybc.example"


def test_hostname_not_convertible_B_107(mxworld):
    """B-107: a host name that cannot be converted → configuration error at the directive."""
    with pytest.raises(ConfigError) as ei:
        mxworld.config("target.remote r {\n hostname " + "т" * 70 + ".example\n}\n")
    assert "remote: cannot represent the hostname as an A-label name" in ei.value.message
    assert (ei.value.line, ei.value.column) == (4, 2)


def test_global_hostname_B_107(std_world, rh):
    """B-107: the global hostname is used when the block has none."""
    srv = std_world.servers[0]
    t = std_world.target(hostname=None, prefix="hostname mx.global.test\n")
    rh.deliver(t, ["test@example.test"])
    assert srv.session.commands[0] == "EHLO mx.global.test"


def test_local_ip_source_address_B_108(std_world, rh):
    """B-108: every outbound connection's source address is local_ip (127.0.0.5 here; a
    non-local address like 192.0.2.10 needs the real-peer harness)."""
    w = std_world
    w.domain("example2.test", (10, "mx.example2.test", "127.0.0.2"))
    srv2 = w.mx("127.0.0.2")
    t = w.target("local_ip 127.0.0.5\nconn_reuse_limit 0")
    rh.deliver(t, ["test@example.test", "test@example2.test"])
    rh.deliver(t, ["test@example.test"])
    peers = {s.peer[0] for s in w.servers[0].sessions + srv2.sessions}
    assert peers == {"127.0.0.5"} and len(w.servers[0].sessions) == 2


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.5", "127.0.0.5"), ("::1", "::1"), ("[::1]", "::1"), ("2001:db8::1", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"), ("localhost", re.compile(r"127\.0\.0\.1|::1")),
])
def test_local_ip_values_B_108(mxworld, value, expected):
    """B-108: IPv6 bare or in brackets; a host name is resolved at configuration."""
    t = mxworld.target(f"local_ip {value}", start=False)
    if isinstance(expected, str):
        assert t.local_ip == expected
    else:
        assert expected.fullmatch(t.local_ip)


@pytest.mark.parametrize("value", ["not_an_ip!", "bad..name"])
def test_local_ip_invalid_B_108(mxworld, value):
    """B-108: neither an address nor a name → `remote: failed to parse local IP`, positioned
    at the directive."""
    with pytest.raises(ConfigError) as ei:
        mxworld.config(f"target.remote r {{\n hostname mx.sender.test\n local_ip {value}\n}}\n")
    assert "remote: failed to parse local IP" in ei.value.message
    assert (ei.value.line, ei.value.column) == (5, 2)


def test_local_ip_v4_and_ipv6_only_mx_B_109(mxworld, rh):
    """B-109: local_ip IPv4 and an IPv6-only MX → no suitable address: 450 4.4.2."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "::1"))
    srv6 = w.mx("::1")
    t = w.target("local_ip 127.0.0.1")
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 451, "4.4.0", "No usable MXs, last err: Network I/O error", True)
    assert srv6.sessions == []


def test_force_ipv4_ipv6_only_mx_B_110(mxworld, rh):
    """B-110: force_ipv4: an IPv6-only MX fails 450 4.4.2, the next MX is tried."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "::1"), (20, "mx2.example.test", "127.0.0.2"))
    srv6 = w.mx("::1")
    srv4 = w.mx("127.0.0.2")
    t = w.target("force_ipv4 yes")
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert srv6.sessions == [] and len(srv4.messages) == 1
    (log,) = w.logs("cannot use MX")
    assert (log["remote_server"], log["reason"]) == ("mx1.example.test.", "450 4.4.2 Network I/O error")


def test_force_ipv4_only_ipv6_mx_temporary_B_110(mxworld, rh):
    """B-110: force_ipv4 and no usable MX → temporary error."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "::1"))
    w.mx("::1")
    t = w.target("force_ipv4 yes")
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 451, "4.4.0", "No usable MXs, last err: Network I/O error", True)


def test_force_ipv4_dual_stack_uses_ipv4_B_110(mxworld, rh):
    """B-110: force_ipv4 and a dual-stack MX → only its IPv4 address is used."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "::1"))
    w.host("mx.example.test", "127.0.0.1")
    srv6, srv4 = w.mx("::1"), w.mx("127.0.0.1")
    t = w.target("force_ipv4 yes")
    rh.deliver(t, ["test@example.test"])
    assert srv6.sessions == [] and len(srv4.messages) == 1


@pytest.mark.parametrize("v6", ["refused", "listening", "blackholed"])
def test_dual_stack_fallback_B_111(mxworld, rh, v6):
    """B-111: a dual-stack MX is reached over either family, with a fast fallback."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "::1"))
    w.host("mx.example.test", "127.0.0.1")
    srv4 = w.mx("127.0.0.1")
    srv6 = w.mx("::1") if v6 == "listening" else None
    if v6 == "blackholed":
        w.blackhole("::1")
    t = w.target("connect_timeout 3s")
    start = time.monotonic()
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert time.monotonic() - start < 1.0
    if srv6 is not None:
        assert len(srv6.messages) == 1 and srv6.session.peer[0] == "::1" and srv4.sessions == []
    else:
        assert len(srv4.messages) == 1
