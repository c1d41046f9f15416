"""Tests for maddylite.dns against an in-process fake DNS server on 127.0.0.1 (UDP and TCP).

A server on a non-loopback address cannot be bound here, so the AD-trust rule is tested
through the :func:`is_loopback` predicate and by injecting the predicate the resolver
applies to the address that actually answered.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from gevent.server import DatagramServer, StreamServer

from maddylite.dns import (
    DNSSEC_UNAVAILABLE,
    DNSError,
    Resolver,
    is_loopback,
    ordered_mx,
)
from maddylite.log import Logger

SOA = "ns.test. hostmaster.test. 1 3600 600 86400 300"


class RecordingLogger(Logger):
    """RecordingLogger keeps log lines instead of writing them."""

    def __init__(self, name: str) -> None:
        super().__init__(name, debug=True)
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _emit(self, level: str, msg: str, fields: dict[str, Any]) -> None:
        self.lines.append((level, msg, fields))


class FakeDNS:
    """FakeDNS answers from a small zone table, over UDP and TCP on the same port.

    ``rcodes`` forces an rcode for a name (``type_rcodes`` for a name and type), ``drop`` never answers, ``truncate`` answers UDP
    with TC set and no data (the full answer comes over TCP), ``ad`` sets AD on every
    answer and ``ad_only`` on the listed (name, type) answers only; ``chase`` off makes the
    server return a CNAME without the target's records; ``noise`` sends garbage and a
    reply with a wrong id before the real one.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.zone: dict[tuple[str, str], list[str]] = {}
        self.rcodes: dict[str, dns.rcode.Rcode] = {}
        self.type_rcodes: dict[tuple[str, str], dns.rcode.Rcode] = {}
        self.drop: set[str] = set()
        self.truncate: set[str] = set()
        self.ad = False
        self.ad_only: set[tuple[str, str]] = set()
        self.chase = True
        self.noise = False
        self.queries: list[tuple[dns.message.Message, str]] = []
        # The UDP port is chosen by the kernel; the same TCP port may be taken by another
        # socket, so try again with a new pair until both bind.
        for _ in range(50):
            self.udp = DatagramServer((host, 0), self._udp)
            self.udp.start()
            try:
                self.tcp = StreamServer((host, self.udp.server_port), self._tcp)
                self.tcp.start()
                break
            except OSError:
                self.udp.close()
        else:
            raise OSError("no free UDP+TCP port pair")

    @property
    def address(self) -> tuple[str, int]:
        """address is (host, port) of both listeners."""
        return (self.host, int(self.udp.server_port))

    def add(self, name: str, rdtype: str, *rdata: str) -> None:
        """add puts records in the zone (names absolute, lower case)."""
        self.zone.setdefault((name.lower(), rdtype), []).extend(rdata)

    def stop(self) -> None:
        """stop closes both listeners."""
        self.udp.stop()
        self.tcp.stop(timeout=1)

    def qnames(self) -> list[str]:
        """qnames lists the names asked, in order, as ``NAME TYPE``."""
        return [f"{q.question[0].name} {dns.rdatatype.to_text(q.question[0].rdtype)}"
                for q, _ in self.queries]

    def _udp(self, data: bytes, address: Any) -> None:
        reply = self.answer(data, "udp")
        if reply is None:
            return
        if self.noise:
            self.udp.socket.sendto(b"\x00garbage", address)
            wrong = bytearray(reply)
            wrong[0] ^= 0xFF
            self.udp.socket.sendto(bytes(wrong), address)
        self.udp.socket.sendto(reply, address)

    def _tcp(self, sock: Any, _address: Any) -> None:
        head = sock.recv(2)
        length = int.from_bytes(head, "big")
        data = b""
        while len(data) < length:
            data += sock.recv(length - len(data))
        reply = self.answer(data, "tcp")
        if reply is not None:
            sock.sendall(len(reply).to_bytes(2, "big") + reply)

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        q = dns.message.from_wire(wire)
        self.queries.append((q, transport))
        qname = q.question[0].name
        rdtype = dns.rdatatype.to_text(q.question[0].rdtype)
        key = qname.to_text().lower()
        if key in self.drop:
            return None
        r = dns.message.make_response(q)
        forced = self.rcodes.get(key, self.type_rcodes.get((key, rdtype)))
        if forced is not None:
            r.set_rcode(forced)
            return r.to_wire()
        if key in self.truncate and transport == "udp":
            r.flags |= dns.flags.TC
            return r.to_wire()
        current = qname
        for _ in range(10):
            ck = current.to_text().lower()
            records = self.zone.get((ck, rdtype))
            if records:
                r.answer.append(dns.rrset.from_text_list(current, 300, "IN", rdtype, records))
                break
            cname = self.zone.get((ck, "CNAME"))
            if cname:
                r.answer.append(dns.rrset.from_text_list(current, 300, "IN", "CNAME", cname))
                current = dns.name.from_text(cname[0])
                if not self.chase:
                    break
                continue
            if not any(k[0] == ck for k in self.zone):
                r.set_rcode(dns.rcode.NXDOMAIN)
            r.authority.append(dns.rrset.from_text("test.", 300, "IN", "SOA", SOA))
            break
        if self.ad or (key, rdtype) in self.ad_only:
            r.flags |= dns.flags.AD
        return r.to_wire()


