"""target.remote: STARTTLS and its fallback ladder, REQUIRETLS and `TLS-Required: No`
(behaviour.md B.3, B.5, B.6).

MTA-STS and DANE are stood in for by the policy stubs of conftest.py (``rh.sts_stub``,
``rh.dane_ee_stub``), which raise the errors of C-12; the real policies have their own
tests. The `dnssec` and `local_policy` policies are the real ones.
"""

import ssl
import warnings

import pytest

from maddylite.interfaces import MsgMetadata

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    TLS11 = ssl.TLSVersion.TLSv1_1
LOCAL_POLICY = "mx_auth {{\n local_policy {{\n {} \n}}\n}}"


def tls_mx(w, kind="valid", ip="127.0.0.1", **kw):
    """tls_mx starts an MX offering STARTTLS with a certificate of the given kind."""
    return w.mx(ip, tls=w.pki.ctx(kind), **kw)


def test_starttls_authenticated_B_44(std_world, rh):
    """B-44: STARTTLS with SNI = the MX host name (not the recipient domain), EHLO again;
    TLS level authenticated."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w)
    t = w.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    s = srv.session
    assert len(srv.sessions) == 1 and s.tls and s.sni == "mx.example.test"
    assert s.verbs[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"]
    assert d.describe("test@example.test")["tls_level"] == "authenticated"
    assert len(s.delivered) == 1


def test_extensions_after_tls_only_B_45(std_world, rh):
    """B-45: only the extensions of the EHLO reply inside TLS count."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, extensions=("PIPELINING", "SIZE 10"), tls_extensions=("SMTPUTF8", "8BITMIME"))
    t = w.target()
    meta = MsgMetadata(id="m", smtputf8=True, size=100)
    _, res = rh.deliver(t, ["test@example.test"], meta=meta)
    assert res == {"test@example.test": None}
    assert srv.mail_lines == ["MAIL FROM:<test@example.com> SMTPUTF8"]


def test_extensions_before_tls_forgotten_B_45(std_world, rh):
    """B-45: an extension advertised only before TLS is not used after it."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, extensions=("SMTPUTF8", "SIZE 10"), tls_extensions=("8BITMIME",))
    t = w.target()
    meta = MsgMetadata(id="m", smtputf8=True, size=100)
    _, res = rh.deliver(t, ["test@example.test"], meta=meta, sender="test@тест.example.org")
    assert res == {"test@example.test": None}
    assert srv.mail_lines == ["MAIL FROM:<test@xn--e1aybc.example.org>"]


def test_no_starttls_plaintext_B_46(std_world, rh):
    """B-46: no STARTTLS advertised → plaintext, TLS level none, delivered."""
    srv = std_world.servers[0]
    t = std_world.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert "STARTTLS" not in srv.session.verbs and not srv.session.tls
    assert d.describe("test@example.test")["tls_level"] == "none"


@pytest.mark.parametrize("kind", ["self_signed", "wrong_name", "expired"])
def test_verify_error_retries_unverified_B_47(std_world, rh, kind):
    """B-47: a certificate verification error → log, close without QUIT, new connection with
    unverified STARTTLS → TLS level encrypted, delivered over TLS."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, kind)
    t = w.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.sessions) == 2
    first, second = srv.sessions
    rh.wait_for(lambda: first.ended)
    assert first.commands == ["EHLO mx.sender.test", "STARTTLS"] and not first.quit
    assert second.tls and second.verbs[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"]
    assert len(second.delivered) == 1
    assert d.describe("test@example.test")["tls_level"] == "encrypted"
    (log,) = w.logs("TLS verify error, trying without authentication")
    assert (log["remote_server"], log["domain"]) == ("mx.example.test.", "example.test")


def test_handshake_error_plaintext_B_48(std_world, rh):
    """B-48: a handshake failure other than verification (no common protocol version) →
    log, close, new connection without STARTTLS → TLS level none, delivered."""
    w = std_world
    w.servers[0].stop()
    srv = w.mx("127.0.0.1", tls=w.pki.ctx("valid", max_version=TLS11))
    t = w.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.sessions) == 2
    assert srv.sessions[0].verbs == ["EHLO", "STARTTLS"] and srv.sessions[0].tls_error
    assert "STARTTLS" not in srv.sessions[1].verbs and len(srv.sessions[1].delivered) == 1
    assert d.describe("test@example.test")["tls_level"] == "none"
    (log,) = w.logs("TLS error, trying plaintext")
    assert (log["remote_server"], log["domain"]) == ("mx.example.test.", "example.test")


