"""target.remote: recipients, MX selection and DNS errors (behaviour.md B.1 and the result
rules of section B).

The fakes (DNS server, MXes, PKI) are in conftest.py; ``rh`` carries its helpers.
"""

import pytest
from maddylite.modules.target.remote import RemoteTarget

from maddylite import dns as mdns
from maddylite.interfaces import MsgMetadata
from maddylite.smtp.errors import SMTPError


def test_basic_delivery_B_1(std_world, rh):
    """B-1: EHLO, MAIL, RCPT, DATA; then RSET and idle; QUIT at stop; nothing left open."""
    assert RemoteTarget.smtp_port == 25
    w = std_world
    srv = w.servers[0]
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    rh.wait_for(lambda: srv.session.verbs[-1:] == ["RSET"])
    s = srv.session
    assert len(srv.sessions) == 1
    assert s.peer[0] == "127.0.0.1"
    assert s.commands == ["EHLO mx.sender.test", "MAIL FROM:<test@example.com>",
                          "RCPT TO:<test@example.test>", "DATA", "<body>", "RSET"]
    assert s.delivered[0]["data"] == rh.HEADER + b"\r\n" + rh.BODY
    assert not s.ended and t.pool.count() == 1
    t.stop(1)
    rh.wait_for(lambda: s.ended)
    assert s.commands[-1] == "QUIT" and s.quit
    assert t.pool.count() == 0


def test_null_reverse_path_B_2(std_world, rh):
    """B-2: the null sender gives MAIL FROM:<>."""
    srv = std_world.servers[0]
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test"], sender="")
    assert res == {"test@example.test": None}
    assert srv.mail_lines == ["MAIL FROM:<>"]
    assert len(srv.messages) == 1


def test_mx_order_B_3(mxworld, rh):
    """B-3: MX 10 mx2 (down) is tried before MX 20 mx1 (up); `cannot use MX` is logged."""
    w = mxworld
    w.domain("example.test", (20, "mx1.example.test", "127.0.0.1"), (10, "mx2.example.test", "127.0.0.2"))
    srv = w.mx("127.0.0.1")
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.messages) == 1
    addr_q = [q[0] for q in w.dns.queries if q[1] == "A"]
    assert addr_q.index("mx2.example.test.") < addr_q.index("mx1.example.test.")
    logs = w.logs("cannot use MX")
    assert [(r["remote_server"], r["domain"]) for r in logs] == [("mx2.example.test.", "example.test")]


def test_implicit_mx_B_5(mxworld, rh):
    """B-5: NOERROR without MX records → the domain itself is the MX (preference 0)."""
    w = mxworld
    w.host("example.test", "127.0.0.1")
    srv = w.mx("127.0.0.1")
    t = w.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.messages) == 1
    assert d.describe("test@example.test")["mx"] == "example.test."


def test_no_mx_no_address_B_6(mxworld, rh):
    """B-6: the name exists without MX or address → 550 5.4.0, no connection."""
    w = mxworld
    w.dns.add("example.test", "TXT", '"hello"')
    srv = w.mx("127.0.0.1")
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 550, "5.4.0", "No usable MXs, last err: DNS error", False)
    assert srv.sessions == []


@pytest.mark.parametrize("records", [
    ["0 ."],
    ["10 .", "5 mx.example.test."],
    ["0 mx.example.test.", "20 ."],
], ids=["only", "with_lower_pref_mx", "with_higher_pref_mx"])
def test_null_mx_B_7(mxworld, rh, records):
    """B-7: any `.` exchange → 556 5.1.10 null MX, whatever else; no connection."""
    w = mxworld
    w.dns.add("example.test", "MX", *records)
    w.host("mx.example.test", "127.0.0.1")
    srv = w.mx("127.0.0.1")
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 556, "5.1.10", "Domain does not accept email (null MX)", False)
    assert srv.sessions == []


def test_mx_nxdomain_B_9(mxworld, rh):
    """B-9: NXDOMAIN for the MX query → 554 5.4.4 perm with the rcode in `reason`."""
    w = mxworld
    srv = w.mx("127.0.0.1")
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    err = res["test@example.test"]
    rh.assert_err(err, 554, "5.4.4", "MX lookup error", False)
    assert err.fields["reason"] == "dns: rcode NXDOMAIN when looking up example.test."
    assert srv.sessions == []


@pytest.mark.parametrize("rcode", ["SERVFAIL", "REFUSED", "NOTIMP", "FORMERR"])
def test_mx_servfail_B_10(mxworld, rh, rcode):
    """B-10: SERVFAIL (and every other failure rcode) → 451 4.4.4 temp; no connection."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "127.0.0.1"))
    w.dns.set_rcode("example.test", rcode)
    srv = w.mx("127.0.0.1")
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 451, "4.4.4", "MX lookup error", True)
    assert srv.sessions == []


def test_resolver_timeout_B_11(mxworld, rh):
    """B-11: no resolver answers → 451 4.4.4 temp."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "127.0.0.1"))
    w.dns.set_rcode("example.test", "DROP")
    srv = w.mx("127.0.0.1")
    t = w.target(resolver=w.resolver(timeout=0.2))
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 451, "4.4.4", "MX lookup error", True)
    assert srv.sessions == []