@pytest.fixture
def fake_dns() -> Iterator[Callable[[], FakeDNS]]:
    """fake_dns is a factory of started FakeDNS servers, stopped after the test."""
    started: list[FakeDNS] = []

    def make(host: str = "127.0.0.1") -> FakeDNS:
        srv = FakeDNS(host)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def world(fake_dns: Callable[[], FakeDNS]) -> FakeDNS:
    """world is the test world of section B: example.test MX 10 mx.example.test, and more."""
    srv = fake_dns()
    srv.add("example.test.", "MX", "10 mx.example.test.")
    srv.add("mx.example.test.", "A", "127.0.0.1")
    srv.add("mx.example.test.", "AAAA", "::1")
    srv.add("implicit.test.", "A", "127.0.0.9")
    srv.add("v6only.test.", "AAAA", "fd00::28")
    srv.add("alias.test.", "CNAME", "target.test.")
    srv.add("target.test.", "MX", "5 mx.target.test.")
    srv.add("mx.cname.test.", "CNAME", "mx.real.test.")
    srv.add("mx.real.test.", "A", "127.0.0.7")
    srv.add("mxonly.test.", "MX", "10 mx.example.test.")
    srv.add("_25._tcp.mx.example.test.", "TLSA", "3 1 1 " + "ab" * 32, "2 0 1 " + "cd" * 32)
    srv.add("_mta-sts.example.test.", "TXT", '"v=STSv1; " "id=20240101"')
    return srv


def resolver_for(*servers: FakeDNS | tuple[str, int], **kw: Any) -> Resolver:
    addrs = [s.address if isinstance(s, FakeDNS) else s for s in servers]
    kw.setdefault("timeout", 0.3)
    kw.setdefault("attempts", 1)
    return Resolver(addrs, **kw)


# --- queries ------------------------------------------------------------------------------


def test_queries_carry_edns0_and_the_ad_bit_c62(world: FakeDNS) -> None:
    """C-62: EDNS0 with a 4096-byte buffer and the AD bit set; DO is not needed."""
    resolver_for(world).lookup_mx("example.test")
    q, transport = world.queries[0]
    assert transport == "udp"
    assert q.flags & dns.flags.AD and q.flags & dns.flags.RD
    assert q.edns == 0 and q.payload == 4096
    assert not q.ednsflags & dns.flags.DO


def test_mx_lookup_basic_b1(world: FakeDNS) -> None:
    """B-1: example.test MX 10 mx.example.test."""
    ans = resolver_for(world).lookup_mx("example.test")
    assert ans.records == [(10, "mx.example.test.")]
    assert ans.domain == "example.test."
    assert not ans.implicit and not ans.null_mx and not ans.authenticated