def test_three_connections_worst_case_B_49(std_world, rh):
    """B-49: verification error → unverified retry → handshake error → plaintext: three
    TCP connections, each stage logged, no loop."""
    w = std_world
    w.servers[0].stop()
    ctx = w.pki.ctx("self_signed")
    srv = w.mx("127.0.0.1", tls=lambda s: ctx if s.index == 0 else None)
    t = w.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.sessions) == 3
    assert [s.verbs[:2] for s in srv.sessions[:2]] == [["EHLO", "STARTTLS"]] * 2
    assert "STARTTLS" not in srv.sessions[2].verbs and len(srv.sessions[2].delivered) == 1
    assert d.describe("test@example.test")["tls_level"] == "none"
    assert len(w.logs("TLS verify error, trying without authentication")) == 1
    assert len(w.logs("TLS error, trying plaintext")) == 1


def test_second_stage_ehlo_rejected_plaintext_B_49(std_world, rh):
    """B-49: any error on the second stage (here EHLO rejected inside TLS) drops to plaintext."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, "self_signed", replies={
        "EHLO": lambda s, _l: b"554 5.7.0 Not today\r\n" if s.tls and s.index == 1 else None})
    t = w.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.sessions) == 3 and not srv.sessions[2].tls
    assert d.describe("test@example.test")["tls_level"] == "none"


def test_second_stage_starttls_454_plaintext_B_49(std_world, rh):
    """B-49 over B-50: a 454 to STARTTLS on the unverified stage is an error of that stage,
    so it drops to plaintext; B-50's "no fallback" is the first stage's rule."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, "self_signed", replies={
        "STARTTLS": lambda s, _l: b"454 4.7.0 TLS not available\r\n" if s.index == 1 else None})
    t = w.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.sessions) == 3 and not srv.sessions[2].tls and len(srv.sessions[2].delivered) == 1
    assert d.describe("test@example.test")["tls_level"] == "none"


@pytest.mark.parametrize("reply", [b"454 4.7.0 TLS not available\r\n", "drop"], ids=["454", "drop"])
def test_starttls_rejected_next_mx_B_50(mxworld, rh, reply):
    """B-50: STARTTLS answered 454 (or the connection drops) → no fallback; the MX fails and
    the next MX is tried."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.1"), (20, "mx2.example.test", "127.0.0.2"))
    mx1 = tls_mx(w, replies={"STARTTLS": rh.CLOSE if reply == "drop" else reply})
    mx2 = w.mx("127.0.0.2")
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(mx1.sessions) == 1 and mx1.mail_lines == []
    assert len(mx2.messages) == 1
    (log,) = w.logs("cannot use MX")
    expected = ("454 4.7.0 mx1.example.test. said: TLS not available" if reply != "drop"
                else "450 4.4.2 Network I/O error")
    assert log["reason"] == expected


def test_starttls_454_is_temporary_B_50(std_world, rh):
    """B-50: the 454 is temporary: the recipient gets 451 4.4.0 with its text."""
    w = std_world
    w.servers[0].stop()
    tls_mx(w, replies={"STARTTLS": b"454 4.7.0 TLS not available\r\n"})
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 451, "4.4.0",
                  "No usable MXs, last err: mx.example.test. said: TLS not available", True)


@pytest.mark.parametrize("reply", [b"554 5.7.0 Not today\r\n", b"421 4.7.0 Not today\r\n"], ids=["554", "421"])
def test_ehlo_in_tls_rejected_plaintext_B_51(std_world, rh, reply):
    """B-51: TLS succeeds but EHLO inside TLS is rejected → plaintext fallback as in B-48,
    on a new connection. A 421 is a rejection like any other (the server answered, then
    closed), not a failed MX."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, replies={"EHLO": lambda s, _l: reply if s.tls else None})
    t = w.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.sessions) == 2 and srv.sessions[0].tls and not srv.sessions[1].tls
    assert "STARTTLS" not in srv.sessions[1].verbs and len(srv.sessions[1].delivered) == 1
    assert d.describe("test@example.test")["tls_level"] == "none"
    assert len(w.logs("TLS error, trying plaintext")) == 1


