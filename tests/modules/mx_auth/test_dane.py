"""Tests for mx_auth.dane: TLSA matching, discovery and the per-MX decision (C.4).

Certificates are made with ``cryptography``; the resolver and the connection are
in-memory fakes, so nothing touches the network. Fixtures live here rather than in a
shared conftest.py.
"""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import gevent
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from maddylite.modules.mx_auth import dane
from maddylite.modules.mx_auth.dane import (
    NOOP_MESSAGE,
    Discovery,
    cert_matches_names,
    decide,
    discover_tlsa,
    match_tlsa,
    record_matches,
    spki_der,
    usable_records,
)

import maddylite.log as log_mod
from maddylite.dns import AddrAnswer, DNSError, TLSAAnswer, TLSARecord
from maddylite.policy import MXCandidate, TLSLevel
from maddylite.smtp.errors import DANE_NO_MATCH, DANE_TLS_REQUIRED, DNS_ERROR_TEMP, SMTPError

NOW = datetime(2030, 6, 1, tzinfo=UTC)
MX = "mx.example.test."
TLSA_MX = "_25._tcp.mx.example.test."
TLSA_CNAME = "_25._tcp.mx.cname.test."
NAMES = ("mx.example.test", "example.test")


# --- certificates ----------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(cn: str, key: Any, *, issuer: tuple[x509.Certificate, Any] | None = None,
          ca: bool = False, sans: tuple[str, ...] | None = None,
          not_before: datetime = NOW - timedelta(days=30),
          not_after: datetime = NOW + timedelta(days=30),
          key_cert_sign: bool | None = None) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans is None and not ca:
        sans = (cn,)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]),
                            critical=False)
    if key_cert_sign is not None:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
            crl_sign=key_cert_sign, encipher_only=False, decipher_only=False), critical=True)
    return b.sign(signer, hashes.SHA256())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _assoc(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    data = _der(cert) if selector == 0 else cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _rec(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> TLSARecord:
    return TLSARecord(usage, selector, mtype, _assoc(cert, selector, mtype))


class PKI:
    """PKI holds a root → intermediate → leaf chain for mx.example.test, and a self-signed leaf."""

    def __init__(self, leaf_name: str = "mx.example.test", **leaf_args: Any) -> None:
        self.root_key, self.int_key, self.leaf_key = _key(), _key(), _key()
        self.root = _cert("Test Root", self.root_key, ca=True)
        self.intermediate = _cert("Test Intermediate", self.int_key,
                                  issuer=(self.root, self.root_key), ca=True)
        self.leaf = _cert(leaf_name, self.leaf_key,
                          issuer=(self.intermediate, self.int_key), **leaf_args)

    @property
    def chain(self) -> list[bytes]:
        return [_der(self.leaf), _der(self.intermediate), _der(self.root)]


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


@pytest.fixture(scope="module")
def other_pki() -> PKI:
    return PKI()


@pytest.fixture(scope="module")
def self_signed() -> x509.Certificate:
    """A self-signed, expired leaf with an unrelated name: PKIX would reject it (C-83)."""
    return _cert("unrelated.invalid", _key(), not_before=NOW - timedelta(days=400),
                 not_after=NOW - timedelta(days=10))


COMBOS = [(s, m) for s in (0, 1) for m in (0, 1, 2)]


# --- DANE-EE (usage 3) --------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "mtype"), COMBOS, ids=[f"C-69-C-90-3-{s}-{m}" for s, m in COMBOS])
def test_dane_ee_matches_every_selector_and_type(self_signed, selector, mtype):
    """C-69, C-83, C-90: DANE-EE matches the leaf or its key; names and dates are ignored."""
    result = match_tlsa([_rec(3, selector, mtype, self_signed)], [_der(self_signed)], NAMES, now=NOW)
    assert result
    assert result.reason == "DANE-EE"


@pytest.mark.parametrize(("selector", "mtype"), COMBOS, ids=[f"C-81-3-{s}-{m}" for s, m in COMBOS])
def test_dane_ee_other_key_does_not_match(self_signed, pki, selector, mtype):
    """C-81: a DANE-EE record for another certificate does not match."""
    result = match_tlsa([_rec(3, selector, mtype, pki.leaf)], [_der(self_signed)], NAMES, now=NOW)
    assert not result


def test_dane_ee_matches_leaf_only(pki):
    """C-69: DANE-EE is about the leaf; a record for the intermediate is no EE match."""
    assert not match_tlsa([_rec(3, 1, 1, pki.intermediate)], pki.chain, NAMES, now=NOW)


def test_dane_ee_one_of_several_is_enough(self_signed, pki, other_pki):
    """C-85: several DANE-EE records, one matching is enough."""
    records = [_rec(3, 1, 1, pki.leaf), _rec(3, 0, 2, other_pki.leaf), _rec(3, 1, 1, self_signed)]
    result = match_tlsa(records, [_der(self_signed)], NAMES, now=NOW)
    assert result and result.record == records[2]


def test_dane_ee_spki_survives_key_rollover_of_certificate(self_signed):
    """C-69: a 3 1 1 record keeps matching a new certificate for the same key."""
    key = _key()
    old = _cert("a.test", key)
    new = _cert("b.test", key, not_after=NOW + timedelta(days=900))
    assert match_tlsa([_rec(3, 1, 1, old)], [_der(new)], NAMES, now=NOW)
    assert not match_tlsa([_rec(3, 0, 1, old)], [_der(new)], NAMES, now=NOW)


def test_spki_is_cut_from_the_certificate():
    """spki_der returns the exact SubjectPublicKeyInfo bytes, for EC and RSA keys."""
    for key in (_key(), rsa.generate_private_key(public_exponent=65537, key_size=1024)):
        cert = _cert("k.test", key)
        expected = key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        assert spki_der(_der(cert)) == expected


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x30\x03\x02\x01\x01", b"garbage" * 10],
                         ids=["empty", "truncated", "no-tbs", "garbage"])
def test_bad_certificate_bytes_never_match(der):
    """C-90: selector 1 on a certificate that is not DER gives no match, not a crash."""
    with pytest.raises(ValueError):
        spki_der(der)
    assert not record_matches(TLSARecord(3, 1, 0, der), der)
    assert not match_tlsa([TLSARecord(2, 1, 1, b"x" * 32)], [der, der], NAMES, now=NOW)


# --- usable records (C-90) --------------------------------------------------------------------


UNUSABLE = [(0, 1, 1), (1, 1, 1), (4, 1, 1), (3, 2, 1), (3, 1, 3), (2, 255, 0), (2, 0, 255)]


@pytest.mark.parametrize("params", UNUSABLE, ids=[f"C-90-{u}-{s}-{m}" for u, s, m in UNUSABLE])
def test_unusable_records_are_skipped(self_signed, params):
    """C-90: PKIX-TA/PKIX-EE and unknown selectors or types are skipped, even if they 'match'."""
    usage, selector, mtype = params
    data = _assoc(self_signed, min(selector, 1), mtype if mtype <= 2 else 1)
    rec = TLSARecord(usage, selector, mtype, data)
    assert usable_records([rec]) == []
    assert not match_tlsa([rec], [_der(self_signed)], NAMES, now=NOW)


@pytest.mark.parametrize("params,data", [((3, 1, 1), b"x" * 31), ((3, 1, 2), b"x" * 32), ((2, 0, 1), b"x" * 33),
                                         ((3, 1, 0), b"")], ids=["C-90-sha256-short", "C-90-sha512-short",
                                                                 "C-90-sha256-long", "C-90-exact-empty"])
def test_malformed_records_are_unusable(params, data):
    """C-90: a digest of the wrong length for its matching type (or no data) can match
    nothing: the record is unusable, so a set of only such records is 'only unusable'."""
    rec = TLSARecord(*params, data)
    assert usable_records([rec]) == []
    assert usable_records([rec, TLSARecord(3, 1, 1, b"x" * 32)]) == [TLSARecord(3, 1, 1, b"x" * 32)]


def test_usable_records_still_decide_next_to_unusable_ones(self_signed):
    """C-90: records with other values are skipped and the usable ones still decide."""
    records = [TLSARecord(1, 1, 1, b"\0" * 32), TLSARecord(3, 7, 1, b""), _rec(3, 1, 2, self_signed)]
    assert usable_records(records) == [records[2]]
    assert match_tlsa(records, [_der(self_signed)], NAMES, now=NOW)


# --- DANE-TA (usage 2) ------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "mtype"), COMBOS, ids=[f"C-86-2-{s}-{m}" for s, m in COMBOS])
def test_dane_ta_intermediate_anchor(pki, selector, mtype):
    """C-86: 2 x y for the intermediate, server sends leaf + intermediate + root."""
    result = match_tlsa([_rec(2, selector, mtype, pki.intermediate)], pki.chain, NAMES, now=NOW)
    assert result
    assert result.reason == "DANE-TA"


@pytest.mark.parametrize(("selector", "mtype"), COMBOS, ids=[f"C-86-root-2-{s}-{m}" for s, m in COMBOS])
def test_dane_ta_root_anchor_through_intermediate(pki, selector, mtype):
    """C-86: the anchor may be the root the server sent; the path goes through the intermediate."""
    assert match_tlsa([_rec(2, selector, mtype, pki.root)], pki.chain, NAMES, now=NOW)


def test_dane_ta_chain_in_any_order(pki):
    """C-86: the path is built by signatures, not by the order the server sent."""
    chain = [_der(pki.leaf), _der(pki.root), _der(pki.intermediate)]
    assert match_tlsa([_rec(2, 1, 1, pki.root)], chain, NAMES, now=NOW)


def test_dane_ta_anchor_must_be_sent(pki):
    """C-86: the trust anchor must be one of the certificates the server sent."""
    chain = [_der(pki.leaf), _der(pki.intermediate)]
    result = match_tlsa([_rec(2, 1, 1, pki.root)], chain, NAMES, now=NOW)
    assert not result
    assert "matches a certificate the server sent" in result.reason


def test_dane_ta_other_chain(pki, other_pki):
    """C-87: a TA record for chain A, the server presents chain B → no match."""
    assert not match_tlsa([_rec(2, 1, 1, pki.intermediate)], other_pki.chain, NAMES, now=NOW)


def test_dane_ta_several_records_one_matches(pki, other_pki):
    """C-88: several TA records, including the same record twice; one matches."""
    good = _rec(2, 1, 1, pki.intermediate)
    records = [_rec(2, 0, 1, other_pki.root), good, good, _rec(2, 1, 2, other_pki.intermediate)]
    result = match_tlsa(records, pki.chain, NAMES, now=NOW)
    assert result and result.record == good


def test_dane_ta_record_for_the_leaf_is_not_an_anchor(pki):
    """C-86: a usage-2 record that matches the leaf itself does not authenticate it."""
    assert not match_tlsa([_rec(2, 1, 1, pki.leaf)], pki.chain, NAMES, now=NOW)


def test_dane_ta_anchor_must_be_a_ca():
    """C-86: an anchor without CA basic constraints is refused, though it signed the leaf."""
    fake_ca_key, leaf_key = _key(), _key()
    fake_ca = _cert("Not A CA", fake_ca_key, ca=False, sans=())
    leaf = _cert("mx.example.test", leaf_key, issuer=(fake_ca, fake_ca_key))
    result = match_tlsa([_rec(2, 1, 1, fake_ca)], [_der(leaf), _der(fake_ca)], NAMES, now=NOW)
    assert not result
    assert "not a CA" in result.reason


def test_dane_ta_anchor_without_cert_sign_usage():
    """C-86: a CA certificate whose key usage forbids signing certificates is no anchor."""
    ca_key, leaf_key = _key(), _key()
    ca = _cert("Limited CA", ca_key, ca=True, key_cert_sign=False)
    leaf = _cert("mx.example.test", leaf_key, issuer=(ca, ca_key))
    assert not match_tlsa([_rec(2, 1, 1, ca)], [_der(leaf), _der(ca)], NAMES, now=NOW)


def test_dane_ta_forged_signature(pki):
    """C-86: a leaf naming the intermediate as issuer but signed by another key does not chain."""
    forger = _key()
    forged = _cert("mx.example.test", _key(), issuer=(pki.intermediate, forger))
    chain = [_der(forged), _der(pki.intermediate), _der(pki.root)]
    result = match_tlsa([_rec(2, 1, 1, pki.intermediate)], chain, NAMES, now=NOW)
    assert not result
    assert "chain" in result.reason


@pytest.mark.parametrize(("before", "after"), [
    pytest.param(NOW - timedelta(days=60), NOW - timedelta(seconds=1), id="C-86-expired"),
    pytest.param(NOW + timedelta(days=1), NOW + timedelta(days=60), id="C-86-not-yet-valid"),
])
def test_dane_ta_leaf_dates(before, after):
    """C-86: with DANE-TA the leaf must be within its validity dates."""
    p = PKI(not_before=before, not_after=after)
    result = match_tlsa([_rec(2, 1, 1, p.intermediate)], p.chain, NAMES, now=NOW)
    assert not result
    assert "expired" in result.reason


def test_dane_ta_expired_intermediate_below_anchor():
    """C-86: a certificate between the leaf and the anchor must be within its dates too."""
    root_key, int_key, leaf_key = _key(), _key(), _key()
    root = _cert("Root", root_key, ca=True)
    inter = _cert("Old Intermediate", int_key, issuer=(root, root_key), ca=True,
                  not_before=NOW - timedelta(days=90), not_after=NOW - timedelta(days=1))
    leaf = _cert("mx.example.test", leaf_key, issuer=(inter, int_key))
    chain = [_der(leaf), _der(inter), _der(root)]
    assert not match_tlsa([_rec(2, 1, 1, root)], chain, NAMES, now=NOW)
    # The anchor's own dates are not checked: DNSSEC vouches for it.
    assert match_tlsa([_rec(2, 1, 1, inter)], chain, NAMES, now=NOW)


def test_dane_ta_wrong_name(pki):
    """C-86, C-91: the leaf must carry an accepted name."""
    result = match_tlsa([_rec(2, 1, 1, pki.intermediate)], pki.chain, ("other.test",), now=NOW)
    assert not result
    assert "name" in result.reason


@pytest.mark.parametrize("leaf_name", [
    pytest.param("mx.example.test", id="C-91-mx-host"),
    pytest.param("mx.cname.test", id="C-91-secure-cname-expansion"),
    pytest.param("example.test", id="C-91-recipient-domain"),
])
def test_dane_ta_accepted_names(leaf_name):
    """C-91: MX host, its secure CNAME expansion or the recipient domain are accepted."""
    p = PKI(leaf_name=leaf_name)
    names = ("mx.example.test.", "mx.cname.test.", "example.test")
    assert match_tlsa([_rec(2, 1, 1, p.intermediate)], p.chain, names, now=NOW)


def test_dane_ee_ignores_names(self_signed):
    """C-69: DANE-EE ignores names entirely, even with no accepted name at all."""
    assert match_tlsa([_rec(3, 1, 1, self_signed)], [_der(self_signed)], (), now=NOW)


@pytest.mark.parametrize(("sans", "cn", "name", "ok"), [
    pytest.param(("MX.Example.TEST",), "x", "mx.example.test.", True, id="C-91-case-and-dot"),
    pytest.param(("*.example.test",), "x", "mx.example.test", True, id="C-91-wildcard"),
    pytest.param(("*.example.test",), "x", "a.mx.example.test", False, id="C-91-wildcard-one-label"),
    pytest.param(("*.example.test",), "x", "example.test", False, id="C-91-wildcard-not-parent"),
    pytest.param(("m*.example.test",), "x", "mx.example.test", False, id="C-91-partial-wildcard"),
    pytest.param((), "mx.example.test", "mx.example.test", True, id="C-91-cn-without-san"),
    pytest.param(("other.test",), "mx.example.test", "mx.example.test", False, id="C-91-san-hides-cn"),
    pytest.param(("xn--bcher-kva.test",), "x", "bücher.test", True, id="C-91-idn-a-label"),
])
def test_cert_names(sans, cn, name, ok):
    """C-91: reference identifiers are compared as RFC 7672 §3.2.3 says."""
    cert = _cert(cn, _key(), sans=sans)
    assert cert_matches_names(cert, (name,)) is ok


def test_no_certificate_no_match():
    """C-81: usable records but the server sent no certificate → no match."""
    assert not match_tlsa([TLSARecord(3, 1, 1, b"\0" * 32)], [], NAMES, now=NOW)


# --- discovery (C-67..C-78) ----------------------------------------------------------------------


def _addrs(host: str = MX, *, ad: bool = True, cname: str | None = None, v4: bool = True,
           errors: dict[str, DNSError] | None = None) -> AddrAnswer:
    return AddrAnswer(host, ["192.0.2.1"] if v4 else [], [] if v4 else ["2001:db8::1"], ad,
                      cname or host, errors or {})


def _tlsa(name: str, records: list[TLSARecord] | None = None, *, ad: bool = True,
          rcode: str = "NOERROR") -> TLSAAnswer:
    return TLSAAnswer(name, list(records or []), ad, rcode, name)


def _servfail(name: str = MX) -> DNSError:
    return DNSError("servfail", f"dns: rcode SERVFAIL when looking up {name}", rcode="SERVFAIL")


REC = TLSARecord(3, 1, 1, b"\x11" * 32)
REC2 = TLSARecord(3, 1, 1, b"\x22" * 32)


class FakeResolver:
    """FakeResolver answers from dicts; a DNSError value is raised; calls are recorded."""

    def __init__(self, addrs: Any, tlsa: dict[str, Any] | None = None, *,
                 dnssec_capable: bool = True, delay: float = 0.0) -> None:
        self.addrs = addrs
        self.tlsa = tlsa or {}
        self.dnssec_capable = dnssec_capable
        self.delay = delay
        self.calls: list[tuple[str, str]] = []

    def lookup_addrs(self, host: str, *, want_v6: bool = True,
                     lifetime: float | None = None) -> AddrAnswer:
        self.calls.append(("addrs", host))
        if self.delay:
            gevent.sleep(self.delay)
        if isinstance(self.addrs, Exception):
            raise self.addrs
        return self.addrs

    def lookup_tlsa(self, name: str, *, lifetime: float | None = None) -> TLSAAnswer:
        self.calls.append(("tlsa", name))
        ans = self.tlsa.get(name, _tlsa(name, rcode="NXDOMAIN"))
        if isinstance(ans, Exception):
            raise ans
        return ans

    @property
    def tlsa_queries(self) -> list[str]:
        return [n for kind, n in self.calls if kind == "tlsa"]


@pytest.mark.parametrize("v4", [True, False], ids=["C-68-A", "C-78-AAAA"])
def test_insecure_address_answer_sends_no_tlsa_query(v4):
    """C-68, C-78: A (or AAAA) answer not authenticated, no CNAME → no TLSA query at all."""
    r = FakeResolver(_addrs(ad=False, v4=v4), {TLSA_MX: _servfail()})
    found = discover_tlsa(r, MX)
    assert found == Discovery(reason="address answer not authenticated")
    assert r.tlsa_queries == []


@pytest.mark.parametrize("v4", [True, False], ids=["C-69-A", "C-78-AAAA"])
def test_secure_address_answer_uses_tlsa(v4):
    """C-69, C-78: authenticated A (or AAAA only) → the TLSA at _25._tcp.<mx> is used."""
    r = FakeResolver(_addrs(v4=v4), {TLSA_MX: _tlsa(TLSA_MX, [REC])})
    found = discover_tlsa(r, MX)
    assert found.records == (REC,)
    assert found.tlsa_name == TLSA_MX
    assert found.names == ("mx.example.test",)
    assert found.error is None


@pytest.mark.parametrize("v4", [True, False], ids=["C-70-A", "C-78-AAAA"])
def test_secure_cname_uses_target_tlsa(v4):
    """C-70, C-78: authenticated CNAME to mx.cname.test → TLSA at the target is used."""
    r = FakeResolver(_addrs(cname="mx.cname.test.", v4=v4),
                     {TLSA_CNAME: _tlsa(TLSA_CNAME, [REC2]), TLSA_MX: _tlsa(TLSA_MX, [REC])})
    found = discover_tlsa(r, MX)
    assert found.records == (REC2,)
    assert found.names == ("mx.example.test", "mx.cname.test")
    assert r.tlsa_queries == [TLSA_CNAME]


@pytest.mark.parametrize("target", [
    pytest.param(_tlsa(TLSA_CNAME, rcode="NXDOMAIN"), id="C-71-nxdomain"),
    pytest.param(_tlsa(TLSA_CNAME), id="C-74-authenticated-empty"),
])
def test_secure_cname_without_target_tlsa_falls_back(target):
    """C-71, C-74: no (or an authenticated empty) TLSA at the target → the original name's."""
    r = FakeResolver(_addrs(cname="mx.cname.test."), {TLSA_CNAME: target, TLSA_MX: _tlsa(TLSA_MX, [REC])})
    found = discover_tlsa(r, MX)
    assert found.records == (REC,)
    assert found.tlsa_name == TLSA_MX
    assert found.names == ("mx.example.test", "mx.cname.test")
    assert r.tlsa_queries == [TLSA_CNAME, TLSA_MX]


@pytest.mark.parametrize("v4", [True, False], ids=["C-73-A", "C-78-AAAA"])
def test_insecure_cname_skips_dane(v4):
    """C-73, C-78: the CNAME itself is not authenticated → no DANE, even with TLSA at the target."""
    r = FakeResolver(_addrs(ad=False, cname="mx.cname.test.", v4=v4),
                     {TLSA_CNAME: _tlsa(TLSA_CNAME, [REC2])})
    assert discover_tlsa(r, MX).records == ()
    assert r.tlsa_queries == []


def test_insecure_tlsa_at_original_name_is_ignored():
    """C-74: the TLSA answer at the name finally used is not authenticated → no DANE."""
    r = FakeResolver(_addrs(), {TLSA_MX: _tlsa(TLSA_MX, [REC], ad=False)})
    found = discover_tlsa(r, MX)
    assert found.records == ()
    assert "not authenticated" in found.reason


def test_insecure_tlsa_at_cname_target_is_ignored():
    """C-74: records at the CNAME target that are not authenticated → ignored, no DANE."""
    r = FakeResolver(_addrs(cname="mx.cname.test."),
                     {TLSA_CNAME: _tlsa(TLSA_CNAME, [REC2], ad=False), TLSA_MX: _tlsa(TLSA_MX, [REC])})
    assert discover_tlsa(r, MX).records == ()


def test_authenticated_empty_everywhere_is_no_dane():
    """C-74: an authenticated empty answer at the target and at the original name → no DANE."""
    r = FakeResolver(_addrs(cname="mx.cname.test."), {TLSA_CNAME: _tlsa(TLSA_CNAME), TLSA_MX: _tlsa(TLSA_MX)})
    found = discover_tlsa(r, MX)
    assert found.records == () and found.error is None


@pytest.mark.parametrize("answer", [
    pytest.param(_tlsa(TLSA_MX, rcode="NXDOMAIN"), id="C-75-nxdomain"),
    pytest.param(_tlsa(TLSA_MX), id="C-75-empty"),
])
def test_no_tlsa_records(answer):
    """C-75: NXDOMAIN or an empty answer → no records, no error."""
    found = discover_tlsa(FakeResolver(_addrs(), {TLSA_MX: answer}), MX)
    assert found.records == () and found.error is None


@pytest.mark.parametrize("err", [
    pytest.param(_servfail(), id="C-77-servfail"),
    pytest.param(DNSError("timeout", "dns: timeout when looking up mx.example.test."), id="C-77-timeout"),
])
def test_address_lookup_failure_is_an_error(err):
    """C-77: the A/AAAA query fails with SERVFAIL or a timeout → DNS error, no TLSA query."""
    r = FakeResolver(err)
    found = discover_tlsa(r, MX)
    assert found.error is err
    assert r.tlsa_queries == []


def test_address_nxdomain_is_not_a_dane_error():
    """C-77: NXDOMAIN for the MX host is not DANE's failure (the dial reports it)."""
    found = discover_tlsa(FakeResolver(DNSError("nxdomain", "dns: rcode NXDOMAIN")), MX)
    assert found.error is None and found.records == ()


def test_failed_a_query_with_aaaa_answer_is_an_error():
    """C-77, C-78: the A query failed, so the deciding answer is unknown → DNS error."""
    answer = _addrs(v4=False, errors={"A": _servfail()})
    found = discover_tlsa(FakeResolver(answer, {TLSA_MX: _tlsa(TLSA_MX, [REC])}), MX)
    assert found.error is not None


def test_failed_aaaa_query_with_a_answer_is_fine():
    """C-77, C-78: the A answer decides; a failed AAAA query does not matter."""
    answer = _addrs(errors={"AAAA": _servfail()})
    found = discover_tlsa(FakeResolver(answer, {TLSA_MX: _tlsa(TLSA_MX, [REC])}), MX)
    assert found.error is None and found.records == (REC,)


@pytest.mark.parametrize(("cname", "failing"), [
    pytest.param(None, TLSA_MX, id="C-77-tlsa-servfail"),
    pytest.param("mx.cname.test.", TLSA_CNAME, id="C-77-tlsa-servfail-at-target"),
    pytest.param("mx.cname.test.", TLSA_MX, id="C-77-tlsa-servfail-at-fallback"),
])
def test_tlsa_lookup_failure_is_an_error(cname, failing):
    """C-77: a TLSA lookup that fails with SERVFAIL (or a timeout) is a DNS error."""
    tlsa = {TLSA_CNAME: _tlsa(TLSA_CNAME), TLSA_MX: _tlsa(TLSA_MX), failing: _servfail(failing)}
    found = discover_tlsa(FakeResolver(_addrs(cname=cname), tlsa), MX)
    assert found.error is not None and found.error.temporary


# --- decision (C-75, C-77, C-79, C-81) ---------------------------------------------------------


def test_decide_no_records_no_effect():
    """C-75: no TLSA records → no effect, with or without TLS."""
    for level in TLSLevel:
        assert decide(Discovery(), level, [], NAMES) == level


def test_decide_dns_error():
    """C-77: lookup failure → 450 4.4.4 "DNS error", temporary."""
    with pytest.raises(SMTPError) as ei:
        decide(Discovery(error=_servfail()), TLSLevel.AUTHENTICATED, [], NAMES, remote_server=MX)
    assert DNS_ERROR_TEMP.matches(ei.value)
    assert ei.value.temporary and ei.value.code == 450
    assert ei.value.remote_server == MX


@pytest.mark.parametrize("records", [
    pytest.param((REC,), id="C-79-usable"),
    pytest.param((TLSARecord(1, 1, 1, b"\0" * 32),), id="C-79-unusable"),
])
def test_decide_plaintext_with_tlsa(records):
    """C-79: authenticated TLSA records (usable or not) and plaintext → 451 4.7.1 temp."""
    with pytest.raises(SMTPError) as ei:
        decide(Discovery(records=records), TLSLevel.NONE, [], NAMES, tls_err="handshake failed")
    assert DANE_TLS_REQUIRED.matches(ei.value)
    assert ei.value.temporary and str(ei.value).startswith("451 4.7.1")
    assert ei.value.fields["tls_err"] == "handshake failed"


def test_decide_only_unusable_records_with_tls():
    """C-90: only unusable records and TLS → the ladder's level stands."""
    found = Discovery(records=(TLSARecord(0, 0, 1, b"\0" * 32),))
    assert decide(found, TLSLevel.ENCRYPTED, [b"x"], NAMES) == TLSLevel.ENCRYPTED


def test_decide_no_match(self_signed, pki):
    """C-81: an authenticated 3 1 1 record that does not match → 451 4.7.0 temp."""
    with pytest.raises(SMTPError) as ei:
        decide(Discovery(records=(_rec(3, 1, 1, pki.leaf),)), TLSLevel.ENCRYPTED,
               [_der(self_signed)], NAMES)
    assert DANE_NO_MATCH.matches(ei.value)
    assert ei.value.temporary and str(ei.value) == "451 4.7.0 No matching TLSA records"


@pytest.mark.parametrize("level", [TLSLevel.ENCRYPTED, TLSLevel.AUTHENTICATED], ids=["C-83", "C-11"])
def test_decide_match_authenticates(self_signed, level):
    """C-69, C-83: a match raises the TLS level to authenticated."""
    found = Discovery(records=(_rec(3, 1, 1, self_signed),))
    assert decide(found, level, [_der(self_signed)], NAMES) == TLSLevel.AUTHENTICATED


# --- the module: configuration and check_conn ------------------------------------------------


class FakeConn:
    """FakeConn is the part of SMTPConnection DANE reads."""

    def __init__(self, chain: list[bytes]) -> None:
        self.chain = chain

    def peer_chain_der(self) -> list[bytes]:
        return list(self.chain)


@pytest.fixture
def log_lines(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log_mod, "_out", buf)
    monkeypatch.setattr(log_mod, "_enabled", True)
    monkeypatch.setattr(log_mod, "_json", False)
    return buf


@pytest.fixture
def dane_module(build_config):
    """dane_module configures ``mx_auth p { dane }`` with the real processor and starts it."""
    made = []

    def make(block: str = "dane", prefix: str = "") -> dane.DANE:
        rt = build_config(f"{prefix}mx_auth p {{\n  {block}\n}}\n")
        group = rt.instance("p")
        assert group is not None
        (mod,) = group.policies()
        assert isinstance(mod, dane.DANE)
        mod.start()
        made.append(mod)
        return mod

    yield make
    for mod in made:
        mod.stop(1)


def _cand(resolver: Any, tls_level: TLSLevel, chain: list[bytes] | None = None) -> MXCandidate:
    c = MXCandidate("example.test", MX, 10, resolver=resolver)
    c.tls_level = tls_level
    c.conn = FakeConn(chain or [])
    return c


@pytest.mark.parametrize(("block", "prefix", "debug"), [
    pytest.param("dane", "", False, id="A-95-bare"),
    pytest.param("dane { }", "", False, id="A-95-empty-block"),
    pytest.param("dane { debug yes }", "", True, id="A-95-debug"),
    pytest.param("dane", "debug yes\n", True, id="A-100-inherits-global-debug"),
    pytest.param("dane { debug no }", "debug yes\n", False, id="A-100-block-overrides-global"),
    pytest.param("dane off", "", False, id="A-96-dane-off-still-enabled"),
])
def test_configuration(dane_module, block, prefix, debug):
    """A-95, A-96, A-100: ``debug`` is the only directive, inherited from the global one."""
    mod = dane_module(block, prefix)
    assert mod.settings.debug is debug
    assert mod.log.debug_enabled is debug


def test_unknown_directive(build_config):
    """A-95: policy blocks are strict."""
    from maddylite.config.errors import ConfigError

    with pytest.raises(ConfigError, match="unexpected directive: foo"):
        build_config("mx_auth p {\n  dane { foo }\n}\n")


def test_discovery_runs_before_connecting_and_is_awaited(dane_module, self_signed):
    """C-67, C-69: prepare_conn starts the lookup in the background; check_conn awaits it."""
    mod = dane_module()
    r = FakeResolver(_addrs(), {TLSA_MX: _tlsa(TLSA_MX, [_rec(3, 1, 1, self_signed)])}, delay=0.02)
    d = mod.start_delivery(None)
    cand = _cand(r, TLSLevel.ENCRYPTED, [_der(self_signed)])
    d.prepare_conn(cand)
    assert r.calls == []  # nothing ran yet: prepare_conn did not block
    assert d.check_conn(cand) == TLSLevel.AUTHENTICATED
    assert r.calls == [("addrs", MX), ("tlsa", TLSA_MX)]
    d.close()


def test_check_conn_errors_go_through(dane_module, pki):
    """C-79, C-81, C-77 through the module's hooks."""
    mod = dane_module()
    d = mod.start_delivery(None)
    r = FakeResolver(_addrs(), {TLSA_MX: _tlsa(TLSA_MX, [_rec(3, 1, 1, pki.leaf)])})
    plain = _cand(r, TLSLevel.NONE)
    d.prepare_conn(plain)
    with pytest.raises(SMTPError) as ei:
        d.check_conn(plain)
    assert DANE_TLS_REQUIRED.matches(ei.value)
    other = _cand(r, TLSLevel.ENCRYPTED, [_der(_cert("x.test", _key()))])
    d.prepare_conn(other)
    with pytest.raises(SMTPError) as ei:
        d.check_conn(other)
    assert DANE_NO_MATCH.matches(ei.value)
    broken = _cand(FakeResolver(_servfail()), TLSLevel.AUTHENTICATED)
    d.prepare_conn(broken)
    with pytest.raises(SMTPError) as ei:
        d.check_conn(broken)
    assert DNS_ERROR_TEMP.matches(ei.value)


def test_dane_ta_through_the_module_accepts_recipient_domain():
    """C-91: the recipient domain is an accepted name when check_conn decides."""
    now = datetime.now(UTC)
    p = PKI(leaf_name="example.test", not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=1))
    mod = dane.DANE("mx_auth.dane", "", None)
    d = mod.start_delivery(None)
    r = FakeResolver(_addrs(), {TLSA_MX: _tlsa(TLSA_MX, [_rec(2, 1, 1, p.intermediate)])})
    cand = _cand(r, TLSLevel.ENCRYPTED, p.chain)
    d.prepare_conn(cand)  # not started: the lookup runs in place
    assert d.check_conn(cand) == TLSLevel.AUTHENTICATED


