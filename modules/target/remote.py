"""target.remote: delivers messages to the MX hosts of each recipient domain.

Registered name: ``target.remote``. Roles: DeliveryTarget. Reference:
target-remote.md; behaviour: behaviour.md sections B and C. RFCs: 5321 (MX choice,
§5.1), 3207 (STARTTLS), 2920 (PIPELINING), 3030 (CHUNKING), 8689 (REQUIRETLS),
7505 (null MX), 6531/6152/1870 (SMTPUTF8, 8BITMIME, SIZE).

One delivery may carry recipients in many domains. Each domain gets its own
connection, opened when its first recipient is added (B-29): MX lookup, then for each
MX in preference order the mx_auth MX checks, TCP, greeting, EHLO, the STARTTLS ladder
"verified → unverified (new connection) → plaintext" (B-47..B-49), the mx_auth
connection checks, local_policy and the REQUIRETLS conditions. The first MX that passes
gets MAIL; after that its errors are final for the domain (B-19). The bodies go out in
parallel greenlets (B-29), as one BDAT chunk when the MX offers CHUNKING, else with DATA. Idle connections are pooled per recipient domain and per
security settings (B-59..B-70).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.pool

from maddylite import dns
from maddylite.config.directives import (
    Bool,
    Custom,
    Directive,
    Duration,
    Int,
    ModuleRef,
    Settings,
    String,
)
from maddylite.config.errors import ConfigError
from maddylite.interfaces import DeliveryTarget, Limits, MsgMetadata, MXAuthGroup
from maddylite.log import Logger
from maddylite.policy import DeliveryPolicy, MXCandidate, MXLevel, TLSLevel
from maddylite.registry import ModuleBase, register
from maddylite.smtp import errors as E
from maddylite.smtp.client import SMTPConnection, to_ascii_address
from maddylite.smtp.errors import SMTPError
from maddylite.tls import TLS_CLIENT_TYPE, TLSClientConfig

#: Timeouts of 0 mean these built-in values (B-105).
DEFAULT_CONNECT_TIMEOUT = 300.0
DEFAULT_COMMAND_TIMEOUT = 300.0
DEFAULT_SUBMISSION_TIMEOUT = 720.0
#: How often idle connections are swept (B-65).
SWEEP_INTERVAL = 60.0


def to_alabel_hostname(name: str) -> str:
    """to_alabel_hostname converts a host name to A-labels (B-107)."""
    try:
        return name.rstrip(".").encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise ConfigError("remote: cannot represent the hostname as an A-label name") from None


def parse_local_ip(text: str) -> str:
    """parse_local_ip accepts an IPv4/IPv6 address (brackets allowed) or a resolvable name."""
    t = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(t))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(t, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ConfigError("remote: failed to parse local IP") from None
    if not infos:
        raise ConfigError("remote: failed to parse local IP")
    return str(infos[0][4][0])


def _domain_of(addr: str) -> str:
    return addr.rpartition("@")[2]


def _msg_8bit(header: bytes, body: bytes) -> bool:
    return not (header.isascii() and body.isascii())


@dataclass
class _Idle:
    """_Idle is a parked connection and the MX as it was judged (host, MX and TLS level);
    the judgement holds for the connection's next uses too."""

    conn: SMTPConnection
    cand: MXCandidate
    parked: float = 0.0


