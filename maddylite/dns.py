"""Resolver: the DNS lookups delivery needs, with the AD bit trusted only from loopback.

Queries are built with ``dns.message`` and sent over ``gevent.socket`` (UDP, then TCP when
the answer is truncated), so a lookup only ever blocks its own greenlet. Every query carries
EDNS0 with a 4096-byte buffer and the AD bit, asking the resolver to report DNSSEC
validation [RFC 6840 §5.7] (C-62). The resolver validates; this module never checks
signatures. An answer counts as authenticated only when it has AD set *and* the server that
actually answered is on a loopback address (C-59, C-60), judged by :func:`is_loopback`.

Nameservers are tried in order until one gives a NOERROR answer; if none does, the last
error decides the outcome (B-14). Only NXDOMAIN is permanent; SERVFAIL, REFUSED, FORMERR,
NOTIMP, timeouts and network errors are temporary [RFC 5321 §5.1] (B-9..B-11).

The resolver is injectable: tests pass nameserver addresses and ports, a clock and the
AD-trust predicate.
"""

from __future__ import annotations

import ipaddress
import random
import socket as _stdlib_socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import gevent
import gevent.event
import gevent.socket

from maddylite.log import Logger

__all__ = [
    "DNSSEC_UNAVAILABLE",
    "DNSError",
    "QueryResult",
    "MXAnswer",
    "AddrAnswer",
    "TLSARecord",
    "TLSAAnswer",
    "TXTAnswer",
    "Resolver",
    "is_loopback",
    "ordered_mx",
]

#: Logged when /etc/resolv.conf is unusable (C-64).
DNSSEC_UNAVAILABLE = (
    "cannot initialize DNSSEC-aware resolver, DNSSEC and DANE are not available"
)
#: Where the system resolver is described.
RESOLV_CONF = "/etc/resolv.conf"
#: What a system without a usable resolv.conf gets, as Go's resolver does.
FALLBACK_NAMESERVERS: tuple[tuple[str, int], ...] = (("127.0.0.1", 53), ("::1", 53))
#: EDNS0 buffer size advertised in every query (C-62).
EDNS_PAYLOAD = 4096
#: Longest CNAME chain followed, within an answer and across re-queries (B-13).
MAX_CNAME_HOPS = 8
#: Most answers kept by a caching Resolver.
CACHE_MAX_ENTRIES = 10_000

ErrorKind = Literal[
    "nxdomain", "nodata", "servfail", "refused", "rcode", "timeout", "network", "badname",
]

_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.ip_address("::1")


def is_loopback(address: str) -> bool:
    """is_loopback tells whether a resolver address may be trusted for the AD bit (C-60).

    True for 127.0.0.0/8, ``::1`` and IPv4-mapped ``::ffff:127.x.x.x``; False for
    anything else, including names and unparsable text.
    """
    text = address.strip().strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            return ip == _LOOPBACK_V6
        return ip.ipv4_mapped in _LOOPBACK_V4
    return ip in _LOOPBACK_V4


class _Abandoned(Exception):
    """_Abandoned tells the callers waiting for a shared question that its asker was stopped."""


class DNSError(Exception):
    """DNSError is a failed lookup: ``kind``, ``temporary``, the name and the rcode text.

    ``kind`` is one of ``nxdomain``, ``nodata`` (permanent: the name has no such record),
    ``servfail``, ``refused``, ``rcode`` (another failure rcode), ``timeout``,
    ``network`` (temporary) or ``badname`` (permanent: the name cannot be written as a DNS
    name). ``str(err)`` is the message, e.g. ``dns: rcode NXDOMAIN when looking up
    example.test.`` (B-9); it is meant for the ``reason`` diagnostic field.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        temporary: bool | None = None,
        name: str | None = None,
        rdtype: str | None = None,
        rcode: str | None = None,
        server: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.temporary = kind not in ("nxdomain", "nodata", "badname") if temporary is None \
            else temporary
        self.name = name
        self.rdtype = rdtype
        self.rcode = rcode
        self.server = server

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"DNSError({self.kind!r}, {self.message!r})"


@dataclass(frozen=True)
class QueryResult:
    """QueryResult is one lookup's outcome: NOERROR (possibly empty) or NXDOMAIN.

    ``rrset`` is the answer RRset at the end of the CNAME chain (None when empty or
    NXDOMAIN); ``canonical_name`` is that chain's end; ``authenticated`` is the trusted
    AD bit of every response used (C-59); ``server`` is the address that answered.
    """

    name: str
    rdtype: str
    rcode: str
    rrset: dns.rrset.RRset | None
    canonical_name: str
    authenticated: bool
    server: str

    @property
    def records(self) -> list[Any]:
        """QueryResult.records lists the answer's rdata objects (empty when none)."""
        return list(self.rrset) if self.rrset is not None else []


