"""SMTPConnection: an outbound SMTP client connection on gevent sockets.

Implements the client side of RFC 5321 with STARTTLS [RFC 3207], PIPELINING of MAIL/RCPT
[RFC 2920], SIZE [RFC 1870] parsing and SMTPUTF8 address conversion [RFC 6531]. It uses
``gevent.socket`` and ``gevent.ssl`` directly and never relies on monkey-patching, so it
only ever blocks the calling greenlet.

Error model:

- A negative server reply raises :class:`~maddylite.smtp.errors.SMTPError` with the
  server's codes and ``"<mx> said: <text>"`` (B-97, B-98). A 421 reply also marks the
  connection broken, since the server closes the channel [RFC 5321 §3.8].
- Every network failure, timeout and protocol violation raises
  :class:`~maddylite.smtp.errors.NetworkError` (``450 4.4.2 "Network I/O error"``, temp)
  with the cause in ``fields["reason"]``; the socket is closed and the connection marked
  broken (B-99..B-104). Any later command raises the same kind of error at once.
- STARTTLS failures are told apart for the fallback ladder (B-47..B-51):
  :class:`~maddylite.smtp.errors.STARTTLSRejected` (the command got a negative reply) and
  :class:`~maddylite.smtp.errors.TLSHandshakeError` with ``kind`` ``"verify"`` or
  ``"handshake"``.

Round trips. PIPELINING is used for ``[RSET] MAIL RCPT...`` only, and the content waits for
the RCPT replies: behaviour.md B-95 forbids sending DATA before one RCPT is known to have
succeeded (and B-40 forbids DATA on a connection without accepted recipients). When the
server offers CHUNKING [RFC 3030], :meth:`SMTPConnection.send_message` sends the content as
one ``BDAT <size> LAST`` chunk in the same write as its command, so a message on a reused
pipelining connection costs two round trips: ``[RSET] RSET+MAIL+RCPT...`` and ``BDAT``+content.
Without CHUNKING it costs three: the envelope, ``DATA`` (the content may only follow the
354 reply), then the content with the final dot. Nothing is sent after the content before
its reply is in, so that no other reply can be taken for it; the RSET that parks a
connection (:meth:`SMTPConnection.rset_deferred`) follows the reply and its own reply is
read with the next use, which costs a write but no wait.
"""

from __future__ import annotations

import _ssl
import ipaddress
import re
import socket as _stdlib_socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.pool
import gevent.queue
import gevent.socket
import gevent.ssl

from maddylite.log import Logger
from maddylite.smtp import codes
from maddylite.smtp.codes import EnhancedCode, parse_enhanced
from maddylite.smtp.errors import (
    NetworkError,
    SMTPError,
    STARTTLSRejected,
    TLSHandshakeError,
)

__all__ = [
    "Reply",
    "SMTPConnection",
    "AddressConversionError",
    "to_ascii_address",
    "to_ascii_domain",
    "prepare_body",
    "canonical_body",
]

#: Longest reply line accepted, CRLF excluded (B-99).
MAX_LINE_LENGTH = 2000
#: Most lines accepted in one multi-line reply; more is treated as a hostile server.
MAX_REPLY_LINES = 200
#: Most bytes accepted in one multi-line reply.
MAX_REPLY_BYTES = 64 * 1024
#: Most commands written in one pipelined batch before their replies are read, so that a
#: server whose replies fill the socket buffer cannot deadlock us [RFC 2920 §3.2].
PIPELINE_WINDOW = 64
#: Size of each body write; each write is bounded by the command timeout (B-104).
BODY_CHUNK = 64 * 1024
#: How many distinct one-line replies are kept parsed (see _buffered_reply).
REPLY_CACHE_SIZE = 512
#: Default per-reply wait [RFC 5321 §4.5.3.2].
DEFAULT_COMMAND_TIMEOUT = 300.0
#: Default wait for the reply to the final dot (B-103).
DEFAULT_SUBMISSION_TIMEOUT = 720.0
#: Fixed greeting wait (B-101).
GREETING_TIMEOUT = 300.0
#: QUIT wait whatever the configuration (B-106).
QUIT_TIMEOUT = 5.0

_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_BAD_ARG_CHARS = re.compile(r"[\x00-\x20\x7f]")
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Reply:
    """Reply is one (possibly multi-line) server reply.

    ``text`` joins the text of every line with ``"\\n"`` (B-97); the enhanced status code,
    if the first line starts with one, is removed from that line and kept in ``enhanced``
    exactly as sent (None when absent).
    """

    code: int
    enhanced: EnhancedCode | None
    text: str
    lines: tuple[str, ...]

    @property
    def positive(self) -> bool:
        """Reply.positive tells whether the code is 2xx or 3xx."""
        return self.code < 400

    def error(self, remote_server: str | None = None, **fields: Any) -> SMTPError:
        """Reply.error converts the reply into an SMTPError (``"<mx> said: <text>"``)."""
        return SMTPError.from_reply(self.code, self.enhanced, self.text,
                                    remote_server=remote_server, fields=fields)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class _Expired(Exception):
    """_Expired is thrown into a greenlet whose wait outlasted its timer (see SMTPConnection._arm)."""


class AddressConversionError(ValueError):
    """AddressConversionError means an address cannot be written in ASCII (B-88, B-89)."""


def to_ascii_domain(domain: str) -> str:
    """to_ascii_domain converts a domain to A-labels [RFC 5890]; ASCII input is returned as is.

    It raises :class:`AddressConversionError` when the name cannot be converted (a label
    too long, a prohibited character). Address literals (``[...]``) are returned unchanged.
    """
    if domain.isascii() or domain.startswith("["):
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise AddressConversionError(f"cannot convert {domain!r} to A-labels: {e}") from e


