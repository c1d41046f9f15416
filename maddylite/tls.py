"""TLS settings: the ``tls_client`` block (outbound) and the ``tls`` directive (listeners).

Both are parsed into frozen values at configuration time; the ``ssl.SSLContext`` objects
are built lazily and cached, so configuration stays free of network side effects. PEM
files are read at configuration (A-101: a ``root_ca`` file without certificates is a
configuration error).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from maddylite.config.directives import Custom, Directive, StringList, process
from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode

_PROTOCOLS = {
    "tls1.0": ssl.TLSVersion.TLSv1,
    "tls1.1": ssl.TLSVersion.TLSv1_1,
    "tls1.2": ssl.TLSVersion.TLSv1_2,
    "tls1.3": ssl.TLSVersion.TLSv1_3,
}
_PROTO_NAMES = tuple(_PROTOCOLS)


def _parse_protocols(node: ConfigNode, builder: Any) -> tuple[str, str]:
    if node.has_block:
        raise ConfigError("can't declare block here")
    if not 1 <= len(node.args) <= 2:
        raise ConfigError("expected 1 or 2 arguments: min [max]")
    for a in node.args:
        if a not in _PROTOCOLS:
            raise ConfigError(f"invalid argument, valid values are: [{' '.join(_PROTO_NAMES)}]")
    lo = node.args[0]
    hi = node.args[1] if len(node.args) == 2 else node.args[0]
    if _PROTOCOLS[lo] > _PROTOCOLS[hi]:
        raise ConfigError("minimum protocol version is above the maximum")
    return lo, hi


def load_cert_bundle(paths: tuple[str, ...]) -> str:
    """load_cert_bundle reads PEM files and returns their certificates concatenated."""
    out = []
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        certs = [
            "-----BEGIN CERTIFICATE-----" + chunk.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
            for chunk in text.split("-----BEGIN CERTIFICATE-----")[1:]
            if "-----END CERTIFICATE-----" in chunk
        ]
        if not certs:
            raise ConfigError(f"no certificates was loaded from {path}")
        out.extend(certs)
    return "".join(out)


@dataclass(frozen=True)
class TLSClientConfig:
    """TLSClientConfig is the ``tls_client`` block: trust roots, client cert, versions.

    ``root_ca_pem`` is None for the system trust store. :meth:`context` returns a cached
    SSLContext that either verifies the peer (for "authenticated") or does not (the
    ladder's unverified retry, B-47).
    """

    root_ca: tuple[str, ...] = ()
    root_ca_pem: str | None = None
    cert: str | None = None
    key: str | None = None
    min_version: str = "tls1.2"
    max_version: str = "tls1.3"
    ciphers: tuple[str, ...] = ()
    curves: tuple[str, ...] = ()
    _cache: dict[bool, ssl.SSLContext] = field(default_factory=dict, compare=False, repr=False, hash=False)

    def key_tuple(self) -> tuple[Any, ...]:
        """key_tuple identifies the settings for connection-pool keys."""
        return (self.root_ca, self.cert, self.key, self.min_version, self.max_version, self.ciphers, self.curves)

    def context(self, verify: bool) -> ssl.SSLContext:
        """context returns the SSLContext, verifying or not."""
        ctx = self._cache.get(verify)
        if ctx is not None:
            return ctx
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = _PROTOCOLS[self.min_version]
        ctx.maximum_version = _PROTOCOLS[self.max_version]
        if self.min_version in ("tls1.0", "tls1.1"):
            # OpenSSL's default security level refuses old protocols even when allowed.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        if self.ciphers:
            ctx.set_ciphers(":".join(self.ciphers))
        if self.curves:
            ctx.set_ecdh_curve(self.curves[0])
        if verify:
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
            if self.root_ca_pem is not None:
                ctx.load_verify_locations(cadata=self.root_ca_pem)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert and self.key:
            ctx.load_cert_chain(self.cert, self.key)
        self._cache[verify] = ctx
        return ctx


#: maddy's cipher names (Go's, for TLS 1.2 and below) and the OpenSSL names they stand for.
MADDY_CIPHERS = {
    "RSA-WITH-RC4128-SHA": "RC4-SHA",
    "RSA-WITH-3DES-EDE-CBC-SHA": "DES-CBC3-SHA",
    "RSA-WITH-AES128-CBC-SHA": "AES128-SHA",
    "RSA-WITH-AES256-CBC-SHA": "AES256-SHA",
    "RSA-WITH-AES128-CBC-SHA256": "AES128-SHA256",
    "RSA-WITH-AES128-GCM-SHA256": "AES128-GCM-SHA256",
    "RSA-WITH-AES256-GCM-SHA384": "AES256-GCM-SHA384",
    "ECDHE-ECDSA-WITH-RC4128-SHA": "ECDHE-ECDSA-RC4-SHA",
    "ECDHE-ECDSA-WITH-AES128-CBC-SHA": "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-ECDSA-WITH-AES256-CBC-SHA": "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-WITH-RC4128-SHA": "ECDHE-RSA-RC4-SHA",
    "ECDHE-RSA-WITH-3DES-EDE-CBC-SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "ECDHE-RSA-WITH-AES128-CBC-SHA": "ECDHE-RSA-AES128-SHA",
    "ECDHE-RSA-WITH-AES256-CBC-SHA": "ECDHE-RSA-AES256-SHA",
    "ECDHE-ECDSA-WITH-AES128-CBC-SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-WITH-AES128-CBC-SHA256": "ECDHE-RSA-AES128-SHA256",
    "ECDHE-RSA-WITH-AES128-GCM-SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-WITH-AES128-GCM-SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-WITH-AES256-GCM-SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-WITH-AES256-GCM-SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-WITH-CHACHA20-POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-WITH-CHACHA20-POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
#: maddy's curve names and OpenSSL's.
MADDY_CURVES = {"p256": "prime256v1", "p384": "secp384r1", "p521": "secp521r1", "X25519": "X25519"}


def _parse_names(kind: str, table: dict[str, str], check: Any) -> Any:
    """_parse_names reads ``ciphers`` or ``curves``: maddy's names (mapped to OpenSSL's) or
    OpenSSL's own; a name OpenSSL does not know is a positioned error, as in maddy."""

    def parse(node: ConfigNode, builder: Any) -> tuple[str, ...]:
        if node.has_block:
            raise ConfigError("can't declare block here")
        if not node.args:
            raise ConfigError("expected at least 1 argument, got 0")
        names = tuple(table.get(a, a) for a in node.args)
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for arg, name in zip(node.args, names, strict=True):
            try:
                check(probe, name)
            except (ssl.SSLError, ValueError):
                if arg in table:
                    raise ConfigError(f"{kind} not available in this OpenSSL: {arg} ({name})") from None
                raise ConfigError(f"unknown {kind}: {arg}") from None
        return names

    return parse