def test_cname_domain_B_13(mxworld, rh):
    """B-13: the domain is a CNAME to a name with MX records → those MX records are used."""
    w = mxworld
    w.dns.cname("example.test", "alias.example2.test")
    w.domain("alias.example2.test", (10, "mx.example2.test", "127.0.0.2"))
    srv = w.mx("127.0.0.2")
    t = w.target()
    d, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.messages) == 1
    assert d.describe("test@example.test")["mx"] == "mx.example2.test."


def test_several_nameservers_first_noerror_wins_B_14(mxworld, rh):
    """B-14: nameservers are tried in order until one answers NOERROR."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "127.0.0.1"))
    srv = w.mx("127.0.0.1")
    bad = w.extra_dns_server()
    bad.set_rcode("example.test", "SERVFAIL")
    bad.set_rcode("mx.example.test", "SERVFAIL")
    t = w.target(resolver=w.resolver(servers=[bad, w.dns]))
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.messages) == 1
    assert ("example.test.", "MX") in bad.queries and ("example.test.", "MX") in w.dns.queries


@pytest.mark.parametrize("first,second,expected", [
    ("NXDOMAIN", "SERVFAIL", (451, "4.4.4", True)),
    ("SERVFAIL", "NXDOMAIN", (554, "5.4.4", False)),
    ("NXDOMAIN", "DROP", (451, "4.4.4", True)),
])
def test_several_nameservers_last_error_decides_B_14(mxworld, rh, first, second, expected):
    """B-14: when no nameserver answers NOERROR, the last error decides (B-9, B-10, B-11)."""
    w = mxworld
    ns1, ns2 = w.extra_dns_server(), w.extra_dns_server()
    ns1.set_rcode("example.test", first)
    ns2.set_rcode("example.test", second)
    t = w.target(resolver=w.resolver(timeout=0.2, servers=[ns1, ns2]))
    _, res = rh.deliver(t, ["test@example.test"])
    code, enh, temp = expected
    rh.assert_err(res["test@example.test"], code, enh, "MX lookup error", temp)


def test_mx_host_nxdomain_next_mx_B_15(mxworld, rh):
    """B-15: an MX host without address fails 550 5.4.4 "DNS error"; the next MX is used."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", None), (20, "mx2.example.test", "127.0.0.2"))
    srv = w.mx("127.0.0.2")
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(srv.messages) == 1
    (log,) = w.logs("cannot use MX")
    assert log["remote_server"] == "mx1.example.test." and log["reason"] == "550 5.4.4 DNS error"


def test_mx_host_nxdomain_last_mx_B_15(mxworld, rh):
    """B-15: the last MX without address → 550 5.4.0 "No usable MXs, last err: DNS error"."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", None))
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 550, "5.4.0", "No usable MXs, last err: DNS error", False)


def test_two_mxs_refused_B_16(mxworld, rh):
    """B-16: connection refused on both MXs → 451 4.4.0 ... Network I/O error, temp."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.2"), (20, "mx2.example.test", "127.0.0.3"))
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 451, "4.4.0", "No usable MXs, last err: Network I/O error", True)
    logs = w.logs("cannot use MX")
    assert [r["reason"] for r in logs] == ["450 4.4.2 Network I/O error"] * 2


