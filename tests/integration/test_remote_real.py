"""target.remote and mx_auth against real peers: Postfix MXes, unbound over signed zones, nginx.

Every case runs `maddylite deliver` inside the harness namespace, with the harness CA as
`tls_client root_ca` (SMTP) and as the system trust store (MTA-STS fetches), and checks
the per-recipient result, the levels reached, which MX got the message and whether it
arrived over TLS. The attack cases also check that the MX never saw MAIL.
"""

import pytest

pytestmark = pytest.mark.harness

ALL = "mtasts\n    dnssec\n    dane\n    local_policy"
STS_ONLY = "mtasts\n    local_policy"

# scenario, policies, remote extra, expected (status, code, enhanced, text fragment), via MX, TLS level, MX level
DELIVERED = [
    pytest.param("plain", ALL, "", "mx.plain.test", "none", "dnssec", id="B-46-C-3-plaintext"),
    pytest.param("tls", ALL, "", "mx.tls.test", "authenticated", "dnssec", id="B-44-B-45-C-2-C-3-authenticated"),
    pytest.param("selfsigned", ALL, "", "mx.selfsigned.test", "encrypted", "dnssec", id="B-47-selfsigned"),
    pytest.param("expired", ALL, "", "mx.expired.test", "encrypted", "dnssec", id="B-47-expired"),
    pytest.param("wrongname", ALL, "", "mx.wrongname.test", "encrypted", "dnssec", id="B-47-wrongname"),
    pytest.param("wildcard", ALL, "", "mx.wildcard.test", "authenticated", "dnssec", id="B-44-wildcard-cert"),
    pytest.param("tlsfail", ALL, "", "mx.tlsfail.test", "none", "dnssec", id="B-48-B-49-handshake-fails"),
    pytest.param("dnssec", "dnssec", "", "mx.dnssec.test", "authenticated", "dnssec", id="C-57-dnssec"),
    pytest.param("nomx", ALL, "", "nomx.test", None, None, id="B-5-implicit-mx"),
    pytest.param("unresolvable", ALL, "", "mx.unresolvable.test", None, None, id="B-15-unresolvable-first-mx"),
    pytest.param("twomx", ALL, "", "mx2.twomx.test", None, None, id="B-3-first-mx-refuses"),
    pytest.param("greet554", ALL, "", "mx2.greet554.test", None, None, id="B-18-greet-554"),
    pytest.param("greet421", ALL, "", "mx2.greet421.test", None, None, id="B-18-greet-421"),
    pytest.param("starttls454", ALL, "", "mx2.starttls454.test", None, None, id="B-50-starttls-454"),
    pytest.param("blackhole", ALL, "connect_timeout 2s", "mx2.blackhole.test", None, None, id="B-100-blackhole"),
    pytest.param("ipv6only", ALL, "", "mx.ipv6only.test", "authenticated", None, id="B-111-C-78-ipv6-only"),
    pytest.param("dualstack", ALL, "", "mx.dualstack.test", None, None, id="B-111-dual-stack"),
    pytest.param("sts-enforce", STS_ONLY, "", "mx.sts-enforce.test", "authenticated", "mtasts", id="C-47-sts-enforce"),
    pytest.param("sts-mismatch", STS_ONLY, "", "mx2.sts-mismatch.test", "authenticated", "mtasts", id="C-42-sts-skip-unlisted"),
    pytest.param("sts-testing", STS_ONLY, "", "mx.sts-testing.test", None, "mtasts", id="C-48-sts-testing"),
    pytest.param("sts-testing-nomatch", STS_ONLY, "", "mx.sts-testing-nomatch.test", None, "none", id="C-50-sts-testing-nomatch"),
    pytest.param("sts-none", STS_ONLY, "", "mx.sts-none.test", None, "none", id="C-26-sts-mode-none"),
    pytest.param("sts-wildcard", STS_ONLY, "", "mx1.sts-wildcard.test", "authenticated", "mtasts", id="C-53-sts-wildcard"),
    pytest.param("sts-crlf", STS_ONLY, "", "mx.sts-crlf.test", None, "mtasts", id="C-26-sts-crlf"),
    pytest.param("sts-redirect", STS_ONLY, "", "mx.sts-redirect.test", None, "none", id="C-21-sts-redirect-not-followed"),
    pytest.param("sts-404", STS_ONLY, "", "mx.sts-404.test", None, "none", id="C-22-sts-404"),
    pytest.param("sts-html", STS_ONLY, "", "mx.sts-html.test", None, "none", id="C-23-sts-text-html"),
    pytest.param("sts-selfsigned", STS_ONLY, "", "mx.sts-selfsigned.test", None, "none", id="C-20-sts-https-untrusted"),
    pytest.param("sts-oversized", STS_ONLY, "", "mx.sts-oversized.test", None, "none", id="C-25-sts-oversized"),
    pytest.param("dane-ee", ALL, "", "mx.dane-ee.test", "authenticated", "dnssec", id="C-69-B-78-dane-ee-311"),
    pytest.param("dane-ee-301", ALL, "", "mx.dane-ee-301.test", "authenticated", "dnssec", id="C-90-dane-ee-301"),
    pytest.param("dane-ta", ALL, "", "mx.dane-ta.test", "authenticated", "dnssec", id="C-86-dane-ta-201"),
    pytest.param("dane-multi", ALL, "", "mx.dane-multi.test", "authenticated", "dnssec", id="C-85-dane-several-records"),
    pytest.param("dane-unusable", ALL, "", "mx.dane-unusable.test", None, "dnssec", id="C-90-dane-unusable-only"),
    pytest.param("dane-insecure-mx", ALL, "", "mx.unsigned-host.test", None, None, id="C-68-dane-insecure-host"),
    pytest.param("dane-cname", ALL, "", "host.dane-cname.test", "authenticated", "dnssec", id="C-70-dane-cname-target"),
    pytest.param("dane-cname-orig", ALL, "", "host.dane-cname-orig.test", "authenticated", "dnssec", id="C-71-dane-cname-original"),
]


