"""smtp: the SMTP endpoint that accepts mail for relaying (maddy's ``smtp`` module).

Registered name: ``smtp``. Roles: Endpoint. Syntax::

    smtp tcp://127.0.0.1:2525 tcp://[::1]:2525 {
        hostname mx.example.org
        tls /etc/maddylite/cert.pem /etc/maddylite/key.pem
        allow_sources 10.0.0.0/8
        limits &inbound
        check {
            command /usr/local/bin/scan {sender} { code 3 quarantine }
        }
        deliver_to &queue
    }

It implements the RFC 5321 server side an outbound relay needs: EHLO/HELO, MAIL, RCPT,
DATA, RSET, NOOP, VRFY, HELP, QUIT, STARTTLS [RFC 3207], PIPELINING [RFC 2920],
8BITMIME [RFC 6152], SMTPUTF8 [RFC 6531], SIZE [RFC 1870], ENHANCEDSTATUSCODES
[RFC 2034] and REQUIRETLS [RFC 8689]; the DSN parameters [RFC 3461] are checked for
syntax and not passed on (B-94). A ``tls://`` listen address is implicit TLS [RFC 8314]
and needs the ``tls`` directive.

Security properties:

- It is never an open relay: only loopback (and unix socket) clients are served unless
  ``allow_sources`` lists other networks; a network covering every address is refused.
- Only ``<CRLF>.<CRLF>`` ends DATA. A bare LF or bare CR in the message closes the
  connection with 521, so ``<LF>.<LF>``, ``<LF>.<CRLF>`` and ``<CR>.<CRLF>`` can never
  end one message and start another ("SMTP smuggling"). NUL, over-long lines and
  oversized messages are read to the real end and refused.
- Input pipelined after STARTTLS is discarded (the plaintext command injection of
  CVE-2011-0411).
- Command lines are limited to 1000 octets and message lines to 1000 octets, both
  including CRLF [RFC 5321 §4.5.3.1]; a client that sends more than
  ``MAX_IDLE_COMMANDS`` commands without a successful MAIL, RCPT or DATA is
  disconnected.

Recipients are normalised before they reach the target (B-26): the domain is lower-cased
and A-labels become U-labels. A top-level ``TLS-Required: No`` header field sets
``tls_required_no`` unless the message carries REQUIRETLS (B-81, RFC 8689 §3).
REQUIRETLS is accepted only over TLS or from a local client (loopback, unix socket),
since otherwise the first hop would already have been in clear text.

Each session runs in a greenlet owned by the endpoint's group; the listening sockets come
from the runtime's listener pool so that a reload hands them over without closing them
(E-6).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from email.utils import formatdate
from typing import Any, NamedTuple

import gevent
import gevent.pool
import gevent.server

from maddylite.config.directives import (
    AddressList,
    Bool,
    Custom,
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
from maddylite.config.nodes import ConfigNode
from maddylite.config.values import ascii_digits
from maddylite.interfaces import Check, Delivery, DeliveryTarget, Endpoint, Limits, MsgMetadata
from maddylite.log import Logger
from maddylite.registry import ModuleBase, register
from maddylite.smtp.client import header_address
from maddylite.smtp.codes import format_enhanced
from maddylite.smtp.errors import Cancelled, SMTPError
from maddylite.tls import TLS_SERVER_TYPE, TLSServerConfig

#: Longest command line accepted, CRLF included [RFC 5321 §4.5.3.1.4, raised for extensions].
MAX_LINE = 1000
#: Longest message line accepted, CRLF included [RFC 5321 §4.5.3.1.6].
MAX_DATA_LINE = 1000
#: Commands without progress (a successful MAIL, RCPT or DATA) before the session is closed.
MAX_IDLE_COMMANDS = 100
#: Bytes of an over-long command line read and thrown away before the session is closed.
MAX_DRAIN = 1 << 20
#: Longest address accepted in MAIL and RCPT [RFC 5321 §4.5.3.1.3, plus room for UTF-8].
MAX_ADDRESS = 320
#: Seconds the TLS handshake after STARTTLS may take.
TLS_HANDSHAKE_TIMEOUT = 60.0


class Reply(NamedTuple):
    """Reply is one SMTP reply: basic code, enhanced code ("" for none) and text."""

    code: int
    enhanced: str
    text: str


# The endpoint's replies, as named constants (aiosmtpd's statuscodes idea).
OK = Reply(250, "2.0.0", "OK")
MAIL_OK = Reply(250, "2.1.0", "OK")
RCPT_OK = Reply(250, "2.1.5", "OK")
RESET_OK = Reply(250, "2.0.0", "Session reset")
BYE = Reply(221, "2.0.0", "Bye")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321")
START_DATA = Reply(354, "", "Go ahead, end with <CRLF>.<CRLF>")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands without progress, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal server error")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Unknown command")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_CHARACTERS = Reply(500, "5.5.2", "Bare CR and NUL characters are not allowed in commands")
BAD_UTF8 = Reply(500, "5.5.2", "Invalid UTF-8 in command")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
NO_PARAMS = Reply(501, "5.5.4", "No parameters allowed")
DOMAIN_REQUIRED = Reply(501, "5.5.4", "Domain name required")
#: Longest domain name a HELO/EHLO may carry [RFC 5321 §4.5.3.1.2].
MAX_DOMAIN = 255
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
MALFORMED_SENDER = Reply(501, "5.1.7", "Malformed sender address")
MALFORMED_RCPT = Reply(501, "5.1.3", "Malformed recipient address")
EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
MAIL_FIRST = Reply(503, "5.5.1", "Send MAIL first")
RCPT_FIRST = Reply(503, "5.5.1", "Send RCPT first")
NO_VALID_RCPTS = Reply(554, "5.5.1", "No valid recipients")
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs a TLS session, use STARTTLS first")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds the limit")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (at most 998 characters and CRLF)")
BARE_LINE_END = Reply(521, "5.5.2", "Bare CR or LF received, closing connection")
NUL_IN_DATA = Reply(550, "5.6.0", "NUL characters are not allowed")
RELAY_DENIED = Reply(554, "5.7.1", "Relaying denied for {ip}")


def _net_list(args: Sequence[str]) -> tuple[Any, ...]:
    nets = []
    for a in args:
        try:
            net = ipaddress.ip_network(a, strict=False)
        except ValueError:
            raise ConfigError(f"invalid network: {a}") from None
        if net.prefixlen == 0:
            raise ConfigError(f"{a} would make an open relay: list the networks of your clients")
        nets.append(net)
    for version, total in ((4, 2**32), (6, 2**128)):
        same: list[Any] = [n for n in nets if n.version == version]
        # networks that together cover every address (0.0.0.0/1 and 128.0.0.0/1) are /0 too
        covered: int = sum(n.num_addresses for n in ipaddress.collapse_addresses(same))
        if same and covered == total:
            raise ConfigError(f"{' '.join(args)}: together these would make an open relay: "
                              "list the networks of your clients")
    return tuple(nets)


class _Networks(StringList):
    syntax = "network..."

    def parse_args(self, args: Sequence[str]) -> tuple[Any, ...]:
        return _net_list(super().parse_args(args))


def _parse_checks(node: ConfigNode, builder: Any) -> tuple[Check, ...]:
    """_parse_checks reads ``check { name args... { ... } ... }``: each child is a check.*."""
    if node.args:
        raise ConfigError("check takes no arguments, only a block")
    if builder is None:  # pragma: no cover - documentation-only use
        raise ConfigError("check blocks need a builder")
    return tuple(
        builder.inline_module(child.name, child.args, child, role=Check, namespace="check", ref=child)
        for child in node.block
    )


def _ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(ip: str) -> bool:
    """is_loopback tells whether ``ip`` is 127.0.0.0/8, ::1 or an IPv4-mapped loopback."""
    addr = _ip(ip)
    return addr is not None and addr.is_loopback


def normalize_domain(domain: str) -> str:
    """normalize_domain lower-cases a domain, drops a trailing dot and decodes A-labels (B-26).

    Labels that are not valid A-labels are kept as they are; U-labels are put in NFC.
    Address literals (``[192.0.2.1]``) are only lower-cased.
    """
    domain = domain.lower().rstrip(".")
    if domain.startswith("["):
        return domain
    labels = []
    for label in domain.split("."):
        if label.startswith("xn--"):
            try:
                label = label.encode("ascii").decode("idna")
            except UnicodeError:
                pass
        labels.append(label)
    return unicodedata.normalize("NFC", ".".join(labels))


def normalize_address(addr: str) -> str:
    """normalize_address lower-cases the domain and turns A-labels into U-labels (B-26)."""
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr
    return f"{local}@{normalize_domain(domain)}"


def _scan_path(text: str) -> int:
    """_scan_path returns the index of the ``>`` closing a path that starts at text[0] == "<"."""
    quoted = escaped = False
    for i in range(1, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = quoted
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1


def _parse_path(arg: str, keyword: str) -> tuple[str, list[str]] | None:
    """_parse_path splits ``FROM:<addr> PARAMS`` into the address and parameters.

    Quoted local parts may contain ``>``; a source route (``<@a,@b:user@d>``) is dropped
    [RFC 5321 §4.1.2, Appendix C]. White space after the colon is tolerated.
    """
    arg = arg.lstrip(" ")
    if arg[: len(keyword) + 1].upper() != keyword + ":":
        return None
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    if not rest.startswith("<"):
        return None
    end = _scan_path(rest)
    if end < 0:
        return None
    addr = rest[1:end]
    if addr.startswith("@") and ":" in addr:
        addr = addr.split(":", 1)[1]
    tail = rest[end + 1 :]
    if tail and not tail.startswith(" "):
        return None
    return addr, tail.split()


def _valid_address(addr: str) -> bool:
    """_valid_address is a light syntax check: local@domain, no white space, sane lengths."""
    if len(addr) > MAX_ADDRESS:
        return False
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        return False
    if domain.startswith("["):
        return domain.endswith("]")
    return not any(c.isspace() or c in "<>()," for c in domain) and ".." not in domain


_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")


def _is_xtext(value: str) -> bool:
    """_is_xtext checks the xtext syntax of DSN parameter values [RFC 3461 §4]."""
    return bool(_XTEXT.fullmatch(value))


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """split_message splits a message at the first empty line into header and body."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    idx = data.find(b"\r\n\r\n")
    if idx < 0:
        return data, b""
    return data[: idx + 2], data[idx + 4 :]