@pytest.mark.parametrize("greeting,per_mx", [
    (b"554 No SMTP service here\r\n", "554 5.0.0 mx1.example.test. said: No SMTP service here"),
    (b"421 4.3.2 Busy\r\n", "421 4.3.2 mx1.example.test. said: Busy"),
], ids=["554", "421"])
def test_negative_greeting_next_mx_B_18(mxworld, rh, greeting, per_mx):
    """B-18: MX1's 554 or 421 greeting fails it with its code and class; MX2 delivers."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.1"), (20, "mx2.example.test", "127.0.0.2"))
    mx1 = w.mx("127.0.0.1", greeting=greeting)
    mx2 = w.mx("127.0.0.2")
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    assert res == {"test@example.test": None}
    assert len(mx1.sessions) == 1 and mx1.mail_lines == []
    assert len(mx2.messages) == 1
    (log,) = w.logs("cannot use MX")
    assert log["reason"] == per_mx


@pytest.mark.parametrize("greeting,expected", [
    (b"554 No SMTP service here\r\n",
     (550, "5.4.0", "No usable MXs, last err: mx.example.test. said: No SMTP service here", False)),
    (b"421 4.3.2 Busy\r\n", (451, "4.4.0", "No usable MXs, last err: mx.example.test. said: Busy", True)),
], ids=["554", "421"])
def test_negative_greeting_class_B_18(std_world, rh, greeting, expected):
    """B-18: the greeting's class decides the recipient's class when it was the only MX."""
    std_world.servers[0].greeting = greeting
    t = std_world.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], *expected)


def test_mail_rejected_no_other_mx_B_19(mxworld, rh):
    """B-19: MAIL answered 550 5.1.2 → "<mx>. said: Hey" perm; QUIT; no other MX tried."""
    w = mxworld
    w.domain("example.test", (10, "mx.example.test", "127.0.0.1"), (20, "mx2.example.test", "127.0.0.2"))
    mx1 = w.mx("127.0.0.1", replies={"MAIL": b"550 5.1.2 Hey\r\n"})
    mx2 = w.mx("127.0.0.2")
    t = w.target()
    _, res = rh.deliver(t, ["test@example.test"])
    rh.assert_err(res["test@example.test"], 550, "5.1.2", "mx.example.test. said: Hey", False)
    rh.wait_for(lambda: mx1.session.ended)
    verbs = mx1.session.verbs
    assert len(mx1.sessions) == 1 and verbs.count("MAIL") == 1 and verbs[-1] == "QUIT"
    assert "DATA" not in verbs
    assert mx2.sessions == []


@pytest.mark.parametrize("batch", [False, True], ids=["add_rcpt", "add_rcpts"])
def test_mail_failure_applies_to_whole_domain_B_20(std_world, rh, batch):
    """B-20: two recipients, MAIL fails → both get the same error; one connection, one MAIL."""
    srv = std_world.servers[0]
    srv.replies["MAIL"] = b"550 5.1.2 Hey\r\n"
    t = std_world.target()
    rcpts = ["test@example.test", "test2@example.test"]
    if batch:
        d = t.start_delivery(MsgMetadata(id="m"), "test@example.com")
        res = d.add_rcpts(rcpts)
        d.abort()
    else:
        _, res = rh.deliver(t, rcpts)
    for r in rcpts:
        rh.assert_err(res[r], 550, "5.1.2", "mx.example.test. said: Hey", False)
    assert len(srv.sessions) == 1
    assert len(srv.mail_lines) == 1 and "DATA" not in srv.session.verbs


@pytest.mark.parametrize("rcpt", ["postmaster", "Postmaster", "POSTMASTER"])
def test_postmaster_without_domain_B_21(std_world, rh, rcpt):
    """B-21: `postmaster` without domain → 550 5.1.1; no DNS lookup."""
    t = std_world.target()
    _, res = rh.deliver(t, [rcpt])
    rh.assert_err(res[rcpt], 550, "5.1.1", "<postmaster> address is not supported", False)
    assert std_world.dns.queries == []
    assert std_world.servers[0].sessions == []


def test_ip_literal_B_22(std_world, rh):
    """B-22: `user@[192.0.2.1]` → 550 5.1.1; no connection (and no DNS)."""
    t = std_world.target()
    _, res = rh.deliver(t, ["user@[192.0.2.1]"])
    rh.assert_err(res["user@[192.0.2.1]"], 550, "5.1.1", "IP address literals are not supported", False)
    assert std_world.servers[0].sessions == []
    assert std_world.dns.queries == []


def test_quarantined_before_rcpts_B_23(std_world, rh):
    """B-23: quarantined before the recipients → 550 5.7.0 for each; no DNS, no connection."""
    t = std_world.target()
    meta = MsgMetadata(id="q", quarantine=True)
    _, res = rh.deliver(t, ["test@example.test", "b@example2.test"], meta=meta, body=None, finish="abort")
    for r in res.values():
        rh.assert_err(r, 550, "5.7.0", "Refusing to deliver a quarantined message", False)
    assert std_world.dns.queries == []
    assert std_world.servers[0].sessions == []


@pytest.mark.parametrize("atomic", [False, True], ids=["body_per_rcpt", "body"])
def test_quarantined_after_rcpts_B_23(std_world, rh, atomic):
    """B-23: flag set after the recipients → the body step fails them with 550 5.7.0; no DATA."""
    srv = std_world.servers[0]
    t = std_world.target()
    meta = MsgMetadata(id="q")
    d = t.start_delivery(meta, "test@example.com")
    d.add_rcpt("test@example.test")
    meta.quarantine = True
    if atomic:
        with pytest.raises(SMTPError) as ei:
            d.body(rh.HEADER, rh.BODY)
        err = ei.value
    else:
        err = d.body_per_rcpt(rh.HEADER, rh.BODY)["test@example.test"]
    d.abort()
    rh.assert_err(err, 550, "5.7.0", "Refusing to deliver quarantined message", False)
    assert "DATA" not in srv.session.verbs


def test_malformed_sender_B_24(std_world, rh):
    """B-24: a sender without `@` (not postmaster) cannot start: 501 5.1.8 perm."""
    t = std_world.target()
    with pytest.raises(SMTPError) as ei:
        t.start_delivery(MsgMetadata(id="m"), "foo")
    rh.assert_err(ei.value, 501, "5.1.8", "Malformed sender address", False)
    for ok in ("postmaster", "Postmaster", ""):
        t.start_delivery(MsgMetadata(id="m"), ok).abort()


def test_malformed_recipient_B_25(std_world, rh):
    """B-25: a recipient without `@` → 501 5.1.3 perm; no DNS lookup."""
    t = std_world.target()
    _, res = rh.deliver(t, ["foo"])
    rh.assert_err(res["foo"], 501, "5.1.3", "Malformed recipient address", False)
    assert std_world.dns.queries == []


def test_domain_grouping_normalised_B_26(std_world, rh):
    """B-26: a@Example.TEST and b@example.test share one connection and one transaction;
    results are keyed by the addresses as passed; the pool key is the normalised domain."""
    srv = std_world.servers[0]
    t = std_world.target()
    _, res = rh.deliver(t, ["a@Example.TEST", "b@example.test"])
    assert res == {"a@Example.TEST": None, "b@example.test": None}
    assert len(srv.sessions) == 1 and len(srv.messages) == 1
    assert srv.messages[0]["rcpts"] == ["a@Example.TEST", "b@example.test"]
    _, res = rh.deliver(t, ["c@EXAMPLE.test"])
    assert res == {"c@EXAMPLE.test": None}
    assert len(srv.sessions) == 1 and len(srv.messages) == 2


def test_results_cover_current_transaction_only(std_world, rh):
    """Result rules: per-recipient results name only this delivery's recipients, as passed."""
    srv = std_world.servers[0]
    srv.rcpt_replies["bad@example.test"] = b"550 5.1.1 No such user\r\n"
    t = std_world.target()
    rh.deliver(t, ["one@example.test"])
    d = t.start_delivery(MsgMetadata(id="m2"), "test@example.com")
    d.add_rcpt("Two@Example.test")
    with pytest.raises(SMTPError) as ei:
        d.add_rcpt("bad@example.test")
    rh.assert_err(ei.value, 550, "5.1.1", "mx.example.test. said: No such user", False)
    assert dict(d.body_per_rcpt(rh.HEADER, rh.BODY)) == {"Two@Example.test": None}
    d.commit()
    assert len(srv.sessions) == 1