def _scenario_domain(harness, name):
    return harness.scenario(name).domain


@pytest.mark.parametrize("name,policies,remote,via,tls_level,mx_level", DELIVERED)
def test_delivered(harness, deliver, name, policies, remote, via, tls_level, mx_level):
    """The message reaches the expected MX with the expected TLS and MX levels."""
    domain = _scenario_domain(harness, name)
    rcpt = harness.new_address(domain)
    rc, res, log = deliver([rcpt], policies=policies, remote=remote)
    r = res[rcpt]
    assert (rc, r.status, r.code) == (0, "delivered", 250), (r, log[-2000:])
    mx_hosts = {h.rstrip(".") for _, h in harness.scenario(name).mx} or {domain}
    assert r.mx.rstrip(".") == via or (r.mx.rstrip(".") in mx_hosts and via not in mx_hosts)  # a CNAME'd MX host
    if tls_level:
        assert r.tls_level == tls_level
    if mx_level:
        assert r.mx_level == mx_level
    (msg,) = harness.wait_mailbox(rcpt)
    assert msg.received_by == via
    assert msg.tls == (r.tls_level in ("encrypted", "authenticated"))


# scenario, policies, remote extra, code, enhanced, message fragment, MX hosts that must see no MAIL
REFUSED = [
    pytest.param("bogus", ALL, "", 451, "4.4.4", "MX lookup error", [], id="B-10-C-63-bogus-servfail"),
    pytest.param("nullmx", ALL, "", 556, "5.1.10", "Domain does not accept email (null MX)", [], id="B-7-null-mx"),
    pytest.param("nullmx-mixed", ALL, "", 556, "5.1.10", "null MX", [], id="B-7-null-mx-mixed"),
    pytest.param("noaddr", ALL, "", 550, "5.4.0", "No usable MXs, last err: DNS error", [], id="B-6-no-address"),
    pytest.param("allrefused", ALL, "", 451, "4.4.0", "No usable MXs, last err: Network I/O error", [], id="B-16-all-refused"),
    pytest.param("insecure", "dnssec\n    local_policy {\n        min_mx_level dnssec\n    }", "", 451, "4.4.0",
                 "Failed to establish the MX record authenticity", ["mx.insecure.test"], id="C-58-C-9-min-mx-level-dnssec"),
    pytest.param("plain", "local_policy {\n        min_tls_level encrypted\n    }", "", 451, "4.4.0",
                 "TLS is not available or unauthenticated but required", ["mx.plain.test"], id="B-53-C-10-min-tls-encrypted"),
    pytest.param("tlsfail", "local_policy {\n        min_tls_level encrypted\n    }", "", 451, "4.4.0",
                 "TLS is not available or unauthenticated but required", ["mx.tlsfail.test"], id="B-52-tls-impossible"),
    pytest.param("selfsigned", "local_policy {\n        min_tls_level authenticated\n    }", "", 451, "4.4.0",
                 "TLS is not available or unauthenticated but required", ["mx.selfsigned.test"], id="C-11-min-tls-authenticated"),
    pytest.param("sts-nomatch", STS_ONLY, "", 451, "4.4.0", "Failed to establish the MX record authenticity (MTA-STS)",
                 ["mx.sts-nomatch.test"], id="C-43-sts-no-mx-listed"),
    pytest.param("sts-notls", STS_ONLY, "", 451, "4.4.0", "TLS is required but unavailable or failed (MTA-STS)",
                 ["mx.sts-notls.test"], id="C-44-sts-enforce-no-starttls"),
    pytest.param("sts-expired", STS_ONLY, "", 451, "4.4.0", "Recipient server TLS certificate is not trusted but authentication is required by MTA-STS",
                 ["mx.sts-expired.test"], id="C-45-C-56-sts-enforce-untrusted-cert"),
    pytest.param("sts-testing-nomatch", "mtasts\n    local_policy {\n        min_mx_level mtasts\n    }", "", 451, "4.4.0",
                 "Failed to establish the MX record authenticity", ["mx.sts-testing-nomatch.test"], id="C-49-sts-testing-min-mx-level"),
    pytest.param("plain", "mtasts\n    local_policy {\n        min_mx_level mtasts\n    }", "", 451, "4.4.0",
                 "Failed to establish the MX record authenticity", ["mx.plain.test"], id="C-52-no-policy-min-mx-mtasts"),
    pytest.param("dane-mismatch", ALL, "", 451, "4.4.0", "No matching TLSA records", ["mx.dane-mismatch.test"], id="C-81-dane-mismatch"),
    pytest.param("dane-sts-selfsigned", ALL, "", 451, "4.4.0",
                 "Recipient server TLS certificate is not trusted but authentication is required by MTA-STS",
                 ["mx.dane-sts-selfsigned.test"], id="C-1-C-45-dane-match-does-not-satisfy-sts-enforce"),
    pytest.param("dane-sts-mismatch", ALL, "", 451, "4.4.0", "No matching TLSA records",
                 ["mx.dane-sts-mismatch.test"], id="C-1-C-81-dane-failure-final-under-sts-enforce"),
    pytest.param("dane-notls", ALL, "", 451, "4.4.0", "TLS is required but unsupported or failed (enforced by DANE)",
                 ["mx.dane-notls.test"], id="C-79-dane-no-starttls"),
    pytest.param("dane-bogus", ALL, "", 451, "4.4.0", "No usable MXs, last err: DNS error", ["mx.dane-bogus.test"], id="C-77-dane-bogus-tlsa"),
    pytest.param("ipv6only", ALL, "force_ipv4 yes", 451, "4.4.0", "Network I/O error", [], id="B-110-force-ipv4"),
    pytest.param("stall", ALL, "submission_timeout 2s", 450, "4.4.2", "Network I/O error", [], id="B-103-no-reply-to-final-dot"),
]


