"""Tests for maddylite.smtp.client against in-process fake SMTP servers on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.ssl
import pytest
from gevent import monkey

from maddylite.smtp.client import (
    MAX_LINE_LENGTH,
    AddressConversionError,
    SMTPConnection,
    canonical_body,
    prepare_body,
    to_ascii_address,
    to_ascii_domain,
)
from maddylite.smtp.errors import (
    NetworkError,
    SMTPError,
    STARTTLSRejected,
    TLSHandshakeError,
)

MX = "mx.example.test."
MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody line\r\n.leading dot\r\n"


def open_session(port: int, *, host: str = "127.0.0.1", command_timeout: float = 2.0,
                 submission_timeout: float = 2.0, ehlo: bool = True) -> SMTPConnection:
    conn = SMTPConnection.connect([host], port, timeout=2.0, remote_server=MX,
                                  command_timeout=command_timeout,
                                  submission_timeout=submission_timeout)
    conn.greet(timeout=2.0)
    if ehlo:
        conn.ehlo("mx.sender.test")
    return conn


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


# --- a normal session ---------------------------------------------------------------------


def test_basic_session_b1(smtp_server: Any) -> None:
    """B-1: EHLO, MAIL, RCPT, DATA, message, dot; then RSET and QUIT."""
    srv = smtp_server()
    conn = open_session(srv.port)
    assert conn.esmtp and conn.supports("pipelining") and conn.supports("8BITMIME")
    assert conn.greeting is not None and conn.greeting.code == 220
    conn.mail("test@example.com")
    conn.rcpt("test@example.test")
    reply = conn.data(MESSAGE)
    assert reply.code == 250 and reply.enhanced == (2, 0, 0) and reply.text == "OK queued"
    conn.rset()
    conn.quit()
    assert conn.closed
    s = srv.session
    assert s.commands == ["EHLO mx.sender.test", "MAIL FROM:<test@example.com>",
                          "RCPT TO:<test@example.test>", "DATA", "RSET", "QUIT"]
    assert s.messages == [MESSAGE]
    assert conn.transactions == 1
    assert conn.remote_address == ("127.0.0.1", srv.port)
    assert conn.local_address[0] == "127.0.0.1" and conn.local_address[1] > 0


def test_null_sender_and_params_b2(smtp_server: Any) -> None:
    """B-2: MAIL FROM:<> is sent as such; ESMTP parameters follow the address."""
    srv = smtp_server()
    conn = open_session(srv.port)
    conn.mail("", {"BODY": "8BITMIME", "SIZE": "123", "SMTPUTF8": None})
    conn.quit()
    assert srv.session.commands[1] == "MAIL FROM:<> BODY=8BITMIME SIZE=123 SMTPUTF8"


def test_last_used_follows_the_clock(smtp_server: Any) -> None:
    """Connection metadata: last_used is the injected clock's value at the last reply."""
    srv = smtp_server()
    now = [100.0]
    conn = SMTPConnection.connect(["127.0.0.1"], srv.port, timeout=2, clock=lambda: now[0])
    assert conn.created == 100.0
    now[0] = 160.0
    conn.greet()
    assert conn.last_used == 160.0
    conn.close()


def test_invalid_arguments_are_not_sent(smtp_server: Any) -> None:
    """A CR/LF in an address or parameter is refused locally (no command injection)."""
    srv = smtp_server()
    conn = open_session(srv.port)
    with pytest.raises(SMTPError) as e:
        conn.mail("a@b.test>\r\nRCPT TO:<x@y.test")
    assert e.value.code == 501 and not e.value.temporary
    with pytest.raises(SMTPError):
        conn.mail("a@b.test", {"SIZE": "1\r\nRSET"})
    conn.quit()
    assert [c.split(" ")[0] for c in srv.session.commands] == ["EHLO", "QUIT"]


# --- EHLO ---------------------------------------------------------------------------------


def test_extensions_parsed_case_insensitively_and_size_b93(smtp_server: Any) -> None:
    """Extension keywords match case-insensitively [RFC 5321 §2.4]; SIZE max parsed (B-93)."""
    srv = smtp_server(extensions=("pipelining", "size 1000", "Auth PLAIN LOGIN", "AUTH=LOGIN"))
    conn = open_session(srv.port)
    assert conn.supports("PIPELINING") and conn.supports("auth")
    assert conn.extensions["AUTH"] == "PLAIN LOGIN"
    assert conn.max_size == 1000
    conn.quit()

    srv2 = smtp_server(extensions=("SIZE",))
    conn = open_session(srv2.port)
    assert conn.max_size == 0
    conn.quit()

    srv3 = smtp_server(extensions=("8BITMIME",))
    conn = open_session(srv3.port)
    assert conn.max_size is None
    conn.quit()


@pytest.mark.parametrize("code", [500, 502], ids=["B-55-500", "B-55-502"])
def test_helo_fallback_b55(smtp_server: Any, code: int) -> None:
    """B-55: EHLO answered 500/502 → HELO; no extensions are known."""
    srv = smtp_server(replies={"EHLO": f"{code} 5.5.1 what?\r\n".encode()})
    conn = open_session(srv.port)
    assert not conn.esmtp and conn.extensions == {}
    assert not conn.supports("STARTTLS") and conn.max_size is None
    conn.quit()
    assert srv.session.commands[:2] == ["EHLO mx.sender.test", "HELO mx.sender.test"]


def test_other_ehlo_error_fails_b55(smtp_server: Any) -> None:
    """B-55: any other EHLO error (550) fails; no HELO is sent."""
    srv = smtp_server(replies={"EHLO": b"550 5.7.1 go away\r\n"})
    with pytest.raises(SMTPError) as e:
        open_session(srv.port)
    assert (e.value.code, e.value.enhanced, e.value.temporary) == (550, (5, 7, 1), False)
    assert e.value.message == "mx.example.test. said: go away"
    assert "HELO" not in " ".join(srv.session.commands)


@pytest.mark.parametrize(("greeting", "code", "temporary"), [
    (b"554 No SMTP service here\r\n", 554, False),
    (b"421 4.3.2 busy\r\n", 421, True),
], ids=["B-18-554", "B-18-421"])
def test_negative_greeting_b18(smtp_server: Any, greeting: bytes, code: int,
                               temporary: bool) -> None:
    """B-18: a 554 or 421 greeting fails with the greeting's code and class."""
    srv = smtp_server(greeting=greeting)
    conn = SMTPConnection.connect(["127.0.0.1"], srv.port, timeout=2, remote_server=MX)
    with pytest.raises(SMTPError) as e:
        conn.greet(timeout=2)
    assert e.value.code == code and e.value.temporary is temporary
    assert e.value.remote_server == MX
    conn.close()


# --- replies and errors -------------------------------------------------------------------


def test_mail_rejected_b19(smtp_server: Any) -> None:
    """B-19: MAIL answered 550 5.1.2 Hey → 550 5.1.2 "mx.example.test. said: Hey" perm."""
    srv = smtp_server(replies={"MAIL": b"550 5.1.2 Hey\r\n"})
    conn = open_session(srv.port)
    with pytest.raises(SMTPError) as e:
        conn.mail("a@example.com")
    assert str(e.value) == "550 5.1.2 mx.example.test. said: Hey"
    assert not e.value.temporary and e.value.remote_server == MX
    assert e.value.fields["command"] == "MAIL"
    assert not conn.broken
    conn.quit()