def test_ad_from_loopback_is_trusted_c57(world: FakeDNS) -> None:
    """C-57: AD=1 from a resolver on a loopback address → authenticated."""
    world.ad = True
    assert resolver_for(world).lookup_mx("example.test").authenticated


def test_ad_judged_by_the_answering_server_c59(world: FakeDNS) -> None:
    """C-59: the AD bit is believed only as the predicate says for the address that
    actually answered; a non-loopback answer is treated as AD=0."""
    world.ad = True
    seen: list[str] = []

    def not_loopback(addr: str) -> bool:
        seen.append(addr)
        return False

    ans = resolver_for(world, trust_ad=not_loopback).lookup_mx("example.test")
    assert not ans.authenticated
    assert seen == ["127.0.0.1"]


def test_no_ad_means_not_authenticated_c58(world: FakeDNS) -> None:
    """C-58: an answer without AD is not authenticated, even from loopback."""
    assert not resolver_for(world).lookup_mx("example.test").authenticated


@pytest.mark.parametrize(("address", "trusted"), [
    ("127.0.0.1", True),
    ("127.0.0.53", True),
    ("127.255.255.254", True),
    ("::1", True),
    ("[::1]", True),
    ("::ffff:127.0.0.1", True),
    ("::ffff:127.0.0.53", True),
    ("10.255.255.53", False),
    ("192.168.1.1", False),
    ("128.0.0.1", False),
    ("0.0.0.0", False),
    ("::", False),
    ("::2", False),
    ("::ffff:10.0.0.1", False),
    ("fe80::1", False),
    ("localhost", False),
    ("", False),
], ids=lambda v: str(v))
def test_loopback_predicate_c60(address: str, trusted: bool) -> None:
    """C-60: 127.0.0.0/8, ::1 and ::ffff:127.x count as loopback; nothing else does."""
    assert is_loopback(address) is trusted


# --- MX semantics -------------------------------------------------------------------------


def test_implicit_mx_b5(world: FakeDNS) -> None:
    """B-5: NOERROR without MX records → implicit MX (the domain, preference 0)."""
    ans = resolver_for(world).lookup_mx("implicit.test")
    assert ans.implicit and ans.records == [(0, "implicit.test.")]


def test_signed_nodata_counts_for_the_implicit_mx_c65(world: FakeDNS) -> None:
    """C-65: for an implicit MX, a signed NODATA answer to the MX query is authenticated."""
    world.ad_only.add(("implicit.test.", "MX"))
    assert resolver_for(world).lookup_mx("implicit.test").authenticated


@pytest.mark.parametrize("records", [["0 ."], ["10 mx.example.test.", "20 ."]],
                         ids=["only-null", "null-among-others"])
def test_null_mx_b7(fake_dns: Callable[[], FakeDNS], records: list[str]) -> None:
    """B-7: any MX whose exchange is "." makes the domain a null-MX domain."""
    srv = fake_dns()
    srv.add("null.test.", "MX", *records)
    assert resolver_for(srv).lookup_mx("null.test").null_mx


def test_nxdomain_is_permanent_b9(world: FakeDNS) -> None:
    """B-9: NXDOMAIN → permanent, with the rcode text as the reason."""
    world.rcodes["example.test."] = dns.rcode.NXDOMAIN
    with pytest.raises(DNSError) as e:
        resolver_for(world).lookup_mx("example.test")
    assert e.value.kind == "nxdomain" and not e.value.temporary
    assert str(e.value) == "dns: rcode NXDOMAIN when looking up example.test."


def test_unknown_name_is_nxdomain_b9(world: FakeDNS) -> None:
    """B-9: a name that does not exist at all → NXDOMAIN."""
    with pytest.raises(DNSError) as e:
        resolver_for(world).lookup_mx("nonexistent.test")
    assert e.value.kind == "nxdomain"