@dataclass(frozen=True)
class MXAnswer:
    """MXAnswer is the MX RRset of a recipient domain (B-5, B-7, B-13, C-57, C-65).

    ``records`` holds ``(preference, host)`` with hosts as absolute names (trailing dot),
    in answer order; use :func:`ordered_mx` to order them. ``implicit`` means NOERROR
    without MX records, and ``records`` is then ``[(0, domain)]``. ``null_mx`` means some
    exchange is ``.``: the domain accepts no mail. ``authenticated`` is the trusted AD bit
    of the MX answer (a signed NODATA counts for the implicit MX).
    """

    domain: str
    records: list[tuple[int, str]]
    authenticated: bool
    implicit: bool = False
    null_mx: bool = False
    canonical_name: str = ""


@dataclass(frozen=True)
class AddrAnswer:
    """AddrAnswer holds the addresses of a host name (B-15, C-68, C-70..C-78).

    ``authenticated`` and ``canonical_name`` come from the A answer, or from the AAAA
    answer when there are no A records. ``errors`` maps ``"A"``/``"AAAA"`` to the
    DNSError of a query that failed while the other one gave addresses.
    """

    host: str
    v4: list[str]
    v6: list[str]
    authenticated: bool
    canonical_name: str
    errors: dict[str, DNSError] = field(default_factory=dict)

    @property
    def addresses(self) -> list[str]:
        """AddrAnswer.addresses lists IPv6 then IPv4 addresses, for dialing."""
        return [*self.v6, *self.v4]