def test_multiline_error_reply_b97(smtp_server: Any) -> None:
    """B-97: a multi-line error keeps all its lines joined by newlines; the enhanced code
    comes from the start of the first line."""
    srv = smtp_server(rcpt_replies={
        "x@example.test": b"550-5.1.1 first line\r\n550-second line\r\n550 5.1.1 third\r\n"})
    conn = open_session(srv.port)
    conn.mail("a@example.com")
    with pytest.raises(SMTPError) as e:
        conn.rcpt("x@example.test")
    assert e.value.enhanced == (5, 1, 1)
    assert e.value.message == "mx.example.test. said: first line\nsecond line\n5.1.1 third"
    conn.quit()


@pytest.mark.parametrize(("reply", "expected"), [
    (b"550 no such user\r\n", "550 5.0.0 mx.example.test. said: no such user"),
    (b"450 try later\r\n", "450 4.0.0 mx.example.test. said: try later"),
    (b"550 4.1.1 mixed classes\r\n", "550 5.1.1 mx.example.test. said: mixed classes"),
], ids=["B-98-550", "B-98-450", "class-digit-follows-code"])
def test_reply_without_enhanced_code_b98(smtp_server: Any, reply: bytes, expected: str) -> None:
    """B-98: a reply without an enhanced code gets X.0.0 of its class."""
    srv = smtp_server(rcpt_replies={"x@example.test": reply})
    conn = open_session(srv.port)
    conn.mail("a@example.com")
    with pytest.raises(SMTPError) as e:
        conn.rcpt("x@example.test")
    assert str(e.value) == expected
    assert e.value.temporary is expected.startswith("4")
    conn.quit()


def test_rcpt_552_is_temporary_but_dot_552_is_not_b34(smtp_server: Any) -> None:
    """B-34: 552 is rewritten to 452 only for RCPT; a 552 to the final dot stays 552 perm."""
    srv = smtp_server(rcpt_replies={"many@example.test": b"552 5.5.3 Too many recipients\r\n"},
                      replies={"DOT": b"552 5.3.4 Message too big\r\n"})
    conn = open_session(srv.port)
    conn.mail("a@example.com")
    with pytest.raises(SMTPError) as e:
        conn.rcpt("many@example.test")
    assert (e.value.code, e.value.enhanced, e.value.temporary) == (452, (4, 5, 3), True)
    conn.rcpt("ok@example.test")
    with pytest.raises(SMTPError) as e2:
        conn.data(MESSAGE)
    assert str(e2.value) == "552 5.3.4 mx.example.test. said: Message too big"
    assert not e2.value.temporary
    conn.quit()


def test_rcpt_accepts_any_25x_b97(smtp_server: Any) -> None:
    """B-97: RCPT succeeds with 250, 251 or 252."""
    srv = smtp_server(rcpt_replies={"a@example.test": b"251 will forward\r\n",
                                    "b@example.test": b"252 cannot verify\r\n"})
    conn = open_session(srv.port)
    conn.mail("s@example.com")
    assert conn.rcpt("a@example.test").code == 251
    assert conn.rcpt("b@example.test").code == 252
    conn.data(b"x\r\n")
    conn.quit()


def test_data_rejected_before_content_b35(smtp_server: Any) -> None:
    """B-35: DATA answered 550 → error with the server's codes; no content is sent."""
    srv = smtp_server(replies={"DATA": b"554 5.5.1 No valid recipients\r\n"})
    conn = open_session(srv.port)
    conn.mail("s@example.com")
    conn.rcpt("a@example.test")
    with pytest.raises(SMTPError) as e:
        conn.data(MESSAGE)
    assert e.value.code == 554 and not conn.broken
    conn.quit()
    assert srv.session.messages == []


@pytest.mark.parametrize("exts", [("PIPELINING",), ("PIPELINING", "CHUNKING")], ids=["DATA", "BDAT"])
def test_data_needs_an_accepted_recipient_b40(smtp_server: Any, exts: tuple[str, ...]) -> None:
    """B-40/B-95: neither DATA nor BDAT is sent when no RCPT succeeded."""
    srv = smtp_server(extensions=exts, rcpt_replies={"x@example.test": b"550 5.1.1 nope\r\n"})
    conn = open_session(srv.port)
    conn.mail("s@example.com")
    with pytest.raises(SMTPError):
        conn.rcpt("x@example.test")
    with pytest.raises(ValueError):
        conn.send_message(MESSAGE)
    conn.rset()
    conn.quit()
    verbs = [c.split(" ")[0] for c in srv.session.commands]
    assert "DATA" not in verbs and "BDAT" not in verbs


def test_421_marks_the_connection_broken(smtp_server: Any) -> None:
    """A 421 reply means the server closes the channel [RFC 5321 §3.8]."""
    srv = smtp_server(replies={"MAIL": b"421 4.3.2 shutting down\r\n"})
    conn = open_session(srv.port)
    with pytest.raises(SMTPError) as e:
        conn.mail("a@example.com")
    assert e.value.code == 421 and e.value.temporary
    assert conn.broken
    with pytest.raises(NetworkError):
        conn.rset()
    conn.quit()


# --- pipelining ---------------------------------------------------------------------------


def test_round_trips_on_a_reused_pipelining_connection_b95(smtp_server: Any) -> None:
    """B-95, B-59: without CHUNKING a message on a reused connection costs 3 round trips:
    RSET+MAIL+RCPTs in one write, then DATA alone (only once a RCPT is known to have
    succeeded), then the content with the final dot."""
    srv = smtp_server()
    conn = open_session(srv.port)
    mail, rcpts = conn.mail_rcpts("a@example.com", None, ["x@example.test", "y@example.test"])
    assert not isinstance(mail, SMTPError)
    assert all(not isinstance(r, SMTPError) for r in rcpts)
    conn.data(MESSAGE)
    turns_before = len(srv.session.turns)

    mail, rcpts = conn.mail_rcpts("b@example.com", {"SIZE": "10"},
                                  ["x@example.test", "y@example.test"], rset_first=True)
    conn.data(MESSAGE)
    new_turns = srv.session.turns[turns_before:]
    assert new_turns == [["RSET", "MAIL", "RCPT", "RCPT"], ["DATA"], ["<body>"]]
    assert conn.transactions == 2
    conn.quit()
    assert len(srv.sessions) == 1 and srv.session.messages == [MESSAGE, MESSAGE]