def to_ascii_address(addr: str) -> str:
    """to_ascii_address rewrites an address for a server without SMTPUTF8 (B-86, B-87).

    The domain is converted to A-labels; a non-ASCII local part cannot be converted and
    raises :class:`AddressConversionError` (B-88, B-89). ASCII addresses, the null
    address ``""`` and addresses without ``@`` that are ASCII are returned unchanged.
    """
    if addr.isascii():
        return addr
    local, at, domain = addr.rpartition("@")
    if not at:
        raise AddressConversionError("the address is not ASCII and has no domain")
    if not local.isascii():
        raise AddressConversionError("the local part is not ASCII")
    return f"{local}@{to_ascii_domain(domain)}"


def header_address(addr: str, smtputf8: bool) -> str:
    """header_address is an address as a header field we generate shows it: as it is in a
    SMTPUTF8 message, with its domain in A-labels otherwise, so that the message stays
    ASCII (RFC 6531 §3.2); an address that cannot be converted is returned unchanged."""
    if smtputf8 or addr.isascii():
        return addr
    try:
        return to_ascii_address(addr)
    except AddressConversionError:
        return addr


def canonical_body(message: bytes) -> bytes:
    """canonical_body gives every line a CRLF end: the content of a BDAT chunk [RFC 3030 §3].

    Every line end (CRLF, bare LF, bare CR) becomes CRLF, so that no peer can read a
    different message than we meant (SMTP smuggling); a missing final line end is added.
    """
    crlf = message.count(b"\r\n")
    if message.count(b"\n") == crlf and message.count(b"\r") == crlf:
        data = message  # already CRLF only: skip the regular expression (the common case)
    else:
        data = _LINE_ENDS.sub(b"\r\n", message)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def prepare_body(message: bytes) -> bytes:
    """prepare_body turns a message into the DATA payload, final dot included.

    Line ends are made CRLF by :func:`canonical_body`; lines starting with ``.`` get
    another ``.`` [RFC 5321 §4.5.2]; then ``.CRLF``.
    """
    data = canonical_body(message).replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


def _format_params(params: Mapping[str, str | None] | None) -> str:
    if not params:
        return ""
    parts = []
    for key, value in params.items():
        if not _KEYWORD_RE.match(key):
            raise _bad_argument(f"invalid parameter keyword {key!r}")
        if value is None:
            parts.append(key)
        else:
            if not value or _BAD_ARG_CHARS.search(value) or "=" in value:
                raise _bad_argument(f"invalid value for parameter {key}")
            parts.append(f"{key}={value}")
    return " " + " ".join(parts)


def _check_address(addr: str) -> None:
    if _BAD_ARG_CHARS.search(addr.replace(" ", "")) or "<" in addr or ">" in addr:
        raise _bad_argument("invalid character in address")


def _bad_argument(reason: str) -> SMTPError:
    # Local check: nothing is sent. X.5.4 is "invalid command arguments" [RFC 3463].
    return SMTPError(501, (5, 5, 4), "Invalid command argument", fields={"reason": reason})


