"""Tests for mx_auth.mtasts: TXT and policy parsing, matching, fetch, cache, decisions (C.2).

Policies are served by an in-process HTTPS server on 127.0.0.1 whose certificates come
from a test CA made with ``cryptography``; the resolver is an in-memory fake and the
clock is injected, so nothing leaves the machine. Fixtures live here rather than in a
shared conftest.py.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gevent
import gevent.ssl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gevent.server import StreamServer
from maddylite.modules.mx_auth import mtasts
from maddylite.modules.mx_auth.mtasts import (
    MAX_AGE_CAP,
    CachedPolicy,
    MTASTSError,
    Policy,
    default_ssl_context,
    fetch_policy,
    match_mx,
    normalize_name,
    parse_policy,
    parse_txt,
    parse_txt_records,
)

import maddylite.log as log_mod
from maddylite.config.errors import ConfigError
from maddylite.dns import AddrAnswer, DNSError, TXTAnswer
from maddylite.policy import MXCandidate, MXLevel, TLSLevel
from maddylite.smtp.errors import (
    MTASTS_CERT_UNTRUSTED,
    MTASTS_MX_MISMATCH,
    MTASTS_TLS_REQUIRED,
    POLICY_MX_LEVEL,
    SMTPError,
)

NOW = 1_900_000_000.0
DOMAIN = "example.test"
ENFORCE = b"version: STSv1\nmode: enforce\nmx: mx2.example.test\nmax_age: 86400\n"
TESTING = b"version: STSv1\nmode: testing\nmx: mx2.example.test\nmax_age: 86400\n"


# --- PKI ---------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(cn: str, key: Any, issuer: tuple[x509.Certificate, Any] | None, *, ca: bool = False,
          sans: tuple[str, ...] = (), days: tuple[int, int] = (-1, 30)) -> x509.Certificate:
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now + timedelta(days=days[0])).not_valid_after(now + timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
        assert issuer is not None
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
    return b.sign(signer, hashes.SHA256())


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class PKI:
    """PKI is a test CA and the server certificates the tests serve, as PEM files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ca_key = _key()
        self.ca = _cert("MTA-STS Test CA", ca_key, None, ca=True)
        self.ca_file = str(self._write("ca.pem", _pem(self.ca)))
        other_key = _key()
        other_ca = _cert("Untrusted CA", other_key, None, ca=True)
        names = ("mta-sts.example.test", "mta-sts.a.test", "mta-sts.b.test", "mta-sts.xn--aca-6ma.test")
        self.certs = {
            "good": self._leaf("good", names, (self.ca, ca_key)),
            "wrong_name": self._leaf("wrong_name", ("mta-sts.wrong.test",), (self.ca, ca_key)),
            "expired": self._leaf("expired", names, (self.ca, ca_key), days=(-30, -1)),
            "untrusted": self._leaf("untrusted", names, (other_ca, other_key)),
        }

    def _write(self, name: str, data: bytes) -> Path:
        p = self.root / name
        p.write_bytes(data)
        return p

    def _leaf(self, tag: str, names: tuple[str, ...], issuer: tuple[x509.Certificate, Any],
              days: tuple[int, int] = (-1, 30)) -> tuple[str, str]:
        key = _key()
        cert = _cert(names[0], key, issuer, sans=names, days=days)
        chain = self._write(f"{tag}.pem", _pem(cert) + _pem(issuer[0]))
        keyfile = self._write(f"{tag}.key", _pem(key))
        return str(chain), str(keyfile)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("mtasts-pki"))


# --- HTTPS policy server -------------------------------------------------------------------------


def http_response(status: int = 200, body: bytes = ENFORCE, ctype: str | None = "text/plain",
                  headers: tuple[str, ...] = (), chunked: bool = False) -> bytes:
    """http_response builds a raw HTTP/1.1 response."""
    reason = {200: "OK", 204: "No Content", 301: "Moved Permanently", 302: "Found",
              404: "Not Found", 500: "Internal Server Error"}.get(status, "X")
    lines = [f"HTTP/1.1 {status} {reason}", "Connection: close", *headers]
    if ctype is not None:
        lines.append(f"Content-Type: {ctype}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4096]), body[i:i + 4096])
                           for i in range(0, len(body), 4096)) + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class PolicyServer:
    """PolicyServer answers every request with ``response`` (bytes or a callable), or hangs."""

    def __init__(self, cert: tuple[str, str]) -> None:
        ctx = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*cert)
        self.response: bytes | Callable[[str], bytes] = http_response()
        self.hang = False
        self.requests: list[str] = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle, ssl_context=ctx)
        self.server.start()
        self.port = self.server.server_port

    def serve(self, body: bytes, **kw: Any) -> None:
        self.response = http_response(body=body, **kw)

    def _handle(self, sock: Any, addr: Any) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                data += chunk
            request = data.decode("latin-1")
            self.requests.append(request)
            if self.hang:
                gevent.sleep(30)
                return
            resp = self.response(request) if callable(self.response) else self.response
            sock.sendall(resp)
        except OSError:
            pass
        finally:
            sock.close()


@pytest.fixture
def https(pki: PKI) -> Iterator[Callable[..., PolicyServer]]:
    servers: list[PolicyServer] = []

    def make(cert: str = "good") -> PolicyServer:
        s = PolicyServer(pki.certs[cert])
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.server.stop(timeout=0.1)


@pytest.fixture
def server(https: Callable[..., PolicyServer]) -> PolicyServer:
    return https()


# --- fakes -------------------------------------------------------------------------------------------


class FakeResolver:
    """FakeResolver answers TXT from ``txt`` (list, DNSError or absent = NXDOMAIN), hosts with 127.0.0.1."""

    def __init__(self) -> None:
        self.txt: dict[str, Any] = {}
        self.txt_queries: list[str] = []
        self.addr_queries: list[str] = []
        self.no_addr: set[str] = set()
        self.delay = 0.0

    def set_id(self, domain: str, rid: str | None) -> None:
        if rid is None:
            self.txt.pop(f"_mta-sts.{domain}", None)
        else:
            self.txt[f"_mta-sts.{domain}"] = [f"v=STSv1; id={rid}"]

    def lookup_txt(self, name: str, *, lifetime: float | None = None) -> TXTAnswer:
        self.txt_queries.append(name)
        if self.delay:
            gevent.sleep(self.delay)
        v = self.txt.get(name)
        if isinstance(v, DNSError):
            raise v
        if v is None:
            return TXTAnswer(name, [], False, "NXDOMAIN")
        return TXTAnswer(name, list(v), False, "NOERROR")

    def lookup_addrs(self, host: str, *, want_v6: bool = True, lifetime: float | None = None) -> AddrAnswer:
        self.addr_queries.append(host)
        if host in self.no_addr:
            raise DNSError("nxdomain", f"dns: rcode NXDOMAIN when looking up {host}.")
        return AddrAnswer(host, ["127.0.0.1"], [], False, host)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class FakeConn:
    def __init__(self, verified: bool) -> None:
        self.tls_verified = verified


