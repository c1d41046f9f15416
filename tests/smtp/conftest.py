"""Fixtures for the SMTP client tests: a scriptable fake SMTP server and a tiny PKI.

The fake server is a gevent StreamServer on 127.0.0.1:0. It speaks enough SMTP for the
client (EHLO/HELO, STARTTLS, MAIL, RCPT, DATA, RSET, NOOP, QUIT), records every command,
every message and every *turn* (one batch of replies written after one read), and lets a
test replace the reply to any verb.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import gevent.ssl
import pytest
from gevent.server import StreamServer
from smtpstream import CommandStream, ehlo_reply, hooked_reply

from maddylite.log import Logger

#: Returned by a reply hook to make the server drop the connection at once.
CLOSE = object()

ReplyHook = Callable[["Session", str], Any]


@dataclass
class Session:
    """Session is what the fake server saw on one connection."""

    peer: tuple[str, int]
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    turns: list[list[str]] = field(default_factory=list)
    sni: str | None = None
    tls: bool = False
    ended: bool = False


class FakeSMTPServer:
    """FakeSMTPServer answers SMTP like a simple, well-behaved MX unless told otherwise.

    ``replies`` maps an upper-case verb (``EHLO``, ``MAIL``, ``RCPT``, ``DATA``, ``DOT``
    for the end of data, ``BDAT`` for the reply after a chunk, ``QUIT``...) to reply bytes or to a hook ``(session, line)``
    returning bytes, None (default reply) or :data:`CLOSE`. ``rcpt_replies`` maps a
    recipient address to its reply.
    """

    def __init__(
        self,
        *,
        greeting: bytes = b"220 mx.example.test ESMTP fake\r\n",
        extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SIZE 10240000"),
        tls_context: ssl.SSLContext | None = None,
        tls_extensions: tuple[str, ...] | None = None,
        replies: dict[str, Any] | None = None,
        rcpt_replies: dict[str, bytes] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.greeting = greeting
        self.extensions = extensions
        self.tls_context = tls_context
        self.tls_extensions = tls_extensions if tls_extensions is not None else extensions
        self.replies = dict(replies or {})
        self.rcpt_replies = dict(rcpt_replies or {})
        self.sessions: list[Session] = []
        self._server = StreamServer((host, port), self._handle)

    def start(self) -> FakeSMTPServer:
        """start begins accepting connections."""
        self._server.start()
        return self

    def stop(self) -> None:
        """stop closes the listener and kills the session greenlets."""
        self._server.stop(timeout=1)

    @property
    def port(self) -> int:
        """port is the TCP port the server listens on."""
        return int(self._server.server_port)

    @property
    def session(self) -> Session:
        """session is the latest session."""
        return self.sessions[-1]

    # --- protocol -------------------------------------------------------------------------

    def _ehlo_reply(self, tls: bool) -> bytes:
        exts = self.tls_extensions if tls else self.extensions
        if self.tls_context is not None and not tls:
            exts = (*exts, "STARTTLS")
        return ehlo_reply("mx.example.test greets you", exts)

    def _reply(self, s: Session, verb: str, line: str, default: bytes) -> Any:
        return hooked_reply(self.replies, s, verb, line, default)

    def _handle(self, sock: Any, addr: tuple[str, int]) -> None:
        s = Session(peer=(addr[0], addr[1]))
        self.sessions.append(s)
        try:
            self._serve(sock, s)
        except (OSError, ssl.SSLError):
            pass
        finally:
            s.ended = True
            sock.close()

    def _serve(self, sock: Any, s: Session) -> None:
        greeting = self._reply(s, "GREETING", "", self.greeting)
        if greeting is CLOSE:
            return
        if greeting:
            sock.sendall(greeting)
        stream = CommandStream()
        body = b""  # the BDAT chunks of the message so far
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return
            stream.feed(chunk)
            out: list[bytes] = []
            turn: list[str] = []
            starttls = False
            while (item := stream.next()) is not None:
                kind, value = item
                if kind == "chunk":
                    data, last = value
                    body += data
                    r = self._end_chunk(s, turn, last, body)
                    body = b"" if last else body
                    if r is CLOSE:
                        return
                    out.append(r)
                    continue
                if kind == "message":
                    s.messages.append(value)
                    turn.append("<body>")
                    r = self._reply(s, "DOT", "", b"250 2.0.0 OK queued\r\n")
                    if r is CLOSE:
                        return
                    out.append(r)
                    continue
                line = value
                s.commands.append(line)
                verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
                turn.append(verb)
                if verb == "BDAT":  # the reply comes after the chunk [RFC 3030]
                    stream.start_chunk(line)
                    continue
                reply = self._default(s, verb, line)
                reply = self._reply(s, verb, line, reply)
                if reply is CLOSE:
                    if out:
                        sock.sendall(b"".join(out))
                    return
                out.append(reply)
                if verb == "DATA" and reply.startswith(b"354"):
                    stream.start_data()
                if verb == "STARTTLS" and reply.startswith(b"220"):
                    starttls = True
                    break
                if verb == "QUIT":
                    sock.sendall(b"".join(out))
                    return
            if out:
                s.turns.append(turn)
                sock.sendall(b"".join(out))
            if starttls:
                sock = self._wrap(sock, s)
                s.tls = True

    def _end_chunk(self, s: Session, turn: list[str], last: bool, body: bytes) -> Any:
        """_end_chunk records a complete BDAT chunk and returns its reply (hook ``BDAT``)."""
        turn.append("<chunk>")
        if last:
            s.messages.append(body)
        return self._reply(s, "BDAT", "", b"250 2.0.0 OK queued\r\n" if last else b"250 2.0.0 chunk OK\r\n")

    def _default(self, s: Session, verb: str, line: str) -> bytes:
        if verb == "EHLO":
            return self._ehlo_reply(s.tls)
        if verb == "HELO":
            return b"250 mx.example.test\r\n"
        if verb == "STARTTLS":
            return b"220 2.0.0 Ready to start TLS\r\n" if self.tls_context else b"502 5.5.1 no\r\n"
        if verb == "MAIL":
            return b"250 2.1.0 OK\r\n"
        if verb == "RCPT":
            addr = line.split("<", 1)[1].split(">", 1)[0] if "<" in line else ""
            return self.rcpt_replies.get(addr, b"250 2.1.5 OK\r\n")
        if verb == "DATA":
            return b"354 Go ahead\r\n"
        if verb in ("RSET", "NOOP"):
            return b"250 2.0.0 OK\r\n"
        if verb == "QUIT":
            return b"221 2.0.0 Bye\r\n"
        return b"500 5.5.2 unknown command\r\n"

    def _wrap(self, sock: Any, s: Session) -> Any:
        assert self.tls_context is not None
        ctx = self.tls_context

        def sni(_sslobj: Any, name: str | None, _ctx: Any) -> None:
            s.sni = name

        ctx.sni_callback = sni
        return ctx.wrap_socket(sock, server_side=True)


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., FakeSMTPServer]]:
    """smtp_server is a factory: ``smtp_server(**options)`` starts a FakeSMTPServer."""
    started: list[FakeSMTPServer] = []

    def make(**kwargs: Any) -> FakeSMTPServer:
        srv = FakeSMTPServer(**kwargs).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


class RecordingLogger(Logger):
    """RecordingLogger keeps ``(level, message, fields)`` instead of writing lines."""

    def __init__(self, name: str = "test") -> None:
        super().__init__(name, debug=True)
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _emit(self, level: str, msg: str, fields: dict[str, Any]) -> None:
        self.lines.append((level, msg, fields))


@pytest.fixture
def recording_logger() -> RecordingLogger:
    """recording_logger is a Logger (debug on) that records its lines."""
    return RecordingLogger()


@pytest.fixture
def smtp_close() -> object:
    """smtp_close is the marker a FakeSMTPServer reply hook returns to drop the connection."""
    return CLOSE


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[Any], None]], int]]:
    """raw_server is a factory: ``raw_server(handler)`` serves each connection with
    ``handler(sock)`` on 127.0.0.1 and returns the port. For hostile-server tests."""
    started: list[StreamServer] = []

    def make(handler: Callable[[Any], None]) -> int:
        def run(sock: Any, _addr: Any) -> None:
            try:
                handler(sock)
            except OSError:
                pass
            finally:
                sock.close()

        srv = StreamServer(("127.0.0.1", 0), run)
        srv.start()
        started.append(srv)
        return int(srv.server_port)

    yield make
    for srv in started:
        srv.stop(timeout=1)


# --- PKI ----------------------------------------------------------------------------------


@dataclass
class PKI:
    """PKI holds PEM paths: a CA, a CA-issued leaf for mx.example.test, a self-signed leaf."""

    ca: Path
    leaf_cert: Path
    leaf_key: Path
    self_signed_cert: Path
    self_signed_key: Path

    def server_context(self, *, self_signed: bool = False,
                       max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """server_context makes a gevent server-side TLS context with one of the leaves."""
        ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self_signed:
            ctx.load_cert_chain(self.self_signed_cert, self.self_signed_key)
        else:
            ctx.load_cert_chain(self.leaf_cert, self.leaf_key)
        if max_version is not None:
            ctx.maximum_version = max_version
        return ctx


def _make_pki(root: Path) -> PKI:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        return path

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_key = key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("Test CA"))
        .issuer_name(name("Test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(issuer_name: x509.Name, signer: ec.EllipticCurvePrivateKey,
             k: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(name("mx.example.test"))
            .issuer_name(issuer_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.example.test")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.public_key()), critical=False)
            .sign(signer, hashes.SHA256())
        )

    leaf_key = key()
    ss_key = key()
    pem = serialization.Encoding.PEM
    return PKI(
        ca=write(root / "ca.pem", ca.public_bytes(pem)),
        leaf_cert=write(root / "leaf.pem", leaf(ca.subject, ca_key, leaf_key).public_bytes(pem)),
        leaf_key=write(root / "leaf.key", pem_key(leaf_key)),
        self_signed_cert=write(root / "self.pem",
                               leaf(name("mx.example.test"), ss_key, ss_key).public_bytes(pem)),
        self_signed_key=write(root / "self.key", pem_key(ss_key)),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """pki is a CA, a CA-issued leaf for mx.example.test and a self-signed leaf."""
    return _make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _no_leftover_greenlets() -> Iterator[None]:
    """Give servers' greenlets a moment to finish between tests."""
    yield
    gevent.sleep(0)
