"""dane: DANE for SMTP, TLS level ``authenticated`` from DNSSEC-signed TLSA records.

Registered name: ``mx_auth.dane``. Roles: MXAuthPolicy. RFC 7672 (SMTP security via
opportunistic DANE TLS) and RFC 6698/7671 (TLSA records). Directive: ``debug`` only,
inherited from the global one (A-95, A-100).

How one MX candidate is judged (behaviour.md C.4):

1. ``prepare_conn`` starts the discovery in a greenlet owned by this module, before
   connecting (C-67); ``check_conn`` awaits it after the STARTTLS ladder.
2. Discovery (:func:`discover_tlsa`) looks up the MX host's addresses. The A answer
   decides, or the AAAA answer when there are no A records (C-78). If that answer is not
   DNSSEC-authenticated, DANE does not apply and no TLSA query is sent (C-68, C-73).
   If the host is a CNAME (the answer's owner name differs from the host), the expansion
   is secure (the answer is authenticated along the whole chain), so the TLSA records at
   ``_25._tcp.<target>`` are used; an authenticated empty answer there falls back to
   ``_25._tcp.<host>`` (C-70, C-71, C-74). A TLSA answer that is not authenticated is
   ignored (C-74). A SERVFAIL or timeout of any of these lookups fails the MX with
   ``450 4.4.4 "DNS error"`` (C-77) [RFC 7672 §2.1.1]; NXDOMAIN or no records means no
   DANE (C-75).
3. Decision (:func:`decide`): authenticated TLSA records, usable or not, on a plaintext
   connection → ``451 4.7.1`` (C-79) [RFC 7672 §2.2]. Otherwise, if some record is
   usable (C-90), the server's chain must match one of them (:func:`match_tlsa`) → TLS
   level authenticated (C-69, C-83), else ``451 4.7.0 "No matching TLSA records"``
   (C-81, C-87). Authenticated records that are all unusable leave the level alone.

When the resolver cannot report DNSSEC validation (no usable resolv.conf, C-64) the
policy logs ``DANE support is no-op: unable to init EDNS resolver`` once and does
nothing (C-92).

Precedence with MTA-STS: a DANE failure is never overridden by MTA-STS. Every DANE
failure is a veto (an SMTPError from ``check_conn``) that ends this MX whatever level
an MTA-STS policy granted, and no policy can undo another's veto; RFC 8461 §2 gives
DANE precedence when TLSA records exist. A DANE match only ever raises the TLS level.
Because ``mtasts`` runs before ``dane`` (C-1), mtasts' own certificate check sees the
ladder's level, not DANE's; whether a DANE match should satisfy an enforce-mode
MTA-STS policy is left to mtasts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dns.exception
import dns.name
import gevent
import gevent.pool
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

from maddylite.config.directives import Bool, Directive, Settings
from maddylite.dns import DNSError, TLSARecord
from maddylite.flights import SharedFlights
from maddylite.interfaces import MXAuthPolicy
from maddylite.log import Logger
from maddylite.policy import DeliveryPolicy, MXCandidate, PolicyModule, TLSLevel
from maddylite.registry import ModuleBase, register
from maddylite.smtp.errors import DANE_NO_MATCH, DANE_TLS_REQUIRED, DNS_ERROR_TEMP

__all__ = [
    "DANE",
    "NOOP_MESSAGE",
    "Discovery",
    "TLSAMatch",
    "cert_matches_names",
    "decide",
    "discover_tlsa",
    "match_tlsa",
    "record_matches",
    "spki_der",
    "usable_records",
]

#: Logged once when the resolver cannot report DNSSEC validation (C-92).
NOOP_MESSAGE = "DANE support is no-op: unable to init EDNS resolver"
#: The port in the TLSA owner name: SMTP to an MX is always port 25 [RFC 7672 §2.2.1].
TLSA_PORT = 25
#: Usage values RFC 7672 §3.1 lets SMTP use: DANE-TA(2) and DANE-EE(3).
USAGE_DANE_TA = 2
USAGE_DANE_EE = 3
_USABLE_SELECTORS = (0, 1)
_USABLE_MTYPES = (0, 1, 2)


@register("mx_auth.dane")
class DANE(PolicyModule, ModuleBase):
    """DANE authenticates MX connections with TLSA records (``mx_auth.dane``)."""

    roles = (MXAuthPolicy,)
    directives = (
        Directive(name="debug", type=Bool(), inherit_global=True, default=False,
                  help="Log the TLSA discovery and matching of every MX."),
    )

    #: Greenlets running TLSA discovery; created by start(), so configure stays pure.
    _group: gevent.pool.Group | None = None
    #: Running discoveries by (MX host, resolver), shared by concurrent deliveries.
    _flights: SharedFlights
    #: Replaced by configure() with one that honours ``debug``.
    log = Logger("mx_auth/dane")
    #: Whether the C-92 message was logged already.
    _noop_logged = False

    def configure(self, inline: tuple[str, ...], settings: Settings) -> None:
        """configure reads ``debug``; ``dane off`` still enables DANE (A-96)."""
        self.log = Logger("mx_auth/dane", bool(settings.debug))
        self._noop_logged = False

    def start(self) -> None:
        """start creates the group that owns the discovery greenlets."""
        if self._group is None:
            self._group = gevent.pool.Group()
            self._flights = SharedFlights()

    def stop(self, timeout: float) -> None:
        """stop waits up to *timeout* for running discoveries, then kills them."""
        group, self._group = self._group, None
        if group is None:
            return
        group.join(timeout=timeout)
        group.kill(block=True, timeout=max(timeout, 0.1))

    def start_delivery(self, msg_meta: Any) -> DeliveryPolicy:
        """start_delivery returns the per-delivery TLSA discovery and check."""
        return _Delivery(self)

    def spawn(self, key: Any, name: str, func: Callable[..., Any], *args: Any) -> gevent.Greenlet | None:
        """spawn runs *func* in a greenlet of this module's group, shared by every caller
        that asks with the same *key* while it runs; None when not started."""
        if self._group is None:
            return None
        return self._flights.spawn(self._group, key, name, func, *args)

    def release(self, key: Any, g: gevent.Greenlet) -> None:
        """release hands back a greenlet from :meth:`spawn`; unused, it is killed."""
        if self._group is not None:
            self._flights.release(key, g)

    def usable_resolver(self, resolver: Any) -> bool:
        """usable_resolver tells whether *resolver* reports DNSSEC; logs C-92 once if not."""
        if resolver is not None and getattr(resolver, "dnssec_capable", False):
            return True
        if not self._noop_logged:
            self._noop_logged = True
            self.log.warn(NOOP_MESSAGE)
        return False


class _Delivery(DeliveryPolicy):
    """_Delivery holds one delivery's pending discoveries, one per MX candidate."""

    def __init__(self, mod: DANE) -> None:
        self.mod = mod
        self.pending: dict[int, tuple[MXCandidate, gevent.Greenlet | Discovery]] = {}
        self.keys: dict[int, Any] = {}  # the shared-discovery key of each pending greenlet

    def prepare_conn(self, cand: MXCandidate) -> None:
        if not self.mod.usable_resolver(cand.resolver):
            return
        self._forget(cand)
        key = (_norm(cand.host), id(cand.resolver))
        g = self.mod.spawn(key, f"dane {cand.host}", self._discover, cand.resolver, cand.host)
        if g is None:
            # Not started (a stopped or never started module): look up in place.
            self.pending[id(cand)] = (cand, self._discover(cand.resolver, cand.host))
            return
        self.pending[id(cand)] = (cand, g)
        self.keys[id(cand)] = key

    def check_conn(self, cand: MXCandidate) -> TLSLevel:
        entry = self.pending.pop(id(cand), None)
        if entry is None or entry[0] is not cand:
            return cand.tls_level
        result = entry[1] if isinstance(entry[1], Discovery) else entry[1].get()
        key = self.keys.pop(id(cand), None)
        if isinstance(entry[1], gevent.Greenlet):
            self.mod.release(key, entry[1])
        if not isinstance(result, Discovery):  # killed while stopping
            result = Discovery(error=DNSError("network", "dane: TLSA discovery aborted"))
        self.mod.log.debug("TLSA discovery", remote_server=cand.host, domain=cand.domain,
                           tlsa_name=result.tlsa_name, records=len(result.records),
                           reason=result.reason or (str(result.error) if result.error else ""))
        level = decide(result, cand.tls_level, _chain_of(cand.conn),
                       (*result.names, cand.domain), remote_server=cand.host, domain=cand.domain,
                       tls_err=cand.tls_err)
        if level > cand.tls_level:
            self.mod.log.debug("DANE match", remote_server=cand.host, domain=cand.domain)
        return level

    def close(self) -> None:
        for cand, _ in list(self.pending.values()):
            self._forget(cand)

    def _forget(self, cand: MXCandidate) -> None:
        # A running discovery may serve other deliveries: it is released, and killed only
        # when nobody else waits for it.
        entry = self.pending.pop(id(cand), None)
        key = self.keys.pop(id(cand), None)
        if entry is not None and isinstance(entry[1], gevent.Greenlet):
            self.mod.release(key, entry[1])

    def _discover(self, resolver: Any, host: str) -> Discovery:
        try:
            return discover_tlsa(resolver, host)
        except Exception as e:  # contain it: the MX fails temporarily, delivery goes on
            self.mod.log.error("TLSA discovery failed", e, remote_server=host)
            return Discovery(error=DNSError("network", f"dane: {e}"))


