"""Private PKI: the harness CA, a second CA for DANE-TA, leaf certificates, TLSA digests."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .model import Host, Tlsa, World


def _crypto():
    # imported lazily: a warm start never needs it
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


@dataclass
class Issued:
    key_path: Path
    cert_path: Path  # the leaf alone
    chain_path: Path  # what the server sends: leaf (+ issuer for DANE-TA)
    issuer_path: Path | None  # the issuing CA's certificate (None if self-signed)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class Pki:
    """Generates everything below ``root`` (``<workdir>/pki``)."""

    def __init__(self, root: Path):
        self.root = root
        self.now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        (self.x509, self.hashes, self.ser, self.ec, self.EKU, self.NameOID) = _crypto()
        self._cas: dict[str, tuple] = {}

    # ------------------------------------------------------------------ primitives
    def _key(self):
        return self.ec.generate_private_key(self.ec.SECP256R1())

    def _save_key(self, key, path: Path) -> None:
        pem = key.private_bytes(
            self.ser.Encoding.PEM, self.ser.PrivateFormat.PKCS8, self.ser.NoEncryption()
        )
        _write(path, pem, 0o600)

    def _pem(self, cert) -> bytes:
        return cert.public_bytes(self.ser.Encoding.PEM)

    def _name(self, cn: str):
        x509, N = self.x509, self.NameOID
        return x509.Name(
            [x509.NameAttribute(N.ORGANIZATION_NAME, "maddylite harness"),
             x509.NameAttribute(N.COMMON_NAME, cn)]
        )

    def make_ca(self, tag: str, cn: str):
        x509 = self.x509
        key = self._key()
        name = self._name(cn)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - dt.timedelta(days=30))
            .not_valid_after(self.now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, self.hashes.SHA256())
        )
        self._save_key(key, self.root / f"{tag}.key")
        _write(self.root / f"{tag}.pem", self._pem(cert))
        self._cas[tag] = (key, cert)
        return key, cert

    def make_leaf(self, names: list[str], path_stem: Path, *, issuer: str | None,
                  expired: bool = False, send_issuer: bool = False) -> Issued:
        x509 = self.x509
        key = self._key()
        subject = self._name(names[0])
        if expired:
            start = self.now - dt.timedelta(days=400)
            end = self.now - dt.timedelta(days=30)
        else:
            start = self.now - dt.timedelta(days=7)
            end = self.now + dt.timedelta(days=5 * 365)
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([self.EKU.SERVER_AUTH, self.EKU.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
        )
        if issuer is None:
            cert = b.issuer_name(subject).sign(key, self.hashes.SHA256())
            issuer_path = None
            ca_cert = None
        else:
            ca_key, ca_cert = self._cas[issuer]
            b = b.issuer_name(ca_cert.subject).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            cert = b.sign(ca_key, self.hashes.SHA256())
            issuer_path = self.root / f"{issuer}.pem"
        key_path = Path(f"{path_stem}.key")
        cert_path = Path(f"{path_stem}.pem")
        chain_path = Path(f"{path_stem}.chain.pem")
        self._save_key(key, key_path)
        _write(cert_path, self._pem(cert))
        chain = self._pem(cert) + (self._pem(ca_cert) if send_issuer and ca_cert else b"")
        _write(chain_path, chain)
        return Issued(key_path, cert_path, chain_path, issuer_path)

    # ------------------------------------------------------------------ the world
    def generate(self, world: World) -> dict:
        """Create every key and certificate; fill in TLSA data; return a summary for state."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.make_ca("ca", "maddylite harness CA")
        self.make_ca("dane-ca", "maddylite harness DANE-TA CA (not in the CA bundle)")
        other = self.make_leaf(["unrelated.elsewhere.test"], self.root / "other", issuer=None)
        issued: dict[str, Issued] = {}
        for h in world.hosts.values():
            if h.server != "smtpd" or h.cname or not h.starttls:
                continue
            issued[h.name] = self.issue_for_host(h)
        sts_issued: dict[str, Issued] = {}
        for sts in world.sts.values():
            self_signed = sts.fetch == "selfsigned"
            sts_issued[sts.domain] = self.make_leaf(
                [sts.host], self.root / "sts" / sts.domain, issuer=None if self_signed else "ca"
            )
        fill_tlsa(world, issued, other)
        return {
            "ca": str(self.root / "ca.pem"),
            "dane_ca": str(self.root / "dane-ca.pem"),
            "hosts": {n: _issued_dict(i) for n, i in issued.items()},
            "sts": {d: _issued_dict(i) for d, i in sts_issued.items()},
            "other": _issued_dict(other),
        }

    def issue_for_host(self, h: Host) -> Issued:
        stem = self.root / "hosts" / h.name
        if h.cert == "selfsigned":
            return self.make_leaf(h.cert_names, stem, issuer=None)
        if h.cert == "expired":
            return self.make_leaf(h.cert_names, stem, issuer="ca", expired=True)
        if h.cert == "dane-ta":
            return self.make_leaf(h.cert_names, stem, issuer="dane-ca", send_issuer=True)
        return self.make_leaf(h.cert_names, stem, issuer="ca")


def _issued_dict(i: Issued) -> dict:
    return {
        "key": str(i.key_path),
        "cert": str(i.cert_path),
        "chain": str(i.chain_path),
        "issuer": str(i.issuer_path) if i.issuer_path else None,
    }


# ---------------------------------------------------------------------------- TLSA digests
def pem_to_der(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pem)
    return cert.public_bytes(serialization.Encoding.DER)


def spki_der(cert_der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tlsa_data(selector: int, mtype: int, cert_der: bytes) -> str:
    """The TLSA association data (hex) for a DER certificate."""
    data = cert_der if selector == 0 else spki_der(cert_der)
    if mtype == 0:
        return data.hex()
    if mtype == 2:
        return hashlib.sha512(data).hexdigest()
    return hashlib.sha256(data).hexdigest()


def fill_tlsa(world: World, issued: dict[str, Issued], other: Issued) -> None:
    for h in world.hosts.values():
        if not h.tlsa:
            continue
        served = world.final_host(h.name)
        for t in h.tlsa:
            if t.source == "other":
                der = pem_to_der(other.cert_path.read_bytes())
            else:
                iss = issued.get(served.name)
                if iss is None:  # no certificate (no STARTTLS): fall back to an unrelated one
                    der = pem_to_der(other.cert_path.read_bytes())
                elif t.source == "issuer" and iss.issuer_path:
                    der = pem_to_der(iss.issuer_path.read_bytes())
                else:
                    der = pem_to_der(iss.cert_path.read_bytes())
            t.data = tlsa_data(t.selector, t.mtype, der)


def apply_tlsa_state(world: World, state_tlsa: dict[str, list[str]]) -> None:
    """Restore the TLSA data saved in state (a warm start does not regenerate)."""
    for name, datas in state_tlsa.items():
        h = world.hosts.get(name)
        if h is None:
            continue
        for t, d in zip(h.tlsa, datas, strict=False):
            t.data = d


def tlsa_state(world: World) -> dict[str, list[str]]:
    return {h.name: [t.data for t in h.tlsa] for h in world.hosts.values() if h.tlsa}


def tlsa_matches(t: Tlsa, chain_der: list[bytes]) -> bool:
    """Does TLSA record ``t`` match a presented chain (leaf first), per RFC 7672 §3.1?"""
    if not t.usable or not chain_der:
        return False
    candidates = [chain_der[0]] if t.usage == 3 else chain_der[1:]
    return any(tlsa_data(t.selector, t.mtype, c) == t.data.lower() for c in candidates)