@pytest.fixture
def resolver() -> FakeResolver:
    r = FakeResolver()
    r.set_id(DOMAIN, "id1")
    return r


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(log_mod, "_out", buf)
    monkeypatch.setattr(log_mod, "_enabled", True)
    monkeypatch.setattr(log_mod, "_json", False)
    return buf


@pytest.fixture
def make_mod(build_config: Any, pki: PKI, resolver: FakeResolver, clock: Clock,
             server: PolicyServer) -> Iterator[Callable[..., mtasts.MTASTS]]:
    """make_mod configures an mtasts instance wired to the fakes and the local server."""
    started: list[mtasts.MTASTS] = []

    def make(body: str = "cache ram", *, extra: str = "", start: bool = False, debug: bool = False) -> mtasts.MTASTS:
        text = ("debug yes\n" if debug else "") + f"mx_auth p {{\n mtasts {{\n  {body}\n }}\n{extra}}}\n"
        rt = make.runtime = build_config(text)
        mod = rt.instance("p").policies()[0]
        assert isinstance(mod, mtasts.MTASTS)
        mod.resolver = resolver
        mod.clock = clock
        mod.https_port = server.port
        mod.ca_file = pki.ca_file
        mod.fetch_timeout = 2.0
        if start:
            mod.start()
            started.append(mod)
        return mod

    make.runtime = None  # type: ignore[attr-defined]
    yield make
    for m in started:
        m.stop(1.0)


def cand(host: str, domain: str = DOMAIN, resolver: Any = None, **kw: Any) -> MXCandidate:
    return MXCandidate(domain, host, 10, resolver=resolver, **kw)


# --- C-15, C-16: the TXT record ----------------------------------------------------------------------


@pytest.mark.parametrize(("record", "rid"), [
    pytest.param("v=STSv1; id=20240101", "20240101", id="C-15-plain"),
    pytest.param("v=STSv1  ;    id=foo", "foo", id="C-15-whitespace-trimmed"),
    pytest.param("v=STSv1; id=foo; unrelated=1", "foo", id="C-15-unknown-key-ignored"),
    pytest.param("v=STSv1; id=foo;", "foo", id="C-15-trailing-semicolon"),
    pytest.param("v=STSv1;id=" + "a1" * 16, "a1" * 16, id="C-15-id-32-chars"),
    pytest.param("v=STSv1; ext-1.x=a:b; id=B7", "B7", id="C-15-extension-before-id"),
])
def test_txt_valid_C_15(record: str, rid: str) -> None:
    """C-15: valid TXT records and the id they carry."""
    assert parse_txt(record) == rid
    assert parse_txt_records([record]) == rid


@pytest.mark.parametrize("record", [
    pytest.param("", id="C-16-empty"),
    pytest.param("v=STSv1", id="C-16-no-id"),
    pytest.param("v=STSv1;", id="C-16-no-id-semicolon"),
    pytest.param("id=foo", id="C-16-no-version"),
    pytest.param("id=foo; v=STSv1", id="C-16-version-not-first"),
    pytest.param("v=STSv2;id=foo", id="C-16-STSv2"),
    pytest.param("v=STSv1; id=foo include=foo.com", id="C-16-space-in-value"),
    pytest.param("v=STSv1; id=foo; include", id="C-16-part-without-equals"),
    pytest.param("v=STSv1; id=foo=bar", id="C-16-second-equals-in-id"),
    pytest.param("v=STSv1; id=foo; ext=a=b", id="C-16-second-equals-in-extension"),
    pytest.param("v=STSv1; id=" + "a" * 33, id="C-16-id-too-long"),
    pytest.param("v=STSv1; id=foo-bar", id="C-16-id-not-alphanumeric"),
    pytest.param("v=STSv1; id=", id="C-16-empty-id"),
    pytest.param("v=STSv1;; id=foo", id="C-16-empty-part"),
])
def test_txt_invalid_C_16(record: str) -> None:
    """C-16: invalid TXT records are rejected."""
    with pytest.raises(MTASTSError):
        parse_txt(record)


@pytest.mark.parametrize(("records", "expect"), [
    pytest.param([], None, id="none"),
    pytest.param(["v=spf1 -all", "v=STSv1; id=a"], "a", id="other-records-discarded"),
    pytest.param(["v=STSv2; id=x", "v=STSv1; id=b"], "b", id="STSv2-discarded-first"),
    pytest.param(["v=STSv1", "v=STSv1; id=c"], "c", id="no-semicolon-discarded-first"),
    pytest.param(["v=STSv1"], None, id="only-discarded"),
    pytest.param(["v=STSv1; id=a", "v=STSv1; id=b"], MTASTSError, id="two-records"),
    pytest.param(["v=STSv1; id=a!"], MTASTSError, id="one-invalid"),
])
def test_txt_rrset_decisions(records: list[str], expect: Any) -> None:
    """Decisions/C-16: records not starting with v=STSv1; are discarded, then exactly one must remain."""
    if expect is MTASTSError:
        with pytest.raises(MTASTSError):
            parse_txt_records(records)
    else:
        assert parse_txt_records(records) == expect


# --- C-26..C-28: the policy body -----------------------------------------------------------------------


@pytest.mark.parametrize(("body", "expect"), [
    pytest.param(b"version: STSv1\nmax_age: 8600\nmode:none\n", Policy("none", 8600), id="C-26-mode-none"),
    pytest.param(b"version: STSv1\nmax_age: 8600\nmode: enforce\nmx: mx0.example.org\nmx: *.example.org\n",
                 Policy("enforce", 8600, ("mx0.example.org", "*.example.org")), id="C-26-enforce-two-mx"),
    pytest.param(b"version: STSv1\r\nmode: testing\r\nmx: mx.example.org\r\nmax_age: 1\r\n",
                 Policy("testing", 1, ("mx.example.org",)), id="C-26-crlf"),
    pytest.param(b"version:\tSTSv1\nmode:   enforce  \nmx:mx\nmax_age: 0", Policy("enforce", 0, ("mx",)),
                 id="C-26-white-space-no-final-newline"),
    pytest.param(ENFORCE + b"ext: a:b\n", Policy("enforce", 86400, ("mx2.example.test",)), id="C-27-value-with-colons"),
    pytest.param(b"version: STSv1\nmode: testing\nmode: enforce\nmax_age: 5\nmax_age: 7\nmx: a\nfoo: bar\nmx: b\n",
                 Policy("enforce", 7, ("a", "b")), id="C-28-last-wins-mx-accumulates"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age: 99999999999\n", Policy("none", MAX_AGE_CAP), id="max-age-capped"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age: 31557601\n\n\n", Policy("none", MAX_AGE_CAP),
                 id="trailing-blank-lines"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age: " + b"9" * 5000 + b"\n", Policy("none", MAX_AGE_CAP),
                 id="max-age-5000-digits-capped"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age: " + b"0" * 20 + b"86400\n", Policy("none", 86400),
                 id="max-age-leading-zeros"),
])
def test_policy_valid_C_26_C_28(body: bytes, expect: Policy) -> None:
    """C-26, C-28, Decisions: valid policy bodies."""
    assert parse_policy(body) == expect