# --- Discovery (C-67..C-78) -------------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    """Discovery is what DANE learned about one MX host before connecting.

    ``records`` are the authenticated TLSA records at ``tlsa_name`` (empty: DANE does
    not apply); ``names`` the accepted DANE-TA reference identifiers learned from DNS
    (the MX host and its secure CNAME expansion); ``error`` a temporary lookup failure
    (C-77); ``reason`` says, for the debug log, why DANE does not apply.
    """

    records: tuple[TLSARecord, ...] = ()
    tlsa_name: str = ""
    names: tuple[str, ...] = ()
    error: DNSError | None = None
    reason: str = ""


def discover_tlsa(resolver: Any, host: str) -> Discovery:
    """discover_tlsa finds the TLSA records that apply to MX *host* (C-68, C-70..C-78).

    *resolver* offers ``lookup_addrs(host, want_v6=...)`` and ``lookup_tlsa(name)`` as
    :class:`maddylite.dns.Resolver` does. Lookups are sequential; run it in a greenlet.
    """
    original = _norm(host)
    try:
        addrs = resolver.lookup_addrs(original + ".", want_v6=True)
    except DNSError as e:
        if e.temporary:
            return Discovery(error=e)
        return Discovery(reason=f"no address: {e}")
    a_err = addrs.errors.get("A")
    if a_err is not None and a_err.temporary:
        # The A answer would decide, but it is unknown: fail rather than guess (C-77).
        return Discovery(error=a_err)
    if not addrs.authenticated:
        return Discovery(reason="address answer not authenticated")
    expanded = _norm(addrs.canonical_name or original)
    names: tuple[str, ...] = (original,)
    if expanded != original:
        # The authenticated answer covers the whole CNAME chain: the expansion is secure.
        names = (original, expanded)
        found = _tlsa_at(resolver, expanded, names)
        if found.error is not None or found.records or found.reason:
            return found
        # An authenticated empty answer at the target: fall back to the original name.
    found = _tlsa_at(resolver, original, names)
    if not found.records and not found.reason and found.error is None:
        return Discovery(tlsa_name=found.tlsa_name, names=names, reason="no TLSA records")
    return found


def _tlsa_at(resolver: Any, base: str, names: tuple[str, ...]) -> Discovery:
    """Look up ``_25._tcp.<base>``: records, or a reason to stop, or empty to go on."""
    name = f"_{TLSA_PORT}._tcp.{base}."
    try:
        ans = resolver.lookup_tlsa(name)
    except DNSError as e:
        if e.temporary:
            return Discovery(tlsa_name=name, names=names, error=e)
        return Discovery(tlsa_name=name, names=names, reason=f"TLSA lookup: {e}")
    if not ans.authenticated:
        return Discovery(tlsa_name=name, names=names, reason="TLSA answer not authenticated")
    return Discovery(records=tuple(ans.records), tlsa_name=name, names=names)


# --- Decision (C-75, C-77, C-79, C-81) ------------------------------------------------------


def decide(found: Discovery, tls_level: TLSLevel, chain_der: Sequence[bytes],
           names: Iterable[str], *, remote_server: str | None = None, domain: str = "",
           tls_err: str | None = None, now: datetime | None = None) -> TLSLevel:
    """decide returns the TLS level DANE grants, or raises the per-MX SMTPError.

    *chain_der* is what the server sent (leaf first); *names* the accepted DANE-TA
    reference identifiers (MX host, secure CNAME expansion, recipient domain, C-91).
    """
    if found.error is not None:
        raise DNS_ERROR_TEMP.error(remote_server=remote_server, domain=domain,
                                   reason=str(found.error))
    if not found.records:
        return tls_level
    if tls_level == TLSLevel.NONE:
        fields = {"tls_err": tls_err} if tls_err else {}
        raise DANE_TLS_REQUIRED.error(remote_server=remote_server, domain=domain,
                                      tls_level=str(tls_level), **fields)
    if not usable_records(found.records):
        return tls_level
    result = match_tlsa(found.records, chain_der, names, now=now)
    if not result:
        raise DANE_NO_MATCH.error(remote_server=remote_server, domain=domain,
                                  tls_level=str(tls_level), reason=result.reason)
    return TLSLevel.AUTHENTICATED


# --- TLSA matching (C-69, C-83..C-91) ---------------------------------------------------------


@dataclass(frozen=True)
class TLSAMatch:
    """TLSAMatch is the outcome of :func:`match_tlsa`: true when some record matched.

    ``reason`` says which record type matched, or why none did; ``record`` is the
    matching record.
    """

    matched: bool
    reason: str
    record: TLSARecord | None = None

    def __bool__(self) -> bool:
        return self.matched


#: The length of the association data of each digest matching type.
_DIGEST_LENGTH = {1: 32, 2: 64}


def usable_records(records: Iterable[TLSARecord]) -> list[TLSARecord]:
    """usable_records keeps DANE-TA/DANE-EE records with known selector and type (C-90).
    A malformed record, whose digest has the wrong length for its type or whose data is
    empty, can match nothing and is unusable too (Postfix skips such records as well)."""
    return [r for r in records
            if r.usage in (USAGE_DANE_TA, USAGE_DANE_EE) and r.selector in _USABLE_SELECTORS
            and r.mtype in _USABLE_MTYPES and r.data and len(r.data) == _DIGEST_LENGTH.get(r.mtype, len(r.data))]


def spki_der(cert_der: bytes) -> bytes:
    """spki_der returns the SubjectPublicKeyInfo of a DER certificate, as encoded in it.

    The bytes are cut out of the certificate rather than re-encoded, so that the hash
    is over exactly what the TLSA publisher hashed. Raises ValueError on bad DER.
    """
    tag, start, _ = _tlv(cert_der, 0)
    tbs_tag, pos, tbs_end = _tlv(cert_der, start)
    if tag != 0x30 or tbs_tag != 0x30:
        raise ValueError("not a certificate")
    if _tlv(cert_der, pos)[0] == 0xA0:  # [0] EXPLICIT version
        pos = _tlv(cert_der, pos)[2]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        pos = _tlv(cert_der, pos)[2]
    tag, _, end = _tlv(cert_der, pos)
    if tag != 0x30 or end > tbs_end:
        raise ValueError("bad subjectPublicKeyInfo")
    return cert_der[pos:end]


def record_matches(record: TLSARecord, cert_der: bytes) -> bool:
    """record_matches tells whether *record*'s selector and matching type fit *cert_der*."""
    try:
        data = cert_der if record.selector == 0 else spki_der(cert_der)
    except ValueError:
        return False
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    elif record.mtype != 0:
        return False
    return data == record.data


