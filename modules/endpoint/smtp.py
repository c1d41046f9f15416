"""smtp: the SMTP endpoint that accepts mail for relaying (maddy's ``smtp`` module).

Registered name: ``smtp``. Roles: Endpoint. Syntax::

    smtp tcp://127.0.0.1:2525 tcp://[::1]:2525 {
        hostname mx.example.org
        deliver_to &queue
    }

It implements the RFC 5321 server side an outbound relay needs: EHLO/HELO, MAIL, RCPT,
DATA, RSET, NOOP, QUIT, STARTTLS [RFC 3207], PIPELINING [RFC 2920], 8BITMIME
[RFC 6152], SMTPUTF8 [RFC 6531], SIZE [RFC 1870], ENHANCEDSTATUSCODES [RFC 2034] and
REQUIRETLS [RFC 8689]. It is never an open relay: only loopback clients are served
unless ``allow_sources`` lists other networks. Each session runs in a greenlet owned by
the endpoint's pool; the listening sockets come from the runtime's listener pool so
that a reload hands them over without closing them (E-6).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import uuid
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.pool
import gevent.server

from maddylite.config.directives import (
    AddressList,
    Bool,
    DataSize,
    Directive,
    Duration,
    Int,
    ModuleRef,
    Settings,
    StringList,
)
from maddylite.config.directives import String as StringType
from maddylite.config.errors import ConfigError
from maddylite.interfaces import Delivery, DeliveryTarget, Endpoint, Limits, MsgMetadata
from maddylite.log import Logger
from maddylite.registry import ModuleBase, register
from maddylite.tls import TLS_SERVER_TYPE, TLSServerConfig

#: Longest command line accepted, CRLF included [RFC 5321 §4.5.3.1.4].
MAX_LINE = 1000
#: Longest line inside DATA (header or body) accepted before the message is refused.
MAX_DATA_LINE = 1000 * 64
#: Commands without progress (NOOP, RSET, failed commands) before the session is closed.
MAX_IDLE_COMMANDS = 100


def _net_list(args: Sequence[str]) -> tuple[Any, ...]:
    nets = []
    for a in args:
        try:
            nets.append(ipaddress.ip_network(a, strict=False))
        except ValueError:
            raise ConfigError(f"invalid network: {a}") from None
    return tuple(nets)


class _Networks(StringList):
    syntax = "network..."

    def parse_args(self, args: Sequence[str]) -> tuple[Any, ...]:
        return _net_list(super().parse_args(args))


def is_loopback(ip: str) -> bool:
    """is_loopback tells whether ``ip`` is 127.0.0.0/8, ::1 or an IPv4-mapped loopback."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def normalize_address(addr: str) -> str:
    """normalize_address lower-cases the domain and turns A-labels into U-labels (B-26)."""
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr
    domain = domain.lower().rstrip(".")
    if domain.startswith("["):
        return f"{local}@{domain}"
    try:
        domain = domain.encode("ascii").decode("idna") if "xn--" in domain else domain
    except UnicodeError:
        pass
    return f"{local}@{domain}"


def _parse_path(arg: str, keyword: str) -> tuple[str, list[str]] | None:
    """_parse_path splits ``FROM:<addr> PARAMS`` into the address and parameters."""
    if not arg[: len(keyword) + 1].upper() == keyword + ":":
        return None
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    if not rest.startswith("<"):
        return None
    end = rest.find(">")
    if end < 0:
        return None
    addr = rest[1:end]
    if addr.startswith("@") and ":" in addr:  # source route [RFC 5321 §4.1.2]
        addr = addr.split(":", 1)[1]
    params = rest[end + 1 :].split()
    return addr, params