class ConnPool:
    """ConnPool keeps idle connections per key: (recipient domain, security settings).

    A connection is parked after RSET and checked again with RSET when taken (B-60);
    at most ``max_idle`` per key (B-64); older than ``max_idle_time`` since its last
    command is closed with QUIT (B-65).
    """

    def __init__(self, max_idle: int, max_idle_time: float, log: Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_idle = max_idle
        self.max_idle_time = max_idle_time
        self.log = log
        self.clock = clock
        self.idle: dict[tuple[Any, ...], list[_Idle]] = {}
        self.closing = gevent.pool.Group()
        #: Set by close_all: a delivery finishing after it parks nothing (B-1, B-70).
        self.closed = False

    def take(self, key: tuple[Any, ...]) -> _Idle | None:
        """take returns a live idle connection for key, or None (LIFO: the freshest first)."""
        entries = self.idle.get(key)
        now = self.clock()
        while entries:
            entry = entries.pop()
            if now - entry.conn.last_used > self.max_idle_time:
                self._quit(entry.conn)
                continue
            if not entries:
                self.idle.pop(key, None)
            return entry
        self.idle.pop(key, None)
        return None

    def put(self, key: tuple[Any, ...], entry: _Idle) -> None:
        """put parks a connection (already reset), or closes it when the key is full."""
        if self.max_idle_time <= 0 or self.closed:
            self._quit(entry.conn)
            return
        entries = self.idle.setdefault(key, [])
        if len(entries) >= self.max_idle:
            self._quit(entry.conn)
            return
        entry.parked = self.clock()
        entries.append(entry)

    def sweep(self) -> None:
        """sweep closes connections idle for longer than max_idle_time."""
        now = self.clock()
        for key in list(self.idle):
            keep = []
            for entry in self.idle[key]:
                if now - entry.conn.last_used > self.max_idle_time:
                    self._quit(entry.conn)
                else:
                    keep.append(entry)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]

    def close_all(self, timeout: float = 5.0) -> None:
        """close_all sends QUIT to every idle connection (B-70) and waits for them; a
        connection put afterwards gets QUIT at once."""
        self.closed = True
        for key in list(self.idle):
            for entry in self.idle.pop(key):
                self._quit(entry.conn)
        self.closing.join(timeout=timeout)

    def _quit(self, conn: SMTPConnection) -> None:
        self.closing.spawn(conn.quit)

    def count(self) -> int:
        """count is the number of idle connections."""
        return sum(len(v) for v in self.idle.values())


@register("target.remote")
class RemoteTarget(ModuleBase):
    """RemoteTarget delivers to the recipient domains' MX hosts (``target.remote``)."""

    roles = (DeliveryTarget,)

    directives = (
        Directive(name="hostname", type=Custom(fn=lambda n, b: to_alabel_hostname(String().parse(n, b)), syntax_text="domain"), required=True, inherit_global=True, help="Name sent in EHLO/HELO; converted to A-labels."),
        Directive(name="limits", type=ModuleRef(role=Limits), default=None, help="Rate and concurrency limits (&name or an inline limits block)."),
        Directive(name="local_ip", type=Custom(fn=lambda n, b: parse_local_ip(String().parse(n, b)), syntax_text="IP address"), default=None, help="Source address for outbound connections."),
        Directive(name="force_ipv4", type=Bool(), default=False, help="Use only IPv4 addresses of MX hosts."),
        Directive(name="connect_timeout", type=Duration(), default=DEFAULT_CONNECT_TIMEOUT, help="Bound on resolving an MX host's addresses plus the TCP handshake (0 = 5m)."),
        Directive(name="command_timeout", type=Duration(), default=DEFAULT_COMMAND_TIMEOUT, help="Bound on each command reply, each body write and the TLS handshake (0 = 5m)."),
        Directive(name="submission_timeout", type=Duration(), default=DEFAULT_SUBMISSION_TIMEOUT, help="Wait for the reply to the final dot (0 = 12m)."),
        Directive(name="debug", type=Bool(), inherit_global=True, default=False, help="Verbose logging."),
        Directive(name="mx_auth", type=ModuleRef(role=MXAuthGroup, namespace=""), default=None, help="Security policies: an inline mx_auth block or &name of a shared one."),
        Directive(name="tls_client", type=TLS_CLIENT_TYPE, inherit_global=True, default_factory=TLSClientConfig, help="TLS settings for STARTTLS."),
        Directive(name="requiretls_override", type=Bool(), default=True, help="Let 'TLS-Required: No' in a message disable the mx_auth policies for it."),
        Directive(name="relaxed_requiretls", type=Bool(), default=True, help="Deliver REQUIRETLS messages to authenticated MXes that do not advertise REQUIRETLS."),
        Directive(name="conn_reuse_limit", type=Int(), default=10, help="Transactions per connection; 0 or less disables reuse."),
        Directive(name="conn_max_idle_count", type=Int(minimum=0), default=10, help="Idle connections kept per recipient domain."),
        Directive(name="conn_max_idle_time", type=Int(minimum=0), default=150, help="Seconds an idle connection stays usable."),
    )

    #: Injected for tests: the DNS resolver and the port MXes listen on.
    resolver: dns.Resolver | None = None
    smtp_port = 25

    def configure(self, inline: tuple[str, ...], settings: Settings) -> None:
        """configure derives the EHLO name, source address, timeouts and policies."""
        self.hostname = to_alabel_hostname(settings.hostname)
        self.local_ip = parse_local_ip(settings.local_ip) if settings.local_ip else None
        self.connect_timeout = settings.connect_timeout or DEFAULT_CONNECT_TIMEOUT
        self.command_timeout = settings.command_timeout or DEFAULT_COMMAND_TIMEOUT
        self.submission_timeout = settings.submission_timeout or DEFAULT_SUBMISSION_TIMEOUT
        self.tls_client: TLSClientConfig = settings.tls_client
        self.limits: Any = settings.limits
        self.mx_auth: Any = settings.mx_auth
        self.conn_reuse_limit: int = settings.conn_reuse_limit
        self.requiretls_override: bool = settings.requiretls_override
        # everything in a pool key but the domain and TLS-Required: No (see pool_key)
        self._key_settings = (self.hostname, self.local_ip, self.tls_client.key_tuple(), id(self.mx_auth))
        self.log = Logger("remote", settings.debug)
        self.pool = ConnPool(settings.conn_max_idle_count, float(settings.conn_max_idle_time), self.log)
        self._greenlets = gevent.pool.Group()
        self.rng = random.Random()

    def start(self) -> None:
        """start creates the resolver (if not injected) and the idle sweeper."""
        if self.resolver is None:
            # Many deliveries to one domain ask the same questions: cache positive answers
            # for their TTL (at most 5 minutes, as a local validating resolver would).
            self.resolver = dns.Resolver(cache_max_ttl=300)
        self.pool.closed = False
        self._greenlets.spawn(self._sweeper)

    def stop(self, timeout: float) -> None:
        """stop closes every idle connection with QUIT (B-70) and ends the sweeper."""
        self._greenlets.kill(block=True, timeout=1)
        self.pool.close_all(timeout=5.0)

    def _sweeper(self) -> None:
        while True:
            gevent.sleep(SWEEP_INTERVAL)
            try:
                self.pool.sweep()
            except Exception as e:  # noqa: BLE001 - the sweeper must survive
                self.log.error("pool sweep failed", e)

    def pool_key(self, domain: str, skip_policies: bool) -> tuple[Any, ...]:
        """pool_key is everything that changes a session's security, plus the domain (B-66)."""
        return (domain, self._key_settings, skip_policies)

    def start_delivery(self, meta: MsgMetadata, mail_from: str) -> RemoteDelivery:
        """start_delivery validates the sender and takes the message-level limit slots."""
        if mail_from and "@" not in mail_from and mail_from.lower() != "postmaster":
            raise E.MALFORMED_SENDER.error()
        if self.limits is not None:
            self.limits.take_msg(meta.src_ip, _domain_of(mail_from))
        return RemoteDelivery(self, meta, mail_from)


