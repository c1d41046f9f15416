"""mtasts: SMTP MTA Strict Transport Security, the recipient domain's published MX policy.

Registered name: ``mx_auth.mtasts``. Roles: MXAuthPolicy. RFC 8461; behaviour.md C-14..C-56.

Discovery (C-14): when target.remote opens a new connection for a recipient domain,
:meth:`prepare_domain` starts a greenlet that looks up ``_mta-sts.<domain>`` TXT (in
A-labels) in parallel with the MX lookup and, when the record's id is new or the cached
policy expired, fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt``;
:meth:`check_mx` waits for it. The fetch resolves the host with the delivery's resolver,
uses gevent sockets and the system trust store (``SSL_CERT_FILE`` is honoured; not
``tls_client``), follows no redirects, accepts only ``200`` with ``text/plain``, reads at
most 64 KiB and takes at most one minute, with no proxy and no HTTP cache (C-19..C-25).

Enforcement: an MX that matches the policy gets MX level ``mtasts`` in ``enforce`` and
``testing`` mode; in ``enforce`` mode a non-matching MX is skipped before connecting
(``451 4.7.0``, C-42, C-43) and a connection without PKIX-valid TLS is rejected (C-44,
C-45); in ``testing`` mode a mismatch is only logged (C-49, C-50). Mode ``none`` is no
policy.

Deliberate choices:

- DANE and MTA-STS. MTA-STS ``enforce`` demands a certificate that PKIX-validates for
  the MX name [RFC 8461 §4.2]; a DANE match does not stand in for it. The check reads
  ``conn.tls_verified`` (the ladder's verified stage), so it does not depend on the
  policies' order: even if DANE ran first and raised the TLS level to authenticated, an
  unverified certificate still fails MTA-STS. Conversely a DANE failure is never
  overridden, because this policy only ever adds rejections [RFC 8461 §2].
- Configuration is pure. C-38 wants the cache directory created "at configuration"; the
  project rule is that ``configure()`` touches no file system, so ``configure()`` only
  resolves ``fs_dir`` (relative to ``state_dir``) and ``start()`` creates it. Failing to
  create it makes ``start()`` raise, so startup (and a reload) fails with a clear message,
  just as a configuration error would.
- Cache: one instance is one cache, shared by every target that references its
  ``mx_auth`` group. ``cache fs`` reads and writes one JSON file per policy domain on
  every use (temporary file, then rename), so instances sharing a directory, and the
  ``maddylite mtasts`` command, see the same policies. A failed write is logged and the
  fetched policy still applies (C-38).
- Background refresh (C-40): at start and every 12 hours each cached domain is checked
  as if 6 hours had passed. It uses the injected :attr:`MTASTS.resolver`, else the
  resolver the last delivery used, else a resolver built from ``/etc/resolv.conf``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import ssl
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import gevent
import gevent.lock
import gevent.pool
import gevent.socket
import gevent.ssl

from maddylite import dns
from maddylite.config.directives import Directive, Enum, Settings, String
from maddylite.config.errors import ConfigError
from maddylite.config.values import ascii_digits
from maddylite.flights import SharedFlights
from maddylite.interfaces import MXAuthPolicy
from maddylite.log import Logger
from maddylite.policy import DeliveryPolicy, MXCandidate, MXLevel, PolicyModule, TLSLevel
from maddylite.registry import ModuleBase, register
from maddylite.smtp.errors import MTASTS_CERT_UNTRUSTED, MTASTS_MX_MISMATCH, MTASTS_TLS_REQUIRED

#: Where the policy is published [RFC 8461 §3.2].
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
#: Bound on the whole HTTPS fetch: address lookup, connect, TLS, headers, body (C-24).
FETCH_TIMEOUT = 60.0
#: Largest policy body accepted (C-25).
MAX_POLICY_SIZE = 64 * 1024
#: ``max_age`` values above this (one year) are treated as this [RFC 8461 §3.2].
MAX_AGE_CAP = 31557600
#: Background refresh period and how far ahead it looks (C-40, RFC 8461 §10.2).
REFRESH_INTERVAL = 12 * 3600.0
REFRESH_LOOKAHEAD = 6 * 3600.0
#: Default cache directory name under state_dir (C-38).
DEFAULT_FS_DIR = "mtasts_cache"

MODES = ("enforce", "testing", "none")

_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_DIGITS = re.compile(r"[0-9]+")
#: What a policy domain may look like once in A-labels; it is also a cache file name.
_DOMAIN = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")


class MTASTSError(Exception):
    """MTASTSError is an invalid TXT record or policy, or a failed policy fetch."""


# --- names ----------------------------------------------------------------------------------


def normalize_name(name: str) -> str | None:
    """normalize_name gives the comparable form of a host name, or None if it is invalid.

    NFC, lower case, one trailing dot removed, every label in A-labels; an ``xn--`` label
    that does not decode and re-encode to itself is invalid (C-53).
    """
    name = unicodedata.normalize("NFC", name).lower()
    name = name[:-1] if name.endswith(".") else name
    if not name:
        return None
    out = []
    for label in name.split("."):
        if not label:
            return None
        try:
            if not label.isascii():
                label = label.encode("idna").decode("ascii").lower()
            elif label.startswith("xn--"):
                ulabel = label.encode("ascii").decode("idna")
                if ulabel.isascii() or ulabel.encode("idna").decode("ascii").lower() != label:
                    return None
        except UnicodeError:
            return None
        out.append(label)
    return ".".join(out)


def policy_domain(domain: str) -> str | None:
    """policy_domain is the recipient domain in A-labels as used for MTA-STS, or None.

    None means the name cannot carry a policy (not convertible, or not a plain host
    name); such a domain is treated as having no policy.
    """
    norm = normalize_name(domain)
    if norm is None or len(norm) > 253 or not _DOMAIN.fullmatch(norm):
        return None
    return norm


def match_mx(pattern: str, host: str) -> bool:
    """match_mx tells whether an MX host matches one ``mx`` pattern of a policy (C-53).

    Both are normalised; ``*.example.org`` matches exactly one extra leftmost label
    [RFC 8461 §4.1]. An invalid pattern never matches.
    """
    h = normalize_name(host)
    if h is None:
        return False
    if pattern.startswith("*."):
        base = normalize_name(pattern[2:])
        first, dot, rest = h.partition(".")
        return base is not None and bool(first) and bool(dot) and rest == base
    p = normalize_name(pattern)
    return p is not None and p == h


# --- TXT record [RFC 8461 §3.1] -----------------------------------------------------------


def _is_sts_record(record: str) -> bool:
    head, sep, _ = record.partition(";")
    return bool(sep) and head.strip(" \t") == "v=STSv1"


def parse_txt(record: str) -> str:
    """parse_txt validates one ``_mta-sts`` TXT record and returns its id (C-15, C-16).

    Parts are separated by ``;`` with white space around them trimmed; ``v=STSv1`` comes
    first, a trailing ``;`` is allowed, ``id`` is 1-32 letters and digits, and other
    parts must be well-formed ``name=value`` extensions (then ignored).
    """
    parts = [p.strip(" \t") for p in record.split(";")]
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if parts[0] != "v=STSv1":
        raise MTASTSError("mtasts: the TXT record does not start with v=STSv1")
    rid: str | None = None
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq:
            raise MTASTSError(f"mtasts: malformed TXT record part: {part!r}")
        if key == "id":
            if not _TXT_ID.fullmatch(value):
                raise MTASTSError(f"mtasts: invalid policy id: {value!r}")
            rid = value
        elif not (_EXT_NAME.fullmatch(key) and _EXT_VALUE.fullmatch(value)):
            raise MTASTSError(f"mtasts: malformed TXT record part: {part!r}")
    if rid is None:
        raise MTASTSError("mtasts: the TXT record has no id")
    return rid


def parse_txt_records(records: Sequence[str]) -> str | None:
    """parse_txt_records returns the policy id from a TXT RRset, or None if there is none.

    Records not starting with ``v=STSv1;`` are discarded first; then exactly one must
    remain [RFC 8461 §3.1]. Several, or an invalid one, raise MTASTSError.
    """
    sts = [r for r in records if _is_sts_record(r)]
    if not sts:
        return None
    if len(sts) > 1:
        raise MTASTSError("mtasts: more than one v=STSv1 TXT record")
    return parse_txt(sts[0])


# --- policy [RFC 8461 §3.2] ---------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """Policy is a parsed MTA-STS policy: mode, max_age (seconds, capped) and mx patterns."""

    mode: str
    max_age: int
    mx: tuple[str, ...] = ()

    def matches(self, host: str) -> bool:
        """Policy.matches tells whether an MX host is listed by one of the patterns."""
        return any(match_mx(p, host) for p in self.mx)


def parse_policy(body: bytes | str) -> Policy:
    """parse_policy validates a policy body (C-26..C-28) and returns it, or raises MTASTSError.

    Lines end in LF or CRLF; each is ``key:value``, split at the first colon, with white
    space around the value trimmed. Unknown keys are ignored, the last value of a key
    wins except ``mx``, whose values accumulate. A blank line between fields, an empty key
    or value, or a line without a colon make the policy invalid.
    """
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise MTASTSError("mtasts: the policy is not UTF-8 text") from None
    else:
        text = body
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    while lines and not lines[-1].strip(" \t"):
        lines.pop()
    fields: dict[str, str] = {}
    mx: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip(" \t"):
            raise MTASTSError(f"mtasts: blank line {n} in the policy")
        key, colon, value = line.partition(":")
        if not colon:
            raise MTASTSError(f"mtasts: policy line {n} has no colon")
        if not key:
            raise MTASTSError(f"mtasts: policy line {n} has an empty key")
        value = value.strip(" \t")
        if not value:
            raise MTASTSError(f"mtasts: policy line {n} has an empty value")
        if key == "mx":
            mx.append(value)
        else:
            fields[key] = value
    version = fields.get("version")
    if version is None:
        raise MTASTSError("mtasts: the policy has no version")
    if version != "STSv1":
        raise MTASTSError(f"mtasts: unsupported policy version: {version}")
    mode = fields.get("mode")
    if mode is None:
        raise MTASTSError("mtasts: the policy has no mode")
    if mode not in MODES:
        raise MTASTSError(f"mtasts: invalid policy mode: {mode}")
    max_age = fields.get("max_age")
    if max_age is None:
        raise MTASTSError("mtasts: the policy has no max_age")
    if not _DIGITS.fullmatch(max_age):
        raise MTASTSError(f"mtasts: invalid max_age: {max_age}")
    if mode != "none" and not mx:
        raise MTASTSError(f"mtasts: mode {mode} without any mx")
    digits = max_age.lstrip("0") or "0"  # no int() of thousands of digits: any long value is above the cap
    return Policy(mode, MAX_AGE_CAP if len(digits) > 10 else min(int(digits), MAX_AGE_CAP), tuple(mx))


# --- fetch (C-19..C-25) -------------------------------------------------------------------


def fetch_policy(
    domain: str,
    resolver: Any,
    *,
    ssl_context: ssl.SSLContext | None = None,
    port: int = 443,
    timeout: float = FETCH_TIMEOUT,
    max_size: int = MAX_POLICY_SIZE,
) -> Policy:
    """fetch_policy downloads and parses the policy of *domain* (A-labels), or raises MTASTSError.

    ``mta-sts.<domain>`` is resolved with *resolver* (a maddylite.dns.Resolver); the
    certificate must chain to *ssl_context*'s roots (default: the system trust store)
    and carry that name. The whole fetch is bounded by *timeout*.
    """
    timer = gevent.Timeout(timeout)
    timer.start()
    try:
        return _fetch(domain, resolver, ssl_context or default_ssl_context(), port, max_size)
    except gevent.Timeout as t:
        if t is not timer:
            raise
        raise MTASTSError(f"mtasts: policy fetch timed out after {timeout:g}s") from None
    finally:
        timer.close()


def default_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """default_ssl_context verifies against the system trust store (or *ca_file*) (C-20)."""
    ctx = gevent.ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _fetch(domain: str, resolver: Any, ctx: ssl.SSLContext, port: int, max_size: int) -> Policy:
    host = f"mta-sts.{domain}"
    try:
        addrs = resolver.lookup_addrs(host).addresses
    except dns.DNSError as e:
        raise MTASTSError(f"mtasts: cannot resolve {host}: {e}") from None
    raw = None
    last: OSError | None = None
    for ip in addrs:
        try:
            raw = gevent.socket.create_connection((ip, port))
            break
        except OSError as e:
            last = e
    if raw is None:
        raise MTASTSError(f"mtasts: cannot connect to {host}: {last or 'no address'}")
    tls = None
    try:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            raise MTASTSError(f"mtasts: TLS certificate of {host}: {e.verify_message or e}") from None
        except (ssl.SSLError, OSError) as e:
            raise MTASTSError(f"mtasts: TLS with {host}: {e}") from None
        host_header = host if port == 443 else f"{host}:{port}"
        request = (
            f"GET {WELL_KNOWN_PATH} HTTP/1.1\r\nHost: {host_header}\r\n"
            "User-Agent: maddylite\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        )
        try:
            tls.sendall(request.encode("ascii"))
            resp = http.client.HTTPResponse(tls, method="GET")  # type: ignore[arg-type]
            resp.begin()
            if 300 <= resp.status < 400:
                raise MTASTSError("mtasts: HTTP redirects are forbidden")
            if resp.status != 200:
                raise MTASTSError(f"mtasts: HTTP status {resp.status}")
            ctype = resp.getheader("Content-Type")
            if ctype is None or ctype.split(";", 1)[0].strip(" \t").lower() != "text/plain":
                raise MTASTSError(f"mtasts: unexpected Content-Type: {ctype or 'none'}")
            length = resp.getheader("Content-Length")
            if length is not None and ascii_digits(length.strip()) and int(length) > max_size:
                raise MTASTSError(f"mtasts: the policy is larger than {max_size} bytes")
            body = resp.read(max_size + 1)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise MTASTSError(f"mtasts: HTTP error from {host}: {e or type(e).__name__}") from None
        if len(body) > max_size:
            raise MTASTSError(f"mtasts: the policy is larger than {max_size} bytes")
        return parse_policy(body)
    finally:
        (tls or raw).close()


# --- cache (C-30..C-40) -------------------------------------------------------------------


class CacheEntry(NamedTuple):
    """CacheEntry is one cached policy as shown by ``maddylite mtasts list``."""

    domain: str
    id: str
    mode: str
    mx: tuple[str, ...]
    fetched_at: float
    expires_at: float


@dataclass(frozen=True)
class CachedPolicy:
    """CachedPolicy is a fetched policy with its TXT id and fetch time (C-30)."""

    domain: str
    id: str
    policy: Policy
    fetched_at: float

    @property
    def expires_at(self) -> float:
        """CachedPolicy.expires_at is fetch time + max_age."""
        return self.fetched_at + self.policy.max_age

    def valid(self, now: float) -> bool:
        """CachedPolicy.valid tells whether the policy has not expired at *now*."""
        return now < self.expires_at

    def to_json(self) -> bytes:
        """CachedPolicy.to_json is the cache file content."""
        p = self.policy
        return json.dumps({"domain": self.domain, "id": self.id, "fetched_at": self.fetched_at,
                           "mode": p.mode, "max_age": p.max_age, "mx": list(p.mx)}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CachedPolicy:
        """CachedPolicy.from_json reads a cache file; ValueError if it is not one."""
        d = json.loads(data)
        ok = (isinstance(d, dict) and isinstance(d.get("domain"), str) and isinstance(d.get("id"), str)
              and isinstance(d.get("fetched_at"), (int, float)) and d.get("mode") in MODES
              and isinstance(d.get("max_age"), int) and 0 <= d["max_age"] <= MAX_AGE_CAP
              and isinstance(d.get("mx"), list) and all(isinstance(m, str) for m in d["mx"])
              and _TXT_ID.fullmatch(d["id"]) is not None)
        if not ok:
            raise ValueError("not an MTA-STS cache entry")
        return cls(d["domain"], d["id"], Policy(d["mode"], d["max_age"], tuple(d["mx"])), float(d["fetched_at"]))


class RAMStore:
    """RAMStore keeps cached policies in memory (``cache ram``, C-39)."""

    def __init__(self) -> None:
        self._entries: dict[str, CachedPolicy] = {}

    def prepare(self) -> None:
        """prepare has nothing to do for memory."""

    def get(self, domain: str) -> CachedPolicy | None:
        """get returns the cached policy of *domain*, if any."""
        return self._entries.get(domain)

    def put(self, entry: CachedPolicy) -> None:
        """put stores or replaces a policy."""
        self._entries[entry.domain] = entry

    def delete(self, domain: str) -> bool:
        """delete drops a policy; False if there was none."""
        return self._entries.pop(domain, None) is not None

    def domains(self) -> list[str]:
        """domains lists the cached policy domains."""
        return sorted(self._entries)


class FSStore:
    """FSStore keeps one JSON file per policy domain in a directory (``cache fs``, C-38).

    Files are written to a temporary name and renamed, so a reader never sees half a
    file. Unreadable or corrupt files count as absent (and are logged).
    """

    def __init__(self, path: str, log: Logger) -> None:
        self.path = path
        self.log = log

    def prepare(self) -> None:
        """prepare creates the directory (called by start); OSError if it cannot."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        if not os.path.isdir(self.path):
            raise NotADirectoryError(f"not a directory: {self.path}")

    def _file(self, domain: str) -> str:
        return os.path.join(self.path, domain)

    def get(self, domain: str) -> CachedPolicy | None:
        """get reads the policy file of *domain*, if there is a valid one."""
        # XXX: small synchronous file reads; they do not yield but are short.
        try:
            with open(self._file(domain), "rb") as f:
                entry = CachedPolicy.from_json(f.read(MAX_POLICY_SIZE * 4))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            self.log.error("cannot read MTA-STS cache entry", e, domain=domain)
            return None
        if entry.domain != domain:
            self.log.error("cannot read MTA-STS cache entry", "domain mismatch", domain=domain)
            return None
        return entry

    def put(self, entry: CachedPolicy) -> None:
        """put writes the policy file atomically; OSError on failure."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{entry.domain}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(entry.to_json())
            os.replace(tmp, self._file(entry.domain))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, domain: str) -> bool:
        """delete removes the policy file; False if there was none."""
        try:
            os.unlink(self._file(domain))
        except FileNotFoundError:
            return False
        return True

    def domains(self) -> list[str]:
        """domains lists the policy files (temporary files excluded)."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _DOMAIN.fullmatch(n))