def test_check_conn_without_prepare_is_no_op(dane_module):
    """C-67: a candidate DANE did not prepare (a reused connection) is left alone."""
    d = dane_module().start_delivery(None)
    assert d.check_conn(_cand(FakeResolver(_servfail()), TLSLevel.ENCRYPTED)) == TLSLevel.ENCRYPTED


def test_no_dnssec_resolver_is_no_op(dane_module, log_lines):
    """C-92: without a DNSSEC-capable resolver DANE logs once and does nothing."""
    mod = dane_module()
    r = FakeResolver(_servfail(), dnssec_capable=False)
    for _ in range(2):
        d = mod.start_delivery(None)
        cand = _cand(r, TLSLevel.NONE)
        d.prepare_conn(cand)
        assert d.check_conn(cand) == TLSLevel.NONE
    assert r.calls == []
    assert log_lines.getvalue().count(NOOP_MESSAGE) == 1


def test_close_kills_pending_discovery(dane_module):
    """close() ends the discoveries of candidates that never reached check_conn."""
    mod = dane_module()
    r = FakeResolver(_addrs(), delay=5)
    d = mod.start_delivery(None)
    cand = _cand(r, TLSLevel.ENCRYPTED)
    d.prepare_conn(cand)
    gevent.sleep(0)
    (entry,) = d.pending.values()
    d.close()
    gevent.sleep(0)
    assert entry[1].dead
    assert d.check_conn(cand) == TLSLevel.ENCRYPTED