_CLIENT_SPECS = (
    Directive(name="root_ca", type=StringList(), default=(), help="PEM files with the trusted roots; replaces the system trust store."),
    Directive(name="cert", type=StringList(), default=None, help="Client certificate (PEM), presented when the server asks."),
    Directive(name="key", type=StringList(), default=None, help="Private key (PEM) of the client certificate."),
    Directive(name="protocols", type=Custom(fn=_parse_protocols, syntax_text="min [max]"), default=("tls1.2", "tls1.3"), help="Allowed TLS versions: tls1.0 tls1.1 tls1.2 tls1.3."),
    Directive(name="ciphers", type=Custom(fn=_parse_names("cipher", MADDY_CIPHERS, lambda c, n: c.set_ciphers(n)),
                                         syntax_text="name..."), default=(),
              help="Cipher suites for TLS 1.2 and below: maddy's names (ECDHE-RSA-WITH-AES128-GCM-SHA256) or OpenSSL's."),
    Directive(name="curves", type=Custom(fn=_parse_names("curve", MADDY_CURVES, lambda c, n: c.set_ecdh_curve(n)),
                                        syntax_text="name..."), default=(),
              help="Key exchange curves: p256 p384 p521 X25519 (maddy's names) or OpenSSL's; Python's ssl offers only the first."),
)


