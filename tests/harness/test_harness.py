"""Self-test of the real-peer harness, with real clients and no maddylite code.

Every scenario must be what the table claims: dig sees AD on signed answers, none on
unsigned ones and SERVFAIL on bogus ones; each MX offers STARTTLS or not and presents the
intended certificate; TLSA digests match (or deliberately do not) what the server sends;
the MTA-STS URLs answer with the intended status, type and body; the misbehaving servers
misbehave; the sinks accept.  A broken harness fails here, not in a maddylite test.
"""

from __future__ import annotations

import http.client
import re
import shutil
import smtplib
import socket
import ssl
import time

import pytest

from .fixtures import require_harness
from .model import (
    DEAD_RESOLVER,
    NSD,
    RESOLVER,
    RESOLVER_ULA,
    Host,
    Scenario,
    load_world,
)
from .pki import tlsa_data, tlsa_matches
from .scenarios import MAGIC

pytestmark = pytest.mark.harness

WORLD = load_world()
SCENARIOS = [sc for sc in WORLD.scenarios.values() if not sc.name.startswith("bench")]
ALL_HOSTS = list(WORLD.hosts.values())
SMTPD = [h for h in WORLD.smtpd_hosts]
SMTPD_ADDRS = [(h, a) for h in SMTPD for a in h.addresses]
TLSA_HOSTS = [h for h in ALL_HOSTS if h.tlsa]
STS = list(WORLD.sts.values())
SENDER = "harness-selftest@sender.test"
TIMEOUT = 5


@pytest.fixture(scope="module")
def h():
    return require_harness()


def _ids(items, attr="name"):
    return [getattr(i, attr) for i in items]


# ---------------------------------------------------------------------------- the table itself
REQUIRED = {
    "plaintext MX": "plain",
    "STARTTLS with CA cert": "tls",
    "self-signed": "selfsigned",
    "MTA-STS enforce ok": "sts-enforce",
    "MTA-STS MX not in policy": "sts-mismatch",
    "MTA-STS no MX matches": "sts-nomatch",
    "MTA-STS no STARTTLS under enforce": "sts-notls",
    "MTA-STS testing mode": "sts-testing",
    "MTA-STS mode none": "sts-none",
    "MTA-STS expired MX cert": "sts-expired",
    "MTA-STS wildcard": "sts-wildcard",
    "MTA-STS CRLF": "sts-crlf",
    "bad policy: 301": "sts-redirect",
    "bad policy: 404": "sts-404",
    "bad policy: text/html": "sts-html",
    "bad policy: self-signed HTTPS": "sts-selfsigned",
    "bad policy: oversized": "sts-oversized",
    "DNSSEC-signed MX": "dnssec",
    "bogus zone": "bogus",
    "DANE-EE 3 1 1": "dane-ee",
    "DANE-EE 3 0 1": "dane-ee-301",
    "DANE-TA 2 0 1": "dane-ta",
    "TLSA mismatch with a valid CA cert": "dane-mismatch",
    "TLSA present and no STARTTLS": "dane-notls",
    "bogus TLSA": "dane-bogus",
    "only unusable TLSA usages": "dane-unusable",
    "secure MX into an unsigned zone": "dane-insecure-mx",
    "null MX": "nullmx",
    "no MX (implicit)": "nomx",
    "two MXes, the first refusing": "twomx",
    "IPv6-only MX": "ipv6only",
    "per-recipient 450/550": "reject",
    "never greets": "nevergreets",
    "stalls after DATA": "stall",
    "blackhole": "blackhole",
    "benchmark sink": "bench",
}


def test_table_covers_the_required_scenarios():
    missing = {what: name for what, name in REQUIRED.items() if name not in WORLD.scenarios}
    assert not missing
    assert len(WORLD.scenarios["bench"].domains) == 100
    assert WORLD.scenarios["bench"].host().server == "sink"
    kinds = {h.server for h in WORLD.hosts.values()}
    assert {"never-greets", "stall-after-data", "blackhole", "refused", "sink"} <= kinds
    certs = {h.cert for h in WORLD.smtpd_hosts if h.starttls}
    assert {"ca", "selfsigned", "expired", "wildcard", "dane-ta"} <= certs
    addrs = [a for h in WORLD.hosts.values() for a in h.addresses]
    assert len(addrs) == len(set(addrs)), "two hosts share an address"


