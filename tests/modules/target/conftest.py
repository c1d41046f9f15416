"""Fakes for the target.remote tests: an in-process DNS server, scriptable MXes and a PKI.

- :class:`FakeDNS` answers UDP queries from a small table (MX, A, AAAA, CNAME, TXT...),
  can answer any rcode, stay silent, answer late, and set the AD bit. It records every
  question, so tests can assert "no DNS lookup".
- :class:`FakeMX` is a gevent StreamServer on one loopback address. It speaks enough SMTP
  (EHLO/HELO, STARTTLS, MAIL, RCPT, DATA, RSET, NOOP, QUIT), records every session (peer
  address, commands, TLS, SNI, transactions, QUIT, who closed) and lets a test replace the
  reply to any verb, delay it, or stop reading. All MXes of a test listen on the same port
  on different 127.0.0.x addresses (or ::1), since target.remote has one port for all.
- :class:`PKISet` is a CA, a CA-issued certificate for the MX names, a self-signed one,
  an expired one, one for the wrong name and a client certificate.
- :class:`World` ties them together: ``mxworld.domain(...)`` publishes a recipient domain,
  ``mxworld.target(...)`` configures and starts a target.remote wired to the fakes.

Fixture names are prefixed (``mxworld``, ``remote_pki``) so that other test files of this
folder keep their own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import gevent
import gevent.pool
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from gevent.server import StreamServer
from smtpstream import CommandStream, ehlo_reply, hooked_reply

import maddylite.log
from maddylite import dns as mdns
from maddylite.interfaces import MsgMetadata
from maddylite.policy import DeliveryPolicy, MXCandidate, MXLevel, TLSLevel
from maddylite.smtp import errors as E

#: Returned by a reply hook to make the fake MX drop the connection at once.
CLOSE = object()

HEADER = b"From: <test@example.com>\r\nTo: <test@example.test>\r\nSubject: hi\r\n"
BODY = b"Hello.\r\n"

ReplyHook = Callable[["Session", str], Any]


def wait_for(pred: Callable[[], Any], timeout: float = 3.0) -> Any:
    """wait_for polls pred (letting the fake servers run) until it is true or fails."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        gevent.sleep(0.01)


def free_tcp_port() -> int:
    """free_tcp_port returns a TCP port free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deliver(t: Any, rcpts: list[str], *, sender: str = "test@example.com", meta: MsgMetadata | None = None,
            header: bytes = HEADER, body: bytes | None = BODY, atomic: bool = False,
            finish: str = "commit") -> tuple[Any, dict[str, Any]]:
    """deliver runs one delivery as the queue does and returns it with the results.

    The results map each recipient to its add_rcpt error, else its body error (None when
    delivered); with ``atomic`` the body() error, if any, is under ``"<body>"``.
    """
    d = t.start_delivery(meta or MsgMetadata(id="m1"), sender)
    res: dict[str, Any] = {}
    for r in rcpts:
        try:
            d.add_rcpt(r)
            res[r] = None
        except E.SMTPError as e:
            res[r] = e
    if body is not None:
        if atomic:
            try:
                d.body(header, body)
            except E.SMTPError as e:
                res["<body>"] = e
        else:
            for r, err in d.body_per_rcpt(header, body).items():
                res[r] = err
    getattr(d, finish)()
    return d, res


def assert_err(err: Any, code: int, enhanced: str, message: str, temporary: bool) -> None:
    """assert_err checks an SMTPError's codes, exact message and class."""
    assert isinstance(err, E.SMTPError), f"expected an SMTPError, got {err!r}"
    got = (err.code, ".".join(map(str, err.enhanced)), err.message, err.temporary)
    assert got == (code, enhanced, message, temporary)


# --- DNS ------------------------------------------------------------------------------------