def test_min_tls_encrypted_handshake_impossible_B_52(std_world, rh):
    """B-52: min_tls_level encrypted, handshake impossible → plaintext, then the policy
    refuses: 451 4.4.0 "No usable MXs, last err: TLS is not available or unauthenticated
    but required"; MAIL not issued."""
    w = std_world
    w.servers[0].stop()
    srv = w.mx("127.0.0.1", tls=w.pki.ctx("valid", max_version=TLS11))
    t = w.target(LOCAL_POLICY.format("min_tls_level encrypted"))
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 451, "4.4.0",
                  "No usable MXs, last err: TLS is not available or unauthenticated but required", True)
    assert srv.mail_lines == []
    rh.wait_for(lambda: srv.session.ended)
    assert srv.session.quit


def test_min_tls_encrypted_no_starttls_B_53(std_world, rh):
    """B-53: min_tls_level encrypted, no STARTTLS → same 451 4.7.1 per MX; MAIL not issued."""
    srv = std_world.servers[0]
    t = std_world.target(LOCAL_POLICY.format("min_tls_level encrypted"))
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 451, "4.4.0",
                  "No usable MXs, last err: TLS is not available or unauthenticated but required", True)
    assert srv.mail_lines == []
    (log,) = std_world.logs("cannot use MX")
    assert log["reason"] == "451 4.7.1 TLS is not available or unauthenticated but required"


@pytest.mark.parametrize("kind", ["valid", "self_signed"])
def test_min_tls_encrypted_working_starttls_B_54(std_world, rh, kind):
    """B-54: min_tls_level encrypted and working STARTTLS → delivered."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, kind)
    t = w.target(LOCAL_POLICY.format("min_tls_level encrypted"))
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.messages) == 1


@pytest.mark.parametrize("code", [500, 502])
def test_ehlo_unsupported_helo_B_55(std_world, rh, code):
    """B-55: EHLO answered 500/502 → HELO; no extensions known: no STARTTLS, SMTPUTF8, SIZE."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, extensions=("SMTPUTF8", "SIZE 1000000", "8BITMIME"),
                 replies={"EHLO": f"{code} 5.5.1 What\r\n".encode()})
    t = w.target()
    meta = MsgMetadata(id="m", smtputf8=True, size=100)
    d, res = rh.deliver(t, ["test@example.test"], meta=meta)
    assert res == {"test@example.test": None}
    assert srv.session.commands[:3] == ["EHLO mx.sender.test", "HELO mx.sender.test",
                                        "MAIL FROM:<test@example.com>"]
    assert "STARTTLS" not in srv.session.verbs
    assert d.describe("test@example.test")["tls_level"] == "none"


def test_ehlo_other_error_fails_mx_B_55(std_world, rh):
    """B-55: any other EHLO error (550) fails the MX; no HELO."""
    srv = std_world.servers[0]
    srv.replies["EHLO"] = b"550 5.7.1 Go away\r\n"
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 550, "5.4.0",
                  "No usable MXs, last err: mx.example.test. said: Go away", False)
    assert srv.session.verbs == ["EHLO"]


def test_root_ca_defines_trust_B_57(std_world, rh):
    """B-57: without `root_ca` the test CA is not trusted (system store): the ladder's
    verification step fails and the session is only encrypted."""
    w = std_world
    w.servers[0].stop()
    tls_mx(w)
    t = w.target(root_ca=False)
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert d.describe("test@example.test")["tls_level"] == "encrypted"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("protocols,level,version", [
    ("", "none", None),
    ("protocols tls1.0 tls1.3", "authenticated", "TLSv1.1"),
], ids=["default_tls12_tls13", "widened"])
def test_protocols_B_57(std_world, rh, protocols, level, version):
    """B-57: `protocols` limits the TLS versions (default tls1.2 tls1.3); widening it lets a
    TLS 1.1-only server negotiate TLS."""
    w = std_world
    w.servers[0].stop()
    srv = w.mx("127.0.0.1", tls=w.pki.ctx("valid", max_version=TLS11))
    t = w.target(f"tls_client {{\n root_ca {w.pki.ca}\n {protocols}\n}}", root_ca=False)
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert d.describe("test@example.test")["tls_level"] == level
    assert srv.sessions[-1].tls_version == version