def parse_tls_client(node: ConfigNode, builder: Any) -> TLSClientConfig:
    """parse_tls_client reads a ``tls_client { ... }`` block (A-101)."""
    if node.args:
        raise ConfigError("tls_client takes no arguments, only a block")
    s = process(_CLIENT_SPECS, node.block, block=node)
    cert = s.cert[0] if s.cert else None
    key = s.key[0] if s.key else None
    for name, v in (("cert", s.cert), ("key", s.key)):
        if v is not None and len(v) != 1:
            raise ConfigError(f"{name}: expected 1 argument").at_node(s.node(name) or node)
    if bool(cert) != bool(key):
        raise ConfigError("cert and key must be given together").at_node(node)
    pem = None
    if s.root_ca:
        try:
            pem = load_cert_bundle(s.root_ca)
        except ConfigError as e:
            raise e.at_node(s.node("root_ca") or node) from None
    cfg = TLSClientConfig(
        root_ca=s.root_ca,
        root_ca_pem=pem,
        cert=cert,
        key=key,
        min_version=s.protocols[0],
        max_version=s.protocols[1],
        ciphers=s.ciphers,
        curves=s.curves,
    )
    if cert and key:
        try:
            cfg.context(verify=True)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load client certificate: {e}").at_node(node) from None
    try:
        cfg.context(verify=False)  # what OpenSSL refuses is a configuration error, not a failed delivery
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ConfigError(f"tls_client: {e}").at_node(node) from None
    return cfg


TLS_CLIENT_TYPE = Custom(fn=parse_tls_client, syntax_text="{ root_ca cert key protocols ciphers curves }")


@dataclass(frozen=True)
class TLSServerConfig:
    """TLSServerConfig is the ``tls`` directive of a listener: ``off`` or a cert and key."""

    cert: str | None = None
    key: str | None = None
    min_version: str = "tls1.2"
    max_version: str = "tls1.3"

    @property
    def enabled(self) -> bool:
        """enabled tells whether STARTTLS can be offered."""
        return self.cert is not None

    def context(self) -> ssl.SSLContext:
        """context builds the server SSLContext (called at start, not at configure)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _PROTOCOLS[self.min_version]
        ctx.maximum_version = _PROTOCOLS[self.max_version]
        assert self.cert and self.key
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


_SERVER_SPECS = (
    Directive(name="protocols", type=Custom(fn=_parse_protocols, syntax_text="min [max]"), default=("tls1.2", "tls1.3"), help="Allowed TLS versions."),
    Directive(name="ciphers", type=StringList(), default=(), help="Accepted for compatibility with maddy; OpenSSL defaults are used."),
    Directive(name="curves", type=StringList(), default=(), help="Accepted for compatibility with maddy."),
)


def parse_tls_server(node: ConfigNode, builder: Any) -> TLSServerConfig:
    """parse_tls_server reads ``tls off``, ``tls CERT KEY`` or ``tls file CERT KEY [{...}]``."""
    args = list(node.args)
    if args == ["off"]:
        return TLSServerConfig()
    if args and args[0] == "file":
        args = args[1:]
    if len(args) != 2:
        raise ConfigError("expected 'off' or a certificate and a key path")
    s = process(_SERVER_SPECS, node.block, block=node)
    for path in args:
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    return TLSServerConfig(cert=args[0], key=args[1], min_version=s.protocols[0], max_version=s.protocols[1])


TLS_SERVER_TYPE = Custom(fn=parse_tls_server, syntax_text="off | [file] cert key [{ protocols ... }]")