@pytest.mark.parametrize(("rcode", "kind"), [
    (dns.rcode.SERVFAIL, "servfail"),
    (dns.rcode.REFUSED, "refused"),
    (dns.rcode.FORMERR, "rcode"),
    (dns.rcode.NOTIMP, "rcode"),
], ids=["B-10-servfail", "refused", "formerr", "notimp"])
def test_failure_rcodes_are_temporary_b10(world: FakeDNS, rcode: dns.rcode.Rcode,
                                          kind: str) -> None:
    """B-10, C-63: SERVFAIL (a bogus answer), REFUSED, FORMERR, NOTIMP → temporary."""
    world.rcodes["example.test."] = rcode
    with pytest.raises(DNSError) as e:
        resolver_for(world).lookup_mx("example.test")
    assert e.value.kind == kind and e.value.temporary
    assert str(e.value) == f"dns: rcode {dns.rcode.to_text(rcode)} when looking up example.test."


def test_no_answer_is_a_temporary_timeout_b11(world: FakeDNS) -> None:
    """B-11: no resolver answers → temporary timeout, within the timeouts."""
    world.drop.add("example.test.")
    start = time.monotonic()
    with pytest.raises(DNSError) as e:
        resolver_for(world, world, timeout=0.2, attempts=2).lookup_mx("example.test")
    took = time.monotonic() - start
    assert e.value.kind == "timeout" and e.value.temporary
    assert 0.7 < took < 1.5  # two servers × two attempts × 0.2 s
    assert len(world.queries) == 4


def test_lifetime_bounds_a_lookup(world: FakeDNS) -> None:
    """A per-call lifetime bounds the whole lookup (e.g. what is left of connect_timeout)."""
    world.drop.add("example.test.")
    start = time.monotonic()
    with pytest.raises(DNSError):
        resolver_for(world, timeout=5).lookup_mx("example.test", lifetime=0.2)
    assert time.monotonic() - start < 1


def test_cname_followed_in_the_answer_b13(world: FakeDNS) -> None:
    """B-13: a domain that is a CNAME to a name with MX records uses the target's MX."""
    ans = resolver_for(world).lookup_mx("alias.test")
    assert ans.records == [(5, "mx.target.test.")]
    assert ans.canonical_name == "target.test." and ans.domain == "alias.test."
    assert len(world.queries) == 1


def test_cname_without_target_data_is_requeried_b13(world: FakeDNS) -> None:
    """B-13: when the answer stops at the CNAME, the target is asked for."""
    world.chase = False
    ans = resolver_for(world).lookup_mx("alias.test")
    assert ans.records == [(5, "mx.target.test.")]
    assert world.qnames() == ["alias.test. MX", "target.test. MX"]


def test_idn_domain_is_queried_as_a_labels(fake_dns: Callable[[], FakeDNS]) -> None:
    """Recipient domains are converted to A-labels for DNS queries [RFC 5890]."""
    srv = fake_dns()
    srv.add("xn--e1aybc.test.", "MX", "10 mx.example.test.")
    ans = resolver_for(srv).lookup_mx("тест.test")
    assert ans.records == [(10, "mx.example.test.")] and ans.domain == "xn--e1aybc.test."


def test_invalid_name_is_permanent(world: FakeDNS) -> None:
    """A name that cannot be a DNS name fails permanently without a query."""
    with pytest.raises(DNSError) as e:
        resolver_for(world).lookup_mx("a" * 70 + ".test")
    assert e.value.kind == "badname" and not e.value.temporary
    assert world.queries == []


# --- several nameservers (B-14) -----------------------------------------------------------


def test_next_nameserver_after_servfail_b14(fake_dns: Callable[[], FakeDNS]) -> None:
    """B-14: nameservers are tried in order until one gives NOERROR."""
    bad, good = fake_dns(), fake_dns()
    bad.rcodes["example.test."] = dns.rcode.SERVFAIL
    good.add("example.test.", "MX", "10 mx.example.test.")
    ans = resolver_for(bad, good).lookup_mx("example.test")
    assert ans.records == [(10, "mx.example.test.")]
    assert len(bad.queries) == 1 and len(good.queries) == 1


def test_next_nameserver_after_timeout_b14(fake_dns: Callable[[], FakeDNS]) -> None:
    """B-14: a silent first nameserver is skipped after its timeout."""
    silent, good = fake_dns(), fake_dns()
    silent.drop.add("example.test.")
    good.add("example.test.", "MX", "10 mx.example.test.")
    assert resolver_for(silent, good, timeout=0.2).lookup_mx("example.test").records