def test_client_certificate_B_57(std_world, rh):
    """B-57: `cert`/`key` are presented when the server asks for a client certificate."""
    w = std_world
    w.servers[0].stop()
    srv = w.mx("127.0.0.1", tls=w.pki.ctx("valid", ask_client_cert=True))
    cert, key = w.pki.certs["client"]
    t = w.target(f"tls_client {{\n root_ca {w.pki.ca}\n cert {cert}\n key {key}\n}}", root_ca=False)
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    subject = dict(x[0] for x in srv.session.client_cert["subject"])
    assert subject["commonName"] == "client.sender.test"


def test_mx_check_fails_before_connecting_B_58(mxworld, rh):
    """B-58: a failing MX check (min_mx_level) opens no TCP connection; MAIL never sent."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.1"), (20, "mx2.example.test", "127.0.0.2"))
    mx1, mx2 = w.mx("127.0.0.1"), w.mx("127.0.0.2")
    t = w.target(LOCAL_POLICY.format("min_mx_level mtasts"))
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 451, "4.4.0",
                  "No usable MXs, last err: Failed to establish the MX record authenticity", True)
    assert mx1.sessions == [] and mx2.sessions == []
    assert len(w.logs("cannot use MX")) == 2


def test_mtasts_mismatch_skips_mx_without_connection_B_58(mxworld, rh):
    """B-58: an MX refused by an MX check (MTA-STS mismatch) gets no connection; the next
    MX is tried."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.1"), (20, "mx2.example.test", "127.0.0.2"))
    mx1 = tls_mx(w)
    mx2 = tls_mx(w, ip="127.0.0.2")
    t = w.target()
    t.mx_auth = rh.StubGroup(rh.sts_stub("enforce", mx=("mx2.example.test",)))
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert mx1.sessions == [] and len(mx2.messages) == 1


def test_tls_check_fails_after_connecting_B_58(mxworld, rh):
    """B-58: a failing connection check (min_tls_level authenticated, self-signed) sends
    QUIT and closes; MAIL never sent there; the next MX is used."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.1"), (20, "mx2.example.test", "127.0.0.2"))
    mx1 = tls_mx(w, "self_signed")
    mx2 = tls_mx(w, ip="127.0.0.2")
    t = w.target(LOCAL_POLICY.format("min_tls_level authenticated"))
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    rh.wait_for(lambda: mx1.session.ended)
    assert mx1.mail_lines == [] and mx1.session.quit
    assert len(mx2.messages) == 1


# --- REQUIRETLS (B.5) -------------------------------------------------------------------------


def rtls_meta(**kw):
    """rtls_meta is a message received with REQUIRETLS."""
    return MsgMetadata(id="r", requiretls=True, **kw)


def test_requiretls_delivered_B_71(std_world, rh):
    """B-71: REQUIRETLS advertised, valid certificate, MTA-STS (testing) match → MAIL carries
    REQUIRETLS."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, tls_extensions=("PIPELINING", "REQUIRETLS"))
    t = w.target()
    t.mx_auth = rh.StubGroup(rh.sts_stub("testing"))
    d, res = rh.deliver(t, ["test@example.test"], meta=rtls_meta())
    assert res == {"test@example.test": None}
    assert srv.mail_lines == ["MAIL FROM:<test@example.com> REQUIRETLS"]
    assert d.describe("test@example.test") == {"mx": "mx.example.test.", "tls_level": "authenticated",
                                               "mx_level": "mtasts"}