def test_concurrent_deliveries_share_one_discovery_C_67(dane_module):
    """C-67 with many deliveries at once: deliveries to one MX that overlap share one
    running TLSA discovery (one lookup); one delivery's close() leaves it to the others,
    the last close() ends it."""
    mod = dane_module()
    r = FakeResolver(_addrs(), {f"_25._tcp.{MX}": _tlsa(f"_25._tcp.{MX}")}, delay=0.2)
    ds = [mod.start_delivery(None) for _ in range(10)]
    cands = [_cand(r, TLSLevel.ENCRYPTED) for _ in ds]
    for d, c in zip(ds, cands, strict=True):
        d.prepare_conn(c)
    gevent.sleep(0)
    greenlets = {id(entry[1]) for d in ds for entry in d.pending.values()}
    assert len(greenlets) == 1 and len(mod._group) == 1
    ds[0].close()
    gevent.sleep(0)
    assert len(mod._group) == 1
    for d, c in zip(ds[1:5], cands[1:5], strict=True):
        assert d.check_conn(c) == TLSLevel.ENCRYPTED
    assert r.calls.count(("addrs", MX)) == 1
    # a new discovery for the rest: the last of them to let go ends it
    r.delay = 5
    later = [mod.start_delivery(None) for _ in range(2)]
    for d in later:
        d.prepare_conn(_cand(r, TLSLevel.ENCRYPTED))
    gevent.sleep(0)
    (g,) = list(mod._group)
    later[0].close()
    gevent.sleep(0)
    assert not g.dead
    later[1].close()
    gevent.sleep(0)
    assert g.dead


def test_stop_kills_discoveries_and_check_conn_fails_safe(dane_module):
    """stop() kills running discoveries; a killed lookup is a temporary DNS error (C-77)."""
    mod = dane_module()
    d = mod.start_delivery(None)
    cand = _cand(FakeResolver(_addrs(), delay=5), TLSLevel.ENCRYPTED)
    d.prepare_conn(cand)
    gevent.sleep(0)
    mod.stop(0)
    with pytest.raises(SMTPError) as ei:
        d.check_conn(cand)
    assert DNS_ERROR_TEMP.matches(ei.value)
    mod.stop(0)  # idempotent
