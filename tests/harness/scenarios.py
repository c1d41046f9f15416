"""The scenario table: the single source of the harness's private Internet.

Everything the harness generates (addresses, keys, certificates, zones, TLSA and DS
records, MTA-STS policies, Postfix/nginx/nsd/unbound configuration) is derived from the
data in this file by ``model.py`` and the generators; nothing below is a digest or an
address.  Add a scenario by adding an entry.

Scenario keys
-------------
name          unique scenario name (what ``Harness.scenario(name)`` takes)
domain        the recipient domain; or ``domains`` = {"pattern": "b{:03d}.bench.test",
              "count": 100} for a family of domains sharing one zone and MX
zone          signing of the domain's zone: "signed" (DS in ``test.``), "unsigned"
              (insecure delegation: no DS), "bogus" (every signature expired)
zone_name     the zone the domain lives in, if not the domain itself
extra_zones   {zone: signing} for further zones the scenario's hosts live in
mx            list of [preference, host]; host "." is a null MX; [] means no MX records
hosts         {host name: host spec}; a host named like the domain puts its address at
              the zone apex (implicit MX)
mta_sts       MTA-STS publication (see below), or absent
expect        what a correct client does (prose; the case IDs are in ``spec``)
via           the MX host that receives the message when delivery succeeds as expected
spec          behaviour-spec case IDs the scenario exists for

Host spec keys (all optional)
-----------------------------
server        "smtpd" (a Postfix listener, the default), "refused" (nothing listens),
              "blackhole" (SYNs dropped by nftables), "never-greets", "stall-after-data",
              "greet-554", "greet-421", "starttls-454" (small misbehaving servers),
              "sink" (Postfix smtp-sink, discards), "nxdomain" (the name has no records)
starttls      smtpd only; default True
cert          "ca" (private CA, the default), "selfsigned", "expired" (CA-issued, expired),
              "wildcard" (``*.<parent>``), "wrongname" (CA-issued for another name),
              "dane-ta" (issued by a second CA that is *not* in the CA bundle; the server
              sends that CA in its chain)
family        "v4" (default), "v6" (AAAA only), "dual"
tlsa          list of "U S M SOURCE": SOURCE is "self" (the certificate served for this
              name, through a CNAME if there is one), "issuer"
              (the certificate's issuer), "other" (an unrelated key: never matches)
tlsa_bogus    the TLSA RRset alone carries broken signatures (digests themselves correct)
cname         this name is a CNAME to the given host name
discard       smtpd only: mail for this host's domains is accepted and discarded
ehlo_discard  smtpd only: EHLO keywords not announced (e.g. ["smtputf8", "8bitmime"])
size_limit    smtpd only: message_size_limit (announced with SIZE)
recipient_limit  smtpd only: RCPTs per transaction before 452 4.5.3
tls_protocols smtpd only: e.g. "TLSv1" (advertises STARTTLS, no handshake succeeds)

MTA-STS keys
------------
mode          "enforce", "testing" or "none"
mx            the policy's mx patterns
crlf          serve the policy with CRLF line ends
fetch         "ok" (default), "redirect" (301 to ``redirect_to``'s policy URL), "404",
              "html" (Content-Type text/html), "selfsigned" (HTTPS certificate not trusted),
              "oversized" (a valid policy padded past 64 KiB with unknown keys)
"""

from __future__ import annotations

# Magic addresses understood by every Postfix MX listener (server "smtpd").
MAGIC = {
    # recipient local parts
    "rcpt_550": "bad",  # RCPT -> 550 5.1.1
    "rcpt_450": "later",  # RCPT -> 450 4.2.0
    # sender local part
    "mail_550": "reject-mail",  # MAIL -> 550 5.7.1 (smtpd_delay_reject = no)
    # Subject substrings checked at the end of DATA
    "data_550": "harness-reject-data",  # final dot -> 550 5.7.1
    "data_451": "harness-defer-data",  # final dot -> 451 4.7.1
}

# A policy mx pattern that matches no MX in the table.
ELSEWHERE = "mx.elsewhere.test"