@pytest.mark.parametrize("rtype", ["MX", "TLSA"])
def test_a_trusted_servfail_is_not_replaced_by_an_untrusted_answer_c63(fake_dns: Callable[..., FakeDNS],
                                                                      rtype: str) -> None:
    """C-63 over B-14: the loopback validator answers SERVFAIL (bogus data); a later
    nameserver whose AD bit is not trusted (here 127.0.0.2, made untrusted) is not asked,
    since its answer would turn bogus into insecure: the lookup fails temporarily. A later
    trusted nameserver is still asked."""
    name = "example.test." if rtype == "MX" else "_25._tcp.mx.example.test."
    validator, untrusted, trusted = fake_dns(), fake_dns("127.0.0.2"), fake_dns()
    validator.ad = trusted.ad = True
    validator.type_rcodes[(name, rtype)] = dns.rcode.SERVFAIL
    rdata = "10 mx.example.test." if rtype == "MX" else "3 1 1 " + "ab" * 32
    for srv in (untrusted, trusted):
        srv.add(name, rtype, rdata)

    def lookup(*servers: FakeDNS) -> Any:
        r = resolver_for(*servers, trust_ad=lambda ip: ip == "127.0.0.1")
        return r.lookup_mx("example.test") if rtype == "MX" else r.lookup_tlsa(name)

    with pytest.raises(DNSError) as e:
        lookup(validator, untrusted)
    assert e.value.kind == "servfail" and e.value.temporary
    assert untrusted.queries == []
    assert lookup(validator, untrusted, trusted).authenticated
    assert untrusted.queries == []


def test_first_noerror_wins_b14(fake_dns: Callable[[], FakeDNS]) -> None:
    """B-14: once a nameserver gives NOERROR the others are not asked."""
    first, second = fake_dns(), fake_dns()
    first.add("example.test.", "MX", "10 mx.example.test.")
    resolver_for(first, second).lookup_mx("example.test")
    assert second.queries == []


@pytest.mark.parametrize(("first", "second", "kind"), [
    ("servfail", "timeout", "timeout"),
    ("timeout", "servfail", "servfail"),
    ("timeout", "nxdomain", "nxdomain"),
    ("nxdomain", "servfail", "servfail"),
], ids=["B-14-last-timeout", "B-14-last-servfail", "B-14-last-nxdomain",
        "B-14-nxdomain-then-servfail"])
def test_last_error_decides_b14(fake_dns: Callable[[], FakeDNS], first: str, second: str,
                                kind: str) -> None:
    """B-14: when no nameserver gives NOERROR, the last error decides (B-9..B-11)."""
    servers = []
    for behaviour in (first, second):
        srv = fake_dns()
        srv.add("example.test.", "MX", "10 mx.example.test.")
        if behaviour == "timeout":
            srv.drop.add("example.test.")
        else:
            srv.rcodes["example.test."] = dns.rcode.from_text(behaviour.upper())
        servers.append(srv)
    with pytest.raises(DNSError) as e:
        resolver_for(*servers, timeout=0.2).lookup_mx("example.test")
    assert e.value.kind == kind
    assert e.value.temporary is (kind != "nxdomain")