# ---------------------------------------------------------------------------- DNS
def dig(h, name: str, rtype: str, *opts: str, server: str = RESOLVER):
    out = h.dig("+dnssec", "+noall", "+comments", "+answer", *opts, name, rtype, server=server)
    st = re.search(r"status: (\w+)", out)
    fl = re.search(r"flags: ([^;]*);", out)
    assert st and fl, f"dig {name} {rtype}: {out}"
    answers = []
    for line in out.splitlines():
        if line and not line.startswith(";"):
            f = line.split(None, 4)
            if len(f) == 5 and f[3] != "RRSIG":
                answers.append((f[0].rstrip(".").lower(), f[3], f[4]))
    return st.group(1), set(fl.group(1).split()), answers


def rdatas(answers, rtype):
    return sorted(r for _, t, r in answers if t == rtype)


def test_root_and_test_are_signed(h):
    for name in (".", "test."):
        status, flags, ans = dig(h, name, "SOA")
        assert status == "NOERROR" and "ad" in flags, (name, flags)
    # outside test.: a secure NXDOMAIN from the private root
    status, flags, _ = dig(h, "example.com", "A")
    assert status == "NXDOMAIN" and "ad" in flags
    # nsd answers authoritatively
    status, flags, _ = dig(h, "tls.test", "SOA", "+norec", server=NSD)
    assert status == "NOERROR" and "aa" in flags


def test_other_resolver_addresses(h):
    for server in ("::1", RESOLVER_ULA):
        status, flags, _ = dig(h, "tls.test", "MX", server=server)
        assert status == "NOERROR" and "ad" in flags, server
    t0 = time.monotonic()
    out = h.dig("+time=1", "+tries=1", "tls.test", "MX", server=DEAD_RESOLVER)
    assert "timed out" in out or "no servers could be reached" in out
    assert time.monotonic() - t0 < 10


def test_resolv_conf_and_ns_call(h):
    assert h.resolv_conf_path.read_text() == "nameserver 127.0.0.1\noptions trust-ad edns0\n"
    mx = h.host("mx.tls.test")
    v6 = h.host("mx.ipv6only.test")

    def resolve():
        return (open("/etc/resolv.conf").read(),
                sorted({ai[4][0] for ai in socket.getaddrinfo("mx.tls.test", 25)}),
                sorted({ai[4][0] for ai in socket.getaddrinfo("mx.ipv6only.test", 25)}))

    conf, a, aaaa = h.ns_call(resolve)
    assert "trust-ad" in conf
    assert a == [mx.ipv4] and aaaa == [v6.ipv6]
    p = h.ns_run(["cat", "/etc/resolv.conf"])
    assert p.stdout == conf
    p = h.ns_run(["cat", "/etc/resolv.conf"], resolv_conf="nameserver 127.0.0.3\n")
    assert p.stdout == "nameserver 127.0.0.3\n", p.stderr


@pytest.mark.parametrize("sc", SCENARIOS, ids=_ids(SCENARIOS))
def test_mx_answer(h, sc: Scenario):
    status, flags, ans = dig(h, sc.domain, "MX")
    if sc.zone == "bogus":
        assert status == "SERVFAIL"
        status, flags, ans = dig(h, sc.domain, "MX", "+cd")
        assert status == "NOERROR" and "ad" not in flags
    else:
        assert status == "NOERROR"
        assert ("ad" in flags) == (sc.zone == "signed"), flags
    want = sorted(f"{p} {m}." if m != "." else f"{p} ." for p, m in sc.mx)
    assert rdatas(ans, "MX") == want
    if not sc.mx:
        status, flags, ans = dig(h, sc.domain, "A")
        apex = h.world.hosts.get(sc.domain)
        assert rdatas(ans, "A") == ([apex.ipv4] if apex else [])