def test_strict_requiretls_not_advertised_B_72(std_world, rh):
    """B-72: relaxed_requiretls no, REQUIRETLS not advertised → 550 5.7.30; MAIL not issued."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w)
    t = w.target("relaxed_requiretls no")
    t.mx_auth = rh.StubGroup(rh.sts_stub("testing"))
    _, res = rh.deliver(t, ["test@example.test"], meta=rtls_meta())
    rh.assert_err(res["test@example.test"], 550, "5.7.30", "Recipient server does not support REQUIRETLS", False)
    assert srv.mail_lines == []
    rh.wait_for(lambda: srv.session.ended)
    assert srv.session.quit


def test_relaxed_requiretls_per_domain_B_73(std_world, rh):
    """B-73: relaxed mode: domain 1 (no REQUIRETLS) is delivered without the parameter; domain
    2 of the same message still gets the full conditions, a fresh connection (its pooled
    one is passed over) and MAIL ... REQUIRETLS; the message keeps its flag."""
    w = std_world
    w.servers[0].stop()
    s1 = tls_mx(w)
    w.domain("example2.test", (10, "mx.example2.test", "127.0.0.2"))
    s2 = tls_mx(w, ip="127.0.0.2", tls_extensions=("PIPELINING", "REQUIRETLS"))
    t = w.target()
    t.mx_auth = rh.StubGroup(rh.sts_stub("testing", mx=("mx.example.test", "mx.example2.test")))
    rh.deliver(t, ["warmup@example2.test"])
    assert t.pool.count() == 1
    meta = rtls_meta()
    _, res = rh.deliver(t, ["test@example.test", "test@example2.test"], meta=meta)
    assert res == {"test@example.test": None, "test@example2.test": None}
    assert s1.mail_lines == ["MAIL FROM:<test@example.com>"]
    assert len(s2.sessions) == 2
    assert s2.sessions[1].mail_lines == ["MAIL FROM:<test@example.com> REQUIRETLS"]
    assert meta.requiretls


@pytest.mark.parametrize("mx_auth", ["", "mx_auth {\n dnssec\n}"], ids=["no_mx_auth", "unsigned_mx"])
def test_requiretls_needs_mx_authentication_B_74(std_world, rh, mx_auth):
    """B-74: no MTA-STS policy and an unsigned MX answer (or no mx_auth at all) → 550 5.7.30;
    MAIL not issued."""
    w = std_world
    w.servers[0].stop()
    srv = tls_mx(w, tls_extensions=("REQUIRETLS",))
    t = w.target(mx_auth)
    _, res = rh.deliver(t, ["test@example.test"], meta=rtls_meta())
    rh.assert_err(res["test@example.test"], 550, "5.7.30",
                  "Failed to establish the MX record authenticity (REQUIRETLS)", False)
    assert srv.mail_lines == []


def test_requiretls_no_starttls_B_75(std_world, rh):
    """B-75: server without STARTTLS → 550 5.7.30 "TLS is not available or unauthenticated
    but required (REQUIRETLS)"; MAIL not issued."""
    srv = std_world.servers[0]
    t = std_world.target()
    t.mx_auth = rh.StubGroup(rh.sts_stub("testing"))
    _, res = rh.deliver(t, ["test@example.test"], meta=rtls_meta())
    rh.assert_err(res["test@example.test"], 550, "5.7.30",
                  "TLS is not available or unauthenticated but required (REQUIRETLS)", False)
    assert srv.mail_lines == []
    rh.wait_for(lambda: srv.session.ended)
    assert srv.session.quit


def test_requiretls_handshake_fails_B_76(std_world, rh):
    """B-76: the handshake fails → plaintext → the same 550 5.7.30; MAIL not issued."""
    w = std_world
    w.servers[0].stop()
    srv = w.mx("127.0.0.1", tls=w.pki.ctx("valid", max_version=TLS11))
    t = w.target()
    t.mx_auth = rh.StubGroup(rh.sts_stub("testing"))
    _, res = rh.deliver(t, ["test@example.test"], meta=rtls_meta())
    rh.assert_err(res["test@example.test"], 550, "5.7.30",
                  "TLS is not available or unauthenticated but required (REQUIRETLS)", False)
    assert srv.mail_lines == [] and len(srv.sessions) == 2