@pytest.mark.parametrize("name,policies,remote,code,enhanced,fragment,no_mail_at", REFUSED)
def test_refused(harness, deliver, name, policies, remote, code, enhanced, fragment, no_mail_at):
    """The recipient fails with the exact code and class; attack cases never reach MAIL."""
    domain = _scenario_domain(harness, name)
    rcpt = harness.new_address(domain)
    mark = harness.mark()
    rc, res, log = deliver([rcpt], policies=policies, remote=remote)
    r = res[rcpt]
    assert (r.code, r.enhanced) == (code, enhanced), (r, log[-2000:])
    assert fragment in r.text
    assert r.status == ("temporary-failure" if code < 500 else "permanent-failure")
    assert rc == (75 if code < 500 else 69)
    for host in no_mail_at:
        assert harness.count_commands(host, "MAIL", since=mark) == 0, f"{host} saw MAIL"
    assert harness.mailbox(rcpt) == []


def test_per_recipient_replies_B_30(harness, deliver):
    """B-30/B-28: one connection, per-recipient RCPT results, only accepted ones delivered."""
    domain = _scenario_domain(harness, "reject")
    ok, bad, later = harness.new_address(domain, prefix="ok"), f"bad@{domain}", f"later@{domain}"
    mark = harness.mark()
    rc, res, _ = deliver([bad, ok, later])
    assert (res[bad].code, res[bad].enhanced, res[bad].status) == (550, "5.1.1", "permanent-failure")
    assert (res[later].code, res[later].enhanced, res[later].status) == (450, "4.2.0", "temporary-failure")
    assert res[ok].status == "delivered"
    assert rc == 69
    assert len(harness.wait_mailbox(ok)) == 1
    assert harness.count_commands("mx.reject.test", "MAIL", since=mark) == 1


def test_two_domains_two_connections_B_29(harness, deliver):
    """B-29/B-31: recipients in two domains: one connection each, both delivered."""
    a = harness.new_address(_scenario_domain(harness, "tls"))
    b = harness.new_address(_scenario_domain(harness, "plain"))
    rc, res, _ = deliver([a, b])
    assert rc == 0 and res[a].status == res[b].status == "delivered"
    assert harness.wait_mailbox(a)[0].received_by == "mx.tls.test"
    assert harness.wait_mailbox(b)[0].received_by == "mx.plain.test"


def test_shared_mx_strict_policy_only_for_its_domain_C_55_B_66(harness, deliver):
    """C-55/B-66: two domains on one MX without STARTTLS; only sts-notls.test has an enforce policy.
    Its recipient is refused and never reaches RCPT at that MX, the other domain's is delivered
    there in plaintext, on its own connection."""
    strict = harness.new_address(_scenario_domain(harness, "sts-notls"))
    other = harness.new_address(_scenario_domain(harness, "sts-shared"))
    mark = harness.mark()
    rc, res, _ = deliver([strict, other], policies=STS_ONLY)
    assert (res[strict].code, res[strict].enhanced) == (451, "4.4.0")
    assert "TLS is required but unavailable or failed (MTA-STS)" in res[strict].text
    assert res[other].status == "delivered" and res[other].mx == "mx.sts-notls.test."
    (msg,) = harness.wait_mailbox(other)
    assert msg.received_by == "mx.sts-notls.test" and not msg.tls
    assert harness.mailbox(strict) == []
    harness.wait_sessions_closed("mx.sts-notls.test", since=mark)
    sessions = harness.mx_sessions("mx.sts-notls.test", since=mark)
    rcpts = [c for sess in sessions for c in sess.commands if c.upper().startswith("RCPT")]
    assert rcpts and all(strict.split("@")[1] not in c for c in rcpts), rcpts