def test_pipelined_rcpt_failures_map_per_recipient_b30(smtp_server: Any) -> None:
    """B-30, B-32: replies are mapped in order; a rejected RCPT fails alone."""
    srv = smtp_server(rcpt_replies={"bad@example.test": b"550 5.1.2 Hey\r\n",
                                    "full@example.test": b"452 4.5.3 Too many recipients\r\n"})
    conn = open_session(srv.port)
    mail, rcpts = conn.mail_rcpts("a@example.com", None,
                                  ["bad@example.test", "ok@example.test", "full@example.test"])
    assert not isinstance(mail, SMTPError)
    assert isinstance(rcpts[0], SMTPError) and str(rcpts[0]) == (
        "550 5.1.2 mx.example.test. said: Hey")
    assert not isinstance(rcpts[1], SMTPError)
    assert isinstance(rcpts[2], SMTPError) and rcpts[2].temporary
    conn.data(MESSAGE)
    conn.quit()
    assert srv.session.turns[1] == ["MAIL", "RCPT", "RCPT", "RCPT"]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "serial"])
def test_mail_failure_applies_to_every_recipient_b20(smtp_server: Any, pipelining: bool) -> None:
    """B-20: a MAIL failure is every recipient's result; one MAIL command only."""
    exts = ("PIPELINING",) if pipelining else ("8BITMIME",)
    srv = smtp_server(extensions=exts, replies={"MAIL": b"550 5.1.2 Hey\r\n"})
    conn = open_session(srv.port)
    mail, rcpts = conn.mail_rcpts("a@example.com", None, ["x@example.test", "y@example.test"])
    assert isinstance(mail, SMTPError) and str(mail) == "550 5.1.2 mx.example.test. said: Hey"
    assert rcpts == [mail, mail]
    with pytest.raises(ValueError):
        conn.data(MESSAGE)
    conn.quit()
    assert [c.split(" ")[0] for c in srv.session.commands].count("MAIL") == 1


def test_serial_envelope_without_pipelining_b95(smtp_server: Any) -> None:
    """B-95: without PIPELINING each command waits for its reply."""
    srv = smtp_server(extensions=("8BITMIME",))
    conn = open_session(srv.port)
    conn.mail_rcpts("a@example.com", None, ["x@example.test", "y@example.test"], rset_first=True)
    conn.quit()
    assert srv.session.turns[1:5] == [["RSET"], ["MAIL"], ["RCPT"], ["RCPT"]]


def test_pipelined_rset_failure_raises_b60(smtp_server: Any) -> None:
    """B-60: the RSET before a pooled connection is reused fails → error, connection broken."""
    srv = smtp_server(replies={"RSET": b"421 4.4.2 idle too long\r\n"})
    conn = open_session(srv.port)
    with pytest.raises(SMTPError) as e:
        conn.mail_rcpts("a@example.com", None, ["x@example.test"], rset_first=True)
    assert e.value.code == 421
    assert conn.broken and conn.closed


def test_pipelined_421_on_rcpt_fails_the_rest(smtp_server: Any) -> None:
    """A 421 in the middle of a pipelined batch ends it; unanswered recipients share it."""
    srv = smtp_server(replies={"RCPT": lambda s, line: b"421 4.3.0 bye\r\n" if "b@" in line
                               else None})
    conn = open_session(srv.port)
    mail, rcpts = conn.mail_rcpts("a@example.com", None,
                                  ["a@example.test", "b@example.test", "c@example.test"])
    assert not isinstance(mail, SMTPError)
    assert not isinstance(rcpts[0], SMTPError)
    assert isinstance(rcpts[1], SMTPError) and rcpts[1].code == 421
    assert rcpts[2] is rcpts[1]
    assert conn.broken


def test_locally_invalid_recipient_is_not_sent(smtp_server: Any) -> None:
    """A recipient refused by the local argument check gets its own error; others go on."""
    srv = smtp_server()
    conn = open_session(srv.port)
    mail, rcpts = conn.mail_rcpts("a@example.com", None, ["ok@example.test", "bad\r\n@x"])
    assert not isinstance(mail, SMTPError) and not isinstance(rcpts[0], SMTPError)
    assert isinstance(rcpts[1], SMTPError) and rcpts[1].code == 501
    conn.quit()
    assert srv.session.turns[1] == ["MAIL", "RCPT"]


# --- body encoding ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "wire"), [
    (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
    (b".start\r\nmid\r\n.\r\n..x\n", b"..start\r\nmid\r\n..\r\n...x\r\n.\r\n"),
    (b"bare\rcr\r\n", b"bare\r\ncr\r\n.\r\n"),
    (b"smuggle\n.\r\nMAIL FROM:<x>\r\n", b"smuggle\r\n..\r\nMAIL FROM:<x>\r\n.\r\n"),
    (b"", b".\r\n"),
], ids=["lf", "no-final-eol", "dot-stuffing", "bare-cr", "smuggling", "empty"])
def test_prepare_body(raw: bytes, wire: bytes) -> None:
    """The body is CRLF-normalised and dot-stuffed; the final dot is added."""
    assert prepare_body(raw) == wire


def test_body_round_trip(smtp_server: Any) -> None:
    """The server receives the normalised message, dot-unstuffed, intact."""
    srv = smtp_server()
    conn = open_session(srv.port)
    body = b"line1\n.line2\n..line3\nend"
    conn.mail("a@example.com")
    conn.rcpt("b@example.test")
    conn.data(body)
    conn.quit()
    assert srv.session.messages == [b"line1\r\n.line2\r\n..line3\r\nend\r\n"]


# --- CHUNKING (BDAT) ----------------------------------------------------------------------

CHUNKING = ("PIPELINING", "8BITMIME", "CHUNKING", "SIZE 10240000")


def test_round_trips_with_chunking_b95(smtp_server: Any) -> None:
    """B-95, B-59, B-60: with CHUNKING a message on a reused pipelining connection costs 2
    round trips: the parking RSET (deferred), RSET+MAIL+RCPTs, then BDAT with the content
    in one write, sent only after a RCPT succeeded. DATA is never used."""
    srv = smtp_server(extensions=CHUNKING)
    conn = open_session(srv.port)
    conn.mail_rcpts("a@example.com", None, ["x@example.test"])
    conn.send_message(MESSAGE)
    conn.rset_deferred()
    turns_before = len(srv.session.turns)
    mail, rcpts = conn.mail_rcpts("b@example.com", None, ["x@example.test", "y@example.test"], rset_first=True)
    assert not isinstance(mail, SMTPError) and not any(isinstance(r, SMTPError) for r in rcpts)
    reply = conn.send_message(MESSAGE)
    assert reply.code == 250
    gevent.sleep(0.05)
    turns = srv.session.turns[turns_before:]
    # The parking RSET may arrive in a flight of its own or with MAIL; either way the
    # client waited for no reply between them.
    flat = [v for t in turns for v in t]
    assert flat == ["RSET", "RSET", "MAIL", "RCPT", "RCPT", "BDAT", "<chunk>"]
    assert turns[-1] == ["BDAT", "<chunk>"]
    assert "DATA" not in [c.split(" ")[0] for c in srv.session.commands]
    conn.quit()
    assert srv.session.messages == [MESSAGE, MESSAGE]