def match_tlsa(records: Iterable[TLSARecord], chain_der: Sequence[bytes],
               names: Iterable[str], *, now: datetime | None = None) -> TLSAMatch:
    """match_tlsa checks the server's chain (leaf first) against TLSA *records*.

    Unusable records are skipped (C-90); one matching record is enough (C-85, C-88).
    DANE-EE(3) matches the leaf certificate or its key, ignoring names and dates (C-69,
    C-83). DANE-TA(2) matches a CA certificate the server sent (not the leaf); the leaf
    must chain to it by signatures, every certificate below the anchor must be within
    its validity dates (intermediates must be CAs), and the leaf must carry one of
    *names* (C-86, C-87, C-91). The anchor's own dates are not checked: it is trusted
    because DNSSEC vouches for it [RFC 7671 §5.2.2].
    """
    usable = usable_records(records)
    if not usable:
        return TLSAMatch(False, "no usable TLSA records")
    if not chain_der:
        return TLSAMatch(False, "no server certificate")
    leaf_der = chain_der[0]
    for rec in usable:
        if rec.usage == USAGE_DANE_EE and record_matches(rec, leaf_der):
            return TLSAMatch(True, "DANE-EE", rec)
    ta_records = [r for r in usable if r.usage == USAGE_DANE_TA]
    if not ta_records:
        return TLSAMatch(False, "no DANE-EE record matches the server certificate")
    certs = [_load(d) for d in chain_der]
    leaf = certs[0]
    if leaf is None:
        return TLSAMatch(False, "cannot parse the server certificate")
    reason = "no DANE-TA record matches a certificate the server sent"
    anchors: dict[int, TLSARecord] = {}
    for i in range(1, len(chain_der)):
        rec_i = next((r for r in ta_records if record_matches(r, chain_der[i])), None)
        if rec_i is None:
            continue
        cert = certs[i]
        if cert is None or not _is_ca(cert):
            reason = "the DANE-TA trust anchor is not a CA certificate"
            continue
        anchors[i] = rec_i
    if not anchors:
        return TLSAMatch(False, reason)
    when = now or datetime.now(UTC)
    if not _valid_at(leaf, when):
        return TLSAMatch(False, "the server certificate is expired or not yet valid")
    if not cert_matches_names(leaf, names):
        return TLSAMatch(False, "the server certificate has none of the accepted names")
    anchor = _chain_to(0, anchors, certs, when, frozenset({0}))
    if anchor is None:
        return TLSAMatch(False, "the server certificate does not chain to the DANE-TA anchor")
    return TLSAMatch(True, "DANE-TA", anchors[anchor])