def test_unreachable_nameserver_is_a_network_error(fake_dns: Callable[[], FakeDNS]) -> None:
    """An ICMP-refused nameserver fails at once with a temporary network error."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DNSError) as e:
        resolver_for(("127.0.0.1", port), timeout=2).lookup_mx("example.test")
    assert e.value.temporary and e.value.kind in ("network", "timeout")
    assert time.monotonic() - start < 2.5


# --- transport ----------------------------------------------------------------------------


def test_truncated_answer_is_retried_over_tcp(world: FakeDNS) -> None:
    """A truncated UDP answer is asked again over TCP."""
    world.truncate.add("example.test.")
    ans = resolver_for(world).lookup_mx("example.test")
    assert ans.records == [(10, "mx.example.test.")]
    assert [t for _, t in world.queries] == ["udp", "tcp"]


def test_garbage_and_wrong_ids_are_ignored(world: FakeDNS) -> None:
    """Unparsable datagrams and answers to other queries are ignored."""
    world.noise = True
    assert resolver_for(world).lookup_mx("example.test").records == [(10, "mx.example.test.")]


# --- addresses ----------------------------------------------------------------------------


def test_addresses_both_families_b111(world: FakeDNS) -> None:
    """A and AAAA are both looked up; IPv6 is listed first for dialing."""
    ans = resolver_for(world).lookup_addrs("mx.example.test.")
    assert ans.v4 == ["127.0.0.1"] and ans.v6 == ["::1"]
    assert ans.addresses == ["::1", "127.0.0.1"] and ans.errors == {}


def test_force_ipv4_asks_only_for_a_b110(world: FakeDNS) -> None:
    """B-110: with want_v6=False no AAAA query is sent."""
    ans = resolver_for(world).lookup_addrs("mx.example.test.", want_v6=False)
    assert ans.addresses == ["127.0.0.1"]
    assert world.qnames() == ["mx.example.test. A"]


def test_unresolvable_mx_host_is_permanent_b15(world: FakeDNS) -> None:
    """B-15: NXDOMAIN for the MX host's A/AAAA → permanent."""
    with pytest.raises(DNSError) as e:
        resolver_for(world).lookup_addrs("nothere.example.test.")
    assert e.value.kind == "nxdomain" and not e.value.temporary


def test_name_without_addresses_is_permanent_b6(world: FakeDNS) -> None:
    """B-6, B-15: the name exists but has no A/AAAA → permanent "nodata"."""
    with pytest.raises(DNSError) as e:
        resolver_for(world).lookup_addrs("mxonly.test.")
    assert e.value.kind == "nodata" and not e.value.temporary


def test_address_lookup_failure_is_temporary_c77(world: FakeDNS) -> None:
    """C-77: a failure (not NXDOMAIN) with no address at all → temporary."""
    world.rcodes["mx.example.test."] = dns.rcode.SERVFAIL
    with pytest.raises(DNSError) as e:
        resolver_for(world).lookup_addrs("mx.example.test.")
    assert e.value.temporary and e.value.kind == "servfail"


def test_one_family_failing_is_kept_in_errors(world: FakeDNS) -> None:
    """A failing AAAA query while A gives addresses: the answer stands, the error is kept
    (for DANE, C-77); a failing A with AAAA addresses likewise."""
    world.type_rcodes[("mx.example.test.", "AAAA")] = dns.rcode.SERVFAIL
    ans = resolver_for(world).lookup_addrs("mx.example.test.")
    assert ans.v4 == ["127.0.0.1"] and ans.v6 == []
    assert ans.errors["AAAA"].kind == "servfail" and ans.errors["AAAA"].temporary
    world.type_rcodes = {("mx.example.test.", "A"): dns.rcode.SERVFAIL}
    ans = resolver_for(world).lookup_addrs("mx.example.test.")
    assert ans.addresses == ["::1"] and ans.errors["A"].kind == "servfail"


def test_empty_v4_with_v6_is_not_an_error(world: FakeDNS) -> None:
    """NODATA for one family is recorded but the other family's addresses are used."""
    ans = resolver_for(world).lookup_addrs("v6only.test.")
    assert ans.v6 == ["fd00::28"] and ans.errors["A"].kind == "nodata"


def test_address_ad_comes_from_a_c68(world: FakeDNS) -> None:
    """C-68: the A answer's AD decides; an authenticated AAAA does not make up for it."""
    world.ad_only.add(("mx.example.test.", "AAAA"))
    assert not resolver_for(world).lookup_addrs("mx.example.test.").authenticated
    world.ad_only = {("mx.example.test.", "A")}
    assert resolver_for(world).lookup_addrs("mx.example.test.").authenticated