def test_content_sent_with_bdat_to_postfix_B_95(harness, deliver):
    """B-95/B-97 with CHUNKING [RFC 3030]: Postfix offers CHUNKING, so the content goes as one
    ``BDAT <size> LAST`` chunk after the RCPT reply, never with DATA. The message arrives
    byte for byte: lines starting with a dot, a line that is only a dot, bare LF line ends
    (sent as CRLF), 8-bit text and a body larger than one write."""
    domain = _scenario_domain(harness, "plain")
    rcpt = harness.new_address(domain)
    body_lines = [".leading dot", ".", "..two dots", "8-bit: Grüße, ÿ", *(f"line {i:05d} " + "x" * 70 for i in range(2000))]
    message = ("From: sender@sender.test\nSubject: bdat\n\n" + "\n".join(body_lines) + "\n").encode()
    mark = harness.mark()
    rc, res, log = deliver([rcpt], message=message)
    assert (rc, res[rcpt].status) == (0, "delivered"), log[-2000:]
    (msg,) = harness.wait_mailbox(rcpt)
    received_body = msg.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
    assert received_body == ("\n".join(body_lines) + "\n").encode()
    harness.wait_sessions_closed("mx.plain.test", since=mark)
    commands = [c.upper() for c in harness.mx_commands("mx.plain.test", since=mark)]
    bdat = [c for c in commands if c.startswith("BDAT")]
    assert len(bdat) == 1 and bdat[0].endswith(" LAST"), commands
    assert int(bdat[0].split()[1]) > 150_000
    assert "DATA" not in commands
    assert commands.index(bdat[0]) > max(i for i, c in enumerate(commands) if c.startswith("RCPT"))


_DELIVER_SEQUENCE = """
from gevent import monkey
monkey.patch_all()
import json, sys, time
from maddylite.config.parser import parse_string
from maddylite.interfaces import MsgMetadata
from maddylite.modules.endpoint.smtp import tls_required_no
from maddylite.modules.target.remote import RemoteTarget
from maddylite.runtime import ConfigSource, Runtime

workdir, ca, steps, extra, port = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], int(sys.argv[5])
RemoteTarget.smtp_port = port  # a private sink may listen on an MX's address, another port
conf = (f"state_dir {workdir}/state\\nhostname mx.sender.test\\nmx_auth p {{\\n mtasts\\n local_policy\\n}}\\n"
        f"target.remote r {{\\n mx_auth &p\\n {extra}\\n tls_client {{\\n  root_ca {ca}\\n }}\\n}}\\n")
rt = Runtime(ConfigSource(workdir + "/seq.conf"))
rt.configure(require_endpoint=False, nodes=parse_string(conf, filename=workdir + "/seq.conf"))
for m in rt.modules:
    m.start()
target = next(m for m in rt.modules if m.mod_name == "target.remote")
results, took = [], []
for i, (rcpt, header, *flags) in enumerate(steps):
    header = header.encode()
    meta = MsgMetadata(id=f"m{i}", tls_required_no=tls_required_no(header), **(flags[0] if flags else {}))
    start = time.monotonic()
    d = target.start_delivery(meta, "sender@sender.test")
    try:
        d.add_rcpt(rcpt)
        d.body(header, b"hello\\r\\n")
        d.commit()
        results.append(None)
    except Exception as e:
        d.abort()
        results.append(str(e))
    took.append(time.monotonic() - start)
print(json.dumps({"results": results, "took": took}))
"""


def _sequence(harness, workdir, steps, extra="", port=25):
    """_sequence delivers ``steps`` ([recipient, header(, MsgMetadata flags)]) one after
    another through one target.remote inside the namespace (so pooled connections carry
    over); returns (per-step error text or None, per-step seconds)."""
    import json
    import sys

    p = harness.ns_run([sys.executable, "-c", _DELIVER_SEQUENCE, str(workdir), str(harness.ca_pem_path), json.dumps(steps),
                        extra, str(port)], timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out["results"], out["took"]


def test_connection_reuse_seen_by_postfix_B_59_B_60(harness, workdir):
    """B-59/B-60 against Postfix: two deliveries to one domain, one after the other, over
    authenticated TLS: Postfix's log shows one session carrying both messages, each
    transaction after the first preceded by RSET, and both messages arrive."""
    domain = _scenario_domain(harness, "tls")
    rcpts = [harness.new_address(domain) for _ in range(2)]
    mark = harness.mark()
    results, _ = _sequence(harness, workdir, [[r, "Subject: reuse\r\n"] for r in rcpts], "conn_reuse_limit 10")
    assert results == [None, None]
    for r in rcpts:
        assert len(harness.wait_mailbox(r)) == 1
    harness.wait_sessions_closed("mx.tls.test", since=mark)
    sessions = [s for s in harness.mx_sessions("mx.tls.test", since=mark)
                if any(c.upper().startswith("MAIL") for c in s.commands)]
    assert len(sessions) == 1, [s.commands for s in sessions]
    verbs = [c.split()[0].upper() for c in sessions[0].commands]
    assert verbs.count("MAIL") == 2 and "STARTTLS" in verbs
    second = verbs.index("MAIL", verbs.index("MAIL") + 1)
    assert "RSET" in verbs[verbs.index("MAIL"):second]


def _await_ready(proc, ready, what, timeout=20.0):
    """_await_ready waits until ``ready()`` holds for a private daemon the test started,
    failing at once if the daemon died."""
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.05)


def _free_port(addr):
    import socket

    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _listening(addr, port):
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((addr, port)) == 0