@pytest.mark.parametrize(("raw", "wire"), [
    (b"a\nb", b"a\r\nb\r\n"),
    (b".lead\r\n..two\r\n", b".lead\r\n..two\r\n"),
    (b"smuggle\n.\r\nMAIL FROM:<x>\r\n", b"smuggle\r\n.\r\nMAIL FROM:<x>\r\n"),
    (b"bare\rcr", b"bare\r\ncr\r\n"),
    (b"", b""),
], ids=["lf", "dots-untouched", "no-end-marker", "bare-cr", "empty"])
def test_bdat_content_is_canonical_not_dot_stuffed(smtp_server: Any, raw: bytes, wire: bytes) -> None:
    """A BDAT chunk carries the CRLF-normalised message, not dot-stuffed, and the size on the
    BDAT line is exactly the bytes that follow [RFC 3030 §2]."""
    assert canonical_body(raw) == wire
    srv = smtp_server(extensions=CHUNKING)
    conn = open_session(srv.port)
    conn.mail("a@example.com")
    conn.rcpt("b@example.test")
    conn.send_message(raw)
    conn.quit()
    assert srv.session.messages == [wire]
    assert f"BDAT {len(wire)} LAST" in srv.session.commands


def test_bdat_large_message_in_several_writes(smtp_server: Any) -> None:
    """A message larger than one write arrives whole, its size announced once."""
    srv = smtp_server(extensions=CHUNKING)
    conn = open_session(srv.port)
    body = b"".join(b"line %06d " % i + b"x" * 60 + b"\r\n" for i in range(5000))
    conn.mail("a@example.com")
    conn.rcpt("b@example.test")
    conn.send_message(body)
    conn.quit()
    assert srv.session.messages == [body]
    assert [c for c in srv.session.commands if c.startswith("BDAT")] == [f"BDAT {len(body)} LAST"]


@pytest.mark.parametrize(("reply", "code", "temporary"), [
    (b"554 5.6.0 content rejected\r\n", 554, False),
    (b"452 4.3.1 insufficient storage\r\n", 452, True),
])
def test_bdat_rejected_carries_the_servers_codes_b97(smtp_server: Any, reply: bytes, code: int,
                                                    temporary: bool) -> None:
    """B-97: the reply to BDAT LAST is the end-of-data reply; only 250 succeeds."""
    srv = smtp_server(extensions=CHUNKING, replies={"BDAT": reply})
    conn = open_session(srv.port)
    conn.mail("a@example.com")
    conn.rcpt("b@example.test")
    with pytest.raises(SMTPError) as e:
        conn.send_message(MESSAGE)
    assert e.value.code == code and e.value.temporary is temporary
    assert e.value.fields["command"] == "BDAT"
    assert "mx.example.test. said:" in e.value.message
    conn.quit()


def test_send_message_uses_data_without_chunking(smtp_server: Any) -> None:
    """Without CHUNKING the message goes with DATA, dot-stuffed."""
    srv = smtp_server()
    conn = open_session(srv.port)
    conn.mail("a@example.com")
    conn.rcpt("b@example.test")
    conn.send_message(MESSAGE)
    conn.quit()
    assert "DATA" in srv.session.commands
    assert not any(c.startswith("BDAT") for c in srv.session.commands)
    assert srv.session.messages == [MESSAGE]


# --- STARTTLS -----------------------------------------------------------------------------


def stdlib_context(**kw: Any) -> ssl.SSLContext:
    """A plain (non-gevent) ssl.SSLContext, even under monkey-patching."""
    cls = monkey.get_original("ssl", "SSLContext")
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
    if kw.get("cafile"):
        ctx.load_verify_locations(cafile=kw["cafile"])
    return ctx


@pytest.mark.parametrize("flavour", ["gevent", "stdlib"])
def test_starttls_verified_with_custom_ca_b44(smtp_server: Any, pki: Any, flavour: str) -> None:
    """B-44: STARTTLS with a certificate valid for the MX name → verified; SNI is the MX
    name without its trailing dot. B-45: extensions come from the EHLO sent inside TLS."""
    srv = smtp_server(tls_context=pki.server_context(),
                      tls_extensions=("PIPELINING", "REQUIRETLS", "SMTPUTF8"))
    conn = open_session(srv.port)
    assert conn.supports("STARTTLS") and not conn.supports("REQUIRETLS")
    if flavour == "gevent":
        ctx = gevent.ssl.create_default_context(cafile=str(pki.ca))
    else:
        ctx = stdlib_context(cafile=str(pki.ca))
    assert conn.starttls(ctx) is True
    assert conn.tls and conn.tls_verified and conn.tls_version in ("TLSv1.2", "TLSv1.3")
    assert conn.extensions == {}
    conn.ehlo("mx.sender.test")
    assert conn.supports("REQUIRETLS") and conn.supports("SMTPUTF8")
    assert not conn.supports("STARTTLS")
    conn.mail("a@example.com")
    conn.rcpt("b@example.test")
    conn.data(MESSAGE)
    der = conn.peer_certificate_der()
    chain = conn.peer_chain_der()
    conn.quit()
    assert srv.session.sni == "mx.example.test"
    assert srv.session.tls and srv.session.messages == [MESSAGE]
    assert der and chain and chain[0] == der


@pytest.mark.parametrize("case", ["self-signed", "wrong-name"])
def test_verification_failure_has_kind_verify_b47(smtp_server: Any, pki: Any, case: str) -> None:
    """B-47: any certificate verification error is reported with kind "verify"."""
    srv = smtp_server(tls_context=pki.server_context(self_signed=(case == "self-signed")))
    conn = open_session(srv.port)
    ctx = gevent.ssl.create_default_context(cafile=str(pki.ca))
    name = "mx.other.test." if case == "wrong-name" else None
    with pytest.raises(TLSHandshakeError) as e:
        conn.starttls(ctx, name)
    assert e.value.kind == "verify" and e.value.fields["tls_err"]
    assert conn.broken and conn.closed


def test_unverified_retry_reports_not_verified_b47(smtp_server: Any, pki: Any) -> None:
    """B-47: the retry without certificate checking gives TLS that is not verified."""
    srv = smtp_server(tls_context=pki.server_context(self_signed=True))
    conn = open_session(srv.port)
    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    assert conn.starttls(ctx) is False
    assert conn.tls and not conn.tls_verified
    conn.ehlo("mx.sender.test")
    conn.quit()