def test_bench_domains(h):
    def resolve(domains):
        import dns.resolver

        r = dns.resolver.Resolver()
        r.use_edns(0, dns.flags.DO, 1232)
        out = {}
        for d in domains:
            ans = r.resolve(d, "MX")
            out[d] = (tuple(str(x.exchange) for x in ans), bool(ans.response.flags & dns.flags.AD))
        return out

    bench, tls = h.scenario("bench"), h.scenario("bench-tls")
    res = h.ns_call(resolve, bench.domains + tls.domains)
    assert {res[d] for d in bench.domains} == {(("mx.bench.test.",), True)}
    assert {res[d] for d in tls.domains} == {(("mx.bench-tls.test.",), True)}
    assert len(bench.domains) == 100
    assert h.bench_domains() == bench.domains and len(h.bench_domains(tls=True)) == 10


@pytest.mark.parametrize("host", ALL_HOSTS, ids=_ids(ALL_HOSTS))
def test_host_records(h, host: Host):
    signing = WORLD.zones[host.zone]
    rtype = "AAAA" if host.family == "v6" else "A"
    status, flags, ans = dig(h, host.name, rtype)
    if signing == "bogus":
        assert status == "SERVFAIL"
        return
    secure = signing == "signed"
    if host.server == "nxdomain":
        assert status == "NXDOMAIN" and ("ad" in flags) == secure
        return
    assert status == "NOERROR" and ("ad" in flags) == secure, flags
    final = WORLD.final_host(host.name)
    if host.cname:
        assert rdatas(ans, "CNAME") == [host.cname + "."]
    if host.family in ("v4", "dual") or host.cname:
        assert rdatas(ans, "A") == [final.ipv4]
    if host.family in ("v6", "dual"):
        _, _, ans6 = dig(h, host.name, "AAAA")
        assert rdatas(ans6, "AAAA") == [final.ipv6]


@pytest.mark.parametrize("host", TLSA_HOSTS, ids=_ids(TLSA_HOSTS))
def test_tlsa_records(h, host: Host):
    live = h.host(host.name)
    want = sorted(f"{t.params} {t.data.upper()}" for t in live.tlsa)
    status, flags, ans = dig(h, live.tlsa_owner, "TLSA")
    if live.tlsa_bogus:
        assert status == "SERVFAIL"
        status, flags, ans = dig(h, live.tlsa_owner, "TLSA", "+cd")
        assert status == "NOERROR"
        # the A record next to it stays secure
        assert "ad" in dig(h, live.name, "A")[1]
    else:
        assert status == "NOERROR"
        assert ("ad" in flags) == (WORLD.zones[live.zone] == "signed")
    got = sorted(" ".join(r.split()[:3]) + " " + "".join(r.split()[3:]).upper()
                 for r in rdatas(ans, "TLSA"))
    assert got == want