def tls_required_no(header: bytes) -> bool:
    """tls_required_no tells whether the header has ``TLS-Required: No`` (B-81).

    Only fields of the top-level header count; the name is matched in any case, the
    value (unfolded) in any case with surrounding white space ignored. A folded
    continuation line of another field never starts a field.
    """
    values: list[bytes] = []
    in_field = False  # the field being unfolded is a TLS-Required field
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if in_field:
                values[-1] += line
            continue
        name, colon, rest = line.partition(b":")
        in_field = bool(colon) and name.strip().lower() == b"tls-required"
        if in_field:
            values.append(rest)
    return any(v.strip().lower() == b"no" for v in values)


class _Reader:
    """_Reader reads lines from a socket with its own buffer.

    Owning the buffer lets the session see whether the client pipelined more input
    (replies are then held back, RFC 2920 §3.2) and discard input pipelined after
    STARTTLS. ``on_wait`` runs before every blocking read, to flush held replies.
    """

    def __init__(self, sock: Any, on_wait: Callable[[], None]) -> None:
        self.sock = sock
        self.on_wait = on_wait
        self.buf = bytearray()
        self.eof = False

    def has_line(self) -> bool:
        """has_line tells whether a complete line is already buffered."""
        return b"\n" in self.buf

    def discard(self) -> int:
        """discard drops buffered input and returns how much there was."""
        n = len(self.buf)
        self.buf.clear()
        return n

    def readline(self, limit: int) -> bytes:
        """readline returns a line with its LF, at most ``limit`` bytes of one, or b"" at EOF."""
        scanned = 0
        while True:
            idx = self.buf.find(b"\n", scanned, limit)
            if idx >= 0:
                line = bytes(self.buf[: idx + 1])
                del self.buf[: idx + 1]
                return line
            if len(self.buf) >= limit:
                line = bytes(self.buf[:limit])
                del self.buf[:limit]
                return line
            if self.eof:
                line = bytes(self.buf)
                self.buf.clear()
                return line
            scanned = len(self.buf)
            self.on_wait()
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
            self.buf += data