def test_handshake_failure_has_kind_handshake_b48(smtp_server: Any, pki: Any) -> None:
    """B-48: a handshake failing for another reason (no common version) → kind "handshake"."""
    srv = smtp_server(tls_context=pki.server_context(max_version=ssl.TLSVersion.TLSv1_2))
    conn = open_session(srv.port)
    ctx = gevent.ssl.create_default_context(cafile=str(pki.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises(TLSHandshakeError) as e:
        conn.starttls(ctx)
    assert e.value.kind == "handshake" and conn.closed


def test_handshake_timeout_is_a_handshake_error_b102(raw_server: Any) -> None:
    """B-102: the handshake is bounded by the command timeout."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 hi\r\n")
        sock.recv(100)
        sock.sendall(b"220 go ahead\r\n")
        gevent.sleep(5)

    port = raw_server(handler)
    conn = open_session(port, command_timeout=0.3, ehlo=False)
    start = time.monotonic()
    with pytest.raises(TLSHandshakeError) as e:
        conn.starttls(gevent.ssl.create_default_context())
    assert e.value.kind == "handshake" and elapsed_since(start) < 2


def test_starttls_rejected_b50(smtp_server: Any, pki: Any) -> None:
    """B-50: STARTTLS answered 454 → STARTTLSRejected with the server's codes (temp)."""
    srv = smtp_server(tls_context=pki.server_context(),
                      replies={"STARTTLS": b"454 4.7.0 TLS not available\r\n"})
    conn = open_session(srv.port)
    with pytest.raises(STARTTLSRejected) as e:
        conn.starttls(gevent.ssl.create_default_context(cafile=str(pki.ca)))
    assert e.value.kind == "rejected"
    assert str(e.value) == "454 4.7.0 mx.example.test. said: TLS not available"
    assert e.value.temporary and not conn.broken
    conn.quit()


def test_data_injected_before_handshake_is_refused(raw_server: Any) -> None:
    """Bytes sent along with the 220 to STARTTLS are not carried into TLS."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 hi\r\n")
        sock.recv(100)
        sock.sendall(b"220 go ahead\r\n250 injected\r\n")
        gevent.sleep(1)

    conn = open_session(raw_server(handler), ehlo=False)
    with pytest.raises(NetworkError):
        conn.starttls(gevent.ssl.create_default_context())
    assert conn.broken


# --- hostile servers ----------------------------------------------------------------------


@pytest.mark.parametrize("greeting", [
    b"hello there\r\n",
    b"999 weird code\r\n",
    b"22O not digits\r\n",
    b"220x no separator\r\n",
    b"220-first\r\n250 second code differs\r\n",
    b"250 not a greeting\r\n",
], ids=["garbage", "invalid-code", "letter-in-code", "bad-separator", "inconsistent-codes",
        "positive-non-220"])
def test_garbage_replies_are_network_errors(raw_server: Any, greeting: bytes) -> None:
    """Malformed replies are protocol errors: 450 4.4.2 Network I/O error, connection closed."""
    def handler(sock: Any) -> None:
        sock.sendall(greeting)
        gevent.sleep(1)

    conn = SMTPConnection.connect(["127.0.0.1"], raw_server(handler), timeout=2)
    with pytest.raises(NetworkError) as e:
        conn.greet(timeout=2)
    assert str(e.value) == "450 4.4.2 Network I/O error" and e.value.temporary
    assert conn.broken and conn.closed


def test_reply_line_longer_than_2000_bytes_b99(raw_server: Any) -> None:
    """B-99: a reply line over 2000 bytes → 450 4.4.2, connection closed; 2000 is fine."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 hi\r\n")
        sock.recv(100)
        sock.sendall(b"250-" + b"x" * (MAX_LINE_LENGTH - 4) + b"\r\n")  # exactly 2000
        sock.sendall(b"250 " + b"y" * 5000 + b"\r\n")
        gevent.sleep(1)

    conn = open_session(raw_server(handler), ehlo=False)
    start = time.monotonic()
    with pytest.raises(NetworkError) as e:
        conn.ehlo("mx.sender.test")
    assert "too long" in e.value.reason and conn.closed
    assert elapsed_since(start) < 1


def test_long_line_without_newline_b99(raw_server: Any) -> None:
    """B-99: an endless line without a line end stops at the limit, not at the timeout."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 " + b"z" * 10000)
        gevent.sleep(2)

    conn = SMTPConnection.connect(["127.0.0.1"], raw_server(handler), timeout=2)
    start = time.monotonic()
    with pytest.raises(NetworkError):
        conn.greet(timeout=1.5)
    assert elapsed_since(start) < 1


def test_endless_multiline_reply(raw_server: Any) -> None:
    """An endless multi-line reply is capped and ends in a clean Network I/O error."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 hi\r\n")
        sock.recv(100)
        while True:
            sock.sendall(b"250-more and more\r\n" * 100)

    conn = open_session(raw_server(handler), ehlo=False, command_timeout=3)
    start = time.monotonic()
    with pytest.raises(NetworkError) as e:
        conn.ehlo("mx.sender.test")
    assert "too long" in e.value.reason
    assert elapsed_since(start) < 1


def test_reply_split_across_packets(raw_server: Any) -> None:
    """Replies arriving a few bytes at a time are reassembled."""
    def dribble(sock: Any, data: bytes) -> None:
        for i in range(0, len(data), 3):
            sock.sendall(data[i : i + 3])
            gevent.sleep(0.002)

    def handler(sock: Any) -> None:
        dribble(sock, b"220 mx ESMTP\r\n")
        sock.recv(100)
        dribble(sock, b"250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n")
        sock.recv(100)
        dribble(sock, b"550-5.1.1 split\n550 reply\r\n")
        gevent.sleep(1)

    conn = open_session(raw_server(handler))
    assert conn.supports("PIPELINING") and conn.max_size == 100
    with pytest.raises(SMTPError) as e:
        conn.mail("a@example.com")
    assert e.value.enhanced == (5, 1, 1) and e.value.message.endswith("split\nreply")


def test_greeting_never_comes_b101(raw_server: Any) -> None:
    """B-101: a server that never greets → 450 4.4.2 after the greeting wait."""
    def handler(sock: Any) -> None:
        gevent.sleep(5)

    conn = SMTPConnection.connect(["127.0.0.1"], raw_server(handler), timeout=2)
    start = time.monotonic()
    with pytest.raises(NetworkError) as e:
        conn.greet(timeout=0.3)
    assert 0.25 < elapsed_since(start) < 1.5
    assert "timeout" in e.value.reason


def test_rcpt_reply_slower_than_command_timeout_b102(smtp_server: Any) -> None:
    """B-102: a RCPT reply slower than command_timeout → 450 4.4.2; the connection is dead."""
    def slow(_s: Any, _line: str) -> bytes:
        gevent.sleep(2)
        return b"250 ok\r\n"

    srv = smtp_server(replies={"RCPT": slow})
    conn = open_session(srv.port, command_timeout=0.3)
    conn.mail("a@example.com")
    with pytest.raises(NetworkError) as e:
        conn.rcpt("b@example.test")
    assert e.value.code == 450 and e.value.enhanced == (4, 4, 2)
    assert conn.broken and conn.closed
    with pytest.raises(NetworkError):
        conn.rcpt("c@example.test")