def test_a_delayed_reply_to_the_content_is_awaited_from_smtp_sink_B_62_B_60(harness, workdir):
    """B-62, B-60 against smtp-sink (Postfix's test server): with ``-W .:1`` it waits a
    second before answering the end of data, and meanwhile answers whatever the client
    sent behind it, out of order. Nothing may follow the content before its reply: each of
    two deliveries over one reused connection takes its second (a RSET pipelined after the
    content would have had its 250 taken for the message's at once)."""
    import subprocess

    addr = str(harness.host("mx.bench.test").ipv4)
    domain = harness.bench_domains()[0]
    port = harness.ns_call(_free_port, addr)
    sink = harness.ns_popen(["smtp-sink", "-u", "nobody", "-h", "sink.test", "-W", ".:1", f"{addr}:{port}", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _await_ready(sink, lambda: harness.ns_call(_listening, addr, port), "smtp-sink")
        results, took = _sequence(harness, workdir, [[f"r{i}@{domain}", "Subject: delayed\r\n"] for i in range(2)],
                                  "conn_reuse_limit 10", port=port)
        assert results == [None, None]
        assert len(took) == 2 and all(t >= 0.9 for t in took), took
    finally:
        sink.terminate()
        sink.wait(10)


#: Not loopback, configured in the namespace (the harness's ULA base address), nothing on port 53.
UNTRUSTED_NS = "fd00:1ab::1"


def _untrusted_nsd(harness, workdir):
    """A second nsd, serving the harness's zones as they are (bogus signatures included)
    on a non-loopback address: what a resolv.conf's second, untrusted nameserver would
    answer when an attacker feeds it."""
    import subprocess

    out = []
    for line in (harness.workdir / "dns" / "nsd.conf").read_text().splitlines():
        key = line.strip().split(":", 1)[0]
        if key == "ip-address":
            line = f"  ip-address: {UNTRUSTED_NS}"
        elif key == "do-ip6":
            line = "  do-ip6: yes"
        elif key in ("zonelistfile", "xfrdfile", "pidfile", "logfile"):
            line = f'  {key}: "{workdir}/nsd-{key}"'
        elif key == "xfrdir":
            line = f'  xfrdir: "{workdir}"'
        out.append(line)
    conf = workdir / "nsd-untrusted.conf"
    conf.write_text("\n".join(out) + "\n")
    nsd = harness.ns_popen(["nsd", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _await_ready(nsd, lambda: "mx.bogus.test" in harness.dig("+norec", "bogus.test", "MX", server=UNTRUSTED_NS),
                 "the private nsd")
    return nsd


def test_a_bogus_answer_is_not_replaced_by_an_untrusted_nameservers_C_63_B_14(harness, deliver, workdir):
    """C-63 over B-14: resolv.conf lists the validating unbound (loopback) and then a
    nameserver on a non-loopback address (a real nsd serving the zones unvalidated). For
    bogus.test unbound answers SERVFAIL; the second server, whose AD bit is never trusted,
    is not asked, so the bogus MX data is not used: 451 4.4.4, and the MX never sees MAIL.
    A signed domain still gets its authenticated answer through the same resolv.conf."""
    nsd = _untrusted_nsd(harness, workdir)
    try:
        resolv = f"nameserver 127.0.0.1\nnameserver {UNTRUSTED_NS}\noptions trust-ad edns0\n"
        bogus = harness.new_address(_scenario_domain(harness, "bogus"))
        good = harness.new_address(_scenario_domain(harness, "tls"))
        mark = harness.mark()
        _, res, _ = deliver([bogus, good], resolv_conf=resolv)
        assert (res[bogus].code, res[bogus].enhanced, res[bogus].status) == (451, "4.4.4", "temporary-failure")
        assert "MX lookup error" in res[bogus].text
        assert harness.count_commands("mx.bogus.test", "MAIL", since=mark) == 0
        assert (res[good].status, res[good].tls_level, res[good].mx_level) == ("delivered", "authenticated", "dnssec")
    finally:
        nsd.terminate()
        nsd.wait(10)



def test_the_ad_bit_of_a_non_loopback_resolver_is_not_believed_C_59_C_60(harness, deliver):
    """C-59/C-60 with the real unbound: the same validating resolver, reached on its
    non-loopback address (fd00:1ab::53), sets AD on signed answers, but only a loopback
    resolver is believed. Through it a signed domain gets MX level none (not dnssec), DANE
    does not apply, and `min_mx_level dnssec` refuses before connecting; through ::1 the
    same signed domain is dnssec again."""
    far = "nameserver fd00:1ab::53\noptions trust-ad edns0\n"
    near = "nameserver ::1\noptions trust-ad edns0\n"
    signed = harness.new_address(_scenario_domain(harness, "tls"))
    # through the loopback resolver its TLSA mismatch refuses it (C-81, test_refused)
    dane = harness.new_address(_scenario_domain(harness, "dane-mismatch"))
    rc, res, log = deliver([signed, dane], resolv_conf=far)
    assert (res[signed].status, res[signed].tls_level, res[signed].mx_level) == ("delivered", "authenticated", "none"), log[-2000:]
    assert (res[dane].status, res[dane].mx_level) == ("delivered", "none"), log[-2000:]  # no trusted AD: no DANE
    strict = "dnssec\n    local_policy {\n        min_mx_level dnssec\n    }"
    rcpt = harness.new_address(_scenario_domain(harness, "dnssec"))
    mark = harness.mark()
    _, res, log = deliver([rcpt], policies=strict, resolv_conf=far)
    assert res[rcpt].status == "temporary-failure" and res[rcpt].code == 451, log[-2000:]
    assert harness.count_commands("mx.dnssec.test", "MAIL", since=mark) == 0
    rcpt = harness.new_address(_scenario_domain(harness, "dnssec"))
    _, res, log = deliver([rcpt], policies=strict, resolv_conf=near)
    assert (res[rcpt].status, res[rcpt].mx_level) == ("delivered", "dnssec"), log[-2000:]


def test_tls_required_no_and_requiretls_override_B_81_B_82(harness, deliver):
    """B-81: a message with `TLS-Required: No` goes to an MTA-STS enforce domain whose MX
    offers no STARTTLS, in plaintext (the policies are off for it). B-82: with
    `requiretls_override no` the header is ignored and the policy refuses; MAIL never sent."""
    domain = _scenario_domain(harness, "sts-notls")
    message = b"From: sender@sender.test\r\nTLS-Required: No\r\nSubject: no tls needed\r\n\r\nhello\r\n"
    rcpt = harness.new_address(domain)
    rc, res, log = deliver([rcpt], policies=STS_ONLY, message=message)
    assert (rc, res[rcpt].status, res[rcpt].tls_level) == (0, "delivered", "none"), log[-2000:]
    (msg,) = harness.wait_mailbox(rcpt)
    assert not msg.tls and msg.received_by == "mx.sts-notls.test"
    rcpt = harness.new_address(domain)
    mark = harness.mark()
    rc, res, log = deliver([rcpt], policies=STS_ONLY, message=message, remote="requiretls_override no")
    assert (res[rcpt].code, res[rcpt].enhanced, res[rcpt].status) == (451, "4.4.0", "temporary-failure"), log[-2000:]
    assert "MTA-STS" in res[rcpt].text
    assert harness.count_commands("mx.sts-notls.test", "MAIL", since=mark) == 0


def _smuggling_message(domain):
    """A message whose body holds, after a bare-LF `.` line, the commands of a second
    message to another recipient of the same domain."""
    return (f"From: sender@sender.test\nSubject: smuggling\n\nhello\n.\nMAIL FROM:<evil@sender.test>\n"
            f"RCPT TO:<victim@{domain}>\nDATA\nSubject: smuggled\n\nevil\n.\n").encode()


def test_a_message_cannot_smuggle_a_second_one_over_data_B_95_B_97(harness, deliver):
    """SMTP smuggling through DATA: the MX (Postfix) offers no CHUNKING, so the content goes
    with DATA. A body holding a bare-LF `.` line and commands after it arrives as one message
    with those lines as text; the would-be victim gets nothing and Postfix sees one MAIL."""
    domain = _scenario_domain(harness, "nochunking")
    rcpt = harness.new_address(domain)
    mark = harness.mark()
    rc, res, log = deliver([rcpt], message=_smuggling_message(domain))
    assert (rc, res[rcpt].status) == (0, "delivered"), log[-2000:]
    (msg,) = harness.wait_mailbox(rcpt)
    body = msg.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
    assert body == f"hello\n.\nMAIL FROM:<evil@sender.test>\nRCPT TO:<victim@{domain}>\nDATA\nSubject: smuggled\n\nevil\n.\n".encode()
    harness.wait_sessions_closed("mx.nochunking.test", since=mark)
    commands = [c.upper() for c in harness.mx_commands("mx.nochunking.test", since=mark)]
    assert "DATA" in commands and not any(c.startswith("BDAT") for c in commands)
    assert harness.count_commands("mx.nochunking.test", "MAIL", since=mark) == 1
    assert harness.mailbox(f"victim@{domain}") == []


def test_a_pooled_weaker_session_never_serves_stricter_mail_B_66_C_55(harness, workdir):
    """B-66/C-55 across deliveries, against Postfix: one MX without STARTTLS serves
    sts-shared.test (no policy) and sts-notls.test (MTA-STS enforce). A plaintext
    connection pooled by sts-shared.test, or by a `TLS-Required: No` message to
    sts-notls.test, is never taken by a later sts-notls.test message: that one is refused
    and Postfix sees no MAIL for it."""
    shared = harness.new_address(_scenario_domain(harness, "sts-shared"))
    strict = harness.new_address(_scenario_domain(harness, "sts-notls"))
    waived = harness.new_address(_scenario_domain(harness, "sts-notls"))
    strict2 = harness.new_address(_scenario_domain(harness, "sts-notls"))
    plain_header = "Subject: pooled\r\n"
    steps = [[shared, plain_header], [strict, plain_header], [waived, "TLS-Required: No\r\n" + plain_header],
             [strict2, plain_header]]
    mark = harness.mark()
    results, _ = _sequence(harness, workdir, steps)
    assert results[0] is None and results[2] is None, results
    for i in (1, 3):
        assert results[i] and "MTA-STS" in results[i], results
    assert len(harness.wait_mailbox(shared)) == 1 and len(harness.wait_mailbox(waived)) == 1
    assert harness.mailbox(strict) == [] and harness.mailbox(strict2) == []
    harness.wait_sessions_closed("mx.sts-notls.test", since=mark)
    rcpts = [c for s in harness.mx_sessions("mx.sts-notls.test", since=mark) for c in s.commands
             if c.upper().startswith("RCPT")]
    assert len(rcpts) == 2 and not any(strict in c or strict2 in c for c in rcpts), rcpts


def test_a_message_over_the_mx_size_is_refused_before_mail_B_93(harness, deliver):
    """B-93 against Postfix announcing SIZE 10000: a bigger message fails 552 5.3.4 for
    good, and MAIL is never sent; a smaller one is delivered."""
    domain = _scenario_domain(harness, "smallsize")
    big, small = harness.new_address(domain), harness.new_address(domain)
    mark = harness.mark()
    rc, res, log = deliver([big], message=b"From: sender@sender.test\r\nSubject: big\r\n\r\n" + b"x" * 70 * 200 + b"\r\n")
    rc2, res2, _ = deliver([small])
    assert (res[big].code, res[big].enhanced, res[big].status) == (552, "5.3.4", "permanent-failure"), log[-2000:]
    assert "Message is too big for the recipient server" in res[big].text
    assert res2[small].status == "delivered"
    assert harness.count_commands("mx.smallsize.test", "MAIL", since=mark) == 1


def test_an_mx_without_smtputf8_and_8bitmime_B_89_B_92(harness, deliver):
    """Against Postfix announcing neither SMTPUTF8 nor 8BITMIME: a non-ASCII recipient
    local part fails 553 5.6.7 while an ASCII recipient of the same message is delivered
    (B-89); 8-bit content fails 554 5.6.3 and no DATA is sent (B-92)."""
    domain = _scenario_domain(harness, "nosmtputf8")
    ascii_rcpt = harness.new_address(domain)
    utf8_rcpt = f"тест@{domain}"
    rc, res, log = deliver([utf8_rcpt, ascii_rcpt])
    assert (res[utf8_rcpt].code, res[utf8_rcpt].enhanced) == (553, "5.6.7"), log[-2000:]
    assert res[ascii_rcpt].status == "delivered"
    rcpt = harness.new_address(domain)
    mark = harness.mark()
    _, res, log = deliver([rcpt], message="From: sender@sender.test\r\nSubject: café\r\n\r\ncafé\r\n".encode())
    assert (res[rcpt].code, res[rcpt].enhanced, res[rcpt].status) == (554, "5.6.3", "permanent-failure"), log[-2000:]
    harness.wait_sessions_closed("mx.nosmtputf8.test", since=mark)
    assert "DATA" not in [c.upper() for c in harness.mx_commands("mx.nosmtputf8.test", since=mark)]
    assert harness.mailbox(rcpt) == []


def test_recipients_over_the_mx_limit_fail_temporarily_B_32(harness, deliver):
    """B-32 against Postfix with smtpd_recipient_limit 100: of 101 recipients the first 100
    are delivered in one message, the 101st fails 452 4.5.3 temporarily (to be retried)."""
    domain = _scenario_domain(harness, "rcptlimit")
    rcpts = [harness.new_address(domain) for _ in range(101)]
    rc, res, log = deliver(rcpts)
    assert all(res[r].status == "delivered" for r in rcpts[:100]), log[-2000:]
    assert (res[rcpts[100]].code, res[rcpts[100]].enhanced, res[rcpts[100]].status) == (452, "4.5.3", "temporary-failure")
    assert rc == 75
    assert len(harness.wait_mailbox(rcpts[0])) == 1 and harness.mailbox(rcpts[100]) == []


def test_requiretls_never_takes_a_pooled_connection_and_strict_mode_refuses_B_68_B_72(harness, workdir):
    """B-68: a REQUIRETLS message to an MTA-STS enforce domain (authenticated TLS, MX level
    mtasts) after an ordinary one opens a connection of its own (Postfix logs two sessions
    with MAIL). B-72: with `relaxed_requiretls no` the same message is refused 550 5.7.30,
    since Postfix does not offer REQUIRETLS; MAIL is never sent for it."""
    domain = _scenario_domain(harness, "sts-enforce")
    first, second = harness.new_address(domain), harness.new_address(domain)
    mark = harness.mark()
    results, _ = _sequence(harness, workdir, [[first, "Subject: a\r\n"], [second, "Subject: b\r\n", {"requiretls": True}]])
    assert results == [None, None]
    assert len(harness.wait_mailbox(first)) == 1 and len(harness.wait_mailbox(second)) == 1
    harness.wait_sessions_closed("mx.sts-enforce.test", since=mark)
    with_mail = [s for s in harness.mx_sessions("mx.sts-enforce.test", since=mark)
                 if any(c.upper().startswith("MAIL") for c in s.commands)]
    assert len(with_mail) == 2, [s.commands for s in with_mail]
    strict = harness.new_address(domain)
    mark = harness.mark()
    (err,), _ = _sequence(harness, workdir, [[strict, "Subject: c\r\n", {"requiretls": True}]], "relaxed_requiretls no")
    assert err and err.startswith("550 5.7.30") and "REQUIRETLS" in err, err
    assert harness.count_commands("mx.sts-enforce.test", "MAIL", since=mark) == 0
    assert harness.mailbox(strict) == []



def test_refusals_of_mail_and_of_the_content_from_postfix_B_19_B_35_B_62(harness, deliver, workdir):
    """Against Postfix (the reject scenario's magic values): MAIL refused 550 fails the
    recipient for good (B-19); the content refused 550 or deferred 451 after the final dot
    fails with that reply (B-35); and a connection whose content was refused is never
    reused: the next message opens a session of its own (B-62)."""
    domain = _scenario_domain(harness, "reject")
    rcpt = harness.new_address(domain, prefix="ok")
    _, res, log = deliver([rcpt], sender="reject-mail@sender.test")
    assert (res[rcpt].code, res[rcpt].enhanced, res[rcpt].status) == (550, "5.7.1", "permanent-failure"), log[-2000:]
    for subject, code, enhanced, status in (("harness-reject-data", 550, "5.7.1", "permanent-failure"),
                                            ("harness-defer-data", 451, "4.7.1", "temporary-failure")):
        rcpt = harness.new_address(domain, prefix="ok")
        message = f"From: sender@sender.test\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
        _, res, log = deliver([rcpt], message=message)
        assert (res[rcpt].code, res[rcpt].enhanced, res[rcpt].status) == (code, enhanced, status), log[-2000:]
        assert harness.mailbox(rcpt) == []
    refused, after = harness.new_address(domain, prefix="ok"), harness.new_address(domain, prefix="ok")
    mark = harness.mark()
    results, _ = _sequence(harness, workdir, [[refused, "Subject: harness-reject-data\r\n"], [after, "Subject: fine\r\n"]],
                           "conn_reuse_limit 10")
    assert results[0] and results[0].startswith("550") and results[1] is None, results
    assert len(harness.wait_mailbox(after)) == 1
    harness.wait_sessions_closed("mx.reject.test", since=mark)
    with_mail = [s for s in harness.mx_sessions("mx.reject.test", since=mark)
                 if any(c.upper().startswith("MAIL") for c in s.commands)]
    assert len(with_mail) == 2, [s.commands for s in with_mail]


STRIPPED_NS = "127.0.0.5"  # a loopback address of the namespace where nothing listens


def _stripping_unbound(harness, workdir, domain):
    """A second validating unbound, the harness's own configuration on another loopback
    address, except that it answers NXDOMAIN for ``_mta-sts.<domain>``: an attacker who
    strips the MTA-STS TXT record."""
    import subprocess

    out = []
    for line in harness.unbound_conf_path.read_text().splitlines():
        key = line.strip().split(":", 1)[0]
        if key == "interface":
            continue  # the one address is added after "server:"
        if key in ("pidfile", "logfile"):
            line = f'  {key}: "{workdir}/stripping-unbound.{key}"'
        elif key == "directory":
            line = f'  directory: "{workdir}"'
        elif key == "control-enable":
            line = "  control-enable: no"
        elif key in ("control-interface", "control-use-cert"):
            continue
        out.append(line)
        if line.strip() == "server:":
            out.append(f"  interface: {STRIPPED_NS}")
        if key == "local-zone":
            out.append(f'  local-zone: "_mta-sts.{domain}." always_nxdomain')
    conf = workdir / "stripping-unbound.conf"
    conf.write_text("\n".join(out) + "\n")
    proc = harness.ns_popen(["unbound", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _await_ready(proc, lambda: "status: NXDOMAIN" in harness.dig(f"_mta-sts.{domain}", "TXT", server=STRIPPED_NS),
                 "the stripping unbound")
    return proc


def test_a_cached_mta_sts_policy_outlives_a_stripped_txt_record_C_18_C_30_C_38(harness, deliver, workdir):
    """C-18/C-30/C-38 with the real nginx and unbound: an attacker strips the MTA-STS TXT
    record (a resolver answering NXDOMAIN for it). Without a cached policy the message would
    go to the MX the policy does not list (the control: delivered). With the policy cached
    on disk by an earlier delivery, it still applies: refused, that MX never sees MAIL, and
    the policy is not fetched again."""
    import shutil

    domain = _scenario_domain(harness, "sts-nomatch")
    stripping = _stripping_unbound(harness, workdir, domain)
    try:
        resolv = f"nameserver {STRIPPED_NS}\noptions trust-ad edns0\n"
        control = harness.new_address(domain)
        _, res, log = deliver([control], policies=STS_ONLY, resolv_conf=resolv)
        assert res[control].status == "delivered", log[-2000:]  # stripped and nothing cached: no policy
        shutil.rmtree(workdir / "state")
        first = harness.new_address(domain)
        _, res, log = deliver([first], policies=STS_ONLY)
        assert res[first].status == "temporary-failure" and "MTA-STS" in res[first].text, log[-2000:]
        mark = harness.mark()
        later = harness.new_address(domain)
        _, res, log = deliver([later], policies=STS_ONLY, resolv_conf=resolv)
        assert res[later].status == "temporary-failure" and "MTA-STS" in res[later].text, log[-2000:]
        assert harness.count_commands("mx.sts-nomatch.test", "MAIL", since=mark) == 0
        assert harness.count_sts_fetches(domain, since=mark) == 0
        assert harness.mailbox(later) == []
    finally:
        stripping.terminate()
        stripping.wait(10)