class FakeDNS:
    """FakeDNS is a UDP DNS server answering from a table; names are case-insensitive.

    ``add(name, type, *rdata)`` publishes records; ``cname(name, target)`` an alias (the
    answer carries the chain, as a recursive resolver's does). A name with no record is
    NXDOMAIN, a known name without the asked type is NODATA (with an SOA). ``rcode`` forces
    an rcode (``"SERVFAIL"``...) or ``"DROP"`` (no answer) for a name, or for ``(name,
    type)``; ``delay`` answers late; names in ``ad`` (or every name when ``ad_all``) get
    the AD bit.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.cnames: dict[str, str] = {}
        self.rcodes: dict[Any, str] = {}
        self.delays: dict[Any, float] = {}
        self.ad: set[str] = set()
        self.ad_all = False
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.group = gevent.pool.Group()

    @staticmethod
    def _n(name: str) -> str:
        name = name.lower()
        return name if name.endswith(".") else name + "."

    def add(self, name: str, rdtype: str, *rdatas: str) -> None:
        """add publishes records (rdata in zone-file text)."""
        self.records.setdefault((self._n(name), rdtype.upper()), []).extend(rdatas)

    def cname(self, name: str, target: str) -> None:
        """cname makes name an alias of target."""
        self.cnames[self._n(name)] = self._n(target)

    def set_rcode(self, name: str, rcode: str, rdtype: str | None = None) -> None:
        """set_rcode forces an rcode or "DROP" for a name (or one type of it)."""
        self.rcodes[(self._n(name), rdtype) if rdtype else self._n(name)] = rcode

    def set_delay(self, name: str, seconds: float, rdtype: str | None = None) -> None:
        """set_delay answers a name (or one type of it) late."""
        self.delays[(self._n(name), rdtype) if rdtype else self._n(name)] = seconds

    def asked(self, name: str | None = None) -> list[tuple[str, str]]:
        """asked lists the questions received (for one name, if given)."""
        return [q for q in self.queries if name is None or q[0] == self._n(name)]

    def start(self) -> FakeDNS:
        """start begins serving."""
        self.group.spawn(self._loop)
        return self

    def stop(self) -> None:
        """stop ends serving."""
        self.group.kill(block=True, timeout=1)
        self.sock.close()

    def _loop(self) -> None:
        while True:
            data, addr = self.sock.recvfrom(65535)
            self.group.spawn(self._answer, data, addr)

    def _known(self, name: str) -> bool:
        return name in self.cnames or any(k[0] == name for k in self.records)

    def _answer(self, data: bytes, addr: Any) -> None:
        try:
            q = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - garbage is ignored
            return
        qname = q.question[0].name.to_text().lower()
        qtype = dns.rdatatype.to_text(q.question[0].rdtype)
        self.queries.append((qname, qtype))
        delay = self.delays.get((qname, qtype), self.delays.get(qname))
        if delay:
            gevent.sleep(delay)
        forced = self.rcodes.get((qname, qtype), self.rcodes.get(qname))
        if forced == "DROP":
            return
        r = dns.message.make_response(q)
        r.flags |= dns.flags.RA
        if self.ad_all or qname in self.ad:
            r.flags |= dns.flags.AD
        if forced:
            r.set_rcode(dns.rcode.from_text(forced))
        elif not self._known(qname):
            r.set_rcode(dns.rcode.NXDOMAIN)
        else:
            cur = qname
            for _ in range(8):
                if cur in self.cnames and qtype != "CNAME":
                    target = self.cnames[cur]
                    r.answer.append(dns.rrset.from_text(cur, 300, "IN", "CNAME", target))
                    cur = target
                    continue
                break
            recs = self.records.get((cur, qtype))
            if recs:
                r.answer.append(dns.rrset.from_text_list(cur, 300, "IN", qtype, recs))
            elif not self._known(cur):
                r.set_rcode(dns.rcode.NXDOMAIN)
            else:
                r.authority.append(dns.rrset.from_text(
                    "test.", 300, "IN", "SOA", "ns.test. hostmaster.test. 1 3600 600 86400 300"))
        try:
            self.sock.sendto(r.to_wire(), addr)
        except OSError:
            pass


# --- SMTP -----------------------------------------------------------------------------------


@dataclass
class Session:
    """Session is what a fake MX saw on one connection."""

    server: FakeMX
    index: int
    peer: tuple[str, int]
    sock: Any = None
    commands: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    #: For each command, the number of the read that brought it (pipelined = same number).
    batches: list[int] = field(default_factory=list)
    transactions: list[dict[str, Any]] = field(default_factory=list)
    tx: dict[str, Any] | None = None
    tls: bool = False
    tls_version: str | None = None
    tls_error: str | None = None
    sni: str | None = None
    client_cert: dict[str, Any] | None = None
    quit: bool = False
    client_closed: bool = False
    ended: bool = False

    def send(self, data: bytes) -> None:
        """send writes raw bytes to the client (for hooks that then stall)."""
        self.sock.sendall(data)

    @property
    def verbs(self) -> list[str]:
        """verbs are the command words received, in order."""
        return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in self.commands]

    @property
    def turns(self) -> list[list[str]]:
        """turns group the command words by the read that brought them."""
        out: dict[int, list[str]] = {}
        for verb, n in zip(self.verbs, self.batches, strict=True):
            out.setdefault(n, []).append(verb)
        return list(out.values())

    @property
    def mail_lines(self) -> list[str]:
        """mail_lines are the MAIL commands received."""
        return [c for c in self.commands if c.upper().startswith("MAIL")]

    @property
    def rcpt_lines(self) -> list[str]:
        """rcpt_lines are the RCPT commands received."""
        return [c for c in self.commands if c.upper().startswith("RCPT")]

    @property
    def delivered(self) -> list[dict[str, Any]]:
        """delivered are the transactions that ended with 250 to the final dot."""
        return [t for t in self.transactions if t.get("accepted")]


class FakeMX:
    """FakeMX answers SMTP like a simple, well-behaved MX unless told otherwise.

    ``replies`` maps an upper-case verb (``GREETING``, ``EHLO``, ``STARTTLS``, ``MAIL``,
    ``RCPT``, ``DATA``, ``DOT`` for the end of data, ``BDAT`` for the reply after a
    chunk (offered when ``extensions`` has CHUNKING), ``RSET``, ``QUIT``...) to reply bytes
    or to a hook ``(session, line)`` returning bytes, None (the default reply) or
    :data:`CLOSE`; a hook may sleep. ``greeting=None`` never greets. ``tls`` is a server
    SSLContext, or ``(session) -> SSLContext | None`` (None: close after the 220 reply, so
    the client's handshake fails); STARTTLS is advertised when ``tls`` is set.
    ``tls_extensions`` are advertised after TLS (default: the same as before).
    """

    def __init__(self, ip: str, port: int, *, greeting: bytes | None = b"220 mx.example.test ESMTP fake\r\n",
                 extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"),
                 tls: Any = None, tls_extensions: tuple[str, ...] | None = None,
                 replies: dict[str, Any] | None = None, rcpt_replies: dict[str, bytes] | None = None) -> None:
        self.ip = ip
        self.port = port
        self.greeting = greeting
        self.extensions = extensions
        self.tls = tls
        self.tls_extensions = tls_extensions if tls_extensions is not None else extensions
        self.replies = dict(replies or {})
        self.rcpt_replies = dict(rcpt_replies or {})
        self.sessions: list[Session] = []
        self.group = gevent.pool.Pool()
        self._server = StreamServer((ip, port), self._handle, spawn=self.group)

    def start(self) -> FakeMX:
        """start begins accepting connections."""
        self._server.start()
        return self

    def stop(self) -> None:
        """stop closes the listener and kills the sessions."""
        self._server.close()
        self.group.kill(block=True, timeout=1)

    @property
    def session(self) -> Session:
        """session is the latest session."""
        return self.sessions[-1]

    @property
    def messages(self) -> list[dict[str, Any]]:
        """messages are the accepted transactions of every session."""
        return [t for s in self.sessions for t in s.delivered]

    @property
    def mail_lines(self) -> list[str]:
        """mail_lines are the MAIL commands of every session."""
        return [m for s in self.sessions for m in s.mail_lines]

    def _ehlo_reply(self, tls: bool) -> bytes:
        exts = list(self.tls_extensions if tls else self.extensions)
        if self.tls is not None and not tls:
            exts.append("STARTTLS")
        return ehlo_reply("mx.example.test greets mx.sender.test", exts)

    def _reply(self, s: Session, verb: str, line: str, default: bytes) -> Any:
        return hooked_reply(self.replies, s, verb, line, default)

    def _handle(self, sock: Any, addr: Any) -> None:
        s = Session(self, len(self.sessions), (addr[0], addr[1]), sock)
        self.sessions.append(s)
        try:
            self._serve(s)
        except (OSError, ssl.SSLError) as e:
            if s.tls_error is None and isinstance(e, ssl.SSLError):
                s.tls_error = str(e)
        finally:
            s.ended = True
            try:
                s.sock.close()
            except OSError:
                pass

    def _serve(self, s: Session) -> None:
        if self.greeting is None and "GREETING" not in self.replies:
            gevent.sleep(3600)
            return
        greeting = self._reply(s, "GREETING", "", self.greeting or b"")
        if greeting is CLOSE:
            return
        if greeting:
            s.sock.sendall(greeting)
        stream = CommandStream()
        body = b""  # the BDAT chunks of the message so far
        nread = 0
        while True:
            chunk = s.sock.recv(65536)
            if not chunk:
                s.client_closed = True
                return
            stream.feed(chunk)
            nread += 1
            out: list[bytes] = []
            starttls = False
            while (item := stream.next()) is not None:
                kind, value = item
                if kind in ("chunk", "message"):
                    s.commands.append("<chunk>" if kind == "chunk" else "<body>")
                    s.times.append(time.monotonic())
                    s.batches.append(nread)
                    last = kind == "message" or value[1]
                    if kind == "chunk":
                        body += value[0]
                    r = self._reply(s, "BDAT" if kind == "chunk" else "DOT", "", b"250 2.0.0 OK queued\r\n")
                    if r is CLOSE:
                        return
                    if s.tx is not None and last:
                        s.tx["data"] = body if kind == "chunk" else value
                        s.tx["accepted"] = r.startswith(b"250")
                        s.tx = None
                    if last or not r.startswith(b"250"):
                        body = b""
                    out.append(r)
                    continue
                line = value
                s.commands.append(line)
                s.times.append(time.monotonic())
                s.batches.append(nread)
                verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb == "BDAT" and "CHUNKING" in self.extensions:
                    stream.start_chunk(line)  # [RFC 3030]: the reply follows the whole chunk
                    continue
                reply = self._reply(s, verb, line, self._default(s, verb, line))
                if reply is CLOSE:
                    if out:
                        s.sock.sendall(b"".join(out))
                    return
                self._track(s, verb, line, reply)
                out.append(reply)
                if verb == "DATA" and reply.startswith(b"354"):
                    stream.start_data()
                if verb == "STARTTLS" and reply.startswith(b"220"):
                    starttls = True
                    break
                if verb == "QUIT":
                    s.quit = True
                    s.sock.sendall(b"".join(out))
                    return
            if out:
                s.sock.sendall(b"".join(out))
            if starttls and not self._wrap(s):
                return

    def _track(self, s: Session, verb: str, line: str, reply: bytes) -> None:
        if verb == "MAIL" and reply.startswith(b"250"):
            s.tx = {"mail": line, "rcpts": [], "data": None, "accepted": False}
            s.transactions.append(s.tx)
        elif verb == "RCPT" and reply[:2] == b"25" and s.tx is not None:
            s.tx["rcpts"].append(line.split("<", 1)[1].split(">", 1)[0])
        elif verb in ("RSET", "EHLO", "HELO"):
            s.tx = None

    def _default(self, s: Session, verb: str, line: str) -> bytes:
        if verb == "EHLO":
            return self._ehlo_reply(s.tls)
        if verb == "HELO":
            return b"250 mx.example.test\r\n"
        if verb == "STARTTLS":
            if self.tls is None or s.tls:
                return b"502 5.5.1 Not supported\r\n"
            return b"220 2.0.0 Ready to start TLS\r\n"
        if verb == "MAIL":
            return b"250 2.1.0 OK\r\n"
        if verb == "RCPT":
            addr = line.split("<", 1)[1].split(">", 1)[0] if "<" in line else ""
            return self.rcpt_replies.get(addr, b"250 2.1.5 OK\r\n")
        if verb == "DATA":
            if s.tx is None or not s.tx["rcpts"]:
                return b"554 5.5.1 No valid recipients\r\n"
            return b"354 Go ahead\r\n"
        if verb in ("RSET", "NOOP"):
            return b"250 2.0.0 OK\r\n"
        if verb == "QUIT":
            return b"221 2.0.0 Bye\r\n"
        return b"500 5.5.2 Unknown command\r\n"

    def _wrap(self, s: Session) -> bool:
        ctx = self.tls(s) if callable(self.tls) else self.tls
        if ctx is None:
            return False

        def sni(_obj: Any, name: str | None, _ctx: Any) -> None:
            s.sni = name

        ctx.sni_callback = sni
        try:
            tls_sock = ctx.wrap_socket(s.sock, server_side=True)
        except (OSError, ssl.SSLError) as e:
            s.tls_error = str(e) or type(e).__name__
            return False
        s.sock = tls_sock
        s.tls = True
        s.tls_version = tls_sock.version()
        s.client_cert = tls_sock.getpeercert() or None
        s.tx = None
        return True


class Blackhole:
    """Blackhole is a listening socket whose accept queue is full: SYNs are dropped."""

    def __init__(self, ip: str, port: int) -> None:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.lsock = socket.socket(fam, socket.SOCK_STREAM)
        self.lsock.bind((ip, port))
        self.lsock.listen(0)
        self.filler = socket.socket(fam, socket.SOCK_STREAM)
        self.filler.connect((ip, port))

    def close(self) -> None:
        """close releases the sockets."""
        self.filler.close()
        self.lsock.close()


# --- PKI ------------------------------------------------------------------------------------

MX_NAMES = ("mx.example.test", "mx1.example.test", "mx2.example.test", "mx.example2.test",
            "mx1.example2.test")


@dataclass
class PKISet:
    """PKISet holds PEM paths: the CA, server certificates of several kinds, a client one."""

    root: Path
    ca: Path
    certs: dict[str, tuple[Path, Path]]
    spki_sha256: dict[str, bytes]

    def ctx(self, kind: str = "valid", *, max_version: ssl.TLSVersion | None = None,
            ask_client_cert: bool = False) -> ssl.SSLContext:
        """ctx makes a server context with one of: valid, self_signed, expired, wrong_name."""
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert, key = self.certs[kind]
        if max_version is not None:
            c.set_ciphers("DEFAULT:@SECLEVEL=0")
            c.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            with warnings.catch_warnings():  # TLS 1.1 is deprecated, which is the point here
                warnings.simplefilter("ignore", DeprecationWarning)
                c.maximum_version = max_version
        c.load_cert_chain(cert, key)
        if ask_client_cert:
            c.verify_mode = ssl.CERT_OPTIONAL
            c.load_verify_locations(cafile=str(self.ca))
        return c


def _make_pki(root: Path) -> PKISet:
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k: Any) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("maddylite test CA")).issuer_name(name("maddylite test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(names: tuple[str, ...], *, self_signed: bool = False, expired: bool = False,
             client: bool = False) -> tuple[Any, Any]:
        k = ec.generate_private_key(ec.SECP256R1())
        signer = k if self_signed else ca_key
        issuer = name(names[0]) if self_signed else ca.subject
        before, after = (now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired else \
            (now - dt.timedelta(days=1), now + dt.timedelta(days=30))
        eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (x509.CertificateBuilder().subject_name(name(names[0])).issuer_name(issuer)
                .public_key(k.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(before).not_valid_after(after)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .sign(signer, hashes.SHA256()))
        return cert, k

    pem = serialization.Encoding.PEM
    (root / "ca.pem").write_bytes(ca.public_bytes(pem))
    kinds = {
        "valid": leaf(MX_NAMES),
        "self_signed": leaf(MX_NAMES, self_signed=True),
        "expired": leaf(MX_NAMES, expired=True),
        "wrong_name": leaf(("wrong.example.invalid",)),
        "client": leaf(("client.sender.test",), client=True),
    }
    certs: dict[str, tuple[Path, Path]] = {}
    spki: dict[str, bytes] = {}
    for kind, (cert, k) in kinds.items():
        cp, kp = root / f"{kind}.pem", root / f"{kind}.key"
        cp.write_bytes(cert.public_bytes(pem))
        kp.write_bytes(pem_key(k))
        certs[kind] = (cp, kp)
        spki[kind] = hashlib.sha256(cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()
    return PKISet(root, root / "ca.pem", certs, spki)


@pytest.fixture(scope="session")
def remote_pki(tmp_path_factory: pytest.TempPathFactory) -> PKISet:
    """remote_pki is the CA and the certificates of the remote tests."""
    return _make_pki(tmp_path_factory.mktemp("remote-pki"))


# --- policy stubs ---------------------------------------------------------------------------


class StubPolicy:
    """StubPolicy is an mx_auth policy whose checks are given as functions.

    ``check_mx(cand) -> MXLevel`` and ``check_conn(cand) -> TLSLevel`` may raise SMTPError.
    ``started`` counts deliveries that used it.
    """

    def __init__(self, check_mx: Callable[[MXCandidate], MXLevel] | None = None,
                 check_conn: Callable[[MXCandidate], TLSLevel] | None = None) -> None:
        self._check_mx = check_mx
        self._check_conn = check_conn
        self.started = 0

    def start_delivery(self, meta: MsgMetadata) -> DeliveryPolicy:
        """start_delivery returns the per-delivery checks."""
        self.started += 1
        outer = self

        class _P(DeliveryPolicy):
            def check_mx(self, cand: MXCandidate) -> MXLevel:
                return outer._check_mx(cand) if outer._check_mx else cand.mx_level

            def check_conn(self, cand: MXCandidate) -> TLSLevel:
                return outer._check_conn(cand) if outer._check_conn else cand.tls_level

        return _P()


class StubGroup:
    """StubGroup stands in for an mx_auth group: policies in the given order."""

    def __init__(self, *policies: Any) -> None:
        self._policies = tuple(policies)

    def policies(self) -> tuple[Any, ...]:
        """policies returns the policies."""
        return self._policies


def sts_stub(mode: str = "enforce", mx: tuple[str, ...] = ("mx.example.test",)) -> StubPolicy:
    """sts_stub behaves like an MTA-STS policy (C-12) for every domain: the MXes in ``mx``
    match (MX level mtasts); in enforce mode others are refused and TLS must be
    authenticated."""

    def check_mx(cand: MXCandidate) -> MXLevel:
        if cand.host.rstrip(".") in mx:
            return max(cand.mx_level, MXLevel.MTASTS)
        if mode == "enforce":
            raise E.MTASTS_MX_MISMATCH.error(remote_server=cand.host)
        return cand.mx_level

    def check_conn(cand: MXCandidate) -> TLSLevel:
        if mode == "enforce":
            if cand.tls_level == TLSLevel.NONE:
                raise E.MTASTS_TLS_REQUIRED.error(remote_server=cand.host)
            if cand.tls_level < TLSLevel.AUTHENTICATED:
                raise E.MTASTS_CERT_UNTRUSTED.error(remote_server=cand.host)
        return cand.tls_level

    return StubPolicy(check_mx, check_conn)


def dane_ee_stub(spki_sha256: bytes) -> StubPolicy:
    """dane_ee_stub behaves like DANE with one authenticated ``3 1 1`` record (C-69)."""
    def check_conn(cand: MXCandidate) -> TLSLevel:
        conn = cand.conn
        der = conn.peer_certificate_der() if conn is not None else None
        if der is None:
            raise E.DANE_TLS_REQUIRED.error(remote_server=cand.host)
        pub = x509.load_der_x509_certificate(der).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if hashlib.sha256(pub).digest() != spki_sha256:
            raise E.DANE_NO_MATCH.error(remote_server=cand.host)
        return TLSLevel.AUTHENTICATED

    return StubPolicy(None, check_conn)


# --- the world ------------------------------------------------------------------------------


class World:
    """World is one test's DNS, MXes, PKI, captured log and targets."""

    def __init__(self, build_config: Callable[..., Any], pki: PKISet, monkeypatch: pytest.MonkeyPatch) -> None:
        self.build_config = build_config
        self.pki = pki
        self.dns = FakeDNS().start()
        self.port = free_tcp_port()
        self.servers: list[FakeMX] = []
        self.blackholes: list[Blackhole] = []
        self.targets: list[Any] = []
        self.extra_dns: list[FakeDNS] = []
        self.logbuf = io.StringIO()
        monkeypatch.setattr(maddylite.log, "_out", self.logbuf)
        monkeypatch.setattr(maddylite.log, "_json", True)
        monkeypatch.setattr(maddylite.log, "_enabled", True)

    # DNS and servers

    def mx(self, ip: str = "127.0.0.1", **kw: Any) -> FakeMX:
        """mx starts a fake MX on ip (port: the world's SMTP port)."""
        srv = FakeMX(ip, self.port, **kw).start()
        self.servers.append(srv)
        return srv

    def blackhole(self, ip: str) -> Blackhole:
        """blackhole makes ip:port drop connection attempts."""
        b = Blackhole(ip, self.port)
        self.blackholes.append(b)
        return b

    def host(self, name: str, *ips: str) -> None:
        """host publishes A/AAAA records for a host name."""
        for ip in ips:
            self.dns.add(name, "AAAA" if ":" in ip else "A", ip)

    def domain(self, domain: str, *mxs: tuple[int, str, str | None]) -> None:
        """domain publishes MX records (pref, host, ip or None for no address record)."""
        for pref, host, ip in mxs:
            self.dns.add(domain, "MX", f"{pref} {host}.")
            if ip is not None:
                self.host(host, ip)

    def resolver(self, timeout: float = 1.0, servers: list[FakeDNS] | None = None, **kw: Any) -> mdns.Resolver:
        """resolver makes a Resolver that asks the fake DNS server(s)."""
        srvs = servers or [self.dns]
        return mdns.Resolver(nameservers=[(s.host, s.port) for s in srvs], timeout=timeout, **kw)

    def extra_dns_server(self) -> FakeDNS:
        """extra_dns_server starts another fake DNS server (B-14)."""
        d = FakeDNS().start()
        self.extra_dns.append(d)
        return d

    # targets

    def config(self, text: str) -> Any:
        """config builds a runtime from text."""
        return self.build_config(text)

    def wire(self, t: Any, resolver: mdns.Resolver | None = None, start: bool = True) -> Any:
        """wire injects the fakes into a configured target.remote and starts it."""
        t.resolver = resolver or self.resolver()
        t.smtp_port = self.port
        if start:
            t.start()
        self.targets.append(t)
        return t

    def target(self, extra: str = "", *, root_ca: bool = True, hostname: str | None = "mx.sender.test",
               resolver: mdns.Resolver | None = None, prefix: str = "", start: bool = True) -> Any:
        """target configures ``target.remote r { hostname mx.sender.test; tls_client {
        root_ca <test CA> }; <extra> }``, wires it to the fakes and starts it."""
        lines = []
        if hostname:
            lines.append(f"hostname {hostname}")
        if root_ca:
            lines.append(f"tls_client {{\n root_ca {self.pki.ca}\n}}")
        lines.append(extra)
        rt = self.config(prefix + "target.remote r {\n" + "\n".join(lines) + "\n}\n")
        return self.wire(rt.instance("r"), resolver, start)

    # logs

    def logs(self, msg: str | None = None) -> list[dict[str, Any]]:
        """logs returns the JSON log records (with message msg, if given)."""
        out = []
        for line in self.logbuf.getvalue().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if msg is None or rec.get("msg") == msg:
                out.append(rec)
        return out

    def close(self) -> None:
        """close stops everything the world started."""
        for t in self.targets:
            try:
                t.stop(1)
            except Exception:  # noqa: BLE001
                pass
        for s in self.servers:
            s.stop()
        for b in self.blackholes:
            b.close()
        for d in [self.dns, *self.extra_dns]:
            d.stop()


@pytest.fixture
def mxworld(build_config: Callable[..., Any], remote_pki: PKISet, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """mxworld is the test world of behaviour.md section B, empty: publish what you need."""
    w = World(build_config, remote_pki, monkeypatch)
    yield w
    w.close()


@pytest.fixture
def std_world(mxworld: World) -> World:
    """std_world is section B's default world: example.test MX 10 mx.example.test at 127.0.0.1
    with a plain fake MX there (``std_world.servers[0]``)."""
    mxworld.domain("example.test", (10, "mx.example.test", "127.0.0.1"))
    mxworld.mx("127.0.0.1")
    return mxworld


@pytest.fixture
def rh() -> Any:
    """rh gives test files the helpers of this conftest (they cannot import it)."""
    import types

    return types.SimpleNamespace(
        CLOSE=CLOSE, HEADER=HEADER, BODY=BODY, wait_for=wait_for, StubPolicy=StubPolicy,
        StubGroup=StubGroup, sts_stub=sts_stub, dane_ee_stub=dane_ee_stub, FakeMX=FakeMX,
        deliver=deliver, assert_err=assert_err,
    )