def test_temp_failure_wins_over_requiretls_rejection(mxworld, rh):
    """Result rules: one MX failed temporarily, another was refused by the REQUIRETLS
    conditions → 451 4.4.0 with the last MX's message."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.2"), (20, "mx2.example.test", "127.0.0.1"))
    srv = w.mx("127.0.0.1")
    t = w.target()
    t.mx_auth = rh.StubGroup(rh.sts_stub("testing", mx=("mx1.example.test", "mx2.example.test")))
    _, res = rh.deliver(t, ["test@example.test"], meta=MsgMetadata(id="r", requiretls=True))
    rh.assert_err(res["test@example.test"], 451, "4.4.0",
                  "No usable MXs, last err: TLS is not available or unauthenticated but required (REQUIRETLS)",
                  True)
    assert srv.mail_lines == []


def test_requiretls_rejection_wins_over_permanent_failures(mxworld, rh):
    """Result rules: no temporary failure, the message carries REQUIRETLS and an MX was
    refused by the REQUIRETLS conditions → 550 5.7.30 with that rejection's message."""
    w = mxworld
    w.domain("example.test", (10, "mx1.example.test", "127.0.0.1"), (20, "mx2.example.test", None))
    srv = w.mx("127.0.0.1")
    t = w.target()
    t.mx_auth = rh.StubGroup(rh.sts_stub("testing", mx=("mx1.example.test", "mx2.example.test")))
    _, res = rh.deliver(t, ["test@example.test"], meta=MsgMetadata(id="r", requiretls=True))
    rh.assert_err(res["test@example.test"], 550, "5.7.30",
                  "TLS is not available or unauthenticated but required (REQUIRETLS)", False)
    assert srv.mail_lines == []


def test_resolv_conf_order_B_14(tmp_path):
    """B-14: the `nameserver` lines of resolv.conf are kept in order."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver 192.0.2.1\nnameserver 127.0.0.1\n")
    r = mdns.Resolver(resolv_conf=str(conf))
    assert r.nameservers == [("127.0.0.53", 53), ("192.0.2.1", 53), ("127.0.0.1", 53)]