SCENARIOS: list[dict] = [
    # ------------------------------------------------------------------ basic delivery
    {
        "name": "plain",
        "domain": "plain.test",
        "mx": [[10, "mx.plain.test"]],
        "hosts": {"mx.plain.test": {"starttls": False}},
        "expect": "delivered in plaintext, TLS level none",
        "via": "mx.plain.test",
        "spec": ["B-1", "B-2", "B-46", "B-53"],
    },
    {
        "name": "tls",
        "domain": "tls.test",
        "mx": [[10, "mx.tls.test"]],
        "hosts": {"mx.tls.test": {"cert": "ca"}},
        "expect": "STARTTLS, certificate valid for mx.tls.test under the harness CA: "
        "TLS level authenticated (with root_ca = the harness CA)",
        "via": "mx.tls.test",
        "spec": ["B-44", "B-45", "B-54", "B-57"],
    },
    {
        "name": "selfsigned",
        "domain": "selfsigned.test",
        "mx": [[10, "mx.selfsigned.test"]],
        "hosts": {"mx.selfsigned.test": {"cert": "selfsigned"}},
        "expect": "verify error, new connection without verification: TLS level encrypted",
        "via": "mx.selfsigned.test",
        "spec": ["B-47"],
    },
    {
        "name": "expired",
        "domain": "expired.test",
        "mx": [[10, "mx.expired.test"]],
        "hosts": {"mx.expired.test": {"cert": "expired"}},
        "expect": "certificate expired: verify error, retry unverified: TLS level encrypted",
        "via": "mx.expired.test",
        "spec": ["B-47"],
    },
    {
        "name": "wrongname",
        "domain": "wrongname.test",
        "mx": [[10, "mx.wrongname.test"]],
        "hosts": {"mx.wrongname.test": {"cert": "wrongname"}},
        "expect": "certificate for another name: verify error, retry unverified: encrypted",
        "via": "mx.wrongname.test",
        "spec": ["B-47"],
    },
    {
        "name": "wildcard",
        "domain": "wildcard.test",
        "mx": [[10, "mx.wildcard.test"]],
        "hosts": {"mx.wildcard.test": {"cert": "wildcard"}},
        "expect": "certificate *.wildcard.test matches mx.wildcard.test: authenticated",
        "via": "mx.wildcard.test",
        "spec": ["B-44"],
    },
    {
        "name": "tlsfail",
        "domain": "tlsfail.test",
        "mx": [[10, "mx.tlsfail.test"]],
        "hosts": {"mx.tlsfail.test": {"tls_protocols": "TLSv1"}},
        "expect": "STARTTLS advertised but no handshake succeeds (TLS 1.0 only): "
        "'TLS error, trying plaintext', delivered in plaintext",
        "via": "mx.tlsfail.test",
        "spec": ["B-48", "B-49", "B-52"],
    },
    {
        "name": "nosmtputf8",
        "domain": "nosmtputf8.test",
        "mx": [[10, "mx.nosmtputf8.test"]],
        "hosts": {"mx.nosmtputf8.test": {"ehlo_discard": ["smtputf8", "8bitmime"]}},
        "expect": "EHLO lacks SMTPUTF8 and 8BITMIME: addresses converted to A-labels or "
        "rejected locally (5.6.7), 8-bit content refused (5.6.3)",
        "via": "mx.nosmtputf8.test",
        "spec": ["B-86", "B-87", "B-88", "B-89", "B-91", "B-92"],
    },
    {
        "name": "smallsize",
        "domain": "smallsize.test",
        "mx": [[10, "mx.smallsize.test"]],
        "hosts": {"mx.smallsize.test": {"size_limit": 10000}},
        "expect": "EHLO announces SIZE 10000; a bigger message fails 552 5.3.4 before MAIL",
        "via": "mx.smallsize.test",
        "spec": ["B-93"],
    },
    {
        "name": "rcptlimit",
        "domain": "rcptlimit.test",
        "mx": [[10, "mx.rcptlimit.test"]],
        "hosts": {"mx.rcptlimit.test": {"recipient_limit": 100}},
        "expect": "RCPT 101 and later answered 452 4.5.3; the first 100 are delivered",
        "via": "mx.rcptlimit.test",
        "spec": ["B-32"],
    },
    {
        "name": "reject",
        "domain": "reject.test",
        "mx": [[10, "mx.reject.test"]],
        "hosts": {"mx.reject.test": {}},
        "expect": "bad@ -> RCPT 550 5.1.1 perm, later@ -> RCPT 450 4.2.0 temp, any other "
        "local part delivered; sender reject-mail@ -> MAIL 550 5.7.1; Subject "
        "harness-reject-data / harness-defer-data -> 550 5.7.1 / 451 4.7.1 after DATA "
        "(these magic addresses work on every Postfix MX)",
        "via": "mx.reject.test",
        "spec": ["B-19", "B-20", "B-30", "B-31", "B-35", "B-38"],
    },
    # ------------------------------------------------------------------ MX selection and DNS
    {
        "name": "dnssec",
        "domain": "dnssec.test",
        "mx": [[10, "mx.dnssec.test"]],
        "hosts": {"mx.dnssec.test": {}},
        "expect": "MX answer carries AD: MX level dnssec; delivered",
        "via": "mx.dnssec.test",
        "spec": ["C-57", "C-65"],
    },
    {
        "name": "insecure",
        "domain": "insecure.test",
        "zone": "unsigned",
        "mx": [[10, "mx.insecure.test"]],
        "hosts": {"mx.insecure.test": {}},
        "expect": "insecure delegation, no AD: MX level none; min_mx_level dnssec -> 451 4.7.0 "
        "without a connection; otherwise delivered",
        "via": "mx.insecure.test",
        "spec": ["C-58", "C-68"],
    },
    {
        "name": "bogus",
        "domain": "bogus.test",
        "zone": "bogus",
        "mx": [[10, "mx.bogus.test"]],
        "hosts": {"mx.bogus.test": {}},
        "expect": "every signature expired: SERVFAIL -> 451 4.4.4 MX lookup error, no connection",
        "via": None,
        "spec": ["B-10", "C-63"],
    },
    {
        "name": "nullmx",
        "domain": "nullmx.test",
        "mx": [[0, "."]],
        "hosts": {},
        "expect": "null MX: 556 5.1.10 perm, no connection",
        "via": None,
        "spec": ["B-7"],
    },
    {
        "name": "nullmx-mixed",
        "domain": "nullmx-mixed.test",
        "mx": [[10, "."], [5, "mx.nullmx-mixed.test"]],
        "hosts": {"mx.nullmx-mixed.test": {}},
        "expect": "a null MX among others still means no mail: 556 5.1.10, no connection",
        "via": None,
        "spec": ["B-7"],
    },
    {
        "name": "nomx",
        "domain": "nomx.test",
        "mx": [],
        "hosts": {"nomx.test": {}},
        "expect": "no MX, apex A record: implicit MX nomx.test; delivered",
        "via": "nomx.test",
        "spec": ["B-5", "C-65"],
    },
    {
        "name": "noaddr",
        "domain": "noaddr.test",
        "mx": [],
        "hosts": {},
        "expect": "no MX and no address: 550 5.4.0 'No usable MXs, last err: DNS error'",
        "via": None,
        "spec": ["B-6"],
    },
    {
        "name": "unresolvable",
        "domain": "unresolvable.test",
        "mx": [[10, "nohost.unresolvable.test"], [20, "mx.unresolvable.test"]],
        "hosts": {"nohost.unresolvable.test": {"server": "nxdomain"}, "mx.unresolvable.test": {}},
        "expect": "first MX host is NXDOMAIN (550 5.4.4 DNS error for that MX); delivered via "
        "the second",
        "via": "mx.unresolvable.test",
        "spec": ["B-15"],
    },
    {
        "name": "twomx",
        "domain": "twomx.test",
        "mx": [[20, "mx2.twomx.test"], [10, "mx1.twomx.test"]],
        "hosts": {"mx1.twomx.test": {"server": "refused"}, "mx2.twomx.test": {}},
        "expect": "MX 10 refuses the connection, MX 20 is used: delivered via mx2",
        "via": "mx2.twomx.test",
        "spec": ["B-3"],
    },
    {
        "name": "allrefused",
        "domain": "allrefused.test",
        "mx": [[10, "mx1.allrefused.test"], [20, "mx2.allrefused.test"]],
        "hosts": {
            "mx1.allrefused.test": {"server": "refused"},
            "mx2.allrefused.test": {"server": "refused"},
        },
        "expect": "both refused: 451 4.4.0 'No usable MXs, last err: Network I/O error'",
        "via": None,
        "spec": ["B-16"],
    },
    {
        "name": "ipv6only",
        "domain": "ipv6only.test",
        "mx": [[10, "mx.ipv6only.test"]],
        "hosts": {"mx.ipv6only.test": {"family": "v6"}},
        "expect": "AAAA only: delivered over IPv6 (authenticated); force_ipv4 -> 451 4.4.0",
        "via": "mx.ipv6only.test",
        "spec": ["B-109", "B-110", "C-78"],
    },
    {
        "name": "dualstack",
        "domain": "dualstack.test",
        "mx": [[10, "mx.dualstack.test"]],
        "hosts": {"mx.dualstack.test": {"family": "dual"}},
        "expect": "A and AAAA, the same listener on both: delivered over either family",
        "via": "mx.dualstack.test",
        "spec": ["B-111"],
    },
    # ------------------------------------------------------------------ misbehaving peers
    {
        "name": "greet554",
        "domain": "greet554.test",
        "mx": [[10, "mx1.greet554.test"], [20, "mx2.greet554.test"]],
        "hosts": {"mx1.greet554.test": {"server": "greet-554"}, "mx2.greet554.test": {}},
        "expect": "MX 10 greets '554 No SMTP service here': failed, delivered via mx2",
        "via": "mx2.greet554.test",
        "spec": ["B-18"],
    },
    {
        "name": "greet421",
        "domain": "greet421.test",
        "mx": [[10, "mx1.greet421.test"], [20, "mx2.greet421.test"]],
        "hosts": {"mx1.greet421.test": {"server": "greet-421"}, "mx2.greet421.test": {}},
        "expect": "MX 10 greets 421: failed (temp), delivered via mx2",
        "via": "mx2.greet421.test",
        "spec": ["B-18"],
    },
    {
        "name": "starttls454",
        "domain": "starttls454.test",
        "mx": [[10, "mx1.starttls454.test"], [20, "mx2.starttls454.test"]],
        "hosts": {"mx1.starttls454.test": {"server": "starttls-454"}, "mx2.starttls454.test": {}},
        "expect": "MX 10 advertises STARTTLS and answers it 454 4.7.0: no fallback on that MX, "
        "delivered via mx2",
        "via": "mx2.starttls454.test",
        "spec": ["B-50"],
    },
    {
        "name": "nevergreets",
        "domain": "nevergreets.test",
        "mx": [[10, "mx1.nevergreets.test"], [20, "mx2.nevergreets.test"]],
        "hosts": {"mx1.nevergreets.test": {"server": "never-greets"}, "mx2.nevergreets.test": {}},
        "expect": "MX 10 accepts TCP and never greets: 450 4.4.2 after the greeting wait, "
        "then delivered via mx2",
        "via": "mx2.nevergreets.test",
        "spec": ["B-101"],
    },
    {
        "name": "stall",
        "domain": "stall.test",
        "mx": [[10, "mx.stall.test"]],
        "hosts": {"mx.stall.test": {"server": "stall-after-data"}},
        "expect": "no reply to the final dot: 450 4.4.2 after submission_timeout",
        "via": None,
        "spec": ["B-103"],
    },
    {
        "name": "blackhole",
        "domain": "blackhole.test",
        "mx": [[10, "mx1.blackhole.test"], [20, "mx2.blackhole.test"]],
        "hosts": {"mx1.blackhole.test": {"server": "blackhole"}, "mx2.blackhole.test": {}},
        "expect": "MX 10 drops SYNs: 450 4.4.2 after connect_timeout, delivered via mx2",
        "via": "mx2.blackhole.test",
        "spec": ["B-100"],
    },
    # ------------------------------------------------------------------ MTA-STS
    {
        "name": "sts-enforce",
        "domain": "sts-enforce.test",
        "mx": [[10, "mx.sts-enforce.test"]],
        "hosts": {"mx.sts-enforce.test": {}},
        "mta_sts": {"mode": "enforce", "mx": ["mx.sts-enforce.test"]},
        "expect": "enforce, MX listed, PKIX-valid TLS: MX level mtasts; delivered",
        "via": "mx.sts-enforce.test",
        "spec": ["C-14", "C-19", "C-30", "C-47"],
    },
    {
        "name": "sts-mismatch",
        "domain": "sts-mismatch.test",
        "mx": [[5, "mx1.sts-mismatch.test"], [10, "mx2.sts-mismatch.test"]],
        "hosts": {"mx1.sts-mismatch.test": {}, "mx2.sts-mismatch.test": {}},
        "mta_sts": {"mode": "enforce", "mx": ["mx2.sts-mismatch.test"]},
        "expect": "enforce, MX 5 not in the policy: skipped without a connection; delivered "
        "via mx2",
        "via": "mx2.sts-mismatch.test",
        "spec": ["C-41", "C-42"],
    },
    {
        "name": "sts-nomatch",
        "domain": "sts-nomatch.test",
        "mx": [[10, "mx.sts-nomatch.test"]],
        "hosts": {"mx.sts-nomatch.test": {}},
        "mta_sts": {"mode": "enforce", "mx": [ELSEWHERE]},
        "expect": "enforce, no MX in the policy: 451 4.4.0 '... (MTA-STS)', no connection",
        "via": None,
        "spec": ["C-43"],
    },
    {
        "name": "sts-notls",
        "domain": "sts-notls.test",
        "mx": [[10, "mx.sts-notls.test"]],
        "hosts": {"mx.sts-notls.test": {"starttls": False}},
        "mta_sts": {"mode": "enforce", "mx": ["mx.sts-notls.test"]},
        "expect": "enforce, MX without STARTTLS: 451 4.7.1 'TLS is required but unavailable or "
        "failed (MTA-STS)', MAIL not issued; TLS-Required: No -> delivered in plaintext",
        "via": None,
        "spec": ["C-44", "B-81", "B-82"],
    },
    {
        "name": "sts-shared",
        "domain": "sts-shared.test",
        "mx": [[10, "mx.sts-notls.test"]],
        "expect": "no MTA-STS policy, MX shared with sts-notls.test (enforce, no STARTTLS): "
        "delivered in plaintext, while sts-notls.test mail to the same MX is refused",
        "via": "mx.sts-notls.test",
        "spec": ["C-55", "B-66"],
    },
    {
        "name": "sts-expired",
        "domain": "sts-expired.test",
        "mx": [[10, "mx.sts-expired.test"]],
        "hosts": {"mx.sts-expired.test": {"cert": "expired"}},
        "mta_sts": {"mode": "enforce", "mx": ["mx.sts-expired.test"]},
        "expect": "enforce, MX certificate expired: 451 4.7.1 'Recipient server TLS "
        "certificate is not trusted ...', MAIL not issued",
        "via": None,
        "spec": ["C-45", "C-56"],
    },
    {
        "name": "sts-testing",
        "domain": "sts-testing.test",
        "mx": [[10, "mx.sts-testing.test"]],
        "hosts": {"mx.sts-testing.test": {}},
        "mta_sts": {"mode": "testing", "mx": ["mx.sts-testing.test"]},
        "expect": "testing, MX listed: MX level mtasts, no TLS enforcement; delivered",
        "via": "mx.sts-testing.test",
        "spec": ["C-48", "B-71", "B-73"],
    },
    {
        "name": "sts-testing-nomatch",
        "domain": "sts-testing-nomatch.test",
        "mx": [[10, "mx.sts-testing-nomatch.test"]],
        "hosts": {"mx.sts-testing-nomatch.test": {}},
        "mta_sts": {"mode": "testing", "mx": [ELSEWHERE]},
        "expect": "testing, MX not listed: delivered with MX level none; with min_mx_level "
        "mtasts -> 451 4.7.0",
        "via": "mx.sts-testing-nomatch.test",
        "spec": ["C-49", "C-50"],
    },
    {
        "name": "sts-none",
        "domain": "sts-none.test",
        "mx": [[10, "mx.sts-none.test"]],
        "hosts": {"mx.sts-none.test": {"starttls": False}},
        "mta_sts": {"mode": "none", "mx": []},
        "expect": "mode none: no MTA-STS effect; delivered (plaintext MX)",
        "via": "mx.sts-none.test",
        "spec": ["C-26"],
    },
    {
        "name": "sts-wildcard",
        "domain": "sts-wildcard.test",
        "mx": [[10, "mx1.sts-wildcard.test"]],
        "hosts": {"mx1.sts-wildcard.test": {"cert": "wildcard"}},
        "mta_sts": {"mode": "enforce", "mx": ["*.sts-wildcard.test"]},
        "expect": "enforce, mx pattern *.sts-wildcard.test, wildcard certificate: delivered",
        "via": "mx1.sts-wildcard.test",
        "spec": ["C-26", "C-53"],
    },
    {
        "name": "sts-crlf",
        "domain": "sts-crlf.test",
        "mx": [[10, "mx.sts-crlf.test"]],
        "hosts": {"mx.sts-crlf.test": {}},
        "mta_sts": {"mode": "enforce", "mx": ["mx.sts-crlf.test"], "crlf": True},
        "expect": "enforce policy with CRLF line ends is valid: MX level mtasts; delivered",
        "via": "mx.sts-crlf.test",
        "spec": ["C-26"],
    },
    {
        "name": "sts-redirect",
        "domain": "sts-redirect.test",
        "mx": [[10, "mx.sts-redirect.test"]],
        "hosts": {"mx.sts-redirect.test": {}},
        "mta_sts": {
            "mode": "enforce",
            "mx": ["mx.sts-enforce.test"],
            "fetch": "redirect",
            "redirect_to": "sts-enforce.test",
        },
        "expect": "301 to a valid policy that does not list this MX: the redirect is not "
        "followed, no policy, delivered (following it would give 451 4.7.0)",
        "via": "mx.sts-redirect.test",
        "spec": ["C-21", "C-36"],
    },
    {
        "name": "sts-404",
        "domain": "sts-404.test",
        "mx": [[10, "mx.sts-404.test"]],
        "hosts": {"mx.sts-404.test": {}},
        "mta_sts": {"mode": "enforce", "mx": [ELSEWHERE], "fetch": "404"},
        "expect": "policy URL answers 404: no policy, delivered",
        "via": "mx.sts-404.test",
        "spec": ["C-22", "C-36"],
    },
    {
        "name": "sts-html",
        "domain": "sts-html.test",
        "mx": [[10, "mx.sts-html.test"]],
        "hosts": {"mx.sts-html.test": {}},
        "mta_sts": {"mode": "enforce", "mx": [ELSEWHERE], "fetch": "html"},
        "expect": "policy served as text/html: no policy, delivered (accepting it would give "
        "451 4.7.0)",
        "via": "mx.sts-html.test",
        "spec": ["C-23", "C-36"],
    },
    {
        "name": "sts-selfsigned",
        "domain": "sts-selfsigned.test",
        "mx": [[10, "mx.sts-selfsigned.test"]],
        "hosts": {"mx.sts-selfsigned.test": {}},
        "mta_sts": {"mode": "enforce", "mx": [ELSEWHERE], "fetch": "selfsigned"},
        "expect": "policy host's HTTPS certificate is self-signed: no policy, delivered",
        "via": "mx.sts-selfsigned.test",
        "spec": ["C-20", "C-36"],
    },
    {
        "name": "sts-oversized",
        "domain": "sts-oversized.test",
        "mx": [[10, "mx.sts-oversized.test"]],
        "hosts": {"mx.sts-oversized.test": {}},
        "mta_sts": {"mode": "enforce", "mx": [ELSEWHERE], "fetch": "oversized"},
        "expect": "policy body larger than 64 KiB: no policy, delivered",
        "via": "mx.sts-oversized.test",
        "spec": ["C-25", "C-36"],
    },
    # ------------------------------------------------------------------ DANE
    {
        "name": "dane-ee",
        "domain": "dane-ee.test",
        "mx": [[10, "mx.dane-ee.test"]],
        "hosts": {"mx.dane-ee.test": {"cert": "selfsigned", "tlsa": ["3 1 1 self"]}},
        "expect": "self-signed certificate matched by DANE-EE 3 1 1: TLS level authenticated",
        "via": "mx.dane-ee.test",
        "spec": ["C-69", "C-83", "B-78"],
    },
    {
        "name": "dane-ee-301",
        "domain": "dane-ee-301.test",
        "mx": [[10, "mx.dane-ee-301.test"]],
        "hosts": {"mx.dane-ee-301.test": {"cert": "selfsigned", "tlsa": ["3 0 1 self"]}},
        "expect": "self-signed certificate matched by DANE-EE 3 0 1: authenticated",
        "via": "mx.dane-ee-301.test",
        "spec": ["C-90"],
    },
    {
        "name": "dane-ta",
        "domain": "dane-ta.test",
        "mx": [[10, "mx.dane-ta.test"]],
        "hosts": {"mx.dane-ta.test": {"cert": "dane-ta", "tlsa": ["2 0 1 issuer"]}},
        "expect": "leaf from a CA outside the CA bundle, CA sent in the chain, DANE-TA 2 0 1 of "
        "that CA: authenticated",
        "via": "mx.dane-ta.test",
        "spec": ["C-86", "C-91"],
    },
    {
        "name": "dane-multi",
        "domain": "dane-multi.test",
        "mx": [[10, "mx.dane-multi.test"]],
        "hosts": {
            "mx.dane-multi.test": {
                "cert": "selfsigned",
                "tlsa": ["3 1 1 other", "2 0 1 other", "3 1 1 self", "3 1 2 self"],
            }
        },
        "expect": "several records, one 3 1 1 (and one 3 1 2) match: authenticated",
        "via": "mx.dane-multi.test",
        "spec": ["C-85", "C-88", "C-90"],
    },
    {
        "name": "dane-mismatch",
        "domain": "dane-mismatch.test",
        "mx": [[10, "mx.dane-mismatch.test"]],
        "hosts": {"mx.dane-mismatch.test": {"cert": "ca", "tlsa": ["3 1 1 other"]}},
        "expect": "PKIX-valid certificate but the only TLSA does not match: 451 4.7.0 'No "
        "matching TLSA records', MAIL not issued",
        "via": None,
        "spec": ["C-81"],
    },
    {
        "name": "dane-notls",
        "domain": "dane-notls.test",
        "mx": [[10, "mx.dane-notls.test"]],
        "hosts": {"mx.dane-notls.test": {"starttls": False, "tlsa": ["3 1 1 other"]}},
        "expect": "authenticated TLSA but no STARTTLS: 451 4.7.1 '... (enforced by DANE)', "
        "MAIL not issued",
        "via": None,
        "spec": ["C-79"],
    },
    {
        "name": "dane-bogus",
        "domain": "dane-bogus.test",
        "mx": [[10, "mx.dane-bogus.test"]],
        "hosts": {"mx.dane-bogus.test": {"tlsa": ["3 1 1 self"], "tlsa_bogus": True}},
        "expect": "MX and A secure, TLSA RRset bogus (SERVFAIL): 450 4.4.4 DNS error for the MX "
        "-> 451 4.4.0; the digest itself matches, so only a validating client notices",
        "via": None,
        "spec": ["C-77", "C-12"],
    },
    {
        "name": "dane-unusable",
        "domain": "dane-unusable.test",
        "mx": [[10, "mx.dane-unusable.test"]],
        "hosts": {
            "mx.dane-unusable.test": {
                "cert": "selfsigned",
                "tlsa": ["0 0 1 self", "1 1 1 self", "3 2 1 self"],
            }
        },
        "expect": "only unusable TLSA records (usages 0/1, selector 2): they do not "
        "authenticate; delivered over TLS at level encrypted",
        "via": "mx.dane-unusable.test",
        "spec": ["C-90", "C-79"],
    },
    {
        "name": "dane-insecure-mx",
        "domain": "dane-insecure-mx.test",
        "extra_zones": {"unsigned-host.test": "unsigned"},
        "mx": [[10, "mx.unsigned-host.test"]],
        "hosts": {"mx.unsigned-host.test": {"cert": "ca", "tlsa": ["3 1 1 other"]}},
        "expect": "signed MX RRset pointing into an unsigned zone: the A answer is not "
        "authenticated, DANE does not apply (the non-matching TLSA is ignored); delivered",
        "via": "mx.unsigned-host.test",
        "spec": ["C-67", "C-68", "C-74"],
    },
    {
        "name": "dane-cname",
        "domain": "dane-cname.test",
        "mx": [[10, "mx.dane-cname.test"]],
        "hosts": {
            "mx.dane-cname.test": {"cname": "host.dane-cname.test"},
            "host.dane-cname.test": {"cert": "selfsigned", "tlsa": ["3 1 1 self"]},
        },
        "expect": "MX host is a secure CNAME; TLSA at the target name matches: authenticated",
        "via": "host.dane-cname.test",
        "spec": ["C-70"],
    },
    {
        "name": "dane-cname-orig",
        "domain": "dane-cname-orig.test",
        "mx": [[10, "mx.dane-cname-orig.test"]],
        "hosts": {
            "mx.dane-cname-orig.test": {"cname": "host.dane-cname-orig.test", "tlsa": ["3 1 1 self"]},
            "host.dane-cname-orig.test": {"cert": "selfsigned"},
        },
        "expect": "secure CNAME, no TLSA at the target; the TLSA at the original name "
        "matches: authenticated",
        "via": "host.dane-cname-orig.test",
        "spec": ["C-71"],
    },
    # ------------------------------------------------------------------ benchmark sinks
    {
        "name": "bench",
        "domains": {"pattern": "b{:03d}.bench.test", "count": 100},
        "zone_name": "bench.test",
        "mx": [[10, "mx.bench.test"]],
        "hosts": {"mx.bench.test": {"server": "sink"}},
        "expect": "100 domains on Postfix's smtp-sink (no STARTTLS, discards)",
        "via": None,
        "spec": [],
    },
    {
        "name": "dane-sts-selfsigned",
        "domain": "dane-sts-selfsigned.test",
        "mx": [[10, "mx.dane-sts-selfsigned.test"]],
        "hosts": {"mx.dane-sts-selfsigned.test": {"cert": "selfsigned", "tlsa": ["3 1 1 self"]}},
        "mta_sts": {"mode": "enforce", "mx": ["mx.dane-sts-selfsigned.test"]},
        "expect": "DANE-EE matches the self-signed certificate, but MTA-STS enforce needs a "
        "PKIX-valid one: refused, MAIL not issued",
        "via": None,
        "spec": ["C-1", "C-45"],
    },
    {
        "name": "dane-sts-mismatch",
        "domain": "dane-sts-mismatch.test",
        "mx": [[10, "mx.dane-sts-mismatch.test"]],
        "hosts": {"mx.dane-sts-mismatch.test": {"cert": "ca", "tlsa": ["3 1 1 other"]}},
        "mta_sts": {"mode": "enforce", "mx": ["mx.dane-sts-mismatch.test"]},
        "expect": "MTA-STS enforce is satisfied (listed MX, PKIX-valid), but the TLSA does not "
        "match: a DANE failure is final, MAIL not issued",
        "via": None,
        "spec": ["C-1", "C-81"],
    },
    {
        "name": "nochunking",
        "domain": "nochunking.test",
        "mx": [[10, "mx.nochunking.test"]],
        "hosts": {"mx.nochunking.test": {"ehlo_discard": ["chunking"]}},
        "expect": "EHLO lacks CHUNKING: the content goes with DATA, dot-stuffed, and cannot "
        "smuggle a second message",
        "via": "mx.nochunking.test",
        "spec": ["B-95", "B-97"],
    },
    {
        "name": "bench-tls",
        "domains": {"pattern": "t{:03d}.bench-tls.test", "count": 10},
        "zone_name": "bench-tls.test",
        "mx": [[10, "mx.bench-tls.test"]],
        "hosts": {"mx.bench-tls.test": {"discard": True}},
        "expect": "10 domains on a Postfix STARTTLS listener that discards everything",
        "via": None,
        "spec": [],
    },
]