def test_ipv6_only_host_uses_the_aaaa_answer_c78(world: FakeDNS) -> None:
    """C-78: with no A records, the AAAA answer's AD bit decides."""
    world.ad_only.add(("v6only.test.", "AAAA"))
    ans = resolver_for(world).lookup_addrs("v6only.test.")
    assert ans.v6 == ["fd00::28"] and ans.v4 == [] and ans.authenticated


def test_address_cname_owner_c70(world: FakeDNS) -> None:
    """C-70: a CNAME'd MX host reports the chain's end as its canonical name."""
    world.ad = True
    ans = resolver_for(world).lookup_addrs("mx.cname.test.")
    assert ans.v4 == ["127.0.0.7"] and ans.canonical_name == "mx.real.test."
    assert ans.host == "mx.cname.test." and ans.authenticated


# --- TLSA and TXT -------------------------------------------------------------------------


def test_tlsa_records_c69(world: FakeDNS) -> None:
    """C-69: TLSA records with usage, selector, matching type and data; AD reported."""
    world.ad = True
    ans = resolver_for(world).lookup_tlsa("_25._tcp.mx.example.test.")
    assert ans.authenticated and ans.rcode == "NOERROR"
    assert sorted(ans.records) == sorted([(3, 1, 1, bytes.fromhex("ab" * 32)),
                                          (2, 0, 1, bytes.fromhex("cd" * 32))])


@pytest.mark.parametrize(("name", "rcode"), [
    ("_25._tcp.nothere.test.", "NXDOMAIN"),
    ("_25._tcp.mx.cname.test.", "NOERROR"),
], ids=["C-75-nxdomain", "C-74-empty"])
def test_no_tlsa_is_an_empty_answer_c75(world: FakeDNS, name: str, rcode: str) -> None:
    """C-74, C-75: NXDOMAIN or an empty answer gives no records, not an error."""
    world.add("_25._tcp.mx.cname.test.", "TXT", '"x"')
    ans = resolver_for(world).lookup_tlsa(name)
    assert ans.records == [] and ans.rcode == rcode


def test_tlsa_failure_raises_c77(world: FakeDNS) -> None:
    """C-77: a TLSA lookup that fails (SERVFAIL) raises a temporary error."""
    world.rcodes["_25._tcp.mx.example.test."] = dns.rcode.SERVFAIL
    with pytest.raises(DNSError) as e:
        resolver_for(world).lookup_tlsa("_25._tcp.mx.example.test.")
    assert e.value.temporary


def test_txt_strings_are_joined_c14(world: FakeDNS) -> None:
    """C-14, RFC 8461 §3.1: a TXT record's strings are concatenated."""
    ans = resolver_for(world).lookup_txt("_mta-sts.example.test")
    assert ans.records == ["v=STSv1; id=20240101"] and ans.rcode == "NOERROR"
    none = resolver_for(world).lookup_txt("_mta-sts.nothere.test")
    assert none.records == [] and none.rcode == "NXDOMAIN"


# --- configuration ------------------------------------------------------------------------