# ---------------------------------------------------------------------------- SMTP probes
def _verify_ctx(cafile: str, hostname_check: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = hostname_check
    return ctx


def _noverify_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def smtp_probe(addr: str, host: str, cafile: str) -> dict:
    """EHLO; STARTTLS without verification (certificate, protocol); then a verifying
    handshake on a second connection."""
    out: dict = {}
    s = smtplib.SMTP(timeout=TIMEOUT)
    code, banner = s.connect(addr, 25)
    out["banner"] = (code, banner.decode())
    s.ehlo("probe.sender.test")
    out["features"] = dict(s.esmtp_features)
    out["starttls"] = s.has_extn("starttls")
    if out["starttls"]:
        s._host = host  # type: ignore[attr-defined]  # SNI = the MX host name
        try:
            s.starttls(context=_noverify_ctx())
            tls_sock: ssl.SSLSocket = s.sock  # type: ignore[assignment]
            out["tls"] = {"ok": True, "version": tls_sock.version(),
                          "cert": tls_sock.getpeercert(binary_form=True)}
            s.ehlo("probe.sender.test")
            out["features_tls"] = dict(s.esmtp_features)
        except (ssl.SSLError, OSError, smtplib.SMTPException) as e:
            out["tls"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            return out
    try:
        s.quit()
    except smtplib.SMTPException:
        pass
    if out["starttls"]:
        v = smtplib.SMTP(addr, 25, timeout=TIMEOUT)
        v.ehlo("probe.sender.test")
        try:
            v._host = host  # type: ignore[attr-defined]  # SNI and name check: the MX name
            v.starttls(context=_verify_ctx(cafile))
            out["verified"] = (True, "")
            v.quit()
        except ssl.SSLCertVerificationError as e:
            out["verified"] = (False, e.verify_message)
        except (ssl.SSLError, OSError) as e:
            out["verified"] = (False, str(e))
    return out


EXPECTED_VERIFY = {
    "ca": (True, ""),
    "wildcard": (True, ""),
    "selfsigned": (False, "self-signed certificate"),
    "expired": (False, "certificate has expired"),
    "wrongname": (False, "Hostname mismatch"),
    "dane-ta": (False, "self-signed certificate in certificate chain"),  # the DANE CA, sent
}


@pytest.mark.parametrize("host,addr", SMTPD_ADDRS, ids=[f"{h.name}@{a}" for h, a in SMTPD_ADDRS])
def test_smtpd_listener(h, host: Host, addr: str):
    r = h.ns_call(smtp_probe, addr, host.name, str(h.ca_pem_path))
    code, banner = r["banner"]
    assert code == 220 and banner.startswith(host.name), banner
    assert r["starttls"] == host.starttls
    for kw in host.ehlo_discard:
        assert kw not in r["features"]
    if not host.ehlo_discard:
        assert "smtputf8" in r["features"] and "8bitmime" in r["features"]
    if host.size_limit:
        assert r["features"]["size"] == str(host.size_limit)
    if not host.starttls:
        return
    if host.tls_protocols:
        assert not r["tls"]["ok"], "handshake should fail"
        return
    assert r["tls"]["ok"], r["tls"]
    assert r["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    from cryptography import x509

    cert = x509.load_der_x509_certificate(r["tls"]["cert"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == host.cert_names
    ok, why = r["verified"]
    want_ok, want_why = EXPECTED_VERIFY[host.cert]
    assert ok == want_ok and want_why in why, (ok, why)


def openssl_chain(h, addr: str, servername: str) -> list[bytes]:
    p = h.ns_run(["openssl", "s_client", "-starttls", "smtp", "-connect", f"{addr}:25",
                  "-servername", servername, "-showcerts"], input="", timeout=20)
    pems = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", p.stdout,
                      re.S)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return [x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)
            for pem in pems]


@pytest.mark.parametrize("host", TLSA_HOSTS, ids=_ids(TLSA_HOSTS))
def test_tlsa_against_presented_chain(h, host: Host):
    live = h.host(host.name)
    server = h.world.final_host(live.name)
    if not server.starttls:
        assert all(t.source == "other" for t in live.tlsa)
        return
    chain = openssl_chain(h, server.address, server.name)
    assert chain, "no certificate from openssl s_client"
    for t in live.tlsa:
        if t.source == "other":
            assert all(tlsa_data(t.selector, t.mtype, c) != t.data for c in chain), t
            assert not tlsa_matches(t, chain)
            continue
        cert = chain[0] if t.source == "self" else chain[1]
        assert tlsa_data(t.selector, t.mtype, cert) == t.data, t
        assert tlsa_matches(t, chain) == t.usable, t


DANE_FINGER = {
    "dane-ee": ["Matched DANE EE certificate", "Verified TLS connection established"],
    "dane-ee-301": ["Matched DANE EE certificate at depth 0: 3 0 1", "Verified TLS"],
    "dane-ta": ["Matched DANE TA certificate at depth 1: 2 0 1", "Verified TLS"],
    "dane-multi": ["Matched DANE EE certificate", "Verified TLS"],
    "dane-cname": ["Matched DANE EE certificate", "Verified TLS"],
    "dane-cname-orig": ["Matched DANE EE certificate", "Verified TLS"],
    "dane-mismatch": ["no matching DANE TLSA records", "Untrusted TLS"],
    "dane-bogus": ["TLSA lookup error"],
    "dane-unusable": ["all TLSA records unusable", "Untrusted TLS"],
    "dane-insecure-mx": ["Untrusted TLS"],
    "tls": ["Verified TLS connection established"],
}


@pytest.mark.skipif(not shutil.which("posttls-finger", path="/usr/sbin:/usr/bin"),
                    reason="posttls-finger not installed")
@pytest.mark.parametrize("name", sorted(DANE_FINGER))
def test_posttls_finger(h, name: str):
    """Postfix's own DANE client agrees with what each DANE scenario claims."""
    out = h.posttls_finger(h.scenario(name).domain)
    for s in DANE_FINGER[name]:
        assert s in out, out
    if name in ("dane-insecure-mx", "dane-unusable", "dane-mismatch", "dane-bogus"):
        assert "Matched DANE" not in out and "Verified TLS" not in out


def test_posttls_finger_no_starttls(h):
    out = h.posttls_finger(h.scenario("dane-notls").domain)
    assert "TLS connection established" not in out


# ---------------------------------------------------------------------------- delivery
def send(addr: str, rcpts: list[str], msg: str, *, sender: str = SENDER, tls: bool = True,
         helo: str = "probe.sender.test") -> dict:
    """One SMTP transaction, command by command; returns every reply."""
    out: dict = {"rcpt": {}}
    s = smtplib.SMTP(addr, 25, timeout=TIMEOUT)
    s.ehlo(helo)
    if tls and s.has_extn("starttls"):
        s.starttls(context=_noverify_ctx())
        s.ehlo(helo)
    out["size"] = s.esmtp_features.get("size")
    out["mail"] = s.mail(sender)
    if out["mail"][0] == 250:
        for r in rcpts:
            out["rcpt"][r] = s.rcpt(r)
        if any(c in (250, 251) for c, _ in out["rcpt"].values()):
            try:
                out["data"] = s.data(msg.encode())
            except smtplib.SMTPDataError as e:
                out["data"] = (e.smtp_code, e.smtp_error)
    try:
        s.quit()
    except smtplib.SMTPException:
        pass
    out = {k: ((v[0], v[1].decode()) if isinstance(v, tuple) else v) for k, v in out.items()}
    out["rcpt"] = {k: (c, m.decode()) for k, (c, m) in out["rcpt"].items()}
    return out


def _msg(subject: str = "harness self-test") -> str:
    return f"From: {SENDER}\r\nSubject: {subject}\r\n\r\nhello\r\n"


def wait_session(h, host: str, command: str, mark, timeout: float = 10):
    """The closed sessions of ``host`` (since ``mark``) in which ``command`` was sent."""
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in h.mx_sessions(host, since=mark)
                 if command.lower() in (c.lower() for c in s.commands)]
        if (found and all(s.closed for s in found)) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


DELIVERY = [(h, a) for h, a in SMTPD_ADDRS if not h.discard]


@pytest.mark.parametrize("host,addr", DELIVERY, ids=[f"{h.name}@{a}" for h, a in DELIVERY])
def test_delivery_to_each_mx(h, host: Host, addr: str):
    domain = host.domains[0]
    rcpt = h.new_address(domain, "selftest")
    mark = h.mark()
    r = h.ns_call(send, addr, [rcpt], _msg(), tls=not host.tls_protocols)
    assert r["rcpt"][rcpt][0] == 250 and r["data"][0] == 250, r
    (m,) = h.wait_mailbox(rcpt)
    assert m.received_by == host.name
    tls_ok = host.starttls and not host.tls_protocols
    assert m.tls == tls_ok, m.received
    assert m.message["X-Original-To"] == rcpt and m.envelope_sender == SENDER
    assert m.message["Subject"] == "harness self-test"
    sessions = wait_session(h, host.name, f"RCPT TO:<{rcpt}>", mark)
    assert len(sessions) == 1 and sessions[0].closed, sessions
    assert sessions[0].count("MAIL") == 1 and sessions[0].count("DATA") == 1
    assert sessions[0].tls == tls_ok
    assert h.count_connections(host.name, since=mark) >= 1
    assert h.count_commands(host.name, "MAIL", since=mark) >= 1


def test_mx_accepts_only_its_domains(h):
    plain = h.host("mx.plain.test")
    r = h.ns_call(send, plain.address, [h.new_address("tls.test")], _msg())
    ((code, text),) = r["rcpt"].values()
    assert code == 550 and "5.7.1" in text and "not an MX" in text


def test_per_recipient_and_magic_replies(h):
    mx = h.host("mx.reject.test")
    good = h.new_address("reject.test")
    bad, later = f"{MAGIC['rcpt_550']}@reject.test", f"{MAGIC['rcpt_450']}@reject.test"
    r = h.ns_call(send, mx.address, [bad, later, good], _msg())
    assert r["rcpt"][bad][0] == 550 and r["rcpt"][bad][1].startswith("5.1.1")
    assert r["rcpt"][later][0] == 450 and r["rcpt"][later][1].startswith("4.2.0")
    assert r["rcpt"][good][0] == 250 and r["data"][0] == 250
    assert len(h.wait_mailbox(good)) == 1
    r = h.ns_call(send, mx.address, [good], _msg(), sender=f"{MAGIC['mail_550']}@sender.test")
    assert r["mail"][0] == 550 and r["mail"][1].startswith("5.7.1")
    for subject, code, enh in ((MAGIC["data_550"], 550, "5.7.1"), (MAGIC["data_451"], 451, "4.7.1")):
        r = h.ns_call(send, mx.address, [good], _msg(subject))
        assert r["data"][0] == code and r["data"][1].startswith(enh), r
    time.sleep(0.3)
    assert len(h.mailbox(good)) == 1


def test_recipient_limit(h):
    mx = h.host("mx.rcptlimit.test")
    rcpts = [h.new_address("rcptlimit.test") for _ in range(101)]
    r = h.ns_call(send, mx.address, rcpts, _msg(), timeout=60)
    codes = [r["rcpt"][x][0] for x in rcpts]
    assert codes[:100] == [250] * 100 and codes[100] == 452
    assert r["rcpt"][rcpts[100]][1].startswith("4.5.3")


def test_size_limit(h):
    mx = h.host("mx.smallsize.test")

    def probe(addr):
        s = smtplib.SMTP(addr, 25, timeout=TIMEOUT)
        s.ehlo("probe.sender.test")
        size = s.esmtp_features.get("size")
        reply = s.mail(SENDER, ["SIZE=20000"])
        s.quit()
        return size, reply[0], reply[1].decode()

    size, code, text = h.ns_call(probe, mx.address)
    assert size == "10000" and code == 552 and text.startswith("5.3.4")


def test_mailbox_helpers(h):
    rcpt = h.new_address("plain.test")
    h.ns_call(send, h.host("mx.plain.test").address, [rcpt], _msg())
    assert len(h.wait_mailbox(rcpt)) == 1
    assert any(m.recipient == rcpt for m in h.mailbox("plain.test"))
    h.clear_mailboxes(rcpt)
    assert h.mailbox(rcpt) == []


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")
@pytest.mark.parametrize("domain,host", [("tls.test", "mx.tls.test"),
                                         ("ipv6only.test", "mx.ipv6only.test"),
                                         ("nomx.test", "nomx.test")])
def test_swaks_finds_the_mx(h, domain: str, host: str):
    """swaks does its own MX lookup through the namespace's resolver."""
    rcpt = h.new_address(domain, "swaks")
    p = h.ns_run(["swaks", "--to", rcpt, "--from", SENDER, "--helo", "swaks.sender.test",
                  "--tls-optional", "--timeout", "10"], timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    (m,) = h.wait_mailbox(rcpt)
    assert m.received_by == host and m.tls


# ---------------------------------------------------------------------------- misbehaving peers
def raw_probe(addr: str, mode: str, timeout: float = 2.0) -> dict:
    out: dict = {}
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.settimeout(timeout)
    try:
        s.connect((addr, 25))
    except TimeoutError:
        return {"connect": "timeout"}
    except ConnectionRefusedError:
        return {"connect": "refused"}
    out["connect"] = "ok"
    f = s.makefile("rb")

    def line():
        try:
            return f.readline().decode().rstrip("\r\n")
        except TimeoutError:
            return "<timeout>"

    def reply():
        lines = [line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(line())
        return lines

    def cmd(c):
        s.sendall(c.encode() + b"\r\n")
        return reply()

    out["greeting"] = reply()
    if mode == "greet-554":
        out["ehlo"] = cmd("EHLO probe.sender.test")
        out["quit"] = cmd("QUIT")
    elif mode == "greet-421":
        out["eof"] = f.read() == b""
    elif mode == "starttls-454":
        out["ehlo"] = cmd("EHLO probe.sender.test")
        out["starttls"] = cmd("STARTTLS")
        out["mail"] = cmd(f"MAIL FROM:<{SENDER}>")
    elif mode == "stall-after-data":
        out["ehlo"] = cmd("EHLO probe.sender.test")
        out["mail"] = cmd(f"MAIL FROM:<{SENDER}>")
        out["rcpt"] = cmd("RCPT TO:<x@stall.test>")
        out["data"] = cmd("DATA")
        out["dot"] = cmd("Subject: x\r\n\r\nhello\r\n.")
    s.close()
    return out


BAD = [h for h in ALL_HOSTS if h.server in ("never-greets", "greet-554", "greet-421",
                                              "starttls-454", "stall-after-data", "blackhole",
                                              "refused")]


@pytest.mark.parametrize("host", BAD, ids=_ids(BAD))
def test_misbehaving_peer(h, host: Host):
    mark = h.mark()
    t0 = time.monotonic()
    r = h.ns_call(raw_probe, host.address, host.server)
    took = time.monotonic() - t0
    if host.server == "refused":
        assert r == {"connect": "refused"}
        return
    if host.server == "blackhole":
        assert r == {"connect": "timeout"} and took >= 1.9
        assert h.count_connections(host.name) == 0
        return
    assert r["connect"] == "ok"
    g = r["greeting"]
    if host.server == "never-greets":
        assert g == ["<timeout>"] and took >= 1.9
    elif host.server == "greet-554":
        assert g[0].startswith("554 ") and r["ehlo"][0].startswith("503")
        assert r["quit"][0].startswith("221")
    elif host.server == "greet-421":
        assert g[0].startswith("421 ") and r["eof"]
    elif host.server == "starttls-454":
        assert g[0].startswith("220 ") and "250 STARTTLS" in r["ehlo"] + ["250 " + x[4:] for x in r["ehlo"]]
        assert r["starttls"][0].startswith("454 4.7.0") and r["mail"][0].startswith("530")
    elif host.server == "stall-after-data":
        assert r["data"][0].startswith("354") and r["dot"] == ["<timeout>"] and took >= 1.9
    h.wait_log(host.name, r" connect$", since=mark)
    assert h.count_connections(host.name, since=mark) >= 1
    if host.server == "stall-after-data":
        h.wait_log(host.name, "stalled after final dot", since=mark)
        assert h.count_commands(host.name, "DATA", since=mark) >= 1


# ---------------------------------------------------------------------------- sinks
def test_smtp_sink_accepts_and_discards(h):
    sink = h.host("mx.bench.test")
    r = h.ns_call(send, sink.address, ["x@b042.bench.test"], _msg())
    assert r["rcpt"]["x@b042.bench.test"][0] == 250 and r["data"][0] == 250
    assert h.mailbox("b042.bench.test") == []


def test_tls_sink_accepts_and_discards(h):
    sink = h.host("mx.bench-tls.test")
    rcpt = h.new_address("t003.bench-tls.test")
    r = h.ns_call(smtp_probe, sink.address, sink.name, str(h.ca_pem_path))
    assert r["tls"]["ok"] and r["verified"] == (True, "")
    r = h.ns_call(send, sink.address, [rcpt], _msg())
    assert r["data"][0] == 250
    time.sleep(0.5)
    assert h.mailbox(rcpt) == []


# ---------------------------------------------------------------------------- MTA-STS
@pytest.mark.parametrize("sts", STS, ids=_ids(STS, "domain"))
def test_sts_dns(h, sts):
    status, flags, ans = dig(h, f"_mta-sts.{sts.domain}", "TXT")
    assert status == "NOERROR" and "ad" in flags
    assert rdatas(ans, "TXT") == [f'"{sts.txt}"']
    assert sts.policy_id == __import__("hashlib").sha256(sts.body).hexdigest()[:20]
    _, _, ans = dig(h, sts.host, "A")
    assert rdatas(ans, "A") == [sts.ip]
    _, _, ans = dig(h, f"_smtp._tls.{sts.domain}", "TXT")
    assert rdatas(ans, "TXT") and "v=TLSRPTv1" in rdatas(ans, "TXT")[0]


def fetch_policy(host: str, cafile: str, verify: bool = True) -> dict:
    ctx = _verify_ctx(cafile) if verify else _noverify_ctx()
    c = http.client.HTTPSConnection(host, 443, timeout=TIMEOUT, context=ctx)
    try:
        c.request("GET", "/.well-known/mta-sts.txt")
        r = c.getresponse()
        return {"status": r.status, "type": r.getheader("Content-Type"),
                "location": r.getheader("Location"), "body": r.read()}
    except ssl.SSLCertVerificationError as e:
        return {"error": e.verify_message}
    finally:
        c.close()


@pytest.mark.parametrize("sts", STS, ids=_ids(STS, "domain"))
def test_sts_fetch(h, sts):
    mark = h.mark()
    r = h.ns_call(fetch_policy, sts.host, str(h.ca_pem_path))
    if sts.fetch == "selfsigned":
        assert r == {"error": "self-signed certificate"}
        r = h.ns_call(fetch_policy, sts.host, str(h.ca_pem_path), verify=False)
    assert r["status"] == sts.expected_status
    if sts.fetch == "redirect":
        assert r["location"] == h.world.sts[sts.redirect_to].url
        return
    if sts.fetch == "404":
        return
    assert r["type"].split(";")[0] == sts.expected_content_type
    assert r["body"] == sts.body
    body = r["body"].decode()
    if sts.fetch == "oversized":
        assert len(r["body"]) > 64 * 1024
    eol = "\r\n" if sts.crlf else "\n"
    assert body.startswith(f"version: STSv1{eol}mode: {sts.mode}{eol}")
    assert [ln[4:] for ln in body.split(eol) if ln.startswith("mx: ")] == sts.mx
    assert ("\r\n" in body) == sts.crlf
    deadline = time.monotonic() + 5
    while h.count_sts_fetches(sts.domain, since=mark) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h.count_sts_fetches(sts.domain, since=mark) >= 1


@pytest.mark.skipif(not shutil.which("mta-sts-query"), reason="postfix-mta-sts-resolver missing")
@pytest.mark.parametrize("sts", STS, ids=_ids(STS, "domain"))
def test_mta_sts_query(h, sts):
    """An independent MTA-STS client (postfix-mta-sts-resolver) agrees."""
    p = h.ns_run(["mta-sts-query", sts.domain], timeout=60)
    want = "VALID" if sts.valid else "FETCH_ERROR"
    assert f"STSFetchResult.{want}" in p.stdout, p.stdout + p.stderr


# ---------------------------------------------------------------------------- lifecycle
def test_up_again_is_fast(h):
    t0 = time.monotonic()
    h.up()
    assert time.monotonic() - t0 < 1.0
    st = h.status()
    assert st["netns_exists"] and st["built"]
    assert all(s["running"] and s["listening"] for s in st["services"].values()), st