class TLSARecord(NamedTuple):
    """TLSARecord is one TLSA record: usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes


@dataclass(frozen=True)
class TLSAAnswer:
    """TLSAAnswer is a TLSA lookup: records (empty for NXDOMAIN/NODATA), AD and rcode."""

    name: str
    records: list[TLSARecord]
    authenticated: bool
    rcode: str
    canonical_name: str


@dataclass(frozen=True)
class TXTAnswer:
    """TXTAnswer is a TXT lookup: one string per record (its character-strings joined)."""

    name: str
    records: list[str]
    authenticated: bool
    rcode: str


def ordered_mx(records: Sequence[tuple[int, str]],
               rng: random.Random | None = None) -> list[tuple[int, str]]:
    """ordered_mx sorts MX records by preference, shuffling equal ones [RFC 5321 §5.1]."""
    rnd = rng or random
    groups: dict[int, list[tuple[int, str]]] = {}
    for rec in records:
        groups.setdefault(rec[0], []).append(rec)
    out: list[tuple[int, str]] = []
    for pref in sorted(groups):
        group = list(groups[pref])
        rnd.shuffle(group)
        out.extend(group)
    return out


class Resolver:
    """Resolver sends queries to a list of nameservers and interprets the answers.

    ``nameservers`` is a list of ``(address, port)``; None reads *resolv_conf*. When that
    file is unusable the message :data:`DNSSEC_UNAVAILABLE` is logged, the local
    fallback nameservers are used and ``dnssec_capable`` is False, so no answer is ever
    authenticated (C-64). *timeout* bounds each attempt at one server; *attempts* is how
    many rounds are made over the servers that timed out or failed at the network level;
    *lifetime* (default: ``timeout × servers × attempts``) bounds a whole lookup.
    *trust_ad* decides, from the address that answered, whether AD is believed. *logger*
    receives the C-64 warning (default: a ``dns`` logger). With *cache_max_ttl* > 0
    answers with records are cached for their TTL (capped), and concurrent identical
    lookups share one query; the AD bit is cached with the answer.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] | None = None,
        timeout: float = 5.0,
        *,
        attempts: int = 2,
        lifetime: float | None = None,
        resolv_conf: str = RESOLV_CONF,
        trust_ad: Callable[[str], bool] = is_loopback,
        clock: Callable[[], float] = time.monotonic,
        logger: Logger | None = None,
        cache_max_ttl: int = 0,
    ) -> None:
        self.log = logger or Logger("dns")
        self.dnssec_capable = True
        if nameservers is None:
            loaded = _read_resolv_conf(resolv_conf, self.log)
            if loaded:
                nameservers = loaded
            else:
                self.log.warn(DNSSEC_UNAVAILABLE, resolv_conf=resolv_conf)
                self.dnssec_capable = False
                nameservers = FALLBACK_NAMESERVERS
        if not nameservers:
            raise ValueError("no nameservers")
        self.nameservers: list[tuple[str, int]] = [(str(a), int(p)) for a, p in nameservers]
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.lifetime = lifetime if lifetime is not None else \
            timeout * len(self.nameservers) * self.attempts
        self._trust_ad = trust_ad
        self._clock = clock
        #: Positive answers are kept for their TTL, at most this many seconds (0: no cache).
        #: Concurrent identical lookups always share one query when the cache is on.
        self.cache_max_ttl = cache_max_ttl
        self._cache: dict[tuple[str, str], tuple[float, QueryResult]] = {}
        self._inflight: dict[tuple[str, str], gevent.event.AsyncResult] = {}

    # --- lookups --------------------------------------------------------------------------

    def lookup_mx(self, domain: str, *, lifetime: float | None = None) -> MXAnswer:
        """Resolver.lookup_mx returns the MX records of *domain* (a U- or A-label name).

        NOERROR without MX gives the implicit MX (B-5); CNAMEs are followed (B-13); NXDOMAIN
        raises a permanent DNSError (B-9); every failure raises a temporary one (B-10,
        B-11). The records are not ordered: see :func:`ordered_mx`. *lifetime* overrides
        the resolver's bound on the whole lookup.
        """
        res = self._lookup(domain, "MX", lifetime)
        if res.rcode == "NXDOMAIN":
            raise _rcode_error("NXDOMAIN", res.name, "MX", res.server)
        records = [(int(rd.preference), rd.exchange.to_text()) for rd in res.records]
        null_mx = any(rd.exchange == dns.name.root for rd in res.records)
        if not records:
            return MXAnswer(res.name, [(0, res.name)], res.authenticated, implicit=True,
                            canonical_name=res.canonical_name)
        return MXAnswer(res.name, records, res.authenticated, null_mx=null_mx,
                        canonical_name=res.canonical_name)

    def lookup_addrs(self, host: str, *, want_v6: bool = True,
                     lifetime: float | None = None) -> AddrAnswer:
        """Resolver.lookup_addrs returns the IPv4 (and, with *want_v6*, IPv6) addresses.

        The A and AAAA queries run concurrently. With no address at all: a temporary
        DNSError if any query failed temporarily, else a permanent one (``nxdomain`` or
        ``nodata``) (B-15). A failure of one family while the other gave addresses is kept
        in ``errors``. *lifetime* bounds both queries (e.g. what is left of a connect
        timeout, B-100).
        """
        types = ["A", "AAAA"] if want_v6 else ["A"]
        outcomes = self._parallel(host, types, lifetime)
        v4: list[str] = []
        v6: list[str] = []
        errors: dict[str, DNSError] = {}
        found: dict[str, QueryResult] = {}
        for rdtype, out in zip(types, outcomes, strict=True):
            if isinstance(out, DNSError):
                errors[rdtype] = out
                continue
            if out.rcode == "NXDOMAIN":
                errors[rdtype] = _rcode_error("NXDOMAIN", out.name, rdtype, out.server)
                continue
            addrs = [rd.address for rd in out.records]
            if not addrs:
                errors[rdtype] = DNSError("nodata", f"dns: no {rdtype} records for {out.name}",
                                          name=out.name, rdtype=rdtype, server=out.server)
                continue
            found[rdtype] = out
            (v4 if rdtype == "A" else v6).extend(addrs)
        if not found:
            temporary = [e for e in errors.values() if e.temporary]
            if temporary:
                raise temporary[0]
            nx = [e for e in errors.values() if e.kind == "nxdomain"]
            raise nx[0] if nx else errors[types[0]]
        basis = found.get("A") or found["AAAA"]
        return AddrAnswer(basis.name, v4, v6, basis.authenticated, basis.canonical_name,
                          errors)

    def lookup_tlsa(self, name: str, *, lifetime: float | None = None) -> TLSAAnswer:
        """Resolver.lookup_tlsa returns the TLSA records at *name* (e.g. ``_25._tcp.mx.``).

        NXDOMAIN and NODATA are answers with no records (C-75) and their rcode; failures
        raise a temporary DNSError (C-77).
        """
        res = self._lookup(name, "TLSA", lifetime)
        records = [TLSARecord(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))
                   for rd in res.records]
        return TLSAAnswer(res.name, records, res.authenticated, res.rcode, res.canonical_name)

    def lookup_txt(self, name: str, *, lifetime: float | None = None) -> TXTAnswer:
        """Resolver.lookup_txt returns the TXT records at *name* (MTA-STS discovery, C-14).

        Each record's character-strings are joined without separator [RFC 8461 §3.1];
        NXDOMAIN and NODATA give no records; failures raise a temporary DNSError.
        """
        res = self._lookup(name, "TXT", lifetime)
        records = [b"".join(rd.strings).decode("utf-8", errors="replace") for rd in res.records]
        return TXTAnswer(res.name, records, res.authenticated, res.rcode)

    def query(self, name: str, rdtype: str, *, lifetime: float | None = None) -> QueryResult:
        """Resolver.query looks up any record type, following CNAMEs.

        It returns NOERROR (possibly empty) and NXDOMAIN results and raises DNSError for
        everything else. Nameserver order and error choice follow B-14.
        """
        return self._lookup(name, rdtype, lifetime)

    # --- internals ------------------------------------------------------------------------

    def _parallel(self, host: str, types: list[str],
                  lifetime: float | None) -> list[QueryResult | DNSError]:
        def one(rdtype: str) -> QueryResult | DNSError:
            try:
                return self._lookup(host, rdtype, lifetime)
            except DNSError as e:
                return e

        # Only questions that must go on the wire get a greenlet of their own: answers in
        # the cache, and questions another caller already asked, are taken in this greenlet
        # (waiting for one in-flight answer while another is in flight costs no time), and
        # the last new question runs here too. A greenlet costs memory for as long as it
        # waits, and many deliveries to one domain ask the same questions at once.
        out: list[QueryResult | DNSError | None] = [self._peek(host, t) for t in types]
        todo = [i for i, r in enumerate(out) if r is None]
        new = [i for i in todo if not self._asked(host, types[i])]
        greenlets: dict[int, gevent.Greenlet] = {}
        try:
            for i in new[:-1]:
                g = gevent.Greenlet(one, types[i])
                g.name = f"dns {types[i]} {host}"
                g.start()
                greenlets[i] = g
            for i in todo:
                if i not in greenlets:
                    out[i] = one(types[i])
            gevent.joinall(list(greenlets.values()), raise_error=True)
            for i, g in greenlets.items():
                out[i] = g.value
        finally:
            gevent.killall([g for g in greenlets.values() if not g.dead], block=True)
        assert all(r is not None for r in out)
        return out  # type: ignore[return-value]

    def _peek(self, name: str, rdtype: str) -> QueryResult | None:
        """_peek returns a cached, unexpired answer without asking anyone, else None."""
        if self.cache_max_ttl <= 0:
            return None
        hit = self._cache.get((name.lower().rstrip("."), rdtype))
        return hit[1] if hit is not None and hit[0] > self._clock() else None

    def _asked(self, name: str, rdtype: str) -> bool:
        """_asked tells whether the same question is on the wire for another caller."""
        return self.cache_max_ttl > 0 and (name.lower().rstrip("."), rdtype) in self._inflight

    def _lookup(self, name: str, rdtype: str, lifetime: float | None = None) -> QueryResult:
        """_lookup answers from the cache when enabled, sharing one query among concurrent callers."""
        if self.cache_max_ttl <= 0:
            return self._lookup_uncached(name, rdtype, lifetime)
        key = (name.lower().rstrip("."), rdtype)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        waiter = self._inflight.get(key)
        if waiter is not None:  # the same question is already on the wire: wait for its answer
            budget = self.lifetime if lifetime is None else lifetime
            try:
                return waiter.get(timeout=budget)
            except gevent.Timeout:
                raise DNSError("timeout", f"dns: timeout when looking up {name}", name=name,
                               rdtype=rdtype) from None
            except _Abandoned:  # the caller that asked was stopped: ask for ourselves
                return self._lookup(name, rdtype, lifetime)
        ev: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self._inflight[key] = ev
        try:
            res = self._lookup_uncached(name, rdtype, lifetime)
        except Exception as e:
            ev.set_exception(e)
            raise
        except BaseException:
            ev.set_exception(_Abandoned())  # killed: the callers waiting for it ask again at once
            raise
        finally:
            self._inflight.pop(key, None)
        ev.set(res)
        if res.rrset is not None:
            ttl = min(int(res.rrset.ttl), self.cache_max_ttl)
            if ttl > 0:
                if len(self._cache) >= CACHE_MAX_ENTRIES:
                    self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                    if len(self._cache) >= CACHE_MAX_ENTRIES:
                        self._cache.clear()
                self._cache[key] = (now + ttl, res)
        return res

    def _lookup_uncached(self, name: str, rdtype: str, lifetime: float | None = None) -> QueryResult:
        qname = _to_name(name, rdtype)
        wanted = dns.rdatatype.from_text(rdtype)
        deadline = self._clock() + (self.lifetime if lifetime is None else lifetime)
        authenticated = True
        current = qname
        for _ in range(MAX_CNAME_HOPS):
            response, server = self._exchange(current, wanted, deadline)
            authenticated = authenticated and self._authentic(response, server)
            rcode = dns.rcode.to_text(response.rcode())
            end, rrset = _follow_chain(response, current, wanted)
            if rcode == "NXDOMAIN" or rrset is not None or end == current \
                    or _is_nodata(response):
                return QueryResult(qname.to_text(), rdtype, rcode, rrset, end.to_text(),
                                   authenticated, server)
            # The answer stopped at a CNAME without the target's data: ask for the target.
            current = end
        raise DNSError("rcode", f"dns: CNAME chain too long when looking up {qname}",
                       name=qname.to_text(), rdtype=rdtype)

    def _authentic(self, response: dns.message.Message, server: str) -> bool:
        return (self.dnssec_capable and bool(response.flags & dns.flags.AD)
                and self._trust_ad(server))

    def _exchange(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                  deadline: float) -> tuple[dns.message.Message, str]:
        """Ask the nameservers in order until one answers NOERROR (B-14); after a SERVFAIL
        from a trusted (loopback) resolver, only trusted ones are asked (C-63)."""
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD,
                                       flags=dns.flags.RD | dns.flags.AD)
        wire = query.to_wire()
        last: DNSError | tuple[dns.message.Message, str] | None = None
        pending = list(self.nameservers)
        bogus = False  # a trusted validating resolver answered SERVFAIL
        for _ in range(self.attempts):
            retry: list[tuple[str, int]] = []
            for server, port in pending:
                if bogus and not self._trust_ad(server):
                    # A validator's SERVFAIL may mean bogus data (C-63): the answer of a
                    # server whose AD bit is not trusted would turn bogus into insecure.
                    continue
                remaining = deadline - self._clock()
                if remaining <= 0:
                    if last is None:
                        last = DNSError("timeout", f"dns: timeout when looking up {qname}",
                                        name=qname.to_text(), rdtype=dns.rdatatype.to_text(rdtype))
                    break
                try:
                    response, answered = self._ask(query, wire, server, port,
                                                   min(self.timeout, remaining))
                except DNSError as e:
                    last = e
                    retry.append((server, port))
                    continue
                rcode = response.rcode()
                if rcode == dns.rcode.NOERROR:
                    return response, answered
                # Another server may know better; if none does, the last error decides.
                last = (response, answered)
                if rcode == dns.rcode.SERVFAIL and self.dnssec_capable and self._trust_ad(answered):
                    bogus = True
            pending = retry
            if not pending:
                break
        if isinstance(last, tuple):
            response, answered = last
            if response.rcode() == dns.rcode.NXDOMAIN:
                return response, answered
            raise _rcode_error(dns.rcode.to_text(response.rcode()), qname.to_text(),
                               dns.rdatatype.to_text(rdtype), answered)
        assert last is not None
        raise last

    def _ask(self, query: dns.message.Message, wire: bytes, server: str, port: int,
             timeout: float) -> tuple[dns.message.Message, str]:
        name = query.question[0].name.to_text()
        try:
            response = self._udp(query, wire, server, port, timeout)
            if response.flags & dns.flags.TC:
                response = self._tcp(query, wire, server, port, timeout)
        except TimeoutError as e:
            raise DNSError("timeout", f"dns: timeout when looking up {name}", name=name,
                           server=server) from e
        except (OSError, dns.exception.DNSException, struct.error) as e:
            raise DNSError("network", f"dns: {e} when looking up {name}", name=name,
                           server=server) from e
        return response, server

    @staticmethod
    def _socket(server: str, kind: int) -> Any:
        family = _stdlib_socket.AF_INET6 if ":" in server else _stdlib_socket.AF_INET
        return gevent.socket.socket(family, kind)

    def _udp(self, query: dns.message.Message, wire: bytes, server: str, port: int,
             timeout: float) -> dns.message.Message:
        end = time.monotonic() + timeout
        sock = self._socket(server, _stdlib_socket.SOCK_DGRAM)
        try:
            # A connected UDP socket only receives datagrams from that server.
            sock.connect((server, port))
            sock.settimeout(timeout)
            sock.send(wire)
            while True:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out")
                sock.settimeout(remaining)
                data = sock.recv(65535)
                try:
                    response = dns.message.from_wire(data, ignore_trailing=True)
                except dns.exception.DNSException:
                    continue  # garbage: keep waiting for the real answer
                if query.is_response(response):
                    return response
        finally:
            sock.close()

    def _tcp(self, query: dns.message.Message, wire: bytes, server: str, port: int,
             timeout: float) -> dns.message.Message:
        end = time.monotonic() + timeout
        sock = self._socket(server, _stdlib_socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((server, port))
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", _recv_exact(sock, 2, end))
            response = dns.message.from_wire(_recv_exact(sock, length, end))
            if not query.is_response(response):
                raise dns.exception.FormError("unexpected TCP response")
            return response
        finally:
            sock.close()


def _recv_exact(sock: Any, n: int, end: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def _to_name(name: str, rdtype: str) -> dns.name.Name:
    try:
        return dns.name.from_text(name, idna_codec=dns.name.IDNA_2003_Practical)
    except (dns.exception.DNSException, UnicodeError, ValueError) as e:
        raise DNSError("badname", f"dns: invalid name {name!r}: {e}", name=name,
                       rdtype=rdtype) from e


def _follow_chain(response: dns.message.Message, qname: dns.name.Name,
                  wanted: dns.rdatatype.RdataType) -> tuple[dns.name.Name, dns.rrset.RRset | None]:
    """Follow CNAMEs in the answer section from *qname*; return the end and its RRset."""
    current = qname
    for _ in range(MAX_CNAME_HOPS * 2):
        found = cname = None
        for rrset in response.answer:
            if rrset.name != current or rrset.rdclass != dns.rdataclass.IN:
                continue
            if rrset.rdtype == wanted:
                found = rrset
            elif rrset.rdtype == dns.rdatatype.CNAME and wanted != dns.rdatatype.CNAME:
                cname = rrset
        if found is not None:
            return current, found
        if cname is None or len(cname) == 0:
            return current, None
        current = cname[0].target
    return current, None


def _is_nodata(response: dns.message.Message) -> bool:
    """A NOERROR response with an SOA in the authority section is a final NODATA."""
    return any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority)


def _rcode_error(rcode: str, name: str, rdtype: str, server: str | None) -> DNSError:
    kind: ErrorKind = {"NXDOMAIN": "nxdomain", "SERVFAIL": "servfail",
                       "REFUSED": "refused"}.get(rcode, "rcode")  # type: ignore[assignment]
    return DNSError(kind, f"dns: rcode {rcode} when looking up {name}", name=name,
                    rdtype=rdtype, rcode=rcode, server=server)


def _read_resolv_conf(path: str, log: Logger) -> list[tuple[str, int]]:
    try:
        parsed = dns.resolver.Resolver(filename=path, configure=True)
    except (dns.exception.DNSException, OSError, ValueError) as e:
        log.debug("cannot read resolver configuration", path=path, reason=str(e))
        return []
    out = []
    for ns in parsed.nameservers:
        text = str(ns)
        try:
            ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        out.append((text, 53))
    return out