def cert_matches_names(cert: x509.Certificate, names: Iterable[str]) -> bool:
    """cert_matches_names tells whether *cert* carries one of the host *names* (C-91).

    DNS-ID subjectAltNames are used, or the subject CN when there is none; a ``*`` that
    is the whole left-most label matches exactly one label [RFC 7672 §3.2.3]. Names are
    compared as lowercase A-labels without the trailing dot.
    """
    wanted = {_norm(n) for n in names if n}
    wanted.discard("")
    for pattern in _cert_dns_names(cert):
        p = _norm(pattern)
        if p in wanted:
            return True
        if p.startswith("*.") and "*" not in p[2:]:
            suffix = p[2:]
            for name in wanted:
                label, _, rest = name.partition(".")
                if label and rest == suffix:
                    return True
    return False


# --- private helpers ----------------------------------------------------------------------


def _chain_of(conn: Any) -> list[bytes]:
    if conn is None:
        return []
    return list(conn.peer_chain_der())


def _chain_to(idx: int, anchors: dict[int, TLSARecord], certs: Sequence[x509.Certificate | None],
              when: datetime, used: frozenset[int]) -> int | None:
    """Depth-first search for a signature path from certs[idx] up to an anchor."""
    child = certs[idx]
    assert child is not None
    for j, issuer in enumerate(certs):
        if j in used or issuer is None or not _issued_by(child, issuer):
            continue
        if j in anchors:
            return j
        if not _is_ca(issuer) or not _valid_at(issuer, when):
            continue
        found = _chain_to(j, anchors, certs, when, used | {j})
        if found is not None:
            return found
    return None


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except ValueError:
        return False
    return bool(ku.key_cert_sign)