class _Session:
    """_Session is one SMTP conversation with one client."""

    def __init__(self, ep: SMTPEndpoint, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        self.ep = ep
        self.sock = sock
        self.peer_ip = str(peer[0])
        sock.settimeout(ep.settings.read_timeout)
        self.rfile = sock.makefile("rb")
        self.tls = False
        self.helo: str | None = None
        self.esmtp = False
        self.idle_commands = 0
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.meta: MsgMetadata | None = None
        self.delivery: Delivery | None = None
        self.rcpts: list[str] = []

    def abort(self) -> None:
        if self.delivery is not None:
            try:
                self.delivery.abort()
            except Exception as e:  # noqa: BLE001
                self.ep.log.error("abort failed", e)
        self.reset()

    def reply(self, code: int, enhanced: str, text: str) -> None:
        lines = text.split("\n")
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{code}{sep}{enhanced + ' ' if enhanced and self.esmtp else ''}{line}\r\n")
        self.sock.sendall("".join(out).encode("utf-8", "replace"))

    def reply_err(self, err: Exception) -> None:
        code = getattr(err, "code", 451)
        enh = getattr(err, "enhanced", (4, 0, 0))
        enh_text = ".".join(str(x) for x in enh) if isinstance(enh, tuple) else str(enh)
        msg = getattr(err, "message", None) or str(err) or "Internal error"
        self.reply(int(code), enh_text, msg)

    def readline(self, limit: int = MAX_LINE) -> bytes | None:
        line = self.rfile.readline(limit + 1)
        if not line:
            return None
        return line

    def serve(self) -> None:
        ep = self.ep
        if not ep.source_allowed(self.peer_ip):
            self.reply(554, "5.7.1", f"{ep.hostname} relaying denied for {self.peer_ip}")
            return
        self.reply(220, "", f"{ep.hostname} ESMTP maddylite")
        while True:
            try:
                line = self.readline()
            except TimeoutError:
                self.reply(421, "4.4.2", "Idle timeout, closing connection")
                return
            if line is None:
                return
            if len(line) > MAX_LINE or not line.endswith(b"\n"):
                self.reply(500, "5.5.2", "Line too long")
                self._drain_line(line)
                continue
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            handler = getattr(self, f"cmd_{verb.lower()}", None) if verb.isalpha() else None
            if handler is None:
                self.reply(500, "5.5.1", "Unknown command")
                self.idle_commands += 1
            else:
                if handler(arg) is False:
                    return
            if verb in ("NOOP", "RSET", "VRFY", "HELP"):
                self.idle_commands += 1
            if self.idle_commands > MAX_IDLE_COMMANDS:
                self.reply(421, "4.7.0", "Too many commands without progress, closing connection")
                return

    def _drain_line(self, line: bytes) -> None:
        while line and not line.endswith(b"\n"):
            line = self.rfile.readline(MAX_LINE)

    # -- commands --------------------------------------------------------------

    def cmd_helo(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def cmd_ehlo(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def _greet(self, arg: str, esmtp: bool) -> None:
        if not arg.strip():
            self.reply(501, "5.5.4", "Domain name required")
            return
        self.abort()
        self.helo = arg.strip()
        self.esmtp = esmtp
        ep = self.ep
        if not esmtp:
            self.reply(250, "", f"{ep.hostname}")
            return
        caps = [f"{ep.hostname} Hello {self.helo}", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        caps.append(f"SIZE {ep.settings.max_message_size}")
        if ep.tls_context is not None and not self.tls:
            caps.append("STARTTLS")
        caps.append("REQUIRETLS")
        body = "".join(f"250-{c}\r\n" for c in caps[:-1]) + f"250 {caps[-1]}\r\n"
        self.sock.sendall(body.encode())

    def cmd_starttls(self, arg: str) -> bool | None:
        ep = self.ep
        if ep.tls_context is None or self.tls:
            self.reply(502, "5.5.1", "STARTTLS not available")
            return None
        if self.helo is None:
            self.reply(503, "5.5.1", "EHLO first")
            return None
        self.reply(220, "2.0.0", "Ready to start TLS")
        try:
            with gevent.Timeout(60):
                self.sock = ep.tls_context.wrap_socket(self.sock, server_side=True)
        except (OSError, gevent.Timeout) as e:
            ep.log.debug("TLS handshake failed", src_ip=self.peer_ip, reason=str(e))
            return False
        self.sock.settimeout(ep.settings.read_timeout)
        self.rfile = self.sock.makefile("rb")
        self.tls = True
        self.helo = None
        self.abort()
        return None

    def cmd_noop(self, arg: str) -> None:
        self.reply(250, "2.0.0", "OK")

    def cmd_rset(self, arg: str) -> None:
        self.abort()
        self.reply(250, "2.0.0", "Session reset")

    def cmd_vrfy(self, arg: str) -> None:
        self.reply(252, "2.5.0", "Cannot VRFY user")

    def cmd_quit(self, arg: str) -> bool:
        self.abort()
        self.reply(221, "2.0.0", "Bye")
        return False

    def cmd_mail(self, arg: str) -> None:
        if self.helo is None:
            self.reply(503, "5.5.1", "Send EHLO first")
            return
        if self.mail_from is not None:
            self.reply(503, "5.5.1", "Nested MAIL command")
            return
        parsed = _parse_path(arg, "FROM")
        if parsed is None:
            self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        addr, params = parsed
        meta = MsgMetadata(id=uuid.uuid4().hex, src_ip=self.peer_ip)
        for p in params:
            key, _, value = p.partition("=")
            key = key.upper()
            if not self.esmtp:
                self.reply(501, "5.5.4", "MAIL parameters need EHLO")
                return
            if key == "SIZE":
                if not value.isdigit():
                    self.reply(501, "5.5.4", "Malformed SIZE parameter")
                    return
                if int(value) > self.ep.settings.max_message_size:
                    self.reply(552, "5.3.4", "Message size exceeds the limit")
                    return
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self.reply(501, "5.5.4", "Unknown BODY type")
                    return
                meta.body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8" and not value:
                meta.smtputf8 = True
            elif key == "REQUIRETLS" and not value:
                meta.requiretls = True
            elif key in ("RET", "ENVID", "AUTH"):
                pass  # accepted, not passed on (B-94)
            else:
                self.reply(555, "5.5.4", f"Unsupported MAIL parameter: {key}")
                return
        if not addr.isascii() and not meta.smtputf8:
            self.reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
            return
        if addr and "@" not in addr and addr.lower() != "postmaster":
            self.reply(501, "5.1.7", "Malformed sender address")
            return
        try:
            if self.ep.limits is not None:
                self.ep.limits.take_msg(self.peer_ip, addr.rpartition("@")[2])
            delivery = self.ep.target.start_delivery(meta, normalize_address(addr))
        except Exception as e:  # noqa: BLE001 - becomes the reply
            self.reply_err(e)
            return
        self.mail_from, self.meta, self.delivery = addr, meta, delivery
        self.idle_commands = 0
        self.reply(250, "2.1.0", "OK")

    def cmd_rcpt(self, arg: str) -> None:
        if self.delivery is None:
            self.reply(503, "5.5.1", "Send MAIL first")
            return
        parsed = _parse_path(arg, "TO")
        if parsed is None or not parsed[0]:
            self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        addr, params = parsed
        for p in params:
            if p.partition("=")[0].upper() not in ("NOTIFY", "ORCPT"):
                self.reply(555, "5.5.4", f"Unsupported RCPT parameter: {p.partition('=')[0]}")
                return
        if len(self.rcpts) >= self.ep.settings.max_recipients:
            self.reply(452, "4.5.3", "Too many recipients")
            return
        assert self.meta is not None
        if not addr.isascii() and not self.meta.smtputf8:
            self.reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
            return
        norm = normalize_address(addr)
        try:
            self.delivery.add_rcpt(norm)
        except Exception as e:  # noqa: BLE001 - becomes the reply
            self.reply_err(e)
            return
        self.meta.original_rcpts[norm] = addr
        self.rcpts.append(norm)
        self.reply(250, "2.1.5", "OK")

    def cmd_data(self, arg: str) -> bool | None:
        if self.delivery is None or not self.rcpts:
            self.reply(503, "5.5.1", "Send RCPT first" if self.delivery else "Send MAIL first")
            return None
        self.reply(354, "", "Go ahead, end with <CRLF>.<CRLF>")
        data, problem = self._read_data()
        if data is None:
            return False
        if problem is not None:
            self.abort()
            self.reply(*problem)
            return None
        header, body = split_message(data)
        assert self.meta is not None
        self.meta.size = len(data)
        self.meta.tls_required_no = tls_required_no(header)
        if self.meta.requiretls:
            self.meta.tls_required_no = False  # RFC 8689 §3: REQUIRETLS wins
        try:
            self.delivery.body(header, body)
            self.delivery.commit()
        except Exception as e:  # noqa: BLE001 - becomes the reply
            self.abort()
            self.reply_err(e)
            return None
        self.ep.log.info("accepted", msg_id=self.meta.id, src_ip=self.peer_ip, rcpts=len(self.rcpts))
        msg_id = self.meta.id
        self.reset()
        self.reply(250, "2.0.0", f"OK: queued as {msg_id}")
        return None

    def _read_data(self) -> tuple[bytes | None, tuple[int, str, str] | None]:
        """_read_data reads up to the final dot; returns (data, error reply or None).

        Only ``<CRLF>.<CRLF>`` ends the data, so a bare-LF dot cannot split a message;
        a message with a bare LF, bare CR or NUL is read to the end and refused.
        """
        limit = self.ep.settings.max_message_size
        chunks: list[bytes] = []
        size = 0
        problem: tuple[int, str, str] | None = None
        while True:
            try:
                line = self.rfile.readline(MAX_DATA_LINE + 1)
            except TimeoutError:
                return None, None
            if not line:
                return None, None
            if line == b".\r\n":
                break
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                if len(line) > MAX_DATA_LINE:
                    problem = problem or (500, "5.5.2", "Line too long")
                else:
                    problem = problem or (550, "5.5.2", "Bare CR or LF characters are not allowed")
            if b"\x00" in line:
                problem = problem or (550, "5.6.0", "NUL characters are not allowed")
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if size > limit:
                problem = problem or (552, "5.3.4", "Message size exceeds the limit")
                continue
            if problem is None:
                chunks.append(line)
        return b"".join(chunks), problem


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """split_message splits a message at the first empty line into header and body."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    idx = data.find(b"\r\n\r\n")
    if idx < 0:
        return data, b""
    return data[: idx + 2], data[idx + 4 :]


def tls_required_no(header: bytes) -> bool:
    """tls_required_no tells whether the header has ``TLS-Required: No`` (B-81)."""
    value = None
    name = b""
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and name == b"tls-required" and value is not None:
            value += line
            continue
        name, colon, rest = line.partition(b":")
        name = name.strip().lower()
        if colon and name == b"tls-required":
            value = rest
    return value is not None and value.strip().lower() == b"no"


@register("smtp")
class SMTPEndpoint(ModuleBase):
    """SMTPEndpoint is the ``smtp`` listener: it accepts mail and hands it to ``deliver_to``."""

    roles = (Endpoint,)
    inline_args = 64

    directives = (
        Directive(name="hostname", type=StringType(), required=True, inherit_global=True, help="Name in the greeting and EHLO reply."),
        Directive(name="deliver_to", type=ModuleRef(role=DeliveryTarget, namespace="target"), required=True, help="Where accepted messages go: &name of a target or an inline target block."),
        Directive(name="max_message_size", type=DataSize(), default=32 * 1024 * 1024, help="Largest message accepted (SIZE)."),
        Directive(name="max_recipients", type=Int(minimum=1), default=20000, help="Most recipients in one transaction."),
        Directive(name="tls", type=TLS_SERVER_TYPE, inherit_global=True, default=None, help="Certificate and key for STARTTLS, or 'off'."),
        Directive(name="limits", type=ModuleRef(role=Limits), default=None, help="Rate and concurrency limits for incoming messages."),
        Directive(name="allow_sources", type=_Networks(), default=(), help="Networks (besides loopback) whose clients may relay mail. Never list the whole Internet."),
        Directive(name="read_timeout", type=Duration(), default=600.0, help="How long to wait for a client's next command or line."),
        Directive(name="shutdown_timeout", type=Duration(), default=180.0, help="How long open sessions may continue after stop or reload."),
        Directive(name="debug", type=Bool(), inherit_global=True, default=False, help="Verbose logging."),
    )

    def configure(self, inline: tuple[str, ...], settings: Settings) -> None:
        """configure checks the listen addresses given as block arguments."""
        if not inline:
            raise ConfigError("smtp: at least one listen address is required (tcp://host:port)")
        self.addresses = AddressList().parse_args(inline)
        self.hostname: str = settings.hostname
        self.target: DeliveryTarget = settings.deliver_to
        self.limits: Limits | None = settings.limits
        self.tls_config: TLSServerConfig | None = settings.tls
        self.allow = tuple(settings.allow_sources)
        self.log = Logger("smtp", settings.debug)
        self.tls_context: ssl.SSLContext | None = None
        self._servers: list[gevent.server.StreamServer] = []
        self._acquired: list[Any] = []
        self._sessions = gevent.pool.Group()

    def source_allowed(self, ip: str) -> bool:
        """source_allowed is the relay guard: loopback, or a network in allow_sources."""
        if is_loopback(ip) or ip == "":
            return True
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        return any(addr in net for net in self.allow)

    def start(self) -> None:
        """start takes the listening sockets from the pool and starts accepting."""
        if self.tls_config is not None and self.tls_config.enabled:
            self.tls_context = self.tls_config.context()
        assert self.runtime is not None
        for addr in self.addresses:
            sock = self.runtime.listeners.acquire(addr, self.runtime.runtime_dir)
            self._acquired.append(addr)
            server = gevent.server.StreamServer(sock, self._handle, spawn=self._sessions.spawn)
            server.start()
            self._servers.append(server)
            self.log.info("listening", address=str(addr))

    def _handle(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        session = _Session(self, sock, peer)
        try:
            session.serve()
        except (OSError, gevent.Timeout) as e:
            self.log.debug("session ended", src_ip=session.peer_ip, reason=str(e))
        except Exception as e:  # noqa: BLE001 - one broken session must not hurt others
            self.log.error("session crashed", e, src_ip=session.peer_ip)
        finally:
            session.abort()
            try:
                session.sock.close()
            except OSError:
                pass

    def early_stop(self) -> None:
        """early_stop stops accepting; open sessions continue."""
        for s in self._servers:
            s.stop_accepting()

    def resume(self) -> None:
        """resume accepts again after a failed reload (E-11)."""
        for s in self._servers:
            s.start_accepting()

    def stop(self, timeout: float) -> None:
        """stop closes the listeners and lets sessions finish within shutdown_timeout."""
        for s in self._servers:
            s.stop_accepting()
            try:
                s.socket.close()
            except OSError:
                pass
        self._servers.clear()
        self._sessions.join(timeout=min(timeout, self.settings.shutdown_timeout))
        self._sessions.kill(block=True, timeout=1)
        assert self.runtime is not None
        for addr in self._acquired:
            self.runtime.listeners.release(addr)
        self._acquired.clear()