@dataclass
class _DomainConn:
    """_DomainConn is one recipient domain's connection within a delivery."""

    domain: str
    conn: SMTPConnection | None = None
    cand: MXCandidate | None = None
    error: SMTPError | None = None  # the domain failed for every recipient (no MX, MAIL)
    rcpts: list[str] = field(default_factory=list)
    dest_slot: bool = False
    reused: bool = False
    #: A pooled connection still owes the RSET that is pipelined before its MAIL (B-60:
    #: one RSET when parked, another when taken); when either fails a fresh connection is
    #: opened.
    pending_rset: bool = False
    mail_sent: bool = False
    #: The pool key the connection was taken with and goes back under (see pool_key).
    pool_key: tuple[Any, ...] | None = None


class RemoteDelivery:
    """RemoteDelivery is one message on its way to the recipient domains' MXes."""

    def __init__(self, target: RemoteTarget, meta: MsgMetadata, mail_from: str) -> None:
        self.t = target
        self.meta = meta
        self.mail_from = mail_from
        self.log = target.log
        self.domains: dict[str, _DomainConn] = {}
        self.rcpt_domain: dict[str, str] = {}
        self.skip_policies = bool(meta.tls_required_no and not meta.requiretls and target.requiretls_override)
        self._policies: list[DeliveryPolicy] | None = None
        self.done = False

    @property
    def policies(self) -> list[DeliveryPolicy]:
        """policies are the mx_auth checks of this delivery, started when first needed: a
        message that only uses pooled connections never consults them, as in maddy, where
        the pool is asked before the policies prepare the domain."""
        if self._policies is None:
            mx_auth = self.t.mx_auth
            if mx_auth is None or self.skip_policies:
                self._policies = []
            else:
                self._policies = [p.start_delivery(self.meta) for p in mx_auth.policies()]
        return self._policies

    # -- recipients ---------------------------------------------------------------

    def add_rcpt(self, rcpt: str) -> None:
        """add_rcpt adds one recipient, connecting to its domain first if needed."""
        err = self._check_rcpt(rcpt)
        if err is None:  # add_rcpts with one recipient, without its grouping
            err = self._add_domain_rcpts(_domain_of(rcpt).lower().rstrip("."), [rcpt])[rcpt]
        if err is not None:
            raise err

    def add_rcpts(self, rcpts: Sequence[str]) -> dict[str, SMTPError | None]:
        """add_rcpts adds recipients; per domain, MAIL/RCPT go out pipelined when offered."""
        results: dict[str, SMTPError | None] = {}
        by_domain: dict[str, list[str]] = {}
        for rcpt in rcpts:
            err = self._check_rcpt(rcpt)
            if err is not None:
                results[rcpt] = err
                continue
            by_domain.setdefault(_domain_of(rcpt).lower().rstrip("."), []).append(rcpt)
        for domain, group in by_domain.items():
            results.update(self._add_domain_rcpts(domain, group))
        return results

    def _check_rcpt(self, rcpt: str) -> SMTPError | None:
        if self.meta.quarantine:
            return E.QUARANTINED_AT_RCPT.error()
        if "@" not in rcpt:
            if rcpt.lower() == "postmaster":
                return E.POSTMASTER_NOT_SUPPORTED.error()
            return E.MALFORMED_RECIPIENT.error()
        domain = _domain_of(rcpt)
        if domain.startswith("[") or not domain:
            return E.IP_LITERAL_NOT_SUPPORTED.error() if domain else E.MALFORMED_RECIPIENT.error()
        return None

    def _add_domain_rcpts(self, domain: str, rcpts: list[str]) -> dict[str, SMTPError | None]:
        dc = self.domains.get(domain)
        if dc is None:
            dc = _DomainConn(domain)
            self.domains[domain] = dc
            try:
                self._open(dc)
            except SMTPError as e:
                dc.error = e
        if dc.error is not None:
            return {r: dc.error for r in rcpts}
        if not dc.mail_sent:
            return self._first_batch(dc, rcpts)
        assert dc.conn is not None
        out: dict[str, SMTPError | None] = {}
        for r in rcpts:
            try:
                dc.conn.rcpt(self._wire_address(dc.conn, r, sender=False))
            except SMTPError as e:
                out[r] = e
                if dc.conn.broken:
                    self._lost(dc, e, out)
                    for r2 in rcpts:
                        out.setdefault(r2, e)
                    break
                continue
            self._accepted(dc, r, out)
        return out

    def _lost(self, dc: _DomainConn, err: SMTPError, out: dict[str, SMTPError | None]) -> None:
        """_lost: the domain's connection broke after RCPTs were accepted on it (B-63).
        Those accepted in this call get ``err`` now; those accepted by earlier calls stay
        in ``dc.rcpts`` and get it at the body step, since nothing was sent for them."""
        self._drop(dc, err)
        for r in dc.rcpts:
            if r in out:
                out[r] = err
        dc.rcpts = [r for r in dc.rcpts if r not in out]

    def _accepted(self, dc: _DomainConn, rcpt: str, out: dict[str, SMTPError | None]) -> None:
        out[rcpt] = None
        dc.rcpts.append(rcpt)
        self.rcpt_domain[rcpt] = dc.domain

    def _first_batch(self, dc: _DomainConn, rcpts: list[str]) -> dict[str, SMTPError | None]:
        """_first_batch sends [RSET] MAIL RCPT... in one round trip when PIPELINING is offered.

        A pooled connection gets its RSET here (B-60); if that RSET fails, the connection
        was dead: it is discarded and the domain gets another connection, transparently.
        A failure after the RSET was answered is the envelope's (B-63, B-102). A MAIL
        failure is final for the domain (B-19, B-20).
        """
        out: dict[str, SMTPError | None] = {}
        for attempt in range(2):
            conn = dc.conn
            assert conn is not None
            try:
                params = self._mail_params(dc)
                sender = self._wire_address(conn, self.mail_from, sender=True)
            except SMTPError as e:
                dc.error = e
                return {r: e for r in rcpts}
            wires: list[tuple[str, str]] = []
            for r in rcpts:
                try:
                    wires.append((r, self._wire_address(conn, r, sender=False)))
                except SMTPError as e:
                    out[r] = e
            try:
                mail_res, rcpt_res = conn.mail_rcpts(sender, params, [w for _, w in wires], rset_first=dc.pending_rset)
            except SMTPError as e:
                conn.close()
                dc.conn = None
                # Only a failed RSET shows a dead pooled connection (B-60); an error after
                # the server answered it is the envelope's own (B-63, B-102).
                if dc.pending_rset and attempt == 0 and not conn.rset_answered:
                    self.log.debug("pooled connection is dead, opening another", domain=dc.domain, reason=str(e))
                    dc.pending_rset = False
                    try:
                        self._open(dc, use_pool=False)
                    except SMTPError as e2:
                        e = e2
                    else:
                        continue
                self._release_dest(dc)
                dc.error = e
                return {r: e for r in rcpts}
            dc.pending_rset = False
            if isinstance(mail_res, SMTPError):
                self.log.error("MAIL failed", mail_res, domain=dc.domain, remote_server=conn.remote_server)
                conn.quit()
                dc.conn = None
                self._release_dest(dc)
                dc.error = mail_res
                return {r: mail_res for r in rcpts}
            dc.mail_sent = True
            for (r, _), res in zip(wires, rcpt_res, strict=True):
                if isinstance(res, SMTPError):
                    out[r] = res
                else:
                    self._accepted(dc, r, out)
            if conn.broken:
                # the server's own 421 says why, when it closed the connection (B-63)
                closing = [res for res in rcpt_res if isinstance(res, SMTPError) and res.code == 421]
                self._lost(dc, closing[0] if closing else E.NETWORK_IO.error(
                    remote_server=conn.remote_server, reason=conn.broken_reason or "connection lost"), out)
            return out
        raise AssertionError("unreachable")

    def _wire_address(self, conn: SMTPConnection, addr: str, *, sender: bool) -> str:
        if addr.isascii() or (self.meta.smtputf8 and conn.supports("SMTPUTF8")):
            return addr
        try:
            return to_ascii_address(addr)
        except ValueError:
            raise (E.SMTPUTF8_SENDER if sender else E.SMTPUTF8_RECIPIENT).error() from None

    def _drop(self, dc: _DomainConn, err: SMTPError) -> None:
        """_drop closes a domain's connection after a failure; its recipients get err."""
        if dc.conn is not None:
            dc.conn.close()
            dc.conn = None
        dc.error = dc.error or err
        self._release_dest(dc)

    # -- connecting ---------------------------------------------------------------

    def _open(self, dc: _DomainConn, use_pool: bool = True) -> None:
        """_open gives the domain a connection (pooled or new) and its destination slot."""
        key = dc.pool_key = self.t.pool_key(dc.domain, self.skip_policies)
        if use_pool and not self.meta.requiretls:  # REQUIRETLS never uses the pool (B-68)
            idle = self.t.pool.take(key)
            if idle is not None:
                cand = idle.cand
                self.log.info("reusing cached connection", domain=dc.domain, transactions_counter=idle.conn.transactions,
                              local_addr=f"{idle.conn.local_address[0]}:{idle.conn.local_address[1]}",
                              remote_addr=f"{idle.conn.remote_address[0]}:{idle.conn.remote_address[1]}")
                dc.conn, dc.cand, dc.reused, dc.pending_rset = idle.conn, cand, True, True
                self._take_dest(dc)
                return
        self._connect_domain(dc)
        self._take_dest(dc)

    def _take_dest(self, dc: _DomainConn) -> None:
        """_take_dest waits for the destination slot before MAIL (B-114, B-118)."""
        limits = self.t.limits
        if limits is None or dc.dest_slot:
            return
        try:
            limits.take_dest(dc.domain)
        except SMTPError:
            if dc.conn is not None:
                dc.conn.quit()
                dc.conn = None
            raise
        dc.dest_slot = True

    def _mail_params(self, dc: _DomainConn) -> dict[str, str | None]:
        """_mail_params are the MAIL parameters the server supports (B-85..B-93, B-71)."""
        conn = dc.conn
        assert conn is not None
        params: dict[str, str | None] = {}
        if self.meta.smtputf8 and conn.supports("SMTPUTF8"):
            params["SMTPUTF8"] = None
        if self.meta.body_8bit and conn.supports("8BITMIME"):
            params["BODY"] = "8BITMIME"
        if self.meta.size is not None and conn.supports("SIZE"):
            limit = conn.max_size
            if limit and self.meta.size > limit:
                raise E.MESSAGE_TOO_BIG.error(remote_server=conn.remote_server)
            params["SIZE"] = str(self.meta.size)
        cand = dc.cand
        if self.meta.requiretls and conn.supports("REQUIRETLS") and cand is not None and cand.tls_level == TLSLevel.AUTHENTICATED:
            params["REQUIRETLS"] = None
        return params

    def _resolve_mx(self, domain: str) -> tuple[list[MXCandidate], bool]:
        resolver = self.t.resolver
        assert resolver is not None
        try:
            ans = resolver.lookup_mx(domain)
        except dns.DNSError as e:
            if e.kind == "nxdomain":
                raise E.MX_LOOKUP_PERM.error(reason=str(e)) from None
            raise E.MX_LOOKUP_TEMP.error(reason=str(e)) from None
        if ans.null_mx:
            raise E.NULL_MX.error()
        ordered = dns.ordered_mx(ans.records, self.t.rng)
        cands = [MXCandidate(domain, host if host.endswith(".") else host + ".", pref, mx_authenticated=ans.authenticated,
                             implicit=ans.implicit, resolver=resolver)
                 for pref, host in ordered]
        return cands, ans.authenticated

    def _connect_domain(self, dc: _DomainConn) -> None:
        """_connect_domain tries the MXes in order until one passes every check."""
        for p in self.policies:
            p.prepare_domain(dc.domain, self.t.resolver)
        cands, _ = self._resolve_mx(dc.domain)
        last: SMTPError | None = None
        any_temp = False
        requiretls_err: SMTPError | None = None
        for cand in cands:
            try:
                self._try_mx(cand)
            except SMTPError as e:
                last = e
                any_temp = any_temp or e.temporary
                if e.enhanced == (5, 7, 30):
                    requiretls_err = e
                # The policy's own diagnostic fields (required_mx_level, required_tls_level,
                # ...) go into the log line next to the levels reached (C-13).
                fields = {k: v for k, v in e.fields.items() if k not in ("remote_server", "domain", "reason")}
                fields.setdefault("mx_level", str(cand.mx_level))
                fields.setdefault("tls_level", str(cand.tls_level))
                if cand.tls_err:
                    fields.setdefault("tls_err", cand.tls_err)
                self.log.info("cannot use MX", remote_server=cand.host, domain=dc.domain, reason=str(e), **fields)
                continue
            dc.conn, dc.cand = cand.conn, cand
            self.log.debug("connected", domain=dc.domain, remote_server=cand.host, mx_level=str(cand.mx_level), tls_level=str(cand.tls_level))
            return
        if last is None:
            raise E.no_usable_mxs("no MX records", temporary=False)
        if any_temp:
            raise E.no_usable_mxs(last, temporary=True)
        if self.meta.requiretls and requiretls_err is not None:
            raise requiretls_err
        raise E.no_usable_mxs(last, temporary=False)

    def _try_mx(self, cand: MXCandidate) -> None:
        """_try_mx judges and connects one MX; raises the per-MX error on any failure."""
        for p in self.policies:
            level = p.check_mx(cand)
            if level > cand.mx_level:
                cand.mx_level = level
        if self.meta.requiretls and cand.mx_level < MXLevel.MTASTS:
            raise E.REQUIRETLS_MX_UNAUTHENTICATED.error(remote_server=cand.host)
        for p in self.policies:
            p.prepare_conn(cand)
        conn = self._ladder(cand)
        cand.conn = conn
        try:
            for p in self.policies:
                tls_level = p.check_conn(cand)
                if tls_level > cand.tls_level:
                    cand.tls_level = tls_level
            if self.meta.requiretls:
                if cand.tls_level < TLSLevel.AUTHENTICATED:
                    raise E.REQUIRETLS_TLS_UNAUTHENTICATED.error(remote_server=cand.host)
                if not self.t.settings.relaxed_requiretls and not conn.supports("REQUIRETLS"):
                    raise E.REQUIRETLS_NOT_SUPPORTED.error(remote_server=cand.host)
        except SMTPError:
            conn.quit()
            cand.conn = None
            raise

    def _dial(self, cand: MXCandidate) -> SMTPConnection:
        """_dial resolves the MX host's addresses and opens TCP, within connect_timeout."""
        t = self.t
        resolver = t.resolver
        assert resolver is not None
        deadline = time.monotonic() + t.connect_timeout
        try:
            # With force_ipv4 the AAAA answer is still asked for, so that an IPv6-only host
            # is told apart from a host without addresses (B-110 vs B-15).
            addrs = resolver.lookup_addrs(cand.host, want_v6=True,
                                          lifetime=max(0.001, deadline - time.monotonic()))
        except dns.DNSError as e:
            raise (E.DNS_ERROR_TEMP if e.temporary else E.DNS_ERROR_PERM).error(remote_server=cand.host, reason=str(e)) from None
        ips = addrs.addresses
        if t.settings.force_ipv4:
            ips = [ip for ip in ips if ":" not in ip]
        if not ips:
            if t.settings.force_ipv4:
                raise E.NETWORK_IO.error(remote_server=cand.host, reason="no IPv4 address")
            raise E.DNS_ERROR_PERM.error(remote_server=cand.host, reason="no address")
        return SMTPConnection.connect(
            ips, t.smtp_port, timeout=max(0.001, deadline - time.monotonic()), local_ip=t.local_ip,
            remote_server=cand.host, command_timeout=t.command_timeout, submission_timeout=t.submission_timeout,
        )

    def _session(self, cand: MXCandidate) -> SMTPConnection:
        conn = self._dial(cand)
        try:
            conn.greet()
            conn.ehlo(self.t.hostname)
        except SMTPError:
            conn.close()
            raise
        return conn

    def _ladder(self, cand: MXCandidate) -> SMTPConnection:
        """_ladder: verified TLS → unverified TLS on a new connection → plaintext (B-44..B-51).

        At worst one MX costs three TCP connections (B-49); an error of any kind on the
        unverified stage drops to plaintext, so there is no loop. A negative reply to
        STARTTLS itself fails the MX with no fallback (B-50).
        """
        conn = self._session(cand)
        step = self._upgrade(conn, cand, verify=True)
        if step is None:
            return conn
        if step == "verify":
            self.log.info("TLS verify error, trying without authentication", remote_server=cand.host, domain=cand.domain, reason=cand.tls_err)
            conn = self._session(cand)
            if self._upgrade(conn, cand, verify=False) is None:
                return conn
        self.log.info("TLS error, trying plaintext", remote_server=cand.host, domain=cand.domain, reason=cand.tls_err)
        return self._plaintext(cand)

    def _upgrade(self, conn: SMTPConnection, cand: MXCandidate, *, verify: bool) -> str | None:
        """_upgrade tries STARTTLS on ``conn``: None when the connection is usable (TLS reached,
        or STARTTLS not offered), "verify" or "error" when it failed and was closed."""
        if not conn.supports("STARTTLS"):
            cand.tls_level = TLSLevel.NONE
            return None
        t = self.t
        try:
            conn.starttls(t.tls_client.context(verify=verify), cand.host.rstrip("."))
            conn.ehlo(t.hostname)
        except E.STARTTLSRejected as e:
            conn.close()
            if verify:
                raise  # no fallback (B-50)
            cand.tls_err = e.message  # on the unverified stage every error drops to plaintext (B-49)
            return "error"
        except E.TLSHandshakeError as e:
            conn.close()
            cand.tls_err = e.fields.get("tls_err") or e.message
            return "verify" if verify and e.kind == "verify" else "error"
        except SMTPError as e:
            # On the verified stage a failure before TLS (the connection broke) fails the
            # MX; an EHLO refused inside TLS, by any reply, 421 included, is a TLS error
            # (B-51). On the unverified stage every error drops to plaintext.
            within_tls = conn.tls and ("smtp_code" in e.fields or not conn.broken)
            conn.close()
            if verify and not within_tls:
                raise
            cand.tls_err = e.message
            return "error"
        cand.tls_level = TLSLevel.AUTHENTICATED if verify else TLSLevel.ENCRYPTED
        return None

    def _plaintext(self, cand: MXCandidate) -> SMTPConnection:
        cand.tls_level = TLSLevel.NONE
        return self._session(cand)

    # -- body -----------------------------------------------------------------------

    def body_per_rcpt(self, header: bytes, body: bytes) -> Mapping[str, Exception | None]:
        """body_per_rcpt sends the message on every domain connection in parallel."""
        results: dict[str, Exception | None] = {}
        for dc in self.domains.values():
            if dc.conn is None and dc.rcpts:  # accepted, then the connection broke (B-63)
                for r in dc.rcpts:
                    results[r] = dc.error or E.NETWORK_IO.error(reason="connection lost")
                dc.rcpts = []
        if self.meta.quarantine:
            for dc in self.domains.values():
                for r in dc.rcpts:
                    results[r] = E.QUARANTINED_AT_BODY.error()
            return results
        active = [dc for dc in self.domains.values() if dc.conn is not None and dc.rcpts]
        parts = (header, b"\r\n", body) if header else (body,)  # joined by the client, not held here
        is_8bit = _msg_8bit(header, body)

        def send(dc: _DomainConn) -> None:
            conn = dc.conn
            assert conn is not None
            err: SMTPError | None = None
            if self.meta.smtputf8 and not conn.supports("SMTPUTF8") and not header.isascii():
                err = E.SMTPUTF8_HEADER.error(remote_server=conn.remote_server)
            elif is_8bit and not conn.supports("8BITMIME"):
                err = E.EIGHTBITMIME_UNSUPPORTED.error(remote_server=conn.remote_server)
            if err is not None:
                try:
                    conn.rset()  # the connection stays reusable (B-91)
                except SMTPError:
                    self._drop(dc, err)
                for r in dc.rcpts:
                    results[r] = err
                dc.rcpts = []
                return
            try:
                conn.send_message(*parts)
            except SMTPError as e:
                for r in dc.rcpts:
                    results[r] = e
                conn.close() if conn.broken else conn.quit()  # never reused after DATA failed (B-62)
                dc.conn = None
                self._release_dest(dc)
                return
            for r in dc.rcpts:
                results[r] = None

        if len(active) == 1:
            send(active[0])
        else:
            group = gevent.pool.Group()
            for dc in active:
                group.spawn(send, dc)
            group.join(raise_error=True)  # an unexpected error is not a delivery
        return results

    def body(self, header: bytes, body: bytes) -> None:
        """body sends the message atomically: any failure is one error (B-36, B-37)."""
        results = self.body_per_rcpt(header, body)
        errs = [e for e in results.values() if e is not None]
        if not errs:
            return
        if len(results) == 1:
            raise errs[0]
        temporary = any(getattr(e, "temporary", True) for e in errs)
        raise E.partial_delivery(temporary=temporary)

    # -- finishing ------------------------------------------------------------------

    def commit(self) -> None:
        """commit parks reusable connections and releases the limit slots."""
        self._finish()

    def abort(self) -> None:
        """abort resets the connections (no DATA) and parks them (B-42)."""
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        t = self.t
        try:
            for dc in self.domains.values():
                conn = dc.conn
                dc.conn = None
                self._release_dest(dc)
                if conn is not None:
                    self._park(dc, conn)
        finally:
            # whatever failed above, no slot and no connection is left behind (B-1)
            for dc in self.domains.values():
                self._release_dest(dc)
                if dc.conn is not None:
                    dc.conn.close()
                    dc.conn = None
            for p in self._policies or ():
                p.close()
            if t.limits is not None:
                t.limits.release_msg(self.meta.src_ip, _domain_of(self.mail_from))

    def _park(self, dc: _DomainConn, conn: SMTPConnection) -> None:
        """_park puts a connection back in the pool, or ends it when it may not serve again."""
        t = self.t
        reuse_limit = t.conn_reuse_limit
        if conn.broken or reuse_limit <= 0 or conn.transactions >= reuse_limit or self.skip_policies:
            conn.quit()  # TLS-Required: No connections never serve other mail (B-66)
            return
        try:
            # sent once the message's reply is in (see send_message); its own reply
            # is read with the next use (B-60)
            conn.rset_deferred()
        except SMTPError:
            conn.close()
            return
        cand = dc.cand
        assert cand is not None
        t.pool.put(dc.pool_key or t.pool_key(dc.domain, self.skip_policies), _Idle(conn, cand))

    def _release_dest(self, dc: _DomainConn) -> None:
        if dc.dest_slot and self.t.limits is not None:
            self.t.limits.release_dest(dc.domain)
        dc.dest_slot = False

    def describe(self, rcpt: str) -> dict[str, str]:
        """describe returns the MX, TLS level and MX level used for a recipient."""
        dc = self.domains.get(self.rcpt_domain.get(rcpt, _domain_of(rcpt).lower()))
        if dc is None or dc.cand is None:
            return {"mx": "-", "tls_level": "-", "mx_level": "-"}
        return {"mx": dc.cand.host, "tls_level": str(dc.cand.tls_level), "mx_level": str(dc.cand.mx_level)}