class _Session:
    """_Session is one SMTP conversation with one client."""

    def __init__(self, ep: SMTPEndpoint, sock: socket.socket, peer: Any) -> None:
        self.ep = ep
        self.sock = sock
        # A TCP peer is an (address, port, ...) tuple; a unix socket peer is a path or "".
        self.local = not (isinstance(peer, tuple) and peer)
        self.peer_ip = "" if self.local else str(peer[0])
        sock.settimeout(ep.settings.read_timeout or None)  # 0: no timeout, as in maddy
        self.reader = _Reader(sock, self.flush)
        self.out: list[bytes] = []
        self.tls = False
        self.helo: str | None = None
        self.esmtp = False
        self.idle_commands = 0
        self.mail_from: str | None = None
        self.meta: MsgMetadata | None = None
        self.delivery: Delivery | None = None
        self.rcpts: list[str] = []
        self.msg_slot: tuple[str, str] | None = None

    @property
    def client_is_local(self) -> bool:
        """client_is_local is true for unix socket and loopback clients."""
        return self.local or is_loopback(self.peer_ip)

    # -- transaction state ----------------------------------------------------------

    def reset(self) -> None:
        """reset forgets the transaction (after commit or abort) and frees its limit slot."""
        self.mail_from = None
        self.meta = None
        self.delivery = None
        self.rcpts = []
        if self.msg_slot is not None and self.ep.limits is not None:
            try:
                self.ep.limits.release_msg(*self.msg_slot)
            except Exception as e:  # noqa: BLE001 - a broken limiter must not end the session
                self.ep.log.error("limits release failed", e)
        self.msg_slot = None

    def abort(self) -> None:
        """abort cancels the target's delivery, if any, and resets."""
        if self.delivery is not None:
            try:
                self.delivery.abort()
            except Exception as e:  # noqa: BLE001
                self.ep.log.error("abort failed", e)
        self.reset()

    # -- output -----------------------------------------------------------------------

    def reply(self, code: int | Reply, enhanced: str = "", text: str = "") -> None:
        """reply queues one reply; it is sent before the next blocking read (PIPELINING)."""
        if isinstance(code, Reply):
            code, enhanced, text = code
        lines = [ln.replace("\r", "")[:500] for ln in (text or "").split("\n")] or [""]
        prefix = f"{enhanced} " if enhanced and self.esmtp else ""
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            self.out.append(f"{code}{sep}{prefix}{line}\r\n".encode("utf-8", "replace"))

    def reply_err(self, err: BaseException, what: str) -> None:
        """reply_err replies with an SMTPError's codes; other errors become 451 4.3.0."""
        if isinstance(err, SMTPError):
            self.reply(err.code, format_enhanced(err.enhanced), err.message or "Error")
            if isinstance(err, Cancelled):  # the session was killed while it waited (B-119)
                self.flush()
                raise gevent.GreenletExit
            return
        self.ep.log.error(f"{what} failed", err, src_ip=self.peer_ip)
        self.reply(INTERNAL_ERROR)

    def flush(self) -> None:
        """flush sends the held replies."""
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            self.sock.sendall(data)

    # -- the command loop ---------------------------------------------------------------

    def serve(self) -> None:
        """serve runs the session until QUIT, EOF, a timeout or a fatal protocol error."""
        ep = self.ep
        if not self.local and not ep.source_allowed(self.peer_ip):
            ep.log.warn("relaying denied", src_ip=self.peer_ip)
            r = RELAY_DENIED
            self.reply(r.code, r.enhanced, r.text.format(ip=self.peer_ip))
            self.flush()
            return
        self.reply(220, "", f"{ep.hostname} ESMTP maddylite")
        try:
            self._loop()
        finally:
            try:
                self.flush()
            except OSError:
                pass

    def _loop(self) -> None:
        handlers: dict[str, Callable[[str], bool | None]] = {
            "HELO": self.cmd_helo, "EHLO": self.cmd_ehlo, "MAIL": self.cmd_mail,
            "RCPT": self.cmd_rcpt, "DATA": self.cmd_data, "RSET": self.cmd_rset,
            "NOOP": self.cmd_noop, "QUIT": self.cmd_quit, "VRFY": self.cmd_vrfy,
            "HELP": self.cmd_help, "STARTTLS": self.cmd_starttls,
            "EXPN": self.cmd_not_implemented, "BDAT": self.cmd_not_implemented,
            "AUTH": self.cmd_not_implemented, "TURN": self.cmd_not_implemented,
        }
        while True:
            try:
                line = self.reader.readline(MAX_LINE)
            except TimeoutError:
                self.reply(IDLE_TIMEOUT)
                return
            if not line:
                return
            self.idle_commands += 1
            if self.idle_commands > MAX_IDLE_COMMANDS:
                self.reply(TOO_MANY_COMMANDS)
                return
            if not line.endswith(b"\n"):
                if self.reader.eof:
                    return
                self.reply(LINE_TOO_LONG)
                if not self._drain_line():
                    self.reply(LINE_TOO_LONG.code, "5.5.2", "Line too long, closing connection")
                    return
                continue
            raw = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if b"\r" in raw or b"\x00" in raw:
                self.reply(BAD_CHARACTERS)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.reply(BAD_UTF8)
                continue
            verb, _, arg = text.partition(" ")
            handler = handlers.get(verb.upper())
            if handler is None:
                self.reply(UNKNOWN_COMMAND)
                continue
            if handler(arg) is False:
                return

    def _drain_line(self) -> bool:
        """_drain_line reads the rest of an over-long line; False if it never ends."""
        drained = 0
        while drained < MAX_DRAIN:
            part = self.reader.readline(MAX_LINE)
            if not part:
                return False
            if part.endswith(b"\n"):
                return True
            drained += len(part)
        return False

    # -- commands ---------------------------------------------------------------------

    def cmd_helo(self, arg: str) -> None:
        """cmd_helo starts a plain SMTP session [RFC 5321 §4.1.1.1]."""
        self._greet(arg, esmtp=False)

    def cmd_ehlo(self, arg: str) -> None:
        """cmd_ehlo starts an ESMTP session and lists the extensions."""
        self._greet(arg, esmtp=True)

    def _greet(self, arg: str, esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name or len(name) > MAX_DOMAIN:  # RFC 5321 §4.5.3.1.2
            self.reply(DOMAIN_REQUIRED)
            return
        self.abort()
        self.helo = name
        self.esmtp = esmtp
        ep = self.ep
        if not esmtp:
            self.reply(250, "", ep.hostname)
            return
        size = ep.settings.max_message_size
        caps = [f"{ep.hostname} Hello {name}", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES",
                "SMTPUTF8", f"SIZE {size}" if size else "SIZE"]  # 0: no fixed maximum [RFC 1870 §4]
        if ep.tls_context is not None and not self.tls:
            caps.append("STARTTLS")
        if self.tls or self.client_is_local:
            caps.append("REQUIRETLS")
        self.reply(250, "", "\n".join(caps))

    def cmd_starttls(self, arg: str) -> bool | None:
        """cmd_starttls upgrades the connection [RFC 3207]; pipelined input is discarded."""
        ep = self.ep
        if ep.tls_context is None or self.tls:
            self.reply(TLS_NOT_AVAILABLE)
            return None
        if arg.strip():
            self.reply(NO_PARAMS)
            return None
        if self.helo is None:
            self.reply(EHLO_FIRST)
            return None
        dropped = self.reader.discard()
        if dropped:
            # Anything sent after STARTTLS before the handshake is plaintext that an
            # attacker could have injected; it must not be read as TLS-protected input.
            ep.log.warn("input pipelined after STARTTLS discarded", src_ip=self.peer_ip, bytes=dropped)
        self.reply(READY_TLS)
        self.flush()
        try:
            with gevent.Timeout(TLS_HANDSHAKE_TIMEOUT):
                self.sock = ep.tls_context.wrap_socket(self.sock, server_side=True)
        except (OSError, gevent.Timeout) as e:
            ep.log.debug("TLS handshake failed", src_ip=self.peer_ip, reason=str(e))
            return False
        self.sock.settimeout(ep.settings.read_timeout or None)
        self.reader = _Reader(self.sock, self.flush)
        self.tls = True
        self.helo = None  # RFC 3207 §4.2: forget what the client said before TLS
        self.esmtp = False
        self.abort()
        return None

    def cmd_noop(self, arg: str) -> None:
        """cmd_noop does nothing [RFC 5321 §4.1.1.9]."""
        self.reply(OK)

    def cmd_rset(self, arg: str) -> None:
        """cmd_rset aborts the transaction [RFC 5321 §4.1.1.5]."""
        self.abort()
        self.reply(RESET_OK)

    def cmd_vrfy(self, arg: str) -> None:
        """cmd_vrfy never verifies addresses [RFC 5321 §3.5.3]."""
        self.reply(CANNOT_VRFY)

    def cmd_help(self, arg: str) -> None:
        """cmd_help points at the RFC."""
        self.reply(HELP)

    def cmd_not_implemented(self, arg: str) -> None:
        """cmd_not_implemented answers known commands this server does not offer."""
        self.reply(NOT_IMPLEMENTED)

    def cmd_quit(self, arg: str) -> bool:
        """cmd_quit ends the session."""
        self.abort()
        self.reply(BYE)
        return False

    def cmd_mail(self, arg: str) -> None:
        """cmd_mail starts a transaction and the target's delivery."""
        if self.helo is None:
            self.reply(EHLO_FIRST)
            return
        if self.mail_from is not None:
            self.reply(NESTED_MAIL)
            return
        parsed = _parse_path(arg, "FROM")
        if parsed is None:
            self.reply(MAIL_SYNTAX)
            return
        addr, params = parsed
        meta = MsgMetadata(id=uuid.uuid4().hex, src_ip=self.peer_ip or None)
        problem = self._mail_params(params, meta)
        if problem is not None:
            self.reply(problem)
            return
        if not addr.isascii() and not meta.smtputf8:
            self.reply(NEED_SMTPUTF8)
            return
        if addr and addr.lower() != "postmaster" and not _valid_address(addr):
            self.reply(MALFORMED_SENDER)
            return
        sender = normalize_address(addr)
        ep = self.ep
        try:
            if ep.limits is not None:
                slot = (self.peer_ip or "127.0.0.1", sender.rpartition("@")[2])
                ep.limits.take_msg(*slot)
                self.msg_slot = slot
            delivery = ep.target.start_delivery(meta, sender)
        except Exception as e:  # noqa: BLE001 - becomes the reply
            self.reset()
            self.reply_err(e, "start_delivery")
            return
        self.mail_from, self.meta, self.delivery = sender, meta, delivery
        self.idle_commands = 0
        self.reply(MAIL_OK)

    def _split_params(self, verb: str, params: list[str]) -> tuple[list[tuple[str, str, str]], Reply | None]:
        """_split_params splits ``KEY[=value]`` parameters of MAIL or RCPT into (upper-case
        key, "=" or "", value); a refusal when they need EHLO or a key is repeated."""
        if params and not self.esmtp:
            return [], Reply(501, "5.5.4", f"{verb} parameters need EHLO")
        out: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for p in params:
            key, eq, value = p.partition("=")
            key = key.upper()
            if key in seen:
                return [], Reply(501, "5.5.4", f"Duplicate {verb} parameter: {key}")
            seen.add(key)
            out.append((key, eq, value))
        return out, None

    def _mail_params(self, params: list[str], meta: MsgMetadata) -> Reply | None:
        """_mail_params applies the MAIL parameters to ``meta``; returns a refusal or None."""
        split, problem = self._split_params("MAIL", params)
        if problem is not None:
            return problem
        for key, eq, value in split:
            if key == "SIZE":
                if not ascii_digits(value) or len(value) > 20:
                    return Reply(501, "5.5.4", "Malformed SIZE parameter")
                if 0 < self.ep.settings.max_message_size < int(value):
                    return TOO_BIG
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4", "Unknown BODY type")
                meta.body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8" and not eq:
                meta.smtputf8 = True
            elif key == "REQUIRETLS" and not eq:
                if not (self.tls or self.client_is_local):
                    return REQUIRETLS_NEEDS_TLS
                meta.requiretls = True
            elif key == "RET":
                if value.upper() not in ("FULL", "HDRS"):
                    return Reply(501, "5.5.4", "Malformed RET parameter")
            elif key in ("ENVID", "AUTH"):
                if not _is_xtext(value) or len(value) > 500:
                    return Reply(501, "5.5.4", f"Malformed {key} parameter")
            else:
                return Reply(555, "5.5.4", f"Unsupported MAIL parameter: {key}")
        return None

    def cmd_rcpt(self, arg: str) -> None:
        """cmd_rcpt adds one recipient; the target's refusal is the reply (per recipient)."""
        if self.delivery is None or self.meta is None:
            self.reply(MAIL_FIRST)
            return
        parsed = _parse_path(arg, "TO")
        if parsed is None or not parsed[0]:
            self.reply(RCPT_SYNTAX)
            return
        addr, params = parsed
        problem = self._rcpt_params(params)
        if problem is not None:
            self.reply(problem)
            return
        if not addr.isascii() and not self.meta.smtputf8:
            self.reply(NEED_SMTPUTF8)
            return
        if addr.lower() == "postmaster":
            norm = "postmaster"  # RFC 5321 §4.5.1: any case, no domain
        elif _valid_address(addr):
            norm = normalize_address(addr)
        else:
            self.reply(MALFORMED_RCPT)
            return
        if norm in self.rcpts:
            self.idle_commands = 0
            self.reply(RCPT_OK)  # already a recipient: the target must not see it twice
            return
        if len(self.rcpts) >= self.ep.settings.max_recipients:
            self.reply(TOO_MANY_RCPTS)
            return
        try:
            self.delivery.add_rcpt(norm)
        except Exception as e:  # noqa: BLE001 - becomes the reply
            self.reply_err(e, "add_rcpt")
            return
        self.meta.original_rcpts[norm] = addr
        self.rcpts.append(norm)
        self.idle_commands = 0
        self.reply(RCPT_OK)

    def _rcpt_params(self, params: list[str]) -> Reply | None:
        """_rcpt_params checks the DSN parameters of RCPT [RFC 3461 §4.1, §4.2]."""
        split, problem = self._split_params("RCPT", params)
        if problem is not None:
            return problem
        for key, _, value in split:
            if key == "NOTIFY":
                words = value.upper().split(",")
                if not (words == ["NEVER"] or (words and set(words) <= {"SUCCESS", "FAILURE", "DELAY"}
                                               and len(set(words)) == len(words))):
                    return Reply(501, "5.5.4", "Malformed NOTIFY parameter")
            elif key == "ORCPT":
                kind, semi, orig = value.partition(";")
                if not semi or not kind or not _is_xtext(orig) or len(value) > 500:
                    return Reply(501, "5.5.4", "Malformed ORCPT parameter")
            else:
                return Reply(555, "5.5.4", f"Unsupported RCPT parameter: {key}")
        return None

    def cmd_data(self, arg: str) -> bool | None:
        """cmd_data reads the message, runs the checks and hands it to the target."""
        if self.delivery is None or self.meta is None:
            self.reply(MAIL_FIRST)
            return None
        if not self.rcpts:
            self.reply(NO_VALID_RCPTS)
            return None
        if arg.strip():
            self.reply(NO_PARAMS)
            return None
        self.reply(START_DATA)
        try:
            data, problem = self._read_data()
        except TimeoutError:
            self.reply(IDLE_TIMEOUT)
            return False
        if data is None:
            if problem is not None:
                self.reply(problem)  # broken framing: the connection cannot be trusted
            return False
        if problem is not None:
            self.abort()
            self.reply(problem)
            return None
        self._deliver(data)
        return None

    def _deliver(self, data: bytes) -> None:
        meta, delivery = self.meta, self.delivery
        assert meta is not None and delivery is not None and self.mail_from is not None
        ep = self.ep
        header, body = split_message(data)
        # B-81: only the client's own top-level header counts; REQUIRETLS wins [RFC 8689 §3].
        meta.tls_required_no = tls_required_no(header) and not meta.requiretls
        header = self._received(meta) + header
        meta.size = len(header) + 2 + len(body)
        try:
            for check in ep.checks:
                verdict = check.check_body(meta, self.mail_from, tuple(self.rcpts), header, body,
                                           source_host=self.helo or "")
                if verdict == "quarantine" and not meta.quarantine:
                    meta.quarantine = True
                    ep.log.info("message quarantined", msg_id=meta.id, check=getattr(check, "label", ""))
            delivery.body(header, body)
            delivery.commit()
        except Exception as e:  # noqa: BLE001 - becomes the reply
            self.abort()
            self.reply_err(e, "message delivery")
            if isinstance(e, SMTPError):
                ep.log.info("message refused", msg_id=meta.id, src_ip=self.peer_ip, reason=str(e))
            return
        ep.log.info("accepted", msg_id=meta.id, src_ip=self.peer_ip, rcpts=len(self.rcpts),
                    quarantine=meta.quarantine)
        self.reset()
        self.idle_commands = 0
        self.reply(250, "2.0.0", f"OK: queued as {meta.id}")

    def _received(self, meta: MsgMetadata) -> bytes:
        """_received is the trace field every SMTP server adds [RFC 5321 §4.4]."""
        helo = re.sub(r"[^A-Za-z0-9.\-:\[\]_]", "?", self.helo or "unknown")
        src = f"[{self.peer_ip}]" if self.peer_ip else "local"
        proto = ("UTF8SMTP" if meta.smtputf8 else "ESMTP" if self.esmtp else "SMTP") + ("S" if self.tls else "")
        if proto == "SMTPS":
            proto = "ESMTPS"  # RFC 3848 has no name for HELO over TLS
        # the recipient's domain was normalised to U-labels (B-26); a message without
        # SMTPUTF8 must stay ASCII, so the field names it in A-labels
        rcpt = f"\r\n\tfor <{header_address(self.rcpts[0], meta.smtputf8)}>" if len(self.rcpts) == 1 else ""
        # folded, so that no line comes near 998 characters whatever the HELO name and address
        line = (f"Received: from {helo} ({src})\r\n\tby {self.ep.hostname} (maddylite) with {proto}"
                f" id {meta.id}{rcpt}; {formatdate(localtime=True)}\r\n")
        return line.encode("utf-8", "replace")

    def _read_data(self) -> tuple[bytes | None, Reply | None]:
        """_read_data reads up to the final dot; returns (data, refusal or None).

        Only ``<CRLF>.<CRLF>`` ends the data: a dot line counts only when the line before
        it ended with CRLF. A bare LF or bare CR gives (None, 521 reply): the session
        ends there, so nothing after it can be taken as a command. NUL, over-long lines
        and an oversized message are read to the end and refused.
        """
        limit = self.ep.settings.max_message_size or float("inf")  # 0: no fixed maximum
        chunks: list[bytes] = []
        size = 0
        problem: Reply | None = None
        line_start = True  # the previous line ended with CRLF
        partial = False  # inside an over-long line
        prev_cr = False  # the previous piece of the over-long line ended with CR
        while True:
            line = self.reader.readline(MAX_DATA_LINE + 1)  # + the transparency dot
            if not line or not line.endswith(b"\n") and self.reader.eof:
                return None, None
            if line_start and line == b".\r\n":
                break
            if not line.endswith(b"\n"):
                problem = problem or DATA_LINE_TOO_LONG  # a piece of an over-long line
                partial, prev_cr, line_start = True, line.endswith(b"\r"), False
                continue
            if partial:
                # The end of an over-long line (refused already): only its line end
                # matters, and its CRLF may have been split between two pieces.
                partial = False
                if not (line.endswith(b"\r\n") or line == b"\n" and prev_cr):
                    return None, BARE_LINE_END
                line_start = True
                continue
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                self.ep.log.info("bare CR or LF in DATA", src_ip=self.peer_ip)
                return None, BARE_LINE_END
            if b"\x00" in line:
                problem = problem or NUL_IN_DATA
            if line_start and line.startswith(b"."):
                line = line[1:]  # dot-stuffing [RFC 5321 §4.5.2]
            if len(line) > MAX_DATA_LINE:  # counted without the transparency dot [RFC 5321 §4.5.3.1.6]
                problem = problem or DATA_LINE_TOO_LONG
            line_start = True
            if problem is not None:
                continue
            size += len(line)
            if size > limit:
                problem = TOO_BIG
                chunks.clear()
                continue
            chunks.append(line)
        return b"".join(chunks), problem


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
        Directive(name="limits", type=ModuleRef(role=Limits), default=None, help="Rate and concurrency limits for incoming messages (taken at MAIL, given back when the transaction ends)."),
        Directive(name="check", type=Custom(fn=_parse_checks, syntax_text="{ <check> [args] [{ ... }] ... }"), default=(), help="Checks run on each message after DATA, before the target gets it: each line is a check.* module (command). A check may reject the message or mark it quarantined."),
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
        self.checks: tuple[Check, ...] = tuple(settings.check or ())
        self.tls_config: TLSServerConfig | None = settings.tls
        if any(a.scheme == "tls" for a in self.addresses) and not (self.tls_config and self.tls_config.enabled):
            # a tls:// address speaks TLS from the first byte (RFC 8314), as in maddy
            raise ConfigError("smtp: can't bind on SMTPS endpoint without TLS configuration")
        self.allow = tuple(settings.allow_sources)
        self.log = Logger("smtp", settings.debug)
        self.tls_context: ssl.SSLContext | None = None
        self._servers: list[gevent.server.StreamServer] = []
        self._acquired: list[Any] = []
        self._sessions = gevent.pool.Group()

    def source_allowed(self, ip: str) -> bool:
        """source_allowed is the relay guard: loopback, or a network in allow_sources.

        ``""`` stands for a unix socket client, which the file permissions guard.
        IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
        """
        if ip == "":
            return True
        addr = _ip(ip)
        if addr is None:
            return False
        if addr.is_loopback:
            return True
        return any(addr.version == net.version and addr in net for net in self.allow)

    def start(self) -> None:
        """start takes the listening sockets from the pool and starts accepting."""
        if self.tls_config is not None and self.tls_config.enabled:
            self.tls_context = self.tls_config.context()
        assert self.runtime is not None
        for addr in self.addresses:
            sock = self.runtime.listeners.acquire(addr, self.runtime.runtime_dir)
            self._acquired.append(addr)
            handle = self._handle_implicit_tls if addr.scheme == "tls" else self._handle
            server = gevent.server.StreamServer(sock, handle, spawn=self._sessions.spawn)
            server.start()
            self._servers.append(server)
            self.log.info("listening", address=str(addr))

    def _handle_implicit_tls(self, sock: socket.socket, peer: Any) -> None:
        """_handle_implicit_tls serves a ``tls://`` connection: TLS first, then SMTP in it."""
        assert self.tls_context is not None
        try:
            with gevent.Timeout(TLS_HANDSHAKE_TIMEOUT):
                tls_sock = self.tls_context.wrap_socket(sock, server_side=True)
        except (OSError, gevent.Timeout) as e:
            self.log.debug("TLS handshake failed", src_ip=str(peer[0]) if isinstance(peer, tuple) else "",
                           reason=str(e))
            sock.close()
            return
        self._handle(tls_sock, peer, tls=True)

    def _handle(self, sock: socket.socket, peer: Any, tls: bool = False) -> None:
        session: _Session | None = None
        try:
            session = _Session(self, sock, peer)
            session.tls = tls  # a tls:// connection is TLS from its first byte: no STARTTLS in it
            session.serve()
        except (OSError, gevent.Timeout) as e:
            self.log.debug("session ended", src_ip=session.peer_ip if session else "", reason=str(e))
        except gevent.GreenletExit:
            if session is not None:
                self._say_goodbye(session)
            raise
        except Exception as e:  # noqa: BLE001 - one broken session must not hurt others
            self.log.error("session crashed", e, src_ip=session.peer_ip if session else "")
        finally:
            if session is not None:
                session.abort()
                sock = session.sock
            try:
                sock.close()
            except OSError:
                pass

    def _say_goodbye(self, session: _Session) -> None:
        """_say_goodbye tells a client that the server is stopping (best effort)."""
        try:
            session.out.clear()
            session.reply(SHUTTING_DOWN)
            with gevent.Timeout(1, False):
                session.flush()
        except (OSError, gevent.GreenletExit):
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
        if self.runtime is not None:
            for addr in self._acquired:
                self.runtime.listeners.release(addr)
        self._acquired.clear()