class SMTPConnection:
    """SMTPConnection is one client session with one server, used by one greenlet at a time.

    Make it with :meth:`connect`, then call :meth:`greet`, :meth:`ehlo`, optionally
    :meth:`starttls` followed by :meth:`ehlo` again (B-45), then transactions: :meth:`mail`,
    :meth:`rcpt` (or :meth:`mail_rcpts`), :meth:`data`; :meth:`rset` between them;
    :meth:`quit` at the end. Errors are described in the module docstring.

    Metadata for logging and the idle pool: ``local_address`` and ``remote_address``
    (``(ip, port)``), ``tls``, ``tls_verified``, ``tls_version``, ``transactions``
    (MAIL commands sent), ``last_used`` and ``created`` (values of ``clock``), ``broken``.
    *logger* receives the debug-level reports of failed QUITs (default: ``smtp/client``).
    """

    def __init__(
        self,
        sock: Any,
        *,
        remote_server: str | None = None,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        submission_timeout: float = DEFAULT_SUBMISSION_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        logger: Logger | None = None,
    ) -> None:
        self._sock: Any = sock
        # Waits are bounded by this connection's own timers (see _arm), not by socket
        # timeouts: gevent would make a Timeout object for every wait.
        sock.settimeout(None)
        #: Deadline timers by duration, for the command and submission timeouts.
        self._timers: dict[float, Any] = {}
        self.log = logger or Logger("smtp/client")
        self._rbuf = bytearray()
        #: MX host name (with trailing dot) used in error messages and as default SNI.
        self.remote_server = remote_server
        #: Bound on each command reply, each body write and the TLS handshake (B-102).
        self.command_timeout = command_timeout
        #: Bound on the reply to the final dot (B-103).
        self.submission_timeout = submission_timeout
        self._clock = clock
        self.created = clock()
        self.last_used = self.created
        self.local_address: tuple[str, int] = _addr_pair(sock, "getsockname")
        self.remote_address: tuple[str, int] = _addr_pair(sock, "getpeername")
        self.broken = False
        self.broken_reason: str | None = None
        self.tls = False
        self.tls_verified = False
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.esmtp = False
        self.extensions: dict[str, str] = {}
        self.transactions = 0
        self.greeting: Reply | None = None
        self._accepted_rcpts = 0
        #: Commands sent whose replies are still to be read (see rset_deferred).
        self._owed: list[str] = []
        #: Whether the last mail_rcpts with ``rset_first`` had its RSET (and any deferred
        #: one) answered 250: when not, a pooled connection was dead (B-60).
        self.rset_answered = False

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        addresses: Sequence[str],
        port: int = 25,
        *,
        timeout: float,
        local_ip: str | None = None,
        stagger: float = 0.25,
        remote_server: str | None = None,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        submission_timeout: float = DEFAULT_SUBMISSION_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        logger: Logger | None = None,
    ) -> SMTPConnection:
        """SMTPConnection.connect opens a TCP connection to the first address that answers.

        Addresses are interleaved by family, starting with the family of the first one, and
        tried Happy-Eyeballs style [RFC 8305]: the next attempt starts when the previous
        one fails or after *stagger* seconds; the first to connect wins and the others are
        closed. *timeout* bounds all attempts together (B-100, B-111). With *local_ip* the
        source address is bound and addresses of the other family are skipped; when none
        is left the result is a NetworkError (B-109). The greeting is not read here.
        """
        sock = _dial(addresses, port, timeout=timeout, local_ip=local_ip, stagger=stagger,
                     remote_server=remote_server)
        return cls(sock, remote_server=remote_server, command_timeout=command_timeout,
                   submission_timeout=submission_timeout, clock=clock, logger=logger)

    # --- session commands -----------------------------------------------------------------

    def greet(self, timeout: float = GREETING_TIMEOUT) -> Reply:
        """SMTPConnection.greet reads the greeting; anything but 220 raises (B-18, B-101).

        A negative greeting raises an SMTPError with the server's code and class.
        """
        reply = self._read_reply(timeout, "greeting")
        self.greeting = reply
        if reply.code != codes.SERVICE_READY:
            if reply.code < 400:
                raise self._fail(f"unexpected greeting: {reply.code}")
            raise self._reply_error(reply, "greeting")
        return reply

    def ehlo(self, hostname: str) -> Reply:
        """SMTPConnection.ehlo sends EHLO, falling back to HELO on 500/502 only (B-55).

        After EHLO the advertised extensions are in :attr:`extensions` (keywords upper
        case, parameters kept as one string); after HELO none are known. Any other
        negative reply, or a failed HELO, raises.
        """
        if not hostname or _BAD_ARG_CHARS.search(hostname):
            raise _bad_argument("invalid EHLO hostname")
        self.extensions = {}
        self.esmtp = False
        reply = self._exchange(f"EHLO {hostname}\r\n".encode(), "EHLO")
        if reply.code in (codes.SYNTAX_ERROR, codes.NOT_IMPLEMENTED):
            reply = self._exchange(f"HELO {hostname}\r\n".encode(), "HELO")
            self._expect(reply, (codes.OK,), "HELO")
            return reply
        self._expect(reply, (codes.OK,), "EHLO")
        self.esmtp = True
        self.extensions = _parse_extensions(reply.lines[1:])
        return reply

    def supports(self, keyword: str) -> bool:
        """SMTPConnection.supports tells whether the last EHLO advertised *keyword*."""
        return keyword.upper() in self.extensions

    @property
    def max_size(self) -> int | None:
        """SMTPConnection.max_size is the SIZE maximum [RFC 1870], or None if not advertised.

        0 means the server advertised SIZE without a fixed maximum.
        """
        if "SIZE" not in self.extensions:
            return None
        param = self.extensions["SIZE"].split()
        if param and param[0].isascii() and param[0].isdigit():
            return int(param[0])
        return 0

    def starttls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None) -> bool:
        """SMTPConnection.starttls upgrades the session to TLS and tells whether it verified.

        The SNI and checked name is *server_hostname* (default: :attr:`remote_server`)
        without its trailing dot (B-44). The command reply and the handshake are each
        bounded by the command timeout. *ssl_context* may be a plain ``ssl.SSLContext`` or
        a ``gevent.ssl.SSLContext``; the handshake runs cooperatively either way.

        Returns True when the context verified the certificate and the host name
        (``CERT_REQUIRED`` with ``check_hostname``). Raises STARTTLSRejected for a negative
        reply, TLSHandshakeError (kind ``verify``/``handshake``, connection closed) for a
        failed handshake, NetworkError when the connection fails before the handshake.
        The extensions are forgotten: send EHLO again and use only the new ones (B-45).
        """
        reply = self._exchange(b"STARTTLS\r\n", "STARTTLS")
        if reply.code != codes.SERVICE_READY:
            if reply.code >= 400:
                err = STARTTLSRejected.from_reply(
                    reply.code, reply.enhanced, reply.text, remote_server=self.remote_server,
                    fields={"command": "STARTTLS"})
                if reply.code == codes.SERVICE_NOT_AVAILABLE:
                    self._mark_broken("421 reply")
                raise err
            raise self._fail(f"unexpected reply to STARTTLS: {reply.code}")
        if self._rbuf:
            # Data sent before the handshake would be read as if it came over TLS
            # (CVE-2011-0411 class); the server or something in between is misbehaving.
            raise self._fail("unexpected data after the STARTTLS reply")
        name = (server_hostname or self.remote_server or "").rstrip(".") or None
        raw = self._sock
        try:
            if isinstance(ssl_context, gevent.ssl.SSLContext):
                tls_sock = ssl_context.wrap_socket(raw, server_hostname=name,
                                                   do_handshake_on_connect=False)
            else:
                tls_sock = gevent.ssl.SSLSocket(sock=raw, server_hostname=name,
                                                do_handshake_on_connect=False,
                                                _context=ssl_context)
        except (ValueError, OSError) as e:
            self._close_socket()
            self._mark_broken(f"TLS setup: {e}")
            raise TLSHandshakeError("handshake", str(e), remote_server=self.remote_server) from e
        # The plain socket is detached into tls_sock from here on.
        self._sock = tls_sock
        try:
            tls_sock.settimeout(self.command_timeout)
            tls_sock.do_handshake()
            tls_sock.settimeout(None)  # later waits have their timers (see _arm)
        except ssl.SSLCertVerificationError as e:
            self._close_socket()
            self._mark_broken("TLS verify error")
            detail = e.verify_message or str(e)
            raise TLSHandshakeError("verify", detail, remote_server=self.remote_server) from e
        except TimeoutError as e:
            self._close_socket()
            self._mark_broken("TLS handshake timeout")
            raise TLSHandshakeError("handshake", "handshake timeout",
                                    remote_server=self.remote_server) from e
        except (ssl.SSLError, OSError) as e:
            self._close_socket()
            self._mark_broken("TLS handshake error")
            raise TLSHandshakeError("handshake", str(e) or type(e).__name__,
                                    remote_server=self.remote_server) from e
        self.tls = True
        self.tls_verified = (ssl_context.verify_mode == ssl.CERT_REQUIRED
                             and ssl_context.check_hostname)
        self.tls_version = tls_sock.version()
        cipher = tls_sock.cipher()
        self.tls_cipher = cipher[0] if cipher else None
        self.extensions = {}
        self.esmtp = False
        return self.tls_verified

    def peer_certificate_der(self) -> bytes | None:
        """SMTPConnection.peer_certificate_der returns the server's leaf certificate (DER)."""
        if not self.tls or self._sock is None:
            return None
        der = self._sock.getpeercert(binary_form=True)
        return bytes(der) if der else None

    def peer_chain_der(self) -> list[bytes]:
        """SMTPConnection.peer_chain_der returns the certificates the server sent, leaf first.

        This is the unverified chain DANE needs (C-86). Python 3.13 has a public API for
        it; on older versions the same method of the underlying ``_ssl`` object is used,
        and when that is missing only the leaf is returned.
        """
        if not self.tls or self._sock is None:
            return []
        sslobj = getattr(self._sock, "_sslobj", None)
        getter = getattr(sslobj, "get_unverified_chain", None)
        if getter is not None:
            chain = getter() or []
            return [bytes(c.public_bytes(_ssl.ENCODING_DER)) for c in chain]
        leaf = self.peer_certificate_der()
        return [leaf] if leaf else []

    # --- transaction commands -------------------------------------------------------------

    def mail(self, sender: str, params: Mapping[str, str | None] | None = None) -> Reply:
        """SMTPConnection.mail sends ``MAIL FROM:<sender> [params]``; only 250 succeeds (B-97).

        *params* maps ESMTP keywords to values (None for a bare keyword, e.g.
        ``{"SIZE": "123", "SMTPUTF8": None}``). Addresses are sent as given (UTF-8 when
        non-ASCII); convert them first with :func:`to_ascii_address` when the server lacks
        SMTPUTF8. Counts one transaction.
        """
        line = self._mail_line(sender, params)
        self._accepted_rcpts = 0
        self.transactions += 1
        reply = self._exchange(line, "MAIL")
        self._expect(reply, (codes.OK,), "MAIL")
        return reply

    def rcpt(self, rcpt: str, params: Mapping[str, str | None] | None = None) -> Reply:
        """SMTPConnection.rcpt sends ``RCPT TO:<rcpt>``; any 25x succeeds (B-97).

        A 552 reply is reported as 452 (class 4) per RFC 5321 §4.5.3.1.10: RCPT only (B-34).
        """
        line = self._rcpt_line(rcpt, params)
        reply = self._exchange(line, "RCPT")
        result = self._rcpt_result(reply, raise_error=True)
        assert isinstance(result, Reply)
        return result

    def mail_rcpts(
        self,
        sender: str,
        params: Mapping[str, str | None] | None,
        rcpts: Iterable[str],
        *,
        rset_first: bool = False,
    ) -> tuple[Reply | SMTPError, list[Reply | SMTPError]]:
        """SMTPConnection.mail_rcpts sends ``[RSET] MAIL RCPT...`` and maps the replies.

        With PIPELINING advertised the commands go out in one write (in windows of
        :data:`PIPELINE_WINDOW`) and the replies are read in order, so the whole envelope
        costs one round trip [RFC 2920]; otherwise they are sent one by one. Returns the
        MAIL result and one result per recipient, each a Reply or an SMTPError; when MAIL
        failed every recipient's result is the MAIL error (B-20). A failed RSET raises
        (the connection should be discarded, B-60) and marks the connection broken; a
        NetworkError raises too. DATA is never included (see the module docstring).
        """
        rcpt_list = list(rcpts)
        self.rset_answered = False
        try:
            mail_line = self._mail_line(sender, params)
        except SMTPError as e:
            return e, [e] * len(rcpt_list)
        if not self.supports("PIPELINING"):
            return self._mail_rcpts_serial(sender, params, rcpt_list, rset_first)

        # Local argument errors are known before anything is sent; those recipients are
        # not sent at all.
        results: list[Reply | SMTPError | None] = []
        batch: list[tuple[str, bytes, int]] = []  # (verb, line, recipient index or -1)
        if rset_first:
            batch.append(("RSET", b"RSET\r\n", -1))
        batch.append(("MAIL", mail_line, -1))
        for i, r in enumerate(rcpt_list):
            try:
                batch.append(("RCPT", self._rcpt_line(r, None), i))
                results.append(None)
            except SMTPError as e:
                results.append(e)

        self._accepted_rcpts = 0
        mail_result: Reply | SMTPError | None = None
        closing: SMTPError | None = None
        for start in range(0, len(batch), PIPELINE_WINDOW):
            window = batch if len(batch) <= PIPELINE_WINDOW else batch[start : start + PIPELINE_WINDOW]
            if isinstance(mail_result, SMTPError) or closing is not None:
                break  # MAIL failed or the server is closing: the rest is not sent.
            if start == 0:  # MAIL is in the first window (after at most one RSET)
                self.transactions += 1
            self._send(b"".join([line for _, line, _ in window]), self.command_timeout,
                       "pipelined commands")
            self._settle()
            for verb, _, slot in window:
                reply = self._read_reply(self.command_timeout, verb)
                if verb == "RSET":
                    if reply.code != codes.OK:
                        err = self._reply_error(reply, "RSET")
                        self._fail("RSET failed in a pipelined batch")
                        raise err
                    self.rset_answered = True
                    continue
                if verb == "MAIL":
                    if reply.code == codes.OK:
                        mail_result = reply
                        continue
                    if reply.code < 400:  # as _expect does without pipelining (B-99)
                        raise self._fail(f"unexpected reply to MAIL: {reply.code}")
                    mail_result = self._reply_error(reply, "MAIL")
                    outcome: Reply | SMTPError = mail_result
                else:
                    outcome = self._rcpt_result(reply, raise_error=False)
                    results[slot] = outcome
                if self.broken and isinstance(outcome, SMTPError):
                    # 421: the server closes the channel; no further reply will come, and
                    # every unanswered recipient gets the same (temporary) error.
                    closing = outcome
                    self._close_socket()
                    break
        assert mail_result is not None
        if isinstance(mail_result, SMTPError):
            self._accepted_rcpts = 0
            return mail_result, [mail_result] * len(rcpt_list)
        final: list[Reply | SMTPError] = []
        for res in results:
            if res is None:
                assert closing is not None
                res = closing
            final.append(res)
        return mail_result, final

    def data(self, *parts: bytes) -> Reply:
        """SMTPConnection.data sends DATA, the message and the final dot; 250 succeeds.

        The message is the concatenation of *parts* (a header and a body need not be joined
        by the caller), CRLF-normalised and dot-stuffed by :func:`prepare_body`. The 354
        reply is bounded by the command timeout, each body write too (B-104), and the final
        reply by the submission timeout (B-103). The wire copy of the message is dropped
        before that wait, so a delivery waiting for its reply holds no copy of its own.
        Must only be called after at least one RCPT succeeded in this transaction (B-40,
        B-95); otherwise ValueError.
        """
        if self._accepted_rcpts <= 0:
            raise ValueError("data() called without an accepted recipient")
        reply = self._exchange(b"DATA\r\n", "DATA")
        self._expect(reply, (codes.START_MAIL_INPUT,), "DATA")
        self._nothing_unasked("the message")
        self._send_payload(b"", prepare_body(b"".join(parts)), "body")
        return self._content_reply("end of data")

    def bdat(self, *parts: bytes) -> Reply:
        """SMTPConnection.bdat sends the message as one ``BDAT <size> LAST`` chunk; 250 succeeds.

        The server must have offered CHUNKING [RFC 3030]. The content is the concatenation
        of *parts* with CRLF line ends (:func:`canonical_body`), neither dot-stuffed nor
        ended by a dot; the command and the content go out in one write when the content
        fits in one :data:`BODY_CHUNK`. Each write is bounded by the command timeout (B-104)
        and the one reply by the submission timeout (B-103), as the final reply of DATA is.
        Like :meth:`data`, it needs an accepted recipient (B-40, B-95); otherwise ValueError.
        """
        if self._accepted_rcpts <= 0:
            raise ValueError("bdat() called without an accepted recipient")
        self._settle()
        self._nothing_unasked("BDAT")
        content = canonical_body(b"".join(parts))
        head = b"BDAT %d LAST\r\n" % len(content)
        self._send_payload(head, content, "BDAT")
        del content  # not held while waiting for the reply
        return self._content_reply("BDAT")

    def send_message(self, *parts: bytes) -> Reply:
        """SMTPConnection.send_message sends the content with BDAT when CHUNKING is offered, else DATA.

        The message is the concatenation of *parts*. Nothing is sent after the content
        until its reply is in: a server that answered a later command first (smtp-sink does,
        when it delays the final reply) would otherwise have that reply taken for the
        message's. See :meth:`bdat` and :meth:`data`; the result and the errors are the same.
        """
        if self.supports("CHUNKING"):
            return self.bdat(*parts)
        return self.data(*parts)

    def _nothing_unasked(self, what: str) -> None:
        """_nothing_unasked fails the connection when the server has sent a reply nothing
        asked for: read after the content, it would be taken for the message's (B-99)."""
        if self._rbuf:
            raise self._fail(f"reply nobody asked for, before {what}")

    def _content_reply(self, what: str) -> Reply:
        """_content_reply reads the reply to the message content (bounded by the submission
        timeout, B-103) and ends the transaction."""
        reply = self._read_reply(self.submission_timeout, what)
        self._accepted_rcpts = 0
        self._expect(reply, (codes.OK,), what)
        return reply

    def _send_payload(self, head: bytes, payload: bytes, what: str) -> None:
        """_send_payload writes *head* and *payload*: in one write when the payload fits in
        one :data:`BODY_CHUNK`, else the head, then the payload in pieces of that size."""
        if len(payload) <= BODY_CHUNK:
            self._send(head + payload if head else payload, self.command_timeout, what)
            return
        if head:
            self._send(head, self.command_timeout, what)
        view = memoryview(payload)
        for start in range(0, len(view), BODY_CHUNK):
            self._send(view[start : start + BODY_CHUNK], self.command_timeout, "body")

    def rset(self) -> Reply:
        """SMTPConnection.rset aborts the current transaction; anything but 250 raises."""
        reply = self._exchange(b"RSET\r\n", "RSET")
        self._accepted_rcpts = 0
        self._expect(reply, (codes.OK,), "RSET")
        return reply

    def noop(self) -> Reply:
        """SMTPConnection.noop sends NOOP; anything but 250 raises."""
        reply = self._exchange(b"NOOP\r\n", "NOOP")
        self._expect(reply, (codes.OK,), "NOOP")
        return reply

    def quit(self, timeout: float = QUIT_TIMEOUT) -> None:
        """SMTPConnection.quit sends QUIT, waits *timeout* for the reply and closes (B-106).

        It never raises: a negative reply, a reset or a timeout is logged at debug level
        only (B-70). A broken connection is just closed.
        """
        if self._sock is None:
            return
        if not self.broken:
            deadline = time.monotonic() + timeout  # one bound for all of it, owed replies included

            def left() -> float:
                return max(0.001, deadline - time.monotonic())

            try:
                if not self.supports("PIPELINING"):
                    self._read_owed(left)
                self._send(b"QUIT\r\n", left(), "QUIT")
                self._read_owed(left)  # replies of deferred commands come first
                reply = self._read_reply(left(), "QUIT")
                if reply.code != codes.CLOSING:
                    self.log.debug("QUIT got an unexpected reply",
                                   remote_server=self.remote_server, reply=str(reply))
            except SMTPError as e:
                self.log.debug("QUIT failed", remote_server=self.remote_server,
                               reason=e.fields.get("reason", str(e)))
        self.close()

    def close(self) -> None:
        """SMTPConnection.close closes the socket without QUIT; it is idempotent."""
        self._close_socket()
        if not self.broken:
            self._mark_broken("closed")

    @property
    def closed(self) -> bool:
        """SMTPConnection.closed tells whether the socket has been closed."""
        return self._sock is None

    def __enter__(self) -> SMTPConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()

    def __repr__(self) -> str:
        state = "broken" if self.broken else ("tls" if self.tls else "plain")
        return (f"<SMTPConnection {self.remote_server or ''} {self.remote_address[0]}:"
                f"{self.remote_address[1]} {state} tx={self.transactions}>")

    # --- internals ------------------------------------------------------------------------

    def _mail_line(self, sender: str, params: Mapping[str, str | None] | None) -> bytes:
        _check_address(sender)
        return f"MAIL FROM:<{sender}>{_format_params(params)}\r\n".encode()

    def _rcpt_line(self, rcpt: str, params: Mapping[str, str | None] | None) -> bytes:
        _check_address(rcpt)
        if not rcpt:
            raise _bad_argument("empty recipient")
        return f"RCPT TO:<{rcpt}>{_format_params(params)}\r\n".encode()

    def _mail_rcpts_serial(
        self,
        sender: str,
        params: Mapping[str, str | None] | None,
        rcpts: list[str],
        rset_first: bool,
    ) -> tuple[Reply | SMTPError, list[Reply | SMTPError]]:
        self._settle()  # a deferred RSET that failed raises, as in a pipelined batch
        if rset_first:
            try:
                self.rset()
            except NetworkError:
                raise
            except SMTPError:
                self._fail("RSET failed")
                raise
            self.rset_answered = True
        try:
            mail_reply: Reply | SMTPError = self.mail(sender, params)
        except NetworkError:
            raise
        except SMTPError as e:
            return e, [e] * len(rcpts)
        results: list[Reply | SMTPError] = []
        for r in rcpts:
            try:
                results.append(self.rcpt(r))
            except NetworkError:
                raise
            except SMTPError as e:
                results.append(e)
                if self.broken:  # 421: the rest get the same error, as when pipelining
                    results.extend([e] * (len(rcpts) - len(results)))
                    self._close_socket()
                    break
        return mail_reply, results

    def _rcpt_result(self, reply: Reply, *, raise_error: bool) -> Reply | SMTPError:
        if reply.code in (codes.OK, codes.USER_NOT_LOCAL, codes.CANNOT_VERIFY):
            self._accepted_rcpts += 1
            return reply
        if reply.code < 400:
            raise self._fail(f"unexpected reply to RCPT: {reply.code}")
        err = self._reply_error(reply, "RCPT")
        if err.code == codes.STORAGE_EXCEEDED:
            # RFC 5321 §4.5.3.1.10: "too many recipients" sent as 552 must be treated as 452.
            err = SMTPError(452, (4, err.enhanced[1], err.enhanced[2]), err.message,
                            remote_server=err.remote_server,
                            fields={**err.fields, "original_code": 552})
        if raise_error:
            raise err
        return err

    def _expect(self, reply: Reply, ok: tuple[int, ...], command: str) -> None:
        if reply.code in ok:
            return
        if reply.code < 400:
            raise self._fail(f"unexpected reply to {command}: {reply.code}")
        raise self._reply_error(reply, command)

    def _reply_error(self, reply: Reply, command: str) -> SMTPError:
        if reply.code == codes.SERVICE_NOT_AVAILABLE:
            # The server closes the channel after 421 [RFC 5321 §3.8].
            self._mark_broken("421 reply")
        return reply.error(self.remote_server, command=command)

    def _exchange(self, line: bytes, command: str) -> Reply:
        if self._owed and not self.supports("PIPELINING"):
            self._settle()  # without PIPELINING a deferred reply is read before the next command
        self._send(line, self.command_timeout, command)
        self._settle()
        return self._read_reply(self.command_timeout, command)

    def rset_deferred(self) -> None:
        """SMTPConnection.rset_deferred sends RSET now and reads its reply with the next command.

        A connection parked in an idle pool gets its RSET this way (B-60) without costing a
        round trip: the reply is read when the connection is used again, together with the
        replies of the next batch. A negative or missing reply then breaks the connection
        and raises, so the caller can open another one.
        """
        self._send(b"RSET\r\n", self.command_timeout, "RSET")
        self._accepted_rcpts = 0
        self._owed.append("RSET")

    def _settle(self) -> None:
        """_settle reads the replies owed for deferred commands; a bad one breaks the connection."""
        while self._owed:
            verb = self._owed.pop(0)
            reply = self._read_reply(self.command_timeout, verb)
            if reply.code != codes.OK:
                err = self._reply_error(reply, verb)
                self._owed.clear()
                self._fail(f"deferred {verb} failed")
                raise err

    def _read_owed(self, left: Callable[[], float]) -> None:
        """_read_owed reads (and ignores) the replies owed for deferred commands, before QUIT,
        each within what ``left()`` says remains of QUIT's bound."""
        while self._owed:
            self._read_reply(left(), self._owed.pop(0))

    def _mark_broken(self, reason: str) -> None:
        self.broken = True
        if self.broken_reason is None:
            self.broken_reason = reason

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _fail(self, reason: str) -> NetworkError:
        """Mark the connection broken, close it, and return the error to raise."""
        self._mark_broken(reason)
        self._close_socket()
        return NetworkError(reason, remote_server=self.remote_server)

    def _check_usable(self) -> None:
        if self.broken or self._sock is None:
            raise NetworkError(f"connection unusable: {self.broken_reason or 'closed'}",
                               remote_server=self.remote_server)

    def _arm(self, timeout: float) -> Any:
        """_arm starts a timer that, after *timeout* seconds, throws :class:`_Expired` into
        the calling greenlet; the caller stops it when its wait is over. The timers of the
        command and submission timeouts are kept for the next waits."""
        timer = self._timers.get(timeout)
        if timer is None:
            timer = gevent.get_hub().loop.timer(timeout)
            if timeout == self.command_timeout or timeout == self.submission_timeout:
                self._timers[timeout] = timer
        timer.start(gevent.getcurrent().throw, _Expired)
        return timer

    def _send(self, data: bytes | memoryview, timeout: float, what: str = "command") -> None:
        if self.broken or self._sock is None:
            self._check_usable()
        timer = self._arm(timeout)
        try:
            # one send() takes a command or a small message whole; sendall() (which asks
            # the kernel for the buffer size first) is only needed for what is left
            sent = self._sock.send(data)
            if sent < len(data):
                self._sock.sendall(memoryview(data)[sent:])
        except (_Expired, TimeoutError):
            raise self._fail(f"timeout writing {what}") from None
        except (OSError, ValueError) as e:
            raise self._fail(f"write error ({what}): {e}") from e
        finally:
            timer.stop()

    def _fill(self, what: str) -> None:
        """_fill reads what has arrived, waiting for it; the caller's timer bounds the wait."""
        try:
            chunk = self._sock.recv(4096)
        except (_Expired, TimeoutError):
            raise self._fail(f"timeout waiting for {what} reply") from None
        except (OSError, ValueError) as e:
            raise self._fail(f"read error ({what}): {e}") from e
        if not chunk:
            raise self._fail(f"connection closed by server ({what})")
        self._rbuf += chunk

    def _buffered_reply(self) -> Reply | None:
        """_buffered_reply takes a complete one-line reply that is already buffered (the
        common case: a pipelined batch's replies arrive together), without the line-by-line
        loop of :meth:`_read_reply`; None when the buffer holds anything else."""
        m = _FAST_REPLY.match(self._rbuf)
        if m is None:
            return None
        end = m.end()
        if end > MAX_LINE_LENGTH + 2:
            return None
        line = m.group(0)
        reply = _REPLIES.get(line)
        if reply is None:
            code_b, text_b, klass, subject, detail = m.groups()
            code = int(code_b)
            raw = text_b.decode("utf-8", errors="replace")
            if klass is None or code // 100 == 3:
                reply = Reply(code, None, raw, (raw,))
            else:
                # the enhanced code as parse_enhanced reads it: N.N.N, then a space or the end
                reply = Reply(code, (int(klass), int(subject), int(detail)), raw.partition(" ")[2], (raw,))
            if len(_REPLIES) >= REPLY_CACHE_SIZE:
                _REPLIES.clear()
            _REPLIES[line] = reply
        del self._rbuf[:end]  # after reading the groups: they point into the buffer
        self.last_used = self._clock()
        return reply

    def _read_line(self, what: str) -> bytes:
        while True:
            idx = self._rbuf.find(b"\n")
            if idx >= 0:
                line = bytes(self._rbuf[:idx])
                del self._rbuf[: idx + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > MAX_LINE_LENGTH:
                    raise self._fail(f"reply line too long ({what})")
                return line
            if len(self._rbuf) > MAX_LINE_LENGTH + 1:
                raise self._fail(f"reply line too long ({what})")
            self._fill(what)

    def _read_reply(self, timeout: float, what: str) -> Reply:
        """Read one reply; the whole reply must arrive within *timeout*."""
        if self.broken or self._sock is None:
            self._check_usable()
        if self._rbuf:
            fast = self._buffered_reply()
            if fast is not None:
                return fast
        timer = self._arm(timeout)  # one timer for the whole reply, however many reads
        try:
            if not self._rbuf:
                # the usual wait: the reply has not arrived; once it has, it is most often
                # one line that the fast path takes whole
                self._fill(what)
                fast = self._buffered_reply()
                if fast is not None:
                    return fast
            return self._read_lines(what)
        finally:
            timer.stop()

    def _read_lines(self, what: str) -> Reply:
        """_read_lines reads a reply line by line (multi-line, split, or malformed ones)."""
        code: int | None = None
        texts: list[str] = []
        total = 0
        while True:
            raw = self._read_line(what)
            total += len(raw) + 2
            head = raw[:3]
            sep = raw[3:4]
            if len(head) != 3 or not head.isdigit() or sep not in (b"", b" ", b"-"):
                raise self._fail(f"malformed reply line ({what})")
            line_code = int(head)
            if not codes.is_valid_code(line_code):
                raise self._fail(f"invalid reply code {line_code} ({what})")
            if code is None:
                code = line_code
            elif line_code != code:
                raise self._fail(f"inconsistent codes in a multi-line reply ({what})")
            texts.append(raw[4:].decode("utf-8", errors="replace"))
            if sep != b"-":
                break
            if len(texts) >= MAX_REPLY_LINES or total > MAX_REPLY_BYTES:
                raise self._fail(f"reply too long ({what})")
        assert code is not None
        self.last_used = self._clock()
        if code // 100 == 3:
            enhanced, first = None, texts[0]
        else:
            enhanced, first = parse_enhanced(texts[0])
        text = "\n".join([first, *texts[1:]])
        return Reply(code, enhanced, text, tuple(texts))


#: One-line replies already parsed, by their bytes, shared by every connection: servers
#: repeat the same few (``250 2.1.0 Ok``) on every transaction, and a Reply is immutable.
_REPLIES: dict[bytes, Reply] = {}

# a complete one-line reply: code, text, and the enhanced code that may start the text
# (the same rule as codes.parse_enhanced: N.N.N followed by a space or the end of the line)
_FAST_REPLY = re.compile(rb"([2-5][0-5][0-9]) ((?:([245])\.(\d{1,3})\.(\d{1,3})(?= |\r?\n))?[^\r\n]*)\r?\n")


def _parse_extensions(lines: Sequence[str]) -> dict[str, str]:
    exts: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        if _KEYWORD_RE.match(keyword):
            exts[keyword.upper()] = params.strip()
    return exts


def _addr_pair(sock: Any, method: str) -> tuple[str, int]:
    # A peer that reset right after connecting makes getpeername fail; the next read
    # reports the failure properly, so metadata just stays empty here.
    try:
        addr = getattr(sock, method)()
        return (str(addr[0]), int(addr[1]))
    except (OSError, TypeError, IndexError, ValueError):
        return ("", 0)


# --- dialing ------------------------------------------------------------------------------


def _family_of(address: str) -> tuple[int, str] | None:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    family = _stdlib_socket.AF_INET6 if ip.version == 6 else _stdlib_socket.AF_INET
    return family, str(ip)


def _interleave(candidates: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Alternate address families, starting with the first one's [RFC 8305 §4]."""
    if not candidates:
        return candidates
    first_family = candidates[0][0]
    first = [c for c in candidates if c[0] == first_family]
    other = [c for c in candidates if c[0] != first_family]
    out: list[tuple[int, str]] = []
    for i in range(max(len(first), len(other))):
        if i < len(first):
            out.append(first[i])
        if i < len(other):
            out.append(other[i])
    return out


def _dial(
    addresses: Sequence[str],
    port: int,
    *,
    timeout: float,
    local_ip: str | None,
    stagger: float,
    remote_server: str | None,
) -> Any:
    local: tuple[int, str] | None = None
    if local_ip:
        local = _family_of(local_ip)
        if local is None:
            raise NetworkError(f"invalid local address {local_ip!r}", remote_server=remote_server)
    candidates: list[tuple[int, str]] = []
    for a in addresses:
        fam = _family_of(a)
        if fam is None:
            continue
        if local is not None and fam[0] != local[0]:
            continue  # B-109: a v4 source cannot reach a v6 destination and vice versa.
        candidates.append(fam)
    if not candidates:
        raise NetworkError("no suitable address to connect to", remote_server=remote_server,
                           fields={"addresses": ",".join(addresses)})
    candidates = _interleave(candidates)

    deadline = time.monotonic() + timeout

    def connect(family: int, ip: str) -> tuple[bool, Any]:
        """One attempt: (True, socket) or (False, reason)."""
        sock = gevent.socket.socket(family, _stdlib_socket.SOCK_STREAM)
        try:
            if local is not None:
                sock.bind((local[1], 0))
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect((ip, port))
            sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
        except TimeoutError:
            sock.close()
            return False, f"connect {ip} port {port}: timeout"
        except OSError as e:
            sock.close()
            return False, f"connect {ip} port {port}: {e.strerror or e}"
        except BaseException:
            sock.close()  # killed because another attempt won
            raise
        return True, sock

    if len(candidates) == 1:
        # One address: no race to run, so no greenlet (it would cost memory per connection).
        ok, value = connect(*candidates[0])
        if ok:
            return value
        raise NetworkError("connect timeout" if value.endswith(": timeout") else value,
                           remote_server=remote_server)

    # Several addresses race (Happy Eyeballs): each attempt in a greenlet of its own.
    results: gevent.queue.Queue = gevent.queue.Queue()
    winner: Any = None

    def attempt(family: int, ip: str) -> None:
        results.put(connect(family, ip))

    group = gevent.pool.Group()

    last_reason = "connect: no attempt made"
    next_idx = 0
    pending = 0
    try:
        while winner is None:
            if next_idx < len(candidates):
                family, ip = candidates[next_idx]
                g = gevent.Greenlet(attempt, family, ip)
                g.name = f"smtp-dial {ip}"
                group.start(g)
                next_idx += 1
                pending += 1
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NetworkError(f"connect timeout ({last_reason})"
                                       if pending == 0 else "connect timeout",
                                       remote_server=remote_server)
                if pending == 0:
                    if next_idx < len(candidates):
                        break
                    raise NetworkError(last_reason, remote_server=remote_server)
                more = next_idx < len(candidates)
                wait = min(stagger, remaining) if more else remaining
                try:
                    ok, value = results.get(timeout=wait)
                except gevent.queue.Empty:
                    if more:
                        break  # stagger elapsed: start the next attempt alongside
                    continue
                pending -= 1
                if ok:
                    winner = value
                    break
                last_reason = value
                if more:
                    break  # a failure starts the next attempt at once [RFC 8305 §5]
    finally:
        group.kill(block=True)
        while not results.empty():
            ok, value = results.get_nowait()
            if ok and value is not winner:
                value.close()
    return winner