# --- the module -----------------------------------------------------------------------------


@register("mx_auth.mtasts")
class MTASTS(PolicyModule, ModuleBase):
    """MTASTS applies the recipient domains' MTA-STS policies (``mx_auth.mtasts``).

    Besides the policy role it offers the cache operations behind ``maddylite mtasts``:
    :meth:`cached`, :meth:`purge` and :meth:`refresh`. They work on a configured
    instance whether or not it was started.
    """

    roles = (MXAuthPolicy,)
    directives = (
        Directive(name="cache", type=Enum(choices=("fs", "ram")), default="fs",
                  help="Policy cache: 'fs' (a directory, survives restarts) or 'ram' (memory only)."),
        Directive(name="fs_dir", type=String(), default=None,
                  help="Cache directory for 'cache fs'; relative to state_dir (default: state_dir/mtasts_cache)."),
    )

    #: Injected for tests: the resolver for background refreshes (see the module docstring).
    resolver: Any = None
    #: Wall clock: cache times are stored on disk and must survive restarts.
    clock: Callable[[], float] = staticmethod(time.time)
    #: Port of the policy host (tests use a local one).
    https_port = 443
    #: CA bundle for the policy host; None means the system trust store (or SSL_CERT_FILE).
    ca_file: str | None = None
    #: Fetch bound (C-24) and refresh schedule (C-40).
    fetch_timeout = FETCH_TIMEOUT
    refresh_interval = REFRESH_INTERVAL
    refresh_lookahead = REFRESH_LOOKAHEAD

    def configure(self, inline: tuple[str, ...], settings: Settings) -> None:
        """configure picks the cache and resolves ``fs_dir``; it touches no file (C-38)."""
        debug = False
        rt = self.runtime
        if rt is not None and getattr(rt, "builder", None) is not None:
            debug = bool(rt.globals.get("debug", False))
        self.log = Logger("mx_auth/mtasts", debug)
        self.cache_kind: str = settings.cache
        self.fs_dir: str | None = None
        self.store: RAMStore | FSStore
        if self.cache_kind == "fs":
            self.fs_dir = self._resolve_fs_dir(settings.fs_dir)
            self.store = FSStore(self.fs_dir, self.log)
        else:
            self.store = RAMStore()
        self._greenlets = gevent.pool.Group()
        self._flights = SharedFlights()
        self._refresher: gevent.Greenlet | None = None
        self._locks: dict[str, list[Any]] = {}
        self._last_resolver: Any = None
        self._own_resolver: Any = None
        self._ssl_ctx: ssl.SSLContext | None = None

    def _resolve_fs_dir(self, fs_dir: str | None) -> str:
        rt = self.runtime
        if rt is not None and getattr(rt, "builder", None) is not None:
            state_dir = rt.state_dir
        else:
            from maddylite.runtime import default_state_dir

            state_dir = default_state_dir()
        if fs_dir is None:
            return os.path.join(state_dir, DEFAULT_FS_DIR)
        if not fs_dir or "\x00" in fs_dir:
            raise ConfigError("fs_dir: not a usable directory name")
        return os.path.normpath(fs_dir if os.path.isabs(fs_dir) else os.path.join(state_dir, fs_dir))

    def start(self) -> None:
        """start creates the cache directory and starts the background refresh (C-38, C-40)."""
        try:
            self.store.prepare()
        except OSError as e:
            raise MTASTSError(f"mtasts: cannot create the cache directory {self.fs_dir}: {e}") from e
        if self._refresher is None or self._refresher.dead:
            self._refresher = self._greenlets.spawn(self._refresh_loop)
            self._refresher.name = f"mtasts refresh {self.label}"

    def stop(self, timeout: float) -> None:
        """stop ends the background refresh, then lets running discoveries finish; idempotent.

        Discoveries get *timeout* to end before they are killed; a delivery whose
        discovery was killed repeats it in its own greenlet rather than go without.
        """
        if self._refresher is not None:
            self._refresher.kill(block=True, timeout=timeout)
            self._refresher = None
        self._greenlets.join(timeout=timeout)
        self._greenlets.kill(block=True, timeout=1)

    # -- role ---------------------------------------------------------------------------

    def start_delivery(self, msg_meta: Any) -> DeliveryPolicy:
        """start_delivery returns the per-delivery policy object."""
        return _Delivery(self)

    # -- cache operations (maddylite mtasts list|purge|refresh) -----------------------------

    def cached(self) -> list[CacheEntry]:
        """cached lists the cached policies, expired ones included, by domain."""
        out = []
        for d in self.store.domains():
            e = self.store.get(d)
            if e is not None:
                out.append(CacheEntry(e.domain, e.id, e.policy.mode, e.policy.mx, e.fetched_at, e.expires_at))
        return out

    def purge(self, domain: str | None = None) -> int:
        """purge drops the cached policy of *domain*, or every one; returns how many."""
        if domain is None:
            return sum(self.store.delete(d) for d in self.store.domains())
        key = policy_domain(domain)
        return int(key is not None and self.store.delete(key))

    def refresh(self, domain: str | None = None) -> None:
        """refresh re-fetches policies now, whatever their id and expiry.

        With *domain*, that domain's policy is fetched (cached or not) and a failure
        raises MTASTSError. Without, every cached domain is refreshed and failures are
        logged (``MTA-STS cache update error``) and leave the entry as it was.
        """
        if domain is None:
            self._refresh_all(lookahead=0.0, force=True)
            return
        key = policy_domain(domain)
        if key is None:
            raise MTASTSError(f"mtasts: not a valid policy domain: {domain}")
        try:
            self._refresh_one(key, self._resolver(), at=self.clock(), force=True)
        except dns.DNSError as e:
            raise MTASTSError(f"mtasts: TXT lookup: {e}") from None

    # -- discovery --------------------------------------------------------------------------

    def spawn_discovery(self, domain: str, resolver: Any) -> gevent.Greenlet:
        """spawn_discovery starts the TXT lookup (and fetch) of *domain* in a module greenlet.

        Concurrent deliveries to one domain share the running discovery (see
        :mod:`maddylite.flights`); the caller reads it, never kills it, and hands it back
        with :meth:`release_discovery`.
        """
        if resolver is not None:
            self._last_resolver = resolver
        return self._flights.spawn(self._greenlets, self._flight_key(domain, resolver),
                                   f"mtasts discovery {domain}", self._discover_safe, domain, resolver)

    def release_discovery(self, domain: str, resolver: Any, g: gevent.Greenlet) -> None:
        """release_discovery hands back a greenlet from :meth:`spawn_discovery`; unused, it is killed."""
        self._flights.release(self._flight_key(domain, resolver), g)

    @staticmethod
    def _flight_key(domain: str, resolver: Any) -> tuple[str, int]:
        return (policy_domain(domain) or domain.lower(), id(resolver))

    def _discover_safe(self, domain: str, resolver: Any) -> Policy | None:
        try:
            return self.discover(domain, resolver)
        except Exception as e:  # noqa: BLE001 - a bug here must not take the delivery down
            self.log.error("MTA-STS error", e, domain=domain)
            # nor drop a policy already known: a still valid cached one applies (C-34)
            key = policy_domain(domain)
            return _active(self._valid_entry(key, self.clock())) if key is not None else None

    def discover(self, domain: str, resolver: Any = None) -> Policy | None:
        """discover returns the policy that applies to *domain* now, or None (C-14..C-37).

        The TXT record is looked up every time; the cached policy is used while its id is
        unchanged and it has not expired; otherwise the policy is fetched and cached. On
        any failure a still valid cached policy applies. Mode ``none`` gives None.
        """
        key = policy_domain(domain)
        if key is None:
            self.log.debug("MTA-STS error", domain=domain, reason="not a valid policy domain")
            return None
        resolver = resolver or self._resolver()
        now = self.clock()
        valid = self._valid_entry(key, now)
        try:
            txt_id = self._txt_id(key, resolver)
        except (dns.DNSError, MTASTSError) as e:  # C-16, C-18
            self.log.debug("MTA-STS error", domain=key, reason=str(e))
            return _active(valid)
        if txt_id is None:  # C-18, C-37
            return _active(valid)
        if valid is not None and valid.id == txt_id:  # C-30
            return _active(valid)
        with self._domain_lock(key):
            now = self.clock()
            valid = self._valid_entry(key, now)  # another greenlet may have fetched it meanwhile
            if valid is not None and valid.id == txt_id:
                return _active(valid)
            try:
                policy = self._fetch(key, resolver)
            except Exception as e:  # noqa: BLE001 - C-20..C-25, C-34, C-36: any failure of the fetch
                self.log.error("MTA-STS error", e, domain=key)
                return _active(valid)
            entry = CachedPolicy(key, txt_id, policy, now)
            self._store(entry)
            self.log.debug("MTA-STS policy fetched", domain=key, id=txt_id, mode=policy.mode, max_age=policy.max_age)
            return _active(entry)

    def _valid_entry(self, key: str, now: float) -> CachedPolicy | None:
        entry = self.store.get(key)
        return entry if entry is not None and entry.valid(now) else None

    def _txt_id(self, key: str, resolver: Any) -> str | None:
        """_txt_id returns the TXT record's id, None without one; DNSError/MTASTSError else."""
        try:
            ans = resolver.lookup_txt(f"_mta-sts.{key}")
        except dns.DNSError as e:
            if e.temporary:
                raise
            return None
        return parse_txt_records(ans.records)

    def _fetch(self, key: str, resolver: Any) -> Policy:
        if self._ssl_ctx is None:
            self._ssl_ctx = default_ssl_context(self.ca_file)
        return fetch_policy(key, resolver, ssl_context=self._ssl_ctx, port=self.https_port, timeout=self.fetch_timeout)

    def _store(self, entry: CachedPolicy) -> None:
        try:
            self.store.put(entry)
        except OSError as e:  # C-38: the fetched policy still applies
            self.log.error("cannot write MTA-STS cache", e, domain=entry.domain)

    def _resolver(self) -> Any:
        if self.resolver is not None:
            return self.resolver
        if self._last_resolver is not None:
            return self._last_resolver
        if self._own_resolver is None:
            self._own_resolver = dns.Resolver()
        return self._own_resolver

    @contextlib.contextmanager
    def _domain_lock(self, key: str) -> Iterator[None]:
        """_domain_lock serialises fetches of one domain, so concurrent deliveries fetch once."""
        slot = self._locks.get(key)
        if slot is None:
            slot = self._locks[key] = [gevent.lock.Semaphore(), 0]
        slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                self._locks.pop(key, None)

    # -- background refresh (C-40) ----------------------------------------------------------

    def _refresh_loop(self) -> None:
        while True:
            try:
                self._refresh_all(lookahead=self.refresh_lookahead, force=False)
            except Exception as e:  # noqa: BLE001 - the refresh must survive
                self.log.error("MTA-STS cache update error", e)
            gevent.sleep(self.refresh_interval)

    def _refresh_all(self, *, lookahead: float, force: bool) -> None:
        for key in self.store.domains():
            try:
                self._refresh_one(key, self._resolver(), at=self.clock() + lookahead, force=force)
            except Exception as e:  # noqa: BLE001 - one domain's failure leaves the others refreshed (C-40)
                self.log.error("MTA-STS cache update error", e, domain=key)

    def _refresh_one(self, key: str, resolver: Any, *, at: float, force: bool) -> bool:
        """_refresh_one refetches *key* if forced, its id changed or it expires by *at*."""
        txt_id = self._txt_id(key, resolver)
        if txt_id is None:
            raise MTASTSError("mtasts: no MTA-STS TXT record")
        with self._domain_lock(key):
            entry = self.store.get(key)
            if not force and entry is not None and entry.id == txt_id and entry.valid(at):
                return False
            policy = self._fetch(key, resolver)
            self.store.put(CachedPolicy(key, txt_id, policy, self.clock()))
        self.log.debug("MTA-STS policy refreshed", domain=key, id=txt_id, mode=policy.mode)
        return True