@pytest.mark.parametrize("body", [
    pytest.param(b"version: STSv2\nmode: none\nmax_age: 1\n", id="C-27-wrong-version"),
    pytest.param(b"mode: none\nmax_age: 1\n", id="C-27-missing-version"),
    pytest.param(b"version: STSv1\nmax_age: 1\n", id="C-27-missing-mode"),
    pytest.param(b"version: STSv1\nmode: none\n", id="C-27-missing-max-age"),
    pytest.param(b"version: STSv1\nmode: invalid_value\nmax_age: 1\n", id="C-27-bad-mode"),
    pytest.param(b"version: STSv1\nmode none\nmax_age: 1\n", id="C-27-no-colon"),
    pytest.param(b"version: STSv1\nmode: none\n: 8600\nmax_age: 1\n", id="C-27-empty-key"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age:\n", id="C-27-empty-value"),
    pytest.param(b"version: STSv1\nmode: enforce\nmax_age: 1\n", id="C-27-enforce-without-mx"),
    pytest.param(b"version: STSv1\nmode: testing\nmax_age: 1\n", id="C-27-testing-without-mx"),
    pytest.param(b"version: STSv1\n\nmode: none\nmax_age: 1\n", id="C-27-blank-line-in-middle"),
    pytest.param(b"version: STSv1\r\n\r\nmode: none\r\nmax_age: 1\r\n", id="C-27-blank-crlf-line-in-middle"),
    pytest.param(b"version: STSv1\nmode : enforce\nmx: a\nmax_age: 1\n", id="C-27-space-before-colon"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age: -1\n", id="max-age-negative"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age: 1d\n", id="max-age-non-numeric"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age: +5\n", id="max-age-plus-sign"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age: \xd9\xa1\n", id="max-age-non-ascii-digit"),
    pytest.param(b"version: STSv1\nmode: none\nmax_age: 1\nx: \xff\n", id="not-utf8"),
    pytest.param(b"", id="empty"),
])
def test_policy_invalid_C_27(body: bytes) -> None:
    """C-27, Decisions: invalid policy bodies."""
    with pytest.raises(MTASTSError):
        parse_policy(body)


# --- C-53: matching -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    pytest.param("example.org", "example.org.", True, id="trailing-dot"),
    pytest.param("mx.example.org.", "MX.Example.ORG", True, id="case-and-pattern-dot"),
    pytest.param("Ñaca.com", "ñaca.com", True, id="unicode-case"),
    pytest.param("ñaca.com", "n\u0303aca.com", True, id="NFC"),
    pytest.param("x.ñaca.com", "x.xn--aca-6ma.com.", True, id="u-label-vs-a-label"),
    pytest.param("x.XN--ACA-6MA.com", "x.ñaca.com", True, id="a-label-pattern-upper"),
    pytest.param("x.naca.com", "x.xn--aca-6ma.com.", False, id="different-name"),
    pytest.param("xn--zz.com", "xn--zz.com", False, id="invalid-a-label-never-matches"),
    pytest.param("xn--abc-.com", "xn--abc-.com", False, id="ascii-a-label-never-matches"),
    pytest.param("*.example.org", "mx1.example.org.", True, id="wildcard-one-label"),
    pytest.param("*.example.org", "example.org.", False, id="wildcard-not-bare"),
    pytest.param("*.example.org", "a.b.example.org.", False, id="wildcard-not-two-labels"),
    pytest.param("*.ñaca.com", "mx.xn--aca-6ma.com.", True, id="wildcard-idn"),
    pytest.param("*.Example.ORG.", "mx.example.org", True, id="wildcard-normalised"),
    pytest.param("mx.*.org", "mx.example.org", False, id="inner-star-is-literal"),
    pytest.param("example..org", "example..org", False, id="empty-label"),
])
def test_match_C_53(pattern: str, host: str, matches: bool) -> None:
    """C-53: matching compares normalised names, wildcards included."""
    assert match_mx(pattern, host) is matches


def test_normalize_name_C_53() -> None:
    """C-53: the normal form is lower case A-labels without the trailing dot."""
    assert normalize_name("Ñaca.COM.") == "xn--aca-6ma.com"
    assert normalize_name("") is None and normalize_name(".") is None


# --- C-19..C-25: the fetch --------------------------------------------------------------------------------


def fetch(pki: PKI, server: PolicyServer, resolver: FakeResolver | None = None, timeout: float = 2.0,
          domain: str = DOMAIN) -> Policy:
    return fetch_policy(domain, resolver or FakeResolver(), ssl_context=default_ssl_context(pki.ca_file),
                        port=server.port, timeout=timeout)


def test_fetch_ok_C_19(pki: PKI, server: PolicyServer) -> None:
    """C-19: GET https://mta-sts.<domain>/.well-known/mta-sts.txt, name resolved with the resolver."""
    r = FakeResolver()
    assert fetch(pki, server, r) == Policy("enforce", 86400, ("mx2.example.test",))
    (req,) = server.requests
    assert req.startswith("GET /.well-known/mta-sts.txt HTTP/1.1\r\n")
    assert f"\r\nHost: mta-sts.example.test:{server.port}\r\n" in req
    assert r.addr_queries == ["mta-sts.example.test"]


def test_fetch_ignores_proxy_variables_C_25(pki: PKI, server: PolicyServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """C-25: proxy environment variables are not used."""
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    assert fetch(pki, server).mode == "enforce"


def test_fetch_trusts_ssl_cert_file_C_20(pki: PKI, server: PolicyServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """C-20: the system trust store is used; SSL_CERT_FILE replaces it (how tests trust their CA)."""
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca_file)
    p = fetch_policy(DOMAIN, FakeResolver(), ssl_context=default_ssl_context(), port=server.port, timeout=2)
    assert p.mode == "enforce"


@pytest.mark.parametrize("cert", ["wrong_name", "expired", "untrusted"])
def test_fetch_tls_failure_C_20(pki: PKI, https: Callable[..., PolicyServer], cert: str) -> None:
    """C-20: certificate for another name, expired, or not chaining to a trusted root → fetch failure."""
    s = https(cert)
    with pytest.raises(MTASTSError, match="TLS"):
        fetch(pki, s)


def test_fetch_redirect_C_21(pki: PKI, server: PolicyServer) -> None:
    """C-21: a 3xx is never followed, even when its target serves a valid policy."""
    for status in (301, 302):
        server.response = http_response(status, body=b"", headers=(
            f"Location: https://mta-sts.example.test:{server.port}/.well-known/mta-sts.txt",))
        with pytest.raises(MTASTSError, match="mtasts: HTTP redirects are forbidden"):
            fetch(pki, server)
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [204, 404, 500])
def test_fetch_status_C_22(pki: PKI, server: PolicyServer, status: int) -> None:
    """C-22: any status other than 200 is a fetch failure."""
    server.response = http_response(status)
    with pytest.raises(MTASTSError, match=f"HTTP status {status}"):
        fetch(pki, server)