def _valid_at(cert: x509.Certificate, when: datetime) -> bool:
    before = getattr(cert, "not_valid_before_utc", None)
    after = getattr(cert, "not_valid_after_utc", None)
    if before is None or after is None:  # cryptography < 42
        before = cert.not_valid_before.replace(tzinfo=UTC)
        after = cert.not_valid_after.replace(tzinfo=UTC)
    return bool(before <= when <= after)


def _cert_dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = san.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, ValueError):
        dns_names = []
    if dns_names:
        return dns_names
    try:
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return []
    return [a.value for a in attrs if isinstance(a.value, str)]


def _load(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _norm(name: str) -> str:
    """A host name as lowercase A-labels without the trailing dot."""
    text = name.strip().rstrip(".")
    if not text:
        return ""
    try:
        return dns.name.from_text(text, idna_codec=dns.name.IDNA_2003_Practical) \
            .to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return text.lower()


def _tlv(buf: bytes, pos: int) -> tuple[int, int, int]:
    """One DER element at *pos*: (tag, start of content, end)."""
    if pos + 2 > len(buf):
        raise ValueError("truncated DER")
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(buf):
            raise ValueError("bad DER length")
        length = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    end = pos + length
    if end > len(buf):
        raise ValueError("truncated DER")
    return tag, pos, end