def _active(entry: CachedPolicy | None) -> Policy | None:
    """_active is the policy that applies: none for no entry or mode none (RFC 8461 §5)."""
    if entry is None or entry.policy.mode == "none":
        return None
    return entry.policy


class _Delivery(DeliveryPolicy):
    """_Delivery is the MTA-STS check of one delivery, for each of its recipient domains."""

    def __init__(self, mod: MTASTS) -> None:
        self.mod = mod
        #: domain key → (domain, resolver, the shared discovery greenlet)
        self._pending: dict[str, tuple[str, Any, gevent.Greenlet]] = {}
        self._policies: dict[str, Policy | None] = {}

    @staticmethod
    def _key(domain: str) -> str:
        return domain.lower().rstrip(".")

    def prepare_domain(self, domain: str, resolver: Any) -> None:
        """prepare_domain starts discovery, in parallel with the MX lookup (C-14)."""
        key = self._key(domain)
        self._release(key)
        self._policies.pop(key, None)
        self._pending[key] = (domain, resolver, self.mod.spawn_discovery(domain, resolver))

    def _release(self, key: str) -> None:
        entry = self._pending.pop(key, None)
        if entry is not None:
            self.mod.release_discovery(*entry)

    def _policy(self, cand: MXCandidate) -> Policy | None:
        key = self._key(cand.domain)
        if key in self._policies:
            return self._policies[key]
        entry = self._pending.get(key)
        g = entry[2] if entry is not None else None
        policy: Policy | None = None
        if g is not None:
            g.join()
            self._release(key)
        if g is not None and g.exception is None and not isinstance(g.value, BaseException):
            policy = g.value
        else:  # not prepared, or killed by stop(): decide here rather than go without
            policy = self.mod._discover_safe(cand.domain, cand.resolver)
        self._policies[key] = policy
        return policy

    def check_mx(self, cand: MXCandidate) -> MXLevel:
        """check_mx grants MX level mtasts to a listed MX; enforce mode rejects others (C-41..C-50)."""
        policy = self._policy(cand)
        if policy is None:
            return cand.mx_level
        if policy.matches(cand.host):
            return max(cand.mx_level, MXLevel.MTASTS)
        if policy.mode == "enforce":
            raise MTASTS_MX_MISMATCH.error(remote_server=cand.host, domain=cand.domain, mx_level=str(cand.mx_level))
        self.mod.log.info("MX does not match published non-enforced MTA-STS policy", remote_server=cand.host, domain=cand.domain)
        return cand.mx_level

    def check_conn(self, cand: MXCandidate) -> TLSLevel:
        """check_conn demands PKIX-valid TLS in enforce mode (C-44, C-45, C-56)."""
        policy = self._policies.get(self._key(cand.domain))
        if policy is None or policy.mode != "enforce":
            return cand.tls_level
        fields: dict[str, Any] = {"domain": cand.domain, "tls_level": str(cand.tls_level)}
        if cand.tls_err:
            fields["tls_err"] = cand.tls_err
        if cand.tls_level == TLSLevel.NONE:
            raise MTASTS_TLS_REQUIRED.error(remote_server=cand.host, **fields)
        if not _pkix_valid(cand):
            raise MTASTS_CERT_UNTRUSTED.error(remote_server=cand.host, **fields)
        return cand.tls_level

    def close(self) -> None:
        """close stops discoveries nobody waited for (unless other deliveries share them)."""
        for key in list(self._pending):
            self._release(key)


def _pkix_valid(cand: MXCandidate) -> bool:
    """_pkix_valid: the certificate was verified by X.509 for the MX name (RFC 8461 §4.2).

    The connection's own record wins over the TLS level, which DANE may have raised.
    """
    verified = getattr(cand.conn, "tls_verified", None)
    if isinstance(verified, bool):
        return verified
    return cand.tls_level >= TLSLevel.AUTHENTICATED