def test_reset_mid_data(raw_server: Any) -> None:
    """A connection reset while the body is sent ends in 450 4.4.2 (B-62)."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 hi\r\n")
        for reply in (b"250 hi\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            sock.recv(4096)
            sock.sendall(reply)
        sock.recv(1000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    conn = open_session(raw_server(handler))
    conn.mail("a@example.com")
    conn.rcpt("b@example.test")
    start = time.monotonic()
    with pytest.raises(NetworkError):
        conn.data(b"x" * 2_000_000)
    assert conn.broken and elapsed_since(start) < 1.5


def test_server_stops_reading_during_body_b104(raw_server: Any) -> None:
    """B-104: a server that stops reading cannot hang the delivery: each body write is
    bounded by command_timeout."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 hi\r\n")
        for reply in (b"250 hi\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            sock.recv(4096)
            sock.sendall(reply)
        gevent.sleep(10)

    conn = open_session(raw_server(handler), command_timeout=0.3, submission_timeout=10)
    conn.mail("a@example.com")
    conn.rcpt("b@example.test")
    start = time.monotonic()
    with pytest.raises(NetworkError) as e:
        conn.data(b"y" * 16 * 1024 * 1024)
    assert "timeout writing body" in e.value.reason
    assert elapsed_since(start) < 5


@pytest.mark.parametrize("verb", ["DOT", "BDAT"])
def test_no_reply_to_the_final_dot_b103(smtp_server: Any, verb: str) -> None:
    """B-103: the reply to the final dot (or to BDAT LAST) is bounded by submission_timeout
    → 450 4.4.2."""
    def stall(_s: Any, _line: str) -> bytes:
        gevent.sleep(3)
        return b"250 late\r\n"

    exts = ("PIPELINING", "CHUNKING") if verb == "BDAT" else ("PIPELINING",)
    srv = smtp_server(extensions=exts, replies={verb: stall})
    conn = open_session(srv.port, command_timeout=2, submission_timeout=0.3)
    conn.mail("a@example.com")
    conn.rcpt("b@example.test")
    start = time.monotonic()
    with pytest.raises(NetworkError):
        conn.send_message(MESSAGE)
    assert 0.25 < elapsed_since(start) < 1.5
    assert conn.broken


def test_connection_closed_by_server_b63(smtp_server: Any, smtp_close: object) -> None:
    """B-63: the server dropping the connection during MAIL → 450 4.4.2; RSET fails too."""
    srv = smtp_server(replies={"MAIL": smtp_close})
    conn = open_session(srv.port)
    with pytest.raises(NetworkError) as e:
        conn.mail("a@example.com")
    assert "closed" in e.value.reason
    with pytest.raises(NetworkError):
        conn.rset()


# --- QUIT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", ["421", "reset", "silent"])
def test_quit_never_raises_b106(raw_server: Any, recording_logger: Any, behaviour: str) -> None:
    """B-106, B-70: QUIT waits at most its timeout; a 421, a reset or silence is logged at
    debug level only."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 hi\r\n")
        sock.recv(100)
        if behaviour == "421":
            sock.sendall(b"421 4.3.0 bye\r\n")
        elif behaviour == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return
        gevent.sleep(3)

    conn = SMTPConnection.connect(["127.0.0.1"], raw_server(handler), timeout=2,
                                  logger=recording_logger)
    conn.greet()
    start = time.monotonic()
    conn.quit(timeout=0.3)
    assert conn.closed and elapsed_since(start) < 1
    conn.quit()  # idempotent
    assert recording_logger.lines
    assert {level for level, _, _ in recording_logger.lines} == {"debug"}


def test_quit_is_one_bound_with_a_reply_owed_b106(raw_server: Any) -> None:
    """B-106: a parked connection owes the reply to its deferred RSET. A server that answers
    it late and then keeps silent to QUIT holds quit() for its timeout once in all, not
    once per reply."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 hi\r\n")
        sock.recv(100)
        sock.sendall(b"250-mx\r\n250 8BITMIME\r\n")  # no PIPELINING: owed replies are read before QUIT
        sock.recv(100)  # the deferred RSET
        gevent.sleep(0.3)
        sock.sendall(b"250 2.0.0 ok\r\n")
        gevent.sleep(3)

    conn = open_session(raw_server(handler))
    conn.rset_deferred()
    start = time.monotonic()
    conn.quit(timeout=0.4)
    assert conn.closed and elapsed_since(start) < 0.6


# --- connecting ---------------------------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[Any]:
    """blackhole(host, port) makes connects to host:port hang: a listener whose accept
    queue is full drops further SYNs."""
    held: list[socket.socket] = []

    def make(host: str, port: int = 0) -> int:
        lst = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        lst.bind((host, port))
        lst.listen(0)
        bound = lst.getsockname()[1]
        filler = socket.socket(lst.family)
        filler.settimeout(1)
        filler.connect((host, bound))
        held.extend([lst, filler])
        return int(bound)

    yield make
    for s in held:
        s.close()


def test_connection_refused_b16(free_port: int) -> None:
    """B-16: nothing listening → 450 4.4.2 Network I/O error, at once."""
    start = time.monotonic()
    with pytest.raises(NetworkError) as e:
        SMTPConnection.connect(["127.0.0.1"], free_port, timeout=2, remote_server=MX)
    assert e.value.temporary and e.value.remote_server == MX
    assert "refused" in e.value.reason.lower()
    assert elapsed_since(start) < 1


def test_connect_timeout_bounds_all_addresses_b100(blackhole: Any) -> None:
    """B-100: a blackholed MX fails after about connect_timeout, all addresses together."""
    port = blackhole("127.0.0.1")
    blackhole("127.0.0.2", port)
    start = time.monotonic()
    with pytest.raises(NetworkError) as e:
        SMTPConnection.connect(["127.0.0.1", "127.0.0.2"], port, timeout=0.5, stagger=0.1)
    assert 0.45 < elapsed_since(start) < 1.2
    assert "timeout" in e.value.reason


def test_staggered_fallback_to_the_next_address_b111(smtp_server: Any, blackhole: Any) -> None:
    """B-111: while the first address hangs, the next starts after `stagger` and wins."""
    srv = smtp_server()
    blackhole("127.0.0.2", srv.port)
    start = time.monotonic()
    conn = SMTPConnection.connect(["127.0.0.2", "127.0.0.1"], srv.port, timeout=3,
                                  stagger=0.1)
    took = elapsed_since(start)
    assert 0.08 < took < 1
    assert conn.remote_address == ("127.0.0.1", srv.port)
    conn.greet()
    conn.quit()


def test_failed_attempt_starts_the_next_at_once_b111(smtp_server: Any) -> None:
    """B-111: a refused address does not wait for the stagger delay."""
    srv = smtp_server()
    start = time.monotonic()
    conn = SMTPConnection.connect(["127.0.0.3", "127.0.0.1"], srv.port, timeout=3, stagger=2)
    assert elapsed_since(start) < 1
    conn.close()


def test_dual_stack_interleaves_families_b111(smtp_server: Any) -> None:
    """B-111: an IPv6 address that is refused falls back to IPv4 quickly."""
    srv = smtp_server()
    conn = SMTPConnection.connect(["::1", "127.0.0.1"], srv.port, timeout=3, stagger=2)
    assert conn.remote_address[0] == "127.0.0.1"
    conn.close()


def test_local_ip_family_mismatch_b109(smtp_server: Any) -> None:
    """B-109: local_ip IPv4 and an IPv6-only MX → no suitable address, 450 4.4.2."""
    srv = smtp_server()
    with pytest.raises(NetworkError) as e:
        SMTPConnection.connect(["::1"], srv.port, timeout=2, local_ip="127.0.0.1")
    assert "no suitable address" in e.value.reason
    assert srv.sessions == []