@pytest.mark.parametrize(("ctype", "ok"), [
    ("text/plain", True), ("text/plain; charset=utf-8", True), ("Text/Plain;charset=UTF-8", True),
    ("text/html", False), ("application/octet-stream", False), (None, False), ("text/plainx", False),
])
def test_fetch_content_type_C_23(pki: PKI, server: PolicyServer, ctype: str | None, ok: bool) -> None:
    """C-23: Content-Type must be text/plain, parameters allowed."""
    server.response = http_response(ctype=ctype)
    if ok:
        assert fetch(pki, server).mode == "enforce"
    else:
        with pytest.raises(MTASTSError, match="Content-Type"):
            fetch(pki, server)


def test_fetch_timeout_C_24(pki: PKI, server: PolicyServer) -> None:
    """C-24: the whole fetch is bounded (1 minute in production, shortened here)."""
    server.hang = True
    t0 = time.monotonic()
    with pytest.raises(MTASTSError, match="timed out"):
        fetch(pki, server, timeout=0.3)
    assert time.monotonic() - t0 < 2


def test_fetch_default_timeout_is_one_minute_C_24() -> None:
    """C-24: the default bound is 60 seconds."""
    assert mtasts.FETCH_TIMEOUT == 60 and mtasts.MTASTS.fetch_timeout == 60