def test_requiretls_dane_and_dnssec_B_78(std_world, rh):
    """B-78: certificate not PKIX-valid but matched by DANE-EE, MX answer DNSSEC-signed →
    TLS authenticated (DANE), MX level dnssec → delivered with REQUIRETLS."""
    w = std_world
    w.servers[0].stop()
    w.dns.ad.add("example.test.")
    srv = tls_mx(w, "self_signed", tls_extensions=("REQUIRETLS",))
    t = w.target("mx_auth {\n dnssec\n}")
    t.mx_auth = rh.StubGroup(rh.dane_ee_stub(w.pki.spki_sha256["self_signed"]), *t.mx_auth.policies())
    d, res = rh.deliver(t, ["test@example.test"], meta=rtls_meta())
    assert res == {"test@example.test": None}
    assert srv.mail_lines == ["MAIL FROM:<test@example.com> REQUIRETLS"]
    assert d.describe("test@example.test")["tls_level"] == "authenticated"
    assert d.describe("test@example.test")["mx_level"] == "dnssec"


# --- TLS-Required: No (B.6) -------------------------------------------------------------------


def test_tls_required_no_skips_policies_B_81(std_world, rh):
    """B-81: `TLS-Required: No` with requiretls_override yes → no mx_auth policy applies:
    MTA-STS enforce + local_policy authenticated, MX without STARTTLS → plaintext delivery;
    the connection is closed with QUIT afterwards, not pooled (B-66)."""
    w = std_world
    srv = w.servers[0]
    t = w.target(LOCAL_POLICY.format("min_tls_level authenticated"))
    sts = rh.sts_stub("enforce")
    t.mx_auth = rh.StubGroup(sts, *t.mx_auth.policies())
    _, res = rh.deliver(t, ["test@example.test"], meta=MsgMetadata(id="n", tls_required_no=True))
    assert res == {"test@example.test": None}
    assert len(srv.messages) == 1 and sts.started == 0
    rh.wait_for(lambda: srv.session.ended)
    assert srv.session.quit and t.pool.count() == 0


def test_tls_required_no_ignored_with_requiretls(std_world, rh):
    """B-81 with REQUIRETLS: `TLS-Required: No` is ignored when the message carries REQUIRETLS."""
    srv = std_world.servers[0]
    t = std_world.target()
    sts = rh.sts_stub("enforce")
    t.mx_auth = rh.StubGroup(sts)
    meta = MsgMetadata(id="n", tls_required_no=True, requiretls=True)
    _, res = rh.deliver(t, ["test@example.test"], meta=meta)
    assert sts.started == 1
    rh.assert_err(res["test@example.test"], 451, "4.4.0",
                  "No usable MXs, last err: TLS is required but unavailable or failed (MTA-STS)", True)
    assert srv.mail_lines == []


def test_requiretls_override_no_B_82(std_world, rh):
    """B-82: requiretls_override no → the header field is ignored; MTA-STS enforce refuses the
    plaintext MX: 451 4.4.0 "No usable MXs, last err: TLS is required but unavailable or
    failed (MTA-STS)"."""
    srv = std_world.servers[0]
    t = std_world.target("requiretls_override no")
    t.mx_auth = rh.StubGroup(rh.sts_stub("enforce"))
    _, res = rh.deliver(t, ["test@example.test"], meta=MsgMetadata(id="n", tls_required_no=True))
    rh.assert_err(res["test@example.test"], 451, "4.4.0",
                  "No usable MXs, last err: TLS is required but unavailable or failed (MTA-STS)", True)
    assert srv.mail_lines == []
    (log,) = std_world.logs("cannot use MX")
    assert log["reason"] == "451 4.7.1 TLS is required but unavailable or failed (MTA-STS)"


def test_no_mx_auth_means_no_policy_lookups_C_8(std_world, rh):
    """C-8: without mx_auth there is no MTA-STS TXT lookup and no TLSA lookup; plaintext is fine."""
    w = std_world
    t = w.target()
    assert t.mx_auth is None
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    kinds = {q[1] for q in w.dns.queries}
    assert "TXT" not in kinds and "TLSA" not in kinds


def test_policy_failure_logs_levels_C_13(std_world, rh):
    """C-13: a policy failure is logged with remote_server, domain and the required and reached levels."""
    w = std_world
    t = w.target("mx_auth {\n local_policy {\n  min_mx_level dnssec\n }\n}")
    _, res = rh.deliver(t, ["test@example.test"])
    assert res["test@example.test"].code == 451
    (rec,) = w.logs("cannot use MX")
    assert rec["remote_server"] == "mx.example.test." and rec["domain"] == "example.test"
    assert rec["mx_level"] == "none" and rec["required_mx_level"] == "dnssec"