def test_local_ip_is_the_source_address_b108(smtp_server: Any) -> None:
    """B-108: local_ip binds the source address; other families are skipped."""
    srv = smtp_server()
    conn = SMTPConnection.connect(["::1", "127.0.0.1"], srv.port, timeout=2,
                                  local_ip="127.0.0.5")
    conn.greet()
    assert conn.local_address[0] == "127.0.0.5"
    conn.quit()
    assert srv.session.peer[0] == "127.0.0.5"


def test_losing_attempts_are_closed_b111(smtp_server: Any, blackhole: Any) -> None:
    """B-111: attempts still connecting when another wins are stopped and their sockets
    closed; only the winner's socket stays open."""
    srv = smtp_server()
    blackhole("127.0.0.2", srv.port)
    blackhole("127.0.0.3", srv.port)
    before = len(os.listdir("/proc/self/fd"))
    conn = SMTPConnection.connect(["127.0.0.2", "127.0.0.3", "127.0.0.1"], srv.port,
                                  timeout=3, stagger=0.05)
    assert conn.remote_address[0] == "127.0.0.1"
    gevent.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) - before <= 2  # our socket (+ the server's side)
    conn.close()


# --- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(("addr", "expected"), [
    ("test@example.org", "test@example.org"),
    ("", ""),
    ("test@тест.example.org", "test@xn--e1aybc.example.org"),
    ("test@тест.example.invalid", "test@xn--e1aybc.example.invalid"),
    ('"we@ird"@тест.org', '"we@ird"@xn--e1aybc.org'),
], ids=["ascii", "null", "B-86", "B-87", "quoted-local"])
def test_to_ascii_address(addr: str, expected: str) -> None:
    """B-86, B-87: the domain of a non-ASCII address is converted to A-labels."""
    assert to_ascii_address(addr) == expected


@pytest.mark.parametrize("addr", ["тест@example.org", "тест"], ids=["B-88", "no-domain"])
def test_to_ascii_address_refuses_utf8_local_part(addr: str) -> None:
    """B-88, B-89: a non-ASCII local part cannot be converted."""
    with pytest.raises(AddressConversionError):
        to_ascii_address(addr)


def test_to_ascii_domain() -> None:
    """Domains are converted to A-labels; an unconvertible name raises (B-107)."""
    assert to_ascii_domain("тест.example") == "xn--e1aybc.example"
    assert to_ascii_domain("Example.ORG") == "Example.ORG"
    with pytest.raises(AddressConversionError):
        to_ascii_domain("т" * 80 + ".example")


def test_utf8_addresses_are_sent_unchanged_b85(smtp_server: Any) -> None:
    """B-85: with SMTPUTF8 the addresses go out as UTF-8, unchanged."""
    srv = smtp_server(extensions=("SMTPUTF8", "8BITMIME"))
    conn = open_session(srv.port)
    conn.mail("тест@example.org", {"SMTPUTF8": None})
    conn.rcpt("test@тест.org")
    conn.quit()
    assert srv.session.commands[1:3] == ["MAIL FROM:<тест@example.org> SMTPUTF8",
                                         "RCPT TO:<test@тест.org>"]