@pytest.mark.parametrize("chunked", [False, True])
def test_fetch_size_cap_C_25(pki: PKI, server: PolicyServer, chunked: bool) -> None:
    """C-25: a body of 64 KiB is accepted, one byte more is a fetch failure (with or without Content-Length)."""
    filler = b"x: " + b"a" * 96 + b"\n"
    body = ENFORCE + filler * ((64 * 1024 - len(ENFORCE)) // len(filler))
    body += b"y: " + b"b" * (64 * 1024 - len(body) - 4) + b"\n"
    assert len(body) == 64 * 1024
    server.serve(body, chunked=chunked)
    assert fetch(pki, server).mode == "enforce"
    server.serve(body + b"\n", chunked=chunked)
    with pytest.raises(MTASTSError, match="larger"):
        fetch(pki, server)


def test_fetch_invalid_policy_C_27(pki: PKI, server: PolicyServer) -> None:
    """C-27: an invalid body is a fetch failure."""
    server.serve(b"version: STSv2\nmode: none\nmax_age: 1\n")
    with pytest.raises(MTASTSError, match="version"):
        fetch(pki, server)


def test_fetch_unresolvable_and_refused_C_19(pki: PKI, server: PolicyServer, free_port: int) -> None:
    """C-19: no address for mta-sts.<domain>, or nothing listening → fetch failure."""
    r = FakeResolver()
    r.no_addr.add("mta-sts.example.test")
    with pytest.raises(MTASTSError, match="cannot resolve"):
        fetch(pki, server, r)
    with pytest.raises(MTASTSError, match="cannot connect"):
        fetch_policy(DOMAIN, FakeResolver(), ssl_context=default_ssl_context(pki.ca_file), port=free_port)


# --- configuration (C-38, C-39, A-95) -----------------------------------------------------------------------


def test_directives_A_95(build_config: Any) -> None:
    """A-95: mtasts takes cache and fs_dir only; cache lists its values."""
    with pytest.raises(ConfigError, match="unexpected directive: debug"):
        build_config("mx_auth p {\n mtasts {\n  debug\n }\n}\n")
    with pytest.raises(ConfigError) as e:
        build_config("mx_auth p {\n mtasts {\n  cache disk\n }\n}\n")
    assert "fs" in str(e.value) and "ram" in str(e.value) and e.value.line == 5


def test_fs_dir_resolution_is_pure_C_38(build_config: Any, tmp_path: Path) -> None:
    """C-38: default and relative fs_dir live under state_dir; configure creates nothing, start does."""
    state = tmp_path / "state"
    rt = build_config("mx_auth p {\n mtasts\n}\n")
    (mod,) = rt.instance("p").policies()
    assert mod.fs_dir == str(state / "mtasts_cache") and mod.cache_kind == "fs"
    rt = build_config("mx_auth p {\n mtasts {\n  fs_dir rel/cache\n }\n}\n")
    (mod,) = rt.instance("p").policies()
    assert mod.fs_dir == str(state / "rel" / "cache")
    rt = build_config(f"mx_auth p {{\n mtasts {{\n  fs_dir {tmp_path / 'abs'}\n }}\n}}\n")
    (mod,) = rt.instance("p").policies()
    assert mod.fs_dir == str(tmp_path / "abs")
    assert not os.path.exists(state) and not os.path.exists(tmp_path / "abs")
    mod.resolver = FakeResolver()
    mod.start()
    try:
        assert os.path.isdir(tmp_path / "abs")
    finally:
        mod.stop(1.0)


def test_fs_dir_creation_failure_is_a_start_error_C_38(build_config: Any, tmp_path: Path) -> None:
    """C-38 (project rule): a cache directory that cannot be created fails start() with a clear message."""
    (tmp_path / "file").write_text("x")
    rt = build_config(f"mx_auth p {{\n mtasts {{\n  fs_dir {tmp_path / 'file' / 'cache'}\n }}\n}}\n")
    (mod,) = rt.instance("p").policies()
    with pytest.raises(MTASTSError, match="cannot create the cache directory"):
        mod.start()
    mod.stop(1.0)


def test_start_failure_rolls_back_runtime_C_38(build_config: Any, tmp_path: Path) -> None:
    """C-38: the failure surfaces as the runtime's StartError."""
    from maddylite.lifecycle import StartError

    (tmp_path / "file").write_text("x")
    rt = build_config(f"mx_auth p {{\n mtasts {{\n  fs_dir {tmp_path / 'file'}\n }}\n}}\n")
    with pytest.raises(StartError, match="cannot create the cache directory"):
        rt.start()


# --- discovery and cache (C-14, C-18, C-30..C-40) -------------------------------------------------------


def test_cached_policy_no_refetch_C_30_C_14(make_mod: Any, server: PolicyServer, resolver: FakeResolver,
                                            clock: Clock) -> None:
    """C-30: while the id is unchanged and the policy valid, no HTTPS request; C-14: TXT asked every time."""
    mod = make_mod()
    assert mod.discover(DOMAIN).mode == "enforce"
    clock.now += 86399
    assert mod.discover(DOMAIN).mode == "enforce"
    assert len(server.requests) == 1
    assert resolver.txt_queries == ["_mta-sts.example.test"] * 2
    (entry,) = mod.cached()
    assert entry == mtasts.CacheEntry(DOMAIN, "id1", "enforce", ("mx2.example.test",), NOW, NOW + 86400)


def test_expired_refetch_C_31(make_mod: Any, server: PolicyServer, clock: Clock) -> None:
    """C-31: after max_age the next delivery refetches."""
    mod = make_mod()
    mod.discover(DOMAIN)
    clock.now += 86400
    server.serve(TESTING)
    assert mod.discover(DOMAIN).mode == "testing"
    assert len(server.requests) == 2
    assert mod.cached()[0].fetched_at == NOW + 86400


def test_new_id_refetch_C_32(make_mod: Any, server: PolicyServer, resolver: FakeResolver) -> None:
    """C-32: a new id refetches before expiry; the new policy replaces the old."""
    mod = make_mod()
    mod.discover(DOMAIN)
    resolver.set_id(DOMAIN, "id2")
    server.serve(TESTING)
    assert mod.discover(DOMAIN).mode == "testing"
    assert [e.id for e in mod.cached()] == ["id2"]


def test_new_id_failed_refetch_keeps_valid_cache_C_34(make_mod: Any, server: PolicyServer, resolver: FakeResolver,
                                                      clock: Clock) -> None:
    """C-34 (and RFC 8461 §3.3): a failed refetch keeps a valid cached policy; once expired → no policy."""
    mod = make_mod()
    mod.discover(DOMAIN)
    resolver.set_id(DOMAIN, "id2")
    server.response = http_response(404)
    assert mod.discover(DOMAIN).mode == "enforce"
    clock.now += 86400
    assert mod.discover(DOMAIN) is None
    assert [e.id for e in mod.cached()] == ["id1"]


def test_an_unexpected_failure_of_the_refetch_keeps_valid_cache_C_34(make_mod: Any, server: PolicyServer,
                                                                    resolver: FakeResolver, monkeypatch: Any,
                                                                    logs: io.StringIO) -> None:
    """C-34: whatever goes wrong in a refetch (here not an MTASTSError), a valid cached
    enforce policy keeps applying, through discover and through the delivery's own path."""
    mod = make_mod()
    assert mod.discover(DOMAIN).mode == "enforce"
    resolver.set_id(DOMAIN, "id2")

    def broken(_body: bytes) -> Policy:
        raise ValueError("unexpected")

    monkeypatch.setattr(mtasts, "parse_policy", broken)
    assert mod.discover(DOMAIN).mode == "enforce"
    monkeypatch.setattr(mod, "discover", lambda *_a: 1 / 0)
    policy = mod._discover_safe(DOMAIN, resolver)
    assert policy is not None and policy.mode == "enforce"
    assert logs.getvalue().count("MTA-STS error") == 2


def test_fetch_fails_nothing_cached_C_36(make_mod: Any, server: PolicyServer, logs: io.StringIO) -> None:
    """C-36: TXT present, fetch fails, nothing cached → no policy."""
    mod = make_mod()
    server.response = http_response(500)
    assert mod.discover(DOMAIN) is None
    assert mod.cached() == []
    assert "MTA-STS error" in logs.getvalue() and "HTTP status 500" in logs.getvalue()


def test_no_txt_C_37_C_18(make_mod: Any, server: PolicyServer, resolver: FakeResolver) -> None:
    """C-37: no TXT and nothing cached → no policy; C-18: no TXT with a valid cache → the cached policy."""
    mod = make_mod()
    resolver.set_id(DOMAIN, None)
    assert mod.discover(DOMAIN) is None
    resolver.set_id(DOMAIN, "id1")
    mod.discover(DOMAIN)
    resolver.set_id(DOMAIN, None)
    assert mod.discover(DOMAIN).mode == "enforce"
    resolver.txt[f"_mta-sts.{DOMAIN}"] = []
    assert mod.discover(DOMAIN).mode == "enforce"
    assert len(server.requests) == 1


def test_txt_servfail_C_18(make_mod: Any, server: PolicyServer, resolver: FakeResolver, logs: io.StringIO) -> None:
    """C-18: SERVFAIL/timeout → debug `MTA-STS error` and no policy; with a valid cache → the cached policy."""
    mod = make_mod(debug=True)
    resolver.txt[f"_mta-sts.{DOMAIN}"] = DNSError("servfail", "dns: rcode SERVFAIL")
    assert mod.discover(DOMAIN) is None
    assert "[debug] mx_auth/mtasts: MTA-STS error" in logs.getvalue()
    resolver.set_id(DOMAIN, "id1")
    mod.discover(DOMAIN)
    resolver.txt[f"_mta-sts.{DOMAIN}"] = DNSError("timeout", "dns: timeout")
    assert mod.discover(DOMAIN).mode == "enforce"


def test_txt_servfail_logged_only_at_debug_C_18(make_mod: Any, resolver: FakeResolver, logs: io.StringIO) -> None:
    """C-18: the lookup error is a debug message, invisible without debug."""
    mod = make_mod()
    resolver.txt[f"_mta-sts.{DOMAIN}"] = DNSError("servfail", "dns: rcode SERVFAIL")
    assert mod.discover(DOMAIN) is None
    assert logs.getvalue() == ""


def test_invalid_txt_uses_valid_cache_C_16(make_mod: Any, resolver: FakeResolver) -> None:
    """C-16: an invalid TXT record → no policy, unless a valid policy is cached."""
    mod = make_mod()
    resolver.txt[f"_mta-sts.{DOMAIN}"] = ["v=STSv1; id=a b"]
    assert mod.discover(DOMAIN) is None
    resolver.set_id(DOMAIN, "id1")
    mod.discover(DOMAIN)
    resolver.txt[f"_mta-sts.{DOMAIN}"] = ["v=STSv1; id=a", "v=STSv1; id=b"]
    assert mod.discover(DOMAIN).mode == "enforce"


def test_mode_none_is_no_policy_but_cached(make_mod: Any, server: PolicyServer) -> None:
    """Decisions: mode none is no policy; it is cached like any other policy (no refetch)."""
    mod = make_mod()
    server.serve(b"version: STSv1\nmode: none\nmax_age: 600\n")
    assert mod.discover(DOMAIN) is None
    assert mod.discover(DOMAIN) is None
    assert len(server.requests) == 1 and mod.cached()[0].mode == "none"


def test_idn_domain_uses_a_labels(make_mod: Any, server: PolicyServer, resolver: FakeResolver) -> None:
    """Decisions: the recipient domain is converted to A-labels for the TXT lookup and the HTTPS host."""
    mod = make_mod()
    resolver.set_id("xn--aca-6ma.test", "x1")
    assert mod.discover("Ñaca.test").mode == "enforce"
    assert resolver.txt_queries == ["_mta-sts.xn--aca-6ma.test"]
    assert "Host: mta-sts.xn--aca-6ma.test:" in server.requests[0]


def test_concurrent_discoveries_fetch_once(make_mod: Any, server: PolicyServer, resolver: FakeResolver) -> None:
    """Concurrent deliveries to a domain with a new id fetch its policy once."""
    mod = make_mod()
    resolver.delay = 0.01
    gs = [gevent.spawn(mod.discover, DOMAIN) for _ in range(5)]
    gevent.joinall(gs, raise_error=True)
    assert all(g.value.mode == "enforce" for g in gs)
    assert len(server.requests) == 1


def test_fs_cache_survives_new_instance_C_38(make_mod: Any, server: PolicyServer, tmp_path: Path) -> None:
    """C-38: cache fs writes one file per domain (temp file + rename) and a new instance reads it."""
    mod = make_mod("cache fs")
    mod.discover(DOMAIN)
    files = os.listdir(mod.fs_dir)
    assert files == [DOMAIN]
    data = json.loads(Path(mod.fs_dir, DOMAIN).read_text())
    assert data["id"] == "id1" and data["mode"] == "enforce" and data["mx"] == ["mx2.example.test"]
    again = make_mod("cache fs")
    assert again is not mod and again.fs_dir == mod.fs_dir
    assert again.discover(DOMAIN).mode == "enforce"
    assert len(server.requests) == 1


def test_fs_cache_write_failure_C_38(make_mod: Any, logs: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """C-38: a failed cache write is logged and the fetched policy still applies."""
    mod = make_mod("cache fs")

    def fail(entry: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod.store, "put", fail)
    assert mod.discover(DOMAIN).mode == "enforce"
    assert "cannot write MTA-STS cache" in logs.getvalue()


def test_fs_cache_write_failure_real_file_C_38(make_mod: Any, logs: io.StringIO) -> None:
    """C-38: the directory replaced by a file: the write fails, the policy applies, no temp file is left."""
    mod = make_mod(f"fs_dir {'cachefile'}")
    os.makedirs(os.path.dirname(mod.fs_dir), exist_ok=True)
    Path(mod.fs_dir).write_text("not a directory")
    assert mod.discover(DOMAIN).mode == "enforce"
    assert "cannot write MTA-STS cache" in logs.getvalue()


def test_fs_cache_corrupt_file_ignored_C_38(make_mod: Any, server: PolicyServer, logs: io.StringIO) -> None:
    """C-38: a corrupt cache file counts as absent; the policy is fetched and the file rewritten."""
    mod = make_mod("cache fs")
    os.makedirs(mod.fs_dir)
    Path(mod.fs_dir, DOMAIN).write_text("{not json")
    Path(mod.fs_dir, ".example.test.abc.tmp").write_text("{}")
    assert mod.discover(DOMAIN).mode == "enforce"
    assert "cannot read MTA-STS cache entry" in logs.getvalue()
    assert [e.domain for e in mod.cached()] == [DOMAIN]


def test_ram_cache_is_per_instance_C_39(make_mod: Any, server: PolicyServer) -> None:
    """C-39: cache ram is lost with the instance (restart, reload)."""
    mod = make_mod("cache ram")
    mod.discover(DOMAIN)
    again = make_mod("cache ram")
    assert again.cached() == []
    again.discover(DOMAIN)
    assert len(server.requests) == 2


def test_cache_entry_round_trip() -> None:
    """The cache file format reads back what it wrote and rejects anything else."""
    e = CachedPolicy(DOMAIN, "abc", Policy("testing", 10, ("a", "*.b")), NOW)
    assert CachedPolicy.from_json(e.to_json()) == e
    for bad in (b"[]", b'{"domain": "x"}', json.dumps({**json.loads(e.to_json()), "mode": "bogus"}).encode()):
        with pytest.raises(ValueError):
            CachedPolicy.from_json(bad)


# --- background refresh (C-40) --------------------------------------------------------------------------


def _seed(mod: Any, domain: str, rid: str, fetched_at: float, max_age: int = 86400) -> None:
    mod.store.put(CachedPolicy(domain, rid, Policy("enforce", max_age, ("old.example.test",)), fetched_at))


def test_background_refresh_C_40(make_mod: Any, server: PolicyServer, resolver: FakeResolver) -> None:
    """C-40: at start every cached domain is checked as if 6 hours later: expiring or new id → refetched."""
    mod = make_mod()
    for d in ("a.test", "b.test"):
        resolver.set_id(d, "same")
    resolver.set_id(DOMAIN, "new")
    _seed(mod, "a.test", "same", NOW - 86400 + 5 * 3600)  # expires in 5 h → refetched
    _seed(mod, "b.test", "same", NOW - 86400 + 7 * 3600)  # expires in 7 h → kept
    _seed(mod, DOMAIN, "old", NOW)  # id changed → refetched
    mod.start()
    try:
        gevent.sleep(0.3)
        got = {e.domain: e for e in mod.cached()}
        assert got["a.test"].mx == ("mx2.example.test",) and got["a.test"].fetched_at == NOW
        assert got["b.test"].mx == ("old.example.test",)
        assert got[DOMAIN].id == "new" and got[DOMAIN].mx == ("mx2.example.test",)
        assert len(server.requests) == 2
    finally:
        mod.stop(1.0)


def test_background_refresh_failure_and_schedule_C_40(make_mod: Any, server: PolicyServer, resolver: FakeResolver,
                                                      logs: io.StringIO) -> None:
    """C-40: failures are logged and leave the cache as it was; the refresh repeats and stops with the module."""
    mod = make_mod()
    mod.refresh_interval = 0.05
    _seed(mod, DOMAIN, "old", NOW)
    resolver.set_id(DOMAIN, "new")
    server.response = http_response(404)
    mod.start()
    gevent.sleep(0.2)
    refresher = mod._refresher
    assert refresher is not None and not refresher.dead
    mod.stop(1.0)
    assert refresher.dead
    n = len(server.requests)
    assert n >= 2  # the first pass at start, then at least one more period
    assert logs.getvalue().count("MTA-STS cache update error") == n
    assert [(e.id, e.mx) for e in mod.cached()] == [("old", ("old.example.test",))]
    gevent.sleep(0.15)
    assert len(server.requests) == n
    mod.stop(1.0)  # idempotent


def test_one_domain_failing_unexpectedly_leaves_the_others_refreshed_C_40(make_mod: Any, server: PolicyServer,
                                                                          resolver: FakeResolver, monkeypatch: Any,
                                                                          logs: io.StringIO) -> None:
    """C-40: a refresh error of any kind is logged for its domain; the pass goes on."""
    mod = make_mod()
    for d in ("a.test", "b.test"):
        resolver.set_id(d, "new")
        _seed(mod, d, "old", NOW)
    real = mod._refresh_one

    def one(key: str, *a: Any, **kw: Any) -> bool:
        if key == "a.test":
            raise ValueError("unexpected")
        return real(key, *a, **kw)

    monkeypatch.setattr(mod, "_refresh_one", one)
    mod._refresh_all(lookahead=0, force=False)
    assert sorted((e.domain, e.id) for e in mod.cached()) == [("a.test", "old"), ("b.test", "new")]
    assert logs.getvalue().count("MTA-STS cache update error") == 1


def test_refresh_interval_defaults_C_40() -> None:
    """C-40: every 12 hours, looking 6 hours ahead."""
    assert mtasts.MTASTS.refresh_interval == 12 * 3600 and mtasts.MTASTS.refresh_lookahead == 6 * 3600


# --- CLI API: cached / purge / refresh ----------------------------------------------------------------


def test_cli_api(make_mod: Any, server: PolicyServer, resolver: FakeResolver) -> None:
    """cached() lists, purge() drops one or all, refresh() re-fetches regardless of id and expiry."""
    mod = make_mod("cache fs")
    resolver.set_id("a.test", "a1")
    mod.discover(DOMAIN)
    mod.discover("a.test")
    assert [e.domain for e in mod.cached()] == ["a.test", DOMAIN]
    server.serve(TESTING)
    mod.refresh(DOMAIN)
    assert {e.domain: e.mode for e in mod.cached()} == {"a.test": "enforce", DOMAIN: "testing"}
    mod.refresh()
    assert {e.mode for e in mod.cached()} == {"testing"} and len(server.requests) == 5
    assert mod.purge("A.TEST.") == 1 and mod.purge("a.test") == 0
    assert [e.domain for e in mod.cached()] == [DOMAIN]
    assert mod.purge() == 1 and mod.cached() == []
    server.response = http_response(404)
    with pytest.raises(MTASTSError, match="404"):
        mod.refresh(DOMAIN)
    resolver.set_id("gone.test", None)
    with pytest.raises(MTASTSError, match="no MTA-STS TXT record"):
        mod.refresh("gone.test")
    with pytest.raises(MTASTSError, match="not a valid policy domain"):
        mod.refresh("a/../b")


# --- enforcement (C-41..C-56) ----------------------------------------------------------------------------


def _prepared(mod: Any, resolver: FakeResolver, domain: str = DOMAIN) -> Any:
    d = mod.start_delivery(None)
    d.prepare_domain(domain, resolver)
    return d


def test_discovery_runs_in_parallel_C_14(make_mod: Any, resolver: FakeResolver) -> None:
    """C-14: prepare_domain returns at once; the lookup runs while the MX lookup would, check_mx waits."""
    mod = make_mod()
    resolver.delay = 0.05
    t0 = time.monotonic()
    d = _prepared(mod, resolver)
    assert time.monotonic() - t0 < 0.04
    gevent.sleep(0)
    assert resolver.txt_queries == ["_mta-sts.example.test"]
    assert d.check_mx(cand("mx2.example.test.", resolver=resolver)) == MXLevel.MTASTS


def test_enforce_picks_listed_mx_C_41_C_42(make_mod: Any, resolver: FakeResolver) -> None:
    """C-41, C-42: enforce: the listed MX gets level mtasts; an unlisted one is refused before connecting."""
    d = _prepared(make_mod(), resolver)
    assert d.check_mx(cand("mx2.example.test.", resolver=resolver)) == MXLevel.MTASTS
    with pytest.raises(SMTPError) as e:
        d.check_mx(cand("mx1.example.test.", resolver=resolver))
    assert MTASTS_MX_MISMATCH.matches(e.value)
    assert (e.value.code, e.value.enhanced, e.value.temporary) == (451, (4, 7, 0), True)
    assert e.value.fields["domain"] == DOMAIN


def test_enforce_no_mx_matches_C_43(make_mod: Any, server: PolicyServer, resolver: FakeResolver) -> None:
    """C-43: no MX matches → each fails 451 4.7.0 temp; the id is checked again at the next attempt."""
    mod = make_mod()
    d = _prepared(mod, resolver)
    for mx in ("mx1.example.test.", "mx3.example.test."):
        with pytest.raises(SMTPError) as e:
            d.check_mx(cand(mx, resolver=resolver))
        assert MTASTS_MX_MISMATCH.matches(e.value) and e.value.temporary
    d.close()
    resolver.set_id(DOMAIN, "id2")
    server.serve(ENFORCE.replace(b"mx2", b"mx1"))
    d = _prepared(mod, resolver)
    assert d.check_mx(cand("mx1.example.test.", resolver=resolver)) == MXLevel.MTASTS


@pytest.mark.parametrize(("tls", "verified", "err"), [
    pytest.param(TLSLevel.NONE, None, MTASTS_TLS_REQUIRED, id="C-44-no-starttls"),
    pytest.param(TLSLevel.ENCRYPTED, False, MTASTS_CERT_UNTRUSTED, id="C-45-C-56-not-pkix-valid"),
    pytest.param(TLSLevel.ENCRYPTED, None, MTASTS_CERT_UNTRUSTED, id="C-45-no-conn-record"),
    pytest.param(TLSLevel.AUTHENTICATED, False, MTASTS_CERT_UNTRUSTED, id="dane-authenticated-is-not-pkix"),
    pytest.param(TLSLevel.AUTHENTICATED, True, None, id="C-47-pkix-valid"),
    pytest.param(TLSLevel.AUTHENTICATED, None, None, id="C-47-ladder-level"),
])
def test_enforce_tls_C_44_C_45_C_47(make_mod: Any, resolver: FakeResolver, tls: TLSLevel,
                                     verified: bool | None, err: Any) -> None:
    """C-44, C-45, C-47, C-56: enforce needs PKIX-valid TLS [RFC 8461 §4.2]; a DANE match does not replace it."""
    d = _prepared(make_mod(), resolver)
    c = cand("mx2.example.test.", resolver=resolver, tls_err="certificate verify failed" if verified is False else None)
    c.mx_level = d.check_mx(c)
    c.tls_level = tls
    c.conn = FakeConn(verified) if verified is not None else None
    if err is None:
        assert d.check_conn(c) == tls
        return
    with pytest.raises(SMTPError) as e:
        d.check_conn(c)
    assert err.matches(e.value) and e.value.temporary and e.value.code == 451
    assert e.value.fields["tls_level"] == str(tls)
    if verified is False:
        assert e.value.fields["tls_err"] == "certificate verify failed"


def test_testing_mode_C_48_C_50(make_mod: Any, server: PolicyServer, resolver: FakeResolver, logs: io.StringIO) -> None:
    """C-48: testing + match → mtasts, no TLS enforcement; C-50: no match → logged, level none."""
    server.serve(TESTING)
    d = _prepared(make_mod(), resolver)
    c = cand("mx2.example.test.", resolver=resolver)
    assert d.check_mx(c) == MXLevel.MTASTS
    c.tls_level = TLSLevel.NONE
    assert d.check_conn(c) == TLSLevel.NONE
    other = cand("mx1.example.test.", resolver=resolver)
    assert d.check_mx(other) == MXLevel.NONE
    assert "MX does not match published non-enforced MTA-STS policy" in logs.getvalue()
    assert "remote_server=mx1.example.test." in logs.getvalue()


def _run_mx_checks(policies: Any, c: MXCandidate) -> None:
    """_run_mx_checks applies check_mx like target.remote does (levels only go up)."""
    for p in policies:
        level = p.check_mx(c)
        c.mx_level = max(c.mx_level, level)


def test_testing_mismatch_with_local_policy_C_49(make_mod: Any, server: PolicyServer, resolver: FakeResolver,
                                                 logs: io.StringIO) -> None:
    """C-49: testing, no match, min_mx_level mtasts → local_policy's 451 4.7.0."""
    server.serve(TESTING)
    mod = make_mod(extra=" local_policy {\n  min_mx_level mtasts\n }\n")
    group = make_mod.runtime.instance("p")
    policies = [p.start_delivery(None) for p in group.policies()]
    assert policies and isinstance(group.policies()[0], mtasts.MTASTS) and group.policies()[0] is mod
    for p in policies:
        p.prepare_domain(DOMAIN, resolver)
    with pytest.raises(SMTPError) as e:
        _run_mx_checks(policies, cand("mx1.example.test.", resolver=resolver))
    assert POLICY_MX_LEVEL.matches(e.value)
    assert "MX does not match published non-enforced MTA-STS policy" in logs.getvalue()
    good = cand("mx2.example.test.", resolver=resolver)
    _run_mx_checks(policies, good)
    assert good.mx_level == MXLevel.MTASTS


def test_no_policy_with_min_mx_level_C_52(make_mod: Any, resolver: FakeResolver) -> None:
    """C-52: a domain without a policy and min_mx_level mtasts → 451 4.7.0 before connecting."""
    make_mod(extra=" local_policy {\n  min_mx_level mtasts\n }\n")
    resolver.set_id(DOMAIN, None)
    policies = [p.start_delivery(None) for p in make_mod.runtime.instance("p").policies()]
    for p in policies:
        p.prepare_domain(DOMAIN, resolver)
    with pytest.raises(SMTPError) as e:
        _run_mx_checks(policies, cand("mx2.example.test.", resolver=resolver))
    assert POLICY_MX_LEVEL.matches(e.value)


def test_mode_none_grants_nothing(make_mod: Any, server: PolicyServer, resolver: FakeResolver) -> None:
    """Decisions: mode none → no MX level and no enforcement."""
    server.serve(b"version: STSv1\nmode: none\nmax_age: 600\n")
    d = _prepared(make_mod(), resolver)
    c = cand("mx2.example.test.", resolver=resolver)
    assert d.check_mx(c) == MXLevel.NONE
    assert d.check_conn(c) == TLSLevel.NONE


def test_policy_domain_is_recipient_domain_C_55(make_mod: Any, resolver: FakeResolver) -> None:
    """C-55: two recipient domains on the same MX each need their own policy."""
    mod = make_mod()
    resolver.set_id("a.test", "a1")
    d = mod.start_delivery(None)
    d.prepare_domain("a.test", resolver)
    d.prepare_domain("b.test", resolver)
    shared = "mx2.example.test."
    assert d.check_mx(cand(shared, domain="a.test", resolver=resolver)) == MXLevel.MTASTS
    c = cand(shared, domain="b.test", resolver=resolver)
    assert d.check_mx(c) == MXLevel.NONE
    assert d.check_conn(c) == TLSLevel.NONE
    assert sorted(resolver.txt_queries) == ["_mta-sts.a.test", "_mta-sts.b.test"]


def test_higher_level_kept(make_mod: Any, resolver: FakeResolver) -> None:
    """C-2: a matching MX already at dnssec keeps dnssec (levels never go down)."""
    d = _prepared(make_mod(), resolver)
    assert d.check_mx(cand("mx2.example.test.", resolver=resolver, mx_level=MXLevel.DNSSEC)) == MXLevel.DNSSEC


def test_check_mx_without_prepare_domain(make_mod: Any, resolver: FakeResolver) -> None:
    """check_mx discovers on its own when prepare_domain was not called (it uses cand.resolver)."""
    d = make_mod().start_delivery(None)
    assert d.check_mx(cand("mx2.example.test.", resolver=resolver)) == MXLevel.MTASTS


def test_stop_during_discovery_does_not_downgrade(make_mod: Any, resolver: FakeResolver) -> None:
    """A discovery killed by stop() is repeated by the delivery instead of going without MTA-STS."""
    mod = make_mod()
    resolver.delay = 0.2
    d = _prepared(mod, resolver)
    gevent.sleep(0)
    mod.stop(0.01)
    resolver.delay = 0
    with pytest.raises(SMTPError):
        d.check_mx(cand("mx1.example.test.", resolver=resolver))


def test_close_kills_pending(make_mod: Any, resolver: FakeResolver) -> None:
    """close ends a discovery nobody waited for."""
    mod = make_mod()
    resolver.delay = 5
    d = _prepared(mod, resolver)
    gevent.sleep(0)
    d.close()
    gevent.sleep(0.01)
    assert len(mod._greenlets) == 0


def test_module_role_and_docs() -> None:
    """The module is registered as mx_auth.mtasts and plays MXAuthPolicy."""
    from maddylite.interfaces import MXAuthPolicy
    from maddylite.registry import lookup

    cls = lookup("mx_auth.mtasts")
    assert cls is mtasts.MTASTS and MXAuthPolicy in cls.roles
    assert {d.name for d in cls.directives} == {"cache", "fs_dir"}


def test_concurrent_deliveries_share_one_discovery_C_14(make_mod: Any, resolver: FakeResolver) -> None:
    """C-14 with many deliveries at once: deliveries to one domain that overlap share one
    running discovery (one TXT lookup), each gets the policy, and one delivery's close()
    does not end the discovery another still waits for."""
    mod = make_mod()
    resolver.delay = 0.2
    ds = [mod.start_delivery(None) for _ in range(20)]
    for d in ds:
        d.prepare_domain(DOMAIN, resolver)
    gevent.sleep(0)
    assert len(mod._greenlets) == 1
    ds[0].close()
    gevent.sleep(0)
    assert len(mod._greenlets) == 1
    resolver.delay = 0
    for d in ds[1:]:
        assert d.check_mx(cand("mx2.example.test.", resolver=resolver)) == MXLevel.MTASTS
    assert resolver.txt_queries == ["_mta-sts.example.test"]