def test_resolv_conf_nameservers_b14(tmp_path: Any) -> None:
    """B-14: the nameservers of resolv.conf are used, in order."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 127.0.0.53\nnameserver ::1\noptions trust-ad edns0\n")
    log = RecordingLogger("dns")
    r = Resolver(resolv_conf=str(conf), logger=log)
    assert log.lines == []
    assert r.nameservers == [("127.0.0.53", 53), ("::1", 53)]
    assert r.dnssec_capable


@pytest.mark.parametrize("content", [None, "", "search example.test\n"],
                         ids=["missing", "empty", "no-nameserver"])
def test_unusable_resolv_conf_disables_dnssec_c64(tmp_path: Any, world: FakeDNS,
                                                  content: str | None) -> None:
    """C-64: no usable resolv.conf → the message is logged, lookups still work through the
    fallback, and no answer is ever authenticated."""
    conf = tmp_path / "resolv.conf"
    if content is not None:
        conf.write_text(content)
    log = RecordingLogger("dns")
    r = Resolver(resolv_conf=str(conf), timeout=0.3, attempts=1, logger=log)
    assert ("warn", DNSSEC_UNAVAILABLE) in [(lvl, msg) for lvl, msg, _ in log.lines]
    assert not r.dnssec_capable and r.nameservers[0] == ("127.0.0.1", 53)
    world.ad = True
    r.nameservers = [world.address]
    ans = r.lookup_mx("example.test")
    assert ans.records and not ans.authenticated


def test_ordered_mx_sorts_and_shuffles_equal_preferences() -> None:
    """RFC 5321 §5.1: lower preference first; equal preferences in random order."""
    records = [(20, "c."), (10, "a."), (10, "b."), (30, "d.")]
    orders = set()
    for seed in range(40):
        out = ordered_mx(records, random.Random(seed))
        assert [p for p, _ in out] == [10, 10, 20, 30]
        orders.add(tuple(h for _, h in out[:2]))
    assert orders == {("a.", "b."), ("b.", "a.")}


def test_cache_answers_for_the_ttl_and_shares_concurrent_queries(world: FakeDNS) -> None:
    """A caching resolver asks once per TTL, and concurrent identical lookups share one query."""
    import gevent

    now = [1000.0]
    r = resolver_for(world, cache_max_ttl=300, clock=lambda: now[0])
    first = r.lookup_mx("example.test")
    n = len(world.queries)
    assert r.lookup_mx("example.test").records == first.records and len(world.queries) == n
    now[0] += 301  # past the cap (the fake's TTL is at least that)
    r.lookup_mx("example.test")
    assert len(world.queries) == n + 1
    uncached = resolver_for(world)
    uncached.lookup_mx("example.test")
    uncached.lookup_mx("example.test")
    assert len(world.queries) == n + 3
    shared = resolver_for(world, cache_max_ttl=300)
    before = len(world.queries)
    results = [g.get() for g in [gevent.spawn(shared.lookup_addrs, "mx.example.test") for _ in range(20)]]
    assert all(res.addresses == results[0].addresses for res in results)
    assert len(world.queries) - before == 2  # one A and one AAAA query for 20 callers


def test_address_lookups_spawn_greenlets_only_for_new_questions(world: FakeDNS, greenlet_starts: list[str]) -> None:
    """lookup_addrs asks A and AAAA in parallel, but answers from the cache and questions
    another caller already asked take no greenlet of their own: many deliveries to one
    domain at once cost memory for the distinct questions only."""
    import gevent

    started = greenlet_starts
    r = resolver_for(world, cache_max_ttl=300)
    callers = [gevent.spawn(r.lookup_addrs, "mx.example.test") for _ in range(20)]
    gevent.joinall(callers, raise_error=True)
    assert len(started) == 1  # the first caller: AAAA beside it; A in its own greenlet
    assert all(g.value.addresses == callers[0].value.addresses for g in callers)
    r.lookup_addrs("mx.example.test")  # cached now: no greenlet at all
    assert len(started) == 1
    uncached = resolver_for(world)
    uncached.lookup_addrs("mx.example.test")
    assert len(started) == 2  # without a cache, one greenlet per lookup as before


def test_a_stopped_asker_does_not_leave_the_callers_sharing_its_question_waiting(world: FakeDNS) -> None:
    """Callers that share a question on the wire are not left waiting when the caller that
    asked it is stopped (its greenlet killed, as a delivery's discovery is when nobody needs
    it any more): they ask again at once, instead of failing when their budget runs out."""
    import gevent

    world.add("example.test.", "MX", "10 mx.example.test.")
    world.drop.add("example.test.")  # the first question goes unanswered
    r = resolver_for(world, cache_max_ttl=300, timeout=5.0, lifetime=5.0)
    asker = gevent.spawn(r.lookup_mx, "example.test")
    gevent.sleep(0.05)
    sharer = gevent.spawn(r.lookup_mx, "example.test")
    gevent.sleep(0.05)
    assert len(world.queries) == 1  # the sharer waits for the asker's question
    world.drop.clear()
    start = time.monotonic()
    asker.kill()
    answer = sharer.get(timeout=3)
    assert [h for _, h in answer.records] == ["mx.example.test."]
    assert time.monotonic() - start < 1.0 and len(world.queries) == 2