def test_single_address_connects_without_a_greenlet_b111(smtp_server: Any, free_port: int,
                                                         greenlet_starts: list[str]) -> None:
    """B-111: with one address there is no race to run, so the connection is made in the
    caller's greenlet (a greenlet per connection costs memory with many in flight); the
    errors are the same as with several addresses."""
    started = greenlet_starts
    srv = smtp_server()
    conn = open_session(srv.port)
    conn.quit()
    assert started == []
    with pytest.raises(NetworkError) as e:
        SMTPConnection.connect(["127.0.0.1"], free_port, timeout=2.0, remote_server=MX)
    assert e.value.fields["reason"] == f"connect 127.0.0.1 port {free_port}: Connection refused"
    assert e.value.temporary and started == []
    # several addresses race, each attempt in a greenlet of its own (the count works)
    SMTPConnection.connect(["127.0.0.1", "127.0.0.2"], srv.port, timeout=2.0, remote_server=MX).close()
    assert started == ["smtp-dial 127.0.0.1"]


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_the_content_reply_is_awaited_alone_b62(raw_server: Any, chunking: bool) -> None:
    """B-62: nothing follows the content until its reply is in. The server here answers a
    command that arrives after the content at once and the content 0.2 s later (smtp-sink
    does that when it delays the final reply), so a RSET pipelined after the content would
    have had its 250 taken for the message's: the 554 must be the result."""
    got: list[bytes] = []

    def handler(sock: Any) -> None:
        sock.sendall(b"220 mx\r\n")
        sock.recv(4096)
        exts = b"250-mx\r\n250-PIPELINING\r\n" + (b"250-CHUNKING\r\n" if chunking else b"") + b"250 8BITMIME\r\n"
        sock.sendall(exts)
        sock.recv(4096)  # MAIL, RCPT
        sock.sendall(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
        if not chunking:
            sock.recv(4096)  # DATA
            sock.sendall(b"354 go\r\n")
        end = b"\r\n" if chunking else b"\r\n.\r\n"
        buf = b""
        while not buf.endswith(end) and b"RSET" not in buf.rpartition(end)[2]:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
        got.append(buf)
        if b"RSET" in buf.rpartition(end)[2]:
            sock.sendall(b"250 2.0.0 reset\r\n")  # the later command answered first
        gevent.sleep(0.2)
        sock.sendall(b"554 5.6.0 rejected\r\n")
        gevent.sleep(1)

    conn = open_session(raw_server(handler))
    conn.mail_rcpts("a@example.com", None, ["b@example.test"])
    with pytest.raises(SMTPError) as e:
        conn.send_message(MESSAGE)
    assert e.value.code == 554 and not e.value.temporary
    assert got and b"RSET" not in got[0]
    conn.close()


def test_buffered_one_line_replies_parse_like_the_slow_path(raw_server: Any) -> None:
    """Replies that arrive together are taken from the buffer one by one with the same
    codes, enhanced codes and texts as replies read line by line."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 hi\r\n")
        sock.recv(4096)
        sock.sendall(b"250 hi\r\n")
        sock.recv(4096)
        sock.sendall(b"250 2.1.0 sender ok\r\n550 no such user\r\n452 4.5.3 too many\r\n251 2.1.5 forwarded\r\n")
        sock.recv(4096)

    conn = open_session(raw_server(handler))
    conn.extensions["PIPELINING"] = ""
    mail, rcpts = conn.mail_rcpts("a@example.com", None, ["x@example.test", "y@example.test", "z@example.test"])
    assert (mail.code, mail.enhanced, mail.text) == (250, (2, 1, 0), "sender ok")
    assert isinstance(rcpts[0], SMTPError) and (rcpts[0].code, rcpts[0].enhanced) == (550, (5, 0, 0))
    assert "no such user" in rcpts[0].message
    assert isinstance(rcpts[1], SMTPError) and (rcpts[1].code, rcpts[1].enhanced) == (452, (4, 5, 3))
    assert not isinstance(rcpts[2], SMTPError) and rcpts[2].code == 251 and rcpts[2].text == "forwarded"
    conn.close()


class ChunkSocket:
    """ChunkSocket hands out the given chunks, one per recv; sends are recorded. Sends
    take at most *send_max* bytes each, as a full socket buffer would."""

    def __init__(self, chunks: list[bytes], send_max: int | None = None) -> None:
        self.chunks = list(chunks)
        self.sent: list[bytes] = []
        self.send_max = send_max
        self.timeouts: list[float | None] = []

    def settimeout(self, t: float | None) -> None:
        self.timeouts.append(t)

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def send(self, data: Any) -> int:
        data = bytes(data)[: self.send_max]
        self.sent.append(data)
        return len(data)

    def sendall(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 1025)

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.2", 25)

    def close(self) -> None:
        pass


REPLY_LINES = [
    b"250 2.0.0 Ok", b"250 2.0.0", b"250 2.0.0x", b"250 2.0.0  two spaces", b"550 5.7.1 Blocked: spam",
    b"451 4.3.0", b"250 9.9.9 not an enhanced class", b"250 2.1234.0 subject too long", b"250 2.0",
    b"354 2.0.0 start mail input", b"354 End data with <CR><LF>.<CR><LF>", b"250 ", b"250",
    b"250 \xc3\xa9t\xc3\xa9 UTF-8", b"250 bad \xff byte", b"221 2.0.0 Bye", b"250 5.1.1 class differs",
    b"250 2.0.0\tOk",
]


@pytest.mark.parametrize("line", REPLY_LINES)
@pytest.mark.parametrize("end", [b"\r\n", b"\n"])
def test_reply_taken_whole_from_the_buffer_equals_the_line_by_line_reading_b97_b98(line: bytes, end: bytes) -> None:
    """B-97, B-98: a one-line reply that arrives whole (parsed by the fast path, and the
    second time taken from the shared table of parsed replies) has the code, enhanced code
    and text of the same reply arriving in two pieces (read line by line)."""
    whole = SMTPConnection(ChunkSocket([line + end, line + end]), remote_server=MX)
    split = SMTPConnection(ChunkSocket([line[:2], line[2:] + end]), remote_server=MX)
    slow = split._read_reply(1.0, "test")
    first, again = whole._read_reply(1.0, "test"), whole._read_reply(1.0, "test")
    assert first == slow and again == slow
    assert slow.code == int(line[:3])


def test_a_partial_send_is_completed_with_sendall() -> None:
    """A write the socket takes only in part is finished by sendall, in order."""
    sock = ChunkSocket([b"250 2.1.0 Ok\r\n"], send_max=4)
    conn = SMTPConnection(sock, remote_server=MX)
    conn.extensions["PIPELINING"] = ""
    conn.mail_rcpts("a@example.com", None, [])
    assert sock.sent == [b"MAIL", b" FROM:<a@example.com>\r\n"]


def test_one_bound_covers_a_whole_reply_however_slowly_it_drips_b102(raw_server: Any) -> None:
    """B-102: the command timeout bounds the whole reply, not each read: a server that
    sends one more line of a multi-line reply every 0.1 s is cut off at the bound."""
    def handler(sock: Any) -> None:
        sock.sendall(b"220 mx\r\n")
        sock.recv(4096)
        sock.sendall(b"250 mx\r\n")
        sock.recv(4096)
        for _ in range(100):
            sock.sendall(b"250-still going\r\n")
            gevent.sleep(0.1)

    conn = open_session(raw_server(handler), command_timeout=0.35)
    start = time.monotonic()
    with pytest.raises(NetworkError) as e:
        conn.mail("a@example.com")
    assert "timeout" in e.value.reason and e.value.temporary
    assert 0.3 < elapsed_since(start) < 1.0


def test_a_bound_ends_with_its_wait_b102(smtp_server: Any) -> None:
    """B-102: the bound of a command that was answered in time ends with it: the
    connection can stay idle longer than the command timeout and be used again."""
    srv = smtp_server()
    conn = open_session(srv.port, command_timeout=0.2)
    conn.mail("a@example.com")
    conn.rset()
    gevent.sleep(0.5)
    assert conn.mail("b@example.com").code == 250
    conn.quit()


def _scripted(replies: list[bytes], exts: bytes, seen: list[bytes]) -> Any:
    """_scripted is a handler: greeting, EHLO with ``exts``, then one reply (or None: none)
    per read of the client's data; what the client sent is kept in ``seen``."""

    def handler(sock: Any) -> None:
        sock.sendall(b"220 mx\r\n")
        sock.recv(4096)
        sock.sendall(b"250-mx\r\n" + exts + b"250 8BITMIME\r\n")
        for reply in replies:
            data = sock.recv(65536)
            if not data:
                return
            seen.append(data)
            if reply:
                sock.sendall(reply)
        gevent.sleep(1)

    return handler


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_a_reply_nobody_asked_for_is_not_taken_for_the_messages_b99(raw_server: Any, chunking: bool) -> None:
    """B-99: the server sends one reply too many with the envelope's. Read after the
    content, it would be taken for the message's (here the message is refused): the
    connection fails as a protocol error, 450 4.4.2, before the content is sent."""
    exts = b"250-PIPELINING\r\n" + (b"250-CHUNKING\r\n" if chunking else b"")
    seen: list[bytes] = []
    replies = [b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 unasked\r\n"]
    replies += [b"554 5.6.0 rejected\r\n"] if chunking else [b"354 go\r\n", b"554 5.6.0 rejected\r\n"]
    conn = open_session(raw_server(_scripted(replies, exts, seen)))
    mail, rcpts = conn.mail_rcpts("a@example.com", None, ["b@example.test"])
    assert mail.code == 250 and rcpts[0].code == 250
    with pytest.raises(NetworkError) as e:
        conn.send_message(MESSAGE)
    assert (e.value.code, e.value.enhanced, e.value.temporary) == (450, (4, 4, 2), True)
    assert conn.broken and not any(b"Subject" in s for s in seen)


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_a_positive_reply_other_than_250_to_mail_is_a_protocol_error_b97_b99(raw_server: Any,
                                                                            pipelining: bool) -> None:
    """B-97/B-99: MAIL needs 250; a 251 (or any other positive reply) is a protocol error,
    450 4.4.2 temporary, the same with and without PIPELINING."""
    exts = b"250-PIPELINING\r\n" if pipelining else b""
    replies = [b"251 2.1.0 odd\r\n250 2.1.5 ok\r\n"] if pipelining else [b"251 2.1.0 odd\r\n"]
    conn = open_session(raw_server(_scripted(replies, exts, [])))
    with pytest.raises(NetworkError) as e:
        conn.mail_rcpts("a@example.com", None, ["b@example.test"])
    assert (e.value.code, e.value.enhanced, e.value.temporary) == (450, (4, 4, 2), True)
    assert conn.broken


def test_a_size_that_is_not_ascii_digits_is_no_maximum_b93(raw_server: Any) -> None:
    """B-93: ``SIZE ²`` (a digit to str.isdigit, not to int) or ``SIZE ١٢٣`` is no fixed
    maximum (0), not a crash and not 123."""
    for param in ("²", "١٢٣"):
        conn = open_session(raw_server(_scripted([], f"250-SIZE {param}\r\n".encode(), [])))
        assert conn.max_size == 0
        conn.close()
