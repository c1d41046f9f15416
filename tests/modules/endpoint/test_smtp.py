"""Protocol edge cases of the `smtp` endpoint, over real sockets against an in-process server.

The endpoint feeds a recording target (`test.record`, registered here) so each test can
see exactly what reached the target: envelope, flags (B-26, B-81, REQUIRETLS, SMTPUTF8,
8BITMIME) and the message bytes.
"""

import datetime
import re
import smtplib
import socket
import ssl

import gevent
import gevent.event
import pytest
from maddylite.modules.endpoint import smtp as smtp_mod

from maddylite.config.directives import Directive, StringList
from maddylite.config.errors import ConfigError
from maddylite.interfaces import DeliveryTarget
from maddylite.registry import MODULES, ModuleBase, register
from maddylite.smtp.errors import SMTPError

# -- the recording target ---------------------------------------------------------------


class RecordedDelivery:
    """RecordedDelivery keeps what one delivery received."""

    def __init__(self, target, meta, mail_from):
        self.target = target
        self.meta = meta
        self.mail_from = mail_from
        self.rcpts = []
        self.header = None
        self.body_bytes = None
        self.committed = False
        self.aborted = False

    def add_rcpt(self, rcpt):
        s = self.target.settings
        if rcpt in s.refuse:
            raise SMTPError(550, (5, 1, 1), f"mx.example.test. said: No such user {rcpt}")
        if rcpt in s.defer:
            raise SMTPError(451, (4, 2, 0), "Mailbox busy\nsecond line")
        self.rcpts.append(rcpt)

    def body(self, header, body):
        self.header, self.body_bytes = header, body

    def body_per_rcpt(self, header, body):
        self.body(header, body)
        return {r: None for r in self.rcpts}

    def commit(self):
        self.committed = True
        self.target.done.set()

    def abort(self):
        self.aborted = True

    @property
    def message(self):
        return self.header + b"\r\n" + self.body_bytes


if "test.record" not in MODULES:

    @register("test.record")
    class Record(ModuleBase):
        """Record is a test-only target that keeps every delivery it gets."""

        roles = (DeliveryTarget,)
        directives = (
            Directive(name="refuse", type=StringList(), default=(), help="recipients refused with 550 5.1.1"),
            Directive(name="defer", type=StringList(), default=(), help="recipients refused with 451 4.2.0"),
        )

        def configure(self, inline, settings):
            """configure prepares the record."""
            self.deliveries = []
            self.done = gevent.event.Event()

        def start_delivery(self, meta, mail_from):
            """start_delivery records a new delivery."""
            d = RecordedDelivery(self, meta, mail_from)
            self.deliveries.append(d)
            return d

        @property
        def committed(self):
            """committed lists the deliveries that were committed."""
            return [d for d in self.deliveries if d.committed]


# -- fixtures and helpers ------------------------------------------------------------------


class Client:
    """Client is a raw SMTP client: it sends bytes and reads whole replies."""

    def __init__(self, port, host="127.0.0.1", source=None):
        self.sock = socket.create_connection((host, port), timeout=5, source_address=source)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _line(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode()

    def reply(self):
        """reply returns (code, lines) of the next reply."""
        lines = []
        while True:
            line = self._line()
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def cmd(self, line):
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self):
        """closed tells whether the server closed the connection (EOF after pending replies)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


@pytest.fixture
def endpoint(build_config, free_port):
    """endpoint(body="", target="", top="") starts an smtp endpoint; returns (ep, target, port)."""
    runtimes = []

    def start(body="", target="", top="", listen=None):
        listen = listen or f"tcp://127.0.0.1:{free_port}"
        rt = build_config(
            f"hostname mx.test\n{top}\n"
            f"smtp {listen} {{\n deliver_to test.record {{\n{target}\n }}\n{body}\n}}\n"
        )
        rt.start()
        runtimes.append(rt)
        ep = [m for m in rt.modules if m.mod_name == "smtp"][0]
        port = ep.addresses[0].port
        return ep, ep.target, port

    yield start
    for rt in runtimes:
        rt.stop(1)


@pytest.fixture
def client(endpoint):
    """client(**endpoint kwargs) starts an endpoint and connects; returns (client, target, ep)."""
    clients = []

    def connect(**kw):
        ep, target, port = endpoint(**kw)
        c = Client(port)
        assert c.reply()[0] == 220
        clients.append(c)
        return c, target, ep

    yield connect
    for c in clients:
        c.close()


def transaction(c, sender="a@x.test", rcpts=("b@y.test",), params=""):
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd(f"MAIL FROM:<{sender}>{params}")[0] == 250
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>")[0] == 250
    assert c.cmd("DATA")[0] == 354


MSG = b"From: a@x.test\r\nSubject: hi\r\n\r\nhello\r\n"


def make_cert(tmp_path, name="mx.test"):
    """make_cert writes a self-signed certificate and key for ``name``; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def client_tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- greeting, EHLO, HELO -------------------------------------------------------------------


def test_greeting(endpoint):
    """The greeting is 220 with the configured hostname."""
    _, _, port = endpoint()
    c = Client(port)
    code, lines = c.reply()
    assert code == 220 and lines[0].startswith("mx.test ") and "ESMTP" in lines[0]
    c.close()


def test_ehlo_capabilities(client):
    """EHLO lists the extensions; STARTTLS only with a certificate; REQUIRETLS to a loopback client."""
    c, _, _ = client(body="max_message_size 1M")
    code, lines = c.cmd("EHLO client.test")
    assert code == 250
    assert lines[0] == "mx.test Hello client.test"
    assert set(lines[1:]) == {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "SIZE 1048576",
                              "REQUIRETLS"}


def test_helo_has_no_extensions(client):
    """HELO: a one-line 250, no enhanced codes in replies, no MAIL parameters."""
    c, _, _ = client()
    assert c.cmd("HELO client.test") == (250, ["mx.test"])
    assert c.cmd("MAIL FROM:<a@x.test> BODY=8BITMIME") == (501, ["MAIL parameters need EHLO"])
    assert c.cmd("MAIL FROM:<a@x.test>") == (250, ["OK"])
    assert c.cmd("RCPT TO:<b@y.test> NOTIFY=NEVER") == (501, ["RCPT parameters need EHLO"])


def test_a_repeated_parameter_is_refused(client):
    """A MAIL or RCPT parameter given twice (in any case) is a syntax error [RFC 5321 §4.1.1.11]."""
    c, _, _ = client()
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<a@x.test> BODY=8BITMIME body=7BIT") == (501, ["5.5.4 Duplicate MAIL parameter: BODY"])
    assert c.cmd("MAIL FROM:<a@x.test> BODY=8BITMIME")[0] == 250
    assert c.cmd("RCPT TO:<b@y.test> NOTIFY=NEVER NOTIFY=NEVER") == (501, ["5.5.4 Duplicate RCPT parameter: NOTIFY"])


@pytest.mark.parametrize("size", ["x", "²", "١٢", "1" * 21])
def test_a_malformed_size_parameter_is_refused(client, size):
    """SIZE= must be ASCII digits [RFC 1870]: anything else is 501, not a crash of the session."""
    c, _, _ = client()
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd(f"MAIL FROM:<a@x.test> SIZE={size}") == (501, ["5.5.4 Malformed SIZE parameter"])
    assert c.cmd("MAIL FROM:<a@x.test> SIZE=100")[0] == 250


def test_enhanced_codes_after_ehlo(client):
    """ENHANCEDSTATUSCODES: after EHLO every reply carries its enhanced code [RFC 2034]."""
    c, _, _ = client()
    c.cmd("EHLO client.test")
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])
    assert c.cmd("RCPT TO:<b@y.test>") == (503, ["5.5.1 Send MAIL first"])


# -- sequences and syntax (table) --------------------------------------------------------------

E = "EHLO client.test"
M = "MAIL FROM:<a@x.test>"

SEQUENCES = [
    pytest.param([("MAIL FROM:<a@x.test>", 503)], id="mail-before-ehlo"),
    pytest.param([(E, 250), ("RCPT TO:<b@y.test>", 503)], id="rcpt-before-mail"),
    pytest.param([(E, 250), ("DATA", 503)], id="data-before-mail"),
    pytest.param([(E, 250), (M, 250), ("DATA", 554)], id="data-without-rcpt"),
    pytest.param([(E, 250), (M, 250), (M, 503)], id="nested-mail"),
    pytest.param([(E, 250), (M, 250), ("RSET", 250), (M, 250)], id="rset-ends-transaction"),
    pytest.param([(E, 250), (M, 250), (E, 250), ("RCPT TO:<b@y.test>", 503)], id="ehlo-resets"),
    pytest.param([("EHLO", 501), ("HELO", 501), ("EHLO a b", 501)], id="ehlo-needs-one-domain"),
    pytest.param([("FOO bar", 500), ("MAIL", 503), ("", 500)], id="unknown-command"),
    pytest.param([("EXPN list", 502), ("BDAT 10 LAST", 502), ("AUTH PLAIN", 502)], id="not-implemented"),
    pytest.param([("VRFY user", 252), ("NOOP", 250), ("HELP", 214), ("noop", 250)], id="harmless-commands"),
    pytest.param([("STARTTLS", 502)], id="starttls-without-certificate"),
    pytest.param([(E, 250), ("MAIL FROM:a@x.test", 501), ("MAIL TO:<a@x.test>", 501),
                  ("MAIL FROM:<a@x.test", 501), ("MAIL FROM:<a@x.test>X", 501)], id="mail-syntax"),
    pytest.param([(E, 250), ("MAIL FROM: <a@x.test>", 250)], id="mail-space-after-colon"),
    pytest.param([(E, 250), ("MAIL FROM:<>", 250), ("RCPT TO:<Postmaster>", 250)], id="null-sender-postmaster"),
    pytest.param([(E, 250), ('MAIL FROM:<"a>b"@x.test>', 250)], id="quoted-local-part"),
    pytest.param([(E, 250), ("MAIL FROM:<@relay.test:a@x.test>", 250)], id="source-route"),
    pytest.param([(E, 250), ("MAIL FROM:<nodomain>", 501), ("MAIL FROM:<a@>", 501),
                  ("MAIL FROM:<a@x..test>", 501)], id="malformed-sender"),
    pytest.param([(E, 250), (M, 250), ("RCPT TO:<>", 501), ("RCPT TO:<nodomain>", 501),
                  ("RCPT TO:b@y.test", 501), ("RCPT TO:<b@y test>", 501)], id="malformed-rcpt"),
    pytest.param([(E, 250), (M + " FOO=1", 555), (M + " BODY=BINARYMIME", 501), (M + " SIZE=abc", 501),
                  (M + " SIZE=1 SIZE=2", 501), (M + " SMTPUTF8=yes", 555), (M + " RET=ALL", 501),
                  (M + " ENVID=a=b", 501)], id="mail-parameters-refused"),
    pytest.param([(E, 250), (M + " RET=HDRS ENVID=QQ+2B1 BODY=7BIT SIZE=100", 250),
                  ("RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@y.test", 250),
                  ("RCPT TO:<c@y.test> NOTIFY=NEVER", 250)], id="dsn-parameters"),
    pytest.param([(E, 250), (M, 250), ("RCPT TO:<b@y.test> NOTIFY=NEVER,SUCCESS", 501),
                  ("RCPT TO:<b@y.test> NOTIFY=BOGUS", 501), ("RCPT TO:<b@y.test> ORCPT=nosemicolon", 501),
                  ("RCPT TO:<b@y.test> FOO=1", 555)], id="rcpt-parameters-refused"),
    pytest.param([(E, 250), ("MAIL FROM:<тест@x.test>", 553), ("MAIL FROM:<тест@x.test> SMTPUTF8", 250),
                  ("RCPT TO:<b@тест.test>", 250)], id="utf8-needs-smtputf8"),
    pytest.param([(E, 250), ("MAIL FROM:<a@x.test>", 250), ("RCPT TO:<b@тест.test>", 553)], id="utf8-rcpt-without-smtputf8"),
    pytest.param([(E, 250), (M, 250), ("RCPT TO:<b@y.test>", 250), ("DATA now", 501)], id="data-takes-no-argument"),
]


@pytest.mark.parametrize("steps", SEQUENCES)
def test_command_sequences(client, steps):
    """Bad sequences get 503, syntax errors 501/555, unknown commands 500 [RFC 5321 §4.3.2]."""
    c, _, _ = client()
    got = [(line, c.cmd(line)[0]) for line, _ in steps]
    assert got == steps


def test_non_utf8_and_control_characters_in_commands(client):
    """A command with a NUL, a bare CR or invalid UTF-8 is refused; the session goes on."""
    c, _, _ = client()
    c.send(b"NOOP\x00\r\n")
    assert c.reply()[0] == 500
    c.send(b"NO\rOP\r\n")
    assert c.reply()[0] == 500
    c.send(b"EHLO \xff\xfe\r\n")
    assert c.reply()[0] == 500
    assert c.cmd("NOOP")[0] == 250


def test_bare_lf_command_line_is_accepted(client):
    """Commands ending in a bare LF are read as lines (only DATA needs strict CRLF)."""
    c, _, _ = client()
    c.send(b"NOOP\n")
    assert c.reply()[0] == 250


# -- line length and command count ------------------------------------------------------------


def test_command_line_length_limit(client):
    """1000 octets with CRLF is the longest command line; a longer one is 500 5.5.2, and the session goes on."""
    c, _, _ = client()
    c.cmd("EHLO client.test")
    ok = "NOOP " + "x" * (1000 - 7)
    assert len(ok) + 2 == 1000
    assert c.cmd(ok)[0] == 250
    code, lines = c.cmd(ok + "x")
    assert (code, lines) == (500, ["5.5.2 Line too long"])
    code, lines = c.cmd("NOOP " + "y" * 5000)
    assert code == 500
    assert c.cmd("NOOP")[0] == 250  # the rest of the long line was not read as commands


def test_too_many_commands_without_progress(client):
    """More than MAX_IDLE_COMMANDS commands without progress → 421 and the connection closes."""
    c, _, _ = client()
    n = smtp_mod.MAX_IDLE_COMMANDS
    c.send(b"NOOP\r\n" * (n + 5))  # pipelined
    for _ in range(n):
        assert c.reply()[0] == 250
    code, lines = c.reply()
    assert code == 421 and "without progress" in lines[0]
    assert c.closed()


def test_progress_resets_the_command_count(client, monkeypatch):
    """A successful MAIL/RCPT/DATA is progress: the count starts again."""
    monkeypatch.setattr(smtp_mod, "MAX_IDLE_COMMANDS", 5)
    c, target, _ = client()
    c.cmd("EHLO client.test")
    for _ in range(3):
        c.cmd("NOOP")
    c.cmd("MAIL FROM:<a@x.test>")
    for _ in range(4):
        assert c.cmd("NOOP")[0] == 250
    c.cmd("RCPT TO:<b@y.test>")
    for _ in range(4):
        assert c.cmd("NOOP")[0] == 250
    assert c.cmd("RCPT TO:<nodomain>")[0] == 501  # failures are not progress
    assert c.cmd("NOOP")[0] == 421


# -- relay guard --------------------------------------------------------------------------------

SOURCES = [
    pytest.param("127.0.0.1", (), True, id="loopback"),
    pytest.param("127.45.6.7", (), True, id="loopback-8"),
    pytest.param("::1", (), True, id="ipv6-loopback"),
    pytest.param("::ffff:127.0.0.1", (), True, id="mapped-loopback"),
    pytest.param("", (), True, id="unix-socket"),
    pytest.param("10.1.2.3", (), False, id="private-not-listed"),
    pytest.param("192.0.2.1", (), False, id="public"),
    pytest.param("2001:db8::1", (), False, id="public-v6"),
    pytest.param("fe80::1%eth0", (), False, id="link-local-scoped"),
    pytest.param("not-an-ip", (), False, id="garbage"),
    pytest.param("10.1.2.3", ("10.0.0.0/8",), True, id="listed"),
    pytest.param("::ffff:10.1.2.3", ("10.0.0.0/8",), True, id="listed-mapped"),
    pytest.param("11.1.2.3", ("10.0.0.0/8",), False, id="outside-listed"),
    pytest.param("2001:db8::5", ("10.0.0.0/8", "2001:db8::/64"), True, id="listed-v6"),
    pytest.param("2001:db9::5", ("2001:db8::/64",), False, id="outside-listed-v6"),
]


@pytest.mark.parametrize("ip,allow,allowed", SOURCES)
def test_relay_guard_source_allowed(build_config, ip, allow, allowed):
    """Only loopback, unix socket clients and allow_sources networks may relay."""
    body = f" allow_sources {' '.join(allow)}\n" if allow else ""
    rt = build_config(f"hostname mx.test\nsmtp tcp://127.0.0.1:0 {{\n deliver_to dummy\n{body}}}\n")
    ep = [m for m in rt.modules if m.mod_name == "smtp"][0]
    assert ep.source_allowed(ip) is allowed


@pytest.mark.parametrize("net", ["0.0.0.0/0", "::/0", "not-a-net", "0.0.0.0/1 128.0.0.0/1",
                                 "::/1 8000::/1", "10.0.0.0/8 0.0.0.0/1 128.0.0.0/2 192.0.0.0/2"])
def test_allow_sources_refuses_everything_networks(build_config, net):
    """allow_sources never accepts a network that is the whole Internet (open relay)."""
    with pytest.raises(ConfigError) as e:
        build_config(f"hostname mx.test\nsmtp tcp://127.0.0.1:0 {{\n deliver_to dummy\n allow_sources {net}\n}}\n")
    assert e.value.line == 6 and ("open relay" in str(e.value) or "invalid network" in str(e.value))


def test_allow_sources_of_halves_of_the_internet_are_fine_apart(build_config):
    """One half of the IPv4 space alone is a (large) list of clients, not everything."""
    rt = build_config("hostname mx.test\nsmtp tcp://127.0.0.1:0 {\n deliver_to dummy\n allow_sources 0.0.0.0/1 ::/1\n}\n")
    (ep,) = [m for m in rt.modules if m.mod_name == "smtp"]
    assert [str(n) for n in ep.allow] == ["0.0.0.0/1", "::/1"]
    assert ep.source_allowed("100.1.2.3") and not ep.source_allowed("200.1.2.3")


def _session_over_pair(ep, peer):
    """_session_over_pair runs a session for a simulated peer address over a socketpair."""
    server_sock, client_sock = socket.socketpair()
    client_sock.settimeout(5)
    g = gevent.spawn(ep._handle, server_sock, peer)
    c = Client.__new__(Client)
    c.sock, c.buf = client_sock, b""
    return c, g


def test_relay_guard_refuses_foreign_source(endpoint):
    """A client from a non-listed address gets 554 5.7.1 and the connection is closed."""
    ep, target, _ = endpoint()
    c, g = _session_over_pair(ep, ("192.0.2.7", 40000))
    code, lines = c.reply()
    assert (code, lines) == (554, ["Relaying denied for 192.0.2.7"])
    assert c.closed()
    g.join(timeout=5)
    assert target.deliveries == []


def test_listed_source_is_served_but_requiretls_needs_tls(endpoint):
    """A listed network is served; without TLS it is offered no REQUIRETLS and MAIL REQUIRETLS is 530."""
    ep, target, _ = endpoint(body="allow_sources 10.0.0.0/8")
    c, g = _session_over_pair(ep, ("10.9.8.7", 40000))
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO client.test")
    assert code == 250 and "REQUIRETLS" not in lines
    assert c.cmd("MAIL FROM:<a@x.test> REQUIRETLS")[0] == 530
    assert c.cmd("MAIL FROM:<a@x.test>")[0] == 250
    assert target.deliveries[0].meta.src_ip == "10.9.8.7"
    c.cmd("QUIT")
    g.join(timeout=5)


def _non_loopback_ip():
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; this only picks a source address
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_relay_guard_real_non_loopback_connection(endpoint, free_port):
    """A real TCP connection from this host's non-loopback address is refused by default."""
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    try:
        ep, target, port = endpoint(listen=f"tcp://{ip}:{free_port}")
    except OSError:
        pytest.skip(f"cannot listen on {ip}")
    c = Client(port, host=ip, source=(ip, 0))
    code, lines = c.reply()
    assert code == 554 and "Relaying denied" in lines[0]
    assert c.closed()
    c.close()


def test_loopback_connection_is_served(client):
    """A real connection from 127.0.0.1 can relay (the default allows loopback)."""
    c, target, _ = client()
    transaction(c)
    c.send(MSG + b".\r\n")
    assert c.reply()[0] == 250
    assert target.committed and target.committed[0].meta.src_ip == "127.0.0.1"


# -- SIZE and max_message_size --------------------------------------------------------------------


def test_size_parameter_over_limit(client):
    """MAIL SIZE= above max_message_size → 552 5.3.4 before any data [RFC 1870]."""
    c, target, _ = client(body="max_message_size 1K")
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@x.test> SIZE=1025") == (552, ["5.3.4 Message size exceeds the limit"])
    assert c.cmd("MAIL FROM:<a@x.test> SIZE=1024")[0] == 250
    assert len(target.deliveries) == 1


@pytest.mark.parametrize("size,accepted", [(1024, True), (1025, False)], ids=["at-limit", "over-limit"])
def test_message_size_limit(client, size, accepted):
    """The message (after dot-unstuffing, CRLFs counted) may be max_message_size; more is 552 5.3.4."""
    c, target, _ = client(body="max_message_size 1K")
    transaction(c)
    head = b"Subject: s\r\n\r\n"
    filler = size - len(head)
    lines = []
    while filler > 0:
        n = min(filler, 500)
        line = b"x" * (n - 2) + b"\r\n" if n >= 2 else b"\r\n"[:n]
        lines.append(line)
        filler -= len(line)
    data = head + b"".join(lines)
    assert len(data) == size
    c.send(data + b".\r\n")
    code, text = c.reply()
    if accepted:
        assert code == 250
        assert len(target.committed[0].body_bytes) + len(head) == size
    else:
        assert (code, text) == (552, ["5.3.4 Message size exceeds the limit"])
        assert target.committed == [] and target.deliveries[0].aborted
        assert c.cmd("NOOP")[0] == 250  # the session goes on


# -- flags reaching MsgMetadata ------------------------------------------------------------------------

FLAGS = [
    pytest.param("", dict(body_8bit=False, smtputf8=False, requiretls=False), id="none"),
    pytest.param(" BODY=8BITMIME", dict(body_8bit=True, smtputf8=False, requiretls=False), id="8bitmime"),
    pytest.param(" body=8bitmime", dict(body_8bit=True), id="8bitmime-lowercase"),
    pytest.param(" BODY=7BIT", dict(body_8bit=False), id="7bit"),
    pytest.param(" SMTPUTF8", dict(smtputf8=True, body_8bit=False), id="smtputf8"),
    pytest.param(" REQUIRETLS", dict(requiretls=True), id="requiretls"),
    pytest.param(" BODY=8BITMIME SMTPUTF8 REQUIRETLS SIZE=500", dict(body_8bit=True, smtputf8=True, requiretls=True),
                 id="all"),
]


@pytest.mark.parametrize("params,expected", FLAGS)
def test_mail_parameters_reach_metadata(client, params, expected):
    """8BITMIME, SMTPUTF8 and REQUIRETLS parameters are set on the target's MsgMetadata (D-1)."""
    c, target, _ = client()
    transaction(c, params=params)
    c.send(MSG + b".\r\n")
    assert c.reply()[0] == 250
    meta = target.committed[0].meta
    for k, v in expected.items():
        assert getattr(meta, k) is v, k
    assert meta.size == len(target.committed[0].message)


TLS_REQUIRED = [
    pytest.param(b"TLS-Required: No\r\n", "", True, id="plain"),
    pytest.param(b"tls-required:   nO  \r\n", "", True, id="any-case-and-space"),
    pytest.param(b"TLS-Required:\r\n No\r\n", "", True, id="folded"),
    pytest.param(b"TLS-Required: No\r\n", " REQUIRETLS", False, id="requiretls-wins"),
    pytest.param(b"TLS-Required: Yes\r\n", "", False, id="yes"),
    pytest.param(b"TLS-Required: No thanks\r\n", "", False, id="other-value"),
    pytest.param(b"X-TLS-Required: No\r\n", "", False, id="other-field"),
    pytest.param(b"Subject: a\r\n TLS-Required: No\r\n", "", False, id="folded-into-subject"),
    pytest.param(b"", "", False, id="absent"),
]


@pytest.mark.parametrize("field,params,expected", TLS_REQUIRED)
def test_tls_required_no_B_81(client, field, params, expected):
    """B-81: a top-level `TLS-Required: No` sets the flag; not in the body; not with REQUIRETLS."""
    c, target, _ = client()
    transaction(c, params=params)
    c.send(b"From: a@x.test\r\n" + field + b"\r\nTLS-Required: No\r\n.\r\n")
    assert c.reply()[0] == 250
    assert target.committed[0].meta.tls_required_no is expected


def test_tls_required_no_only_in_top_level_header():
    """B-81: a MIME part's header does not count."""
    header, _ = smtp_mod.split_message(
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nTLS-Required: No\r\n\r\nx\r\n--b--\r\n")
    assert smtp_mod.tls_required_no(header) is False


# -- recipients: normalisation and per-recipient replies ------------------------------------------------

NORMALISED = [
    pytest.param("a@Example.TEST", "a@example.test", id="domain-lowercased"),
    pytest.param("Mixed.Case@EXAMPLE.test", "Mixed.Case@example.test", id="local-part-kept"),
    pytest.param("a@xn--e1aybc.example.test", "a@тест.example.test", id="a-label-to-u-label"),
    pytest.param("a@XN--E1AYBC.test", "a@тест.test", id="uppercase-a-label"),
    pytest.param("a@example.test.", "a@example.test", id="trailing-dot"),
    pytest.param("a@xn--zz.test", "a@xn--zz.test", id="invalid-a-label-kept"),
    pytest.param("a@[192.0.2.1]", "a@[192.0.2.1]", id="address-literal"),
    pytest.param("postmaster", "postmaster", id="postmaster"),
    pytest.param("PostMaster", "postmaster", id="postmaster-any-case"),
]


@pytest.mark.parametrize("given,expected", NORMALISED)
def test_recipient_normalisation_B_26(client, given, expected):
    """B-26: the target gets the domain lower-cased and in U-labels; the original is kept."""
    c, target, _ = client()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<Sender@X.TEST>")
    assert c.cmd(f"RCPT TO:<{given}>")[0] == 250
    d = target.deliveries[0]
    assert d.mail_from == "Sender@x.test"
    assert d.rcpts == [expected]
    assert d.meta.original_rcpts == {expected: given}


def test_same_recipient_twice_reaches_target_once(client):
    """Two spellings of one normalised recipient are added to the target once."""
    c, target, _ = client()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@x.test>")
    assert c.cmd("RCPT TO:<b@Y.test>")[0] == 250
    assert c.cmd("RCPT TO:<b@y.TEST>")[0] == 250
    assert target.deliveries[0].rcpts == ["b@y.test"]


def test_per_recipient_replies_from_target(client):
    """The target's error for one recipient is that RCPT's reply, codes and text; the others go on."""
    c, target, _ = client(target="refuse bad@y.test\ndefer later@y.test")
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@x.test>")
    assert c.cmd("RCPT TO:<good@y.test>") == (250, ["2.1.5 OK"])
    assert c.cmd("RCPT TO:<bad@y.test>") == (550, ["5.1.1 mx.example.test. said: No such user bad@y.test"])
    assert c.cmd("RCPT TO:<later@y.test>") == (451, ["4.2.0 Mailbox busy", "4.2.0 second line"])
    assert c.cmd("DATA")[0] == 354
    c.send(MSG + b".\r\n")
    assert c.reply()[0] == 250
    assert target.committed[0].rcpts == ["good@y.test"]


def test_max_recipients(client):
    """More than max_recipients → 452 4.5.3 for the extra ones."""
    c, target, _ = client(body="max_recipients 2")
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@x.test>")
    assert [c.cmd(f"RCPT TO:<r{i}@y.test>")[0] for i in range(3)] == [250, 250, 452]


def test_pipelined_transaction(client):
    """PIPELINING: a whole transaction sent at once gets its replies in order [RFC 2920]."""
    c, target, _ = client(target="refuse bad@y.test")
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<bad@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(5)] == [250, 250, 550, 250, 354]
    c.send(MSG + b".\r\nMAIL FROM:<c@x.test>\r\nRCPT TO:<d@y.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    c.send(MSG + b".\r\nQUIT\r\n")
    assert [c.reply()[0] for _ in range(2)] == [250, 221]
    assert [d.rcpts for d in target.committed] == [["b@y.test"], ["d@y.test"]]


def test_smtplib_round_trip(endpoint):
    """smtplib can send a message; the target gets header and body split at the empty line."""
    _, target, port = endpoint()
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
        refused = s.sendmail("a@x.test", ["b@y.test"], MSG)
    assert refused == {}
    d = target.committed[0]
    assert d.header.startswith(b"Received: from ")
    assert d.header.endswith(b"From: a@x.test\r\nSubject: hi\r\n")
    assert d.body_bytes == b"hello\r\n"


def _received_field(header):
    """_received_field is the first field of a header, unfolded."""
    fields = re.split(rb"\r\n(?![ \t])", header)
    return re.sub(rb"\r\n[ \t]+", b" ", fields[0])


def test_received_field(client):
    """The endpoint adds one Received field at the top [RFC 5321 §4.4]."""
    c, target, _ = client()
    transaction(c)
    c.send(MSG + b".\r\n")
    code, lines = c.reply()
    assert code == 250
    d = target.committed[0]
    first = _received_field(d.header).decode()
    assert first.startswith("Received: from client.test ([127.0.0.1]) by mx.test (maddylite) with ESMTP id ")
    assert d.meta.id in first and "for <b@y.test>" in first
    assert d.meta.id in lines[0]


@pytest.mark.parametrize("params,shown", [("", "b@xn--bcher-kva.test"), (" SMTPUTF8", "b@bücher.test")],
                         ids=["ascii", "smtputf8"])
def test_received_field_stays_ascii_without_smtputf8_B_26(client, params, shown):
    """B-26 normalises the recipient's domain to U-labels; the Received field of a message
    without SMTPUTF8 still names it in A-labels, so an ASCII message stays ASCII (RFC 6531)."""
    c, target, _ = client()
    transaction(c, rcpts=("b@xn--bcher-kva.test",), params=params)
    c.send(MSG + b".\r\n")
    assert c.reply()[0] == 250
    first = _received_field(target.committed[0].header)
    assert f"for <{shown}>".encode() in first
    assert first.isascii() is (params == "")


def test_dot_stuffing(client):
    """Leading dots are removed once [RFC 5321 §4.5.2]; a stuffed dot line is content."""
    c, target, _ = client()
    transaction(c)
    c.send(b"Subject: s\r\n\r\n..\r\n..x\r\n.y\r\n.\r\n")
    assert c.reply()[0] == 250
    assert target.committed[0].body_bytes == b".\r\n.x\r\ny\r\n"


def test_empty_message(client):
    """A message with no content at all is accepted (a header with the Received field only)."""
    c, target, _ = client()
    transaction(c)
    c.send(b".\r\n")
    assert c.reply()[0] == 250
    assert target.committed[0].body_bytes == b""


# -- bare CR/LF, NUL and smuggling --------------------------------------------------------------------

SMUGGLED = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n\r\nsmuggled\r\n.\r\n"

SMUGGLING = [
    pytest.param(b"hello\n.\n" + SMUGGLED, id="lf-dot-lf"),
    pytest.param(b"hello\r.\r\n" + SMUGGLED, id="cr-dot-crlf"),
    pytest.param(b"hello\n.\r\n" + SMUGGLED, id="lf-dot-crlf"),
    pytest.param(b"hello\r\n.\n" + SMUGGLED, id="crlf-dot-lf"),
    pytest.param(b"hello\r\n.\r" + SMUGGLED, id="crlf-dot-cr"),
    pytest.param(b"hello\r\r\n.\r\n" + SMUGGLED, id="cr-crlf-dot-crlf"),
    pytest.param(b"x" * 1500 + b"\n.\r\n" + SMUGGLED, id="long-line-lf-dot-crlf"),
    pytest.param(b"bare\nlf\r\n", id="bare-lf"),
    pytest.param(b"bare\rcr\r\n", id="bare-cr"),
]


@pytest.mark.parametrize("payload", SMUGGLING)
def test_smuggling_attempts_do_not_end_the_message(client, payload):
    """A bare CR or LF never ends DATA: the client gets 521 and is disconnected; nothing is delivered."""
    c, target, _ = client()
    transaction(c)
    c.send(b"Subject: s\r\n\r\n" + payload + b"\r\n.\r\n")
    code, lines = c.reply()
    assert (code, lines) == (521, ["5.5.2 Bare CR or LF received, closing connection"])
    assert c.closed()
    gevent.sleep(0.05)
    assert target.committed == []
    assert [d.mail_from for d in target.deliveries] == ["a@x.test"]
    assert target.deliveries[0].aborted


def test_nul_in_message(client):
    """A NUL in the message is refused with 550 5.6.0 after the real end; the session goes on."""
    c, target, _ = client()
    transaction(c)
    c.send(b"Subject: s\r\n\r\nnul\x00here\r\n.\r\n")
    assert c.reply() == (550, ["5.6.0 NUL characters are not allowed"])
    assert target.committed == []
    assert c.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("length,accepted", [(998, True), (999, False), (1000, False), (5000, False)])
def test_message_line_length(client, length, accepted):
    """Message lines may have 998 characters plus CRLF [RFC 5321 §4.5.3.1.6]; longer ones are refused."""
    c, target, _ = client()
    transaction(c)
    c.send(b"Subject: s\r\n\r\n" + b"x" * (length - 1) + b".\r\n.\r\n")
    code, _ = c.reply()
    assert code == (250 if accepted else 500)
    assert bool(target.committed) is accepted
    assert c.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("length,accepted", [(998, True), (999, False)])
def test_the_transparency_dot_does_not_count_in_the_line_length(client, length, accepted):
    """RFC 5321 §4.5.3.1.6: the limit is on the line as sent after the dot is removed: a
    998-character line that starts with a dot is 999 on the wire and is accepted, as it is
    unstuffed; one more character is refused."""
    c, target, _ = client()
    transaction(c)
    line = b"." + b"y" * (length - 1)
    c.send(b"Subject: s\r\n\r\n." + line + b"\r\n.\r\n")
    code, _ = c.reply()
    assert code == (250 if accepted else 500)
    assert bool(target.committed) is accepted
    if accepted:
        assert target.committed[0].body_bytes == line + b"\r\n"
    assert c.cmd("NOOP")[0] == 250


def test_client_disconnects_in_data(client):
    """EOF inside DATA aborts the delivery."""
    c, target, ep = client()
    transaction(c)
    c.send(b"Subject: s\r\n\r\npartial")
    c.sock.shutdown(socket.SHUT_WR)
    assert c.closed()
    gevent.sleep(0.05)
    assert target.deliveries[0].aborted and not target.deliveries[0].committed


def test_read_timeout_0_means_none(client):
    """read_timeout 0: no timeout (as in maddy), not a session dropped at once."""
    c, _, _ = client(body="read_timeout 0")
    gevent.sleep(0.1)
    assert c.cmd("EHLO client.test")[0] == 250 and c.cmd("NOOP")[0] == 250


def test_max_message_size_0_means_no_fixed_maximum(client):
    """max_message_size 0: EHLO says SIZE with no number and nothing is too big [RFC 1870 §4]."""
    c, target, _ = client(body="max_message_size 0")
    code, lines = c.cmd("EHLO client.test")
    assert code == 250 and "SIZE" in lines and not any(line.startswith("SIZE ") for line in lines)
    transaction(c, params=" SIZE=999999999999")
    c.send(MSG + (b"x" * 70 + b"\r\n") * 2000 + b".\r\n")
    assert c.reply()[0] == 250 and len(target.committed) == 1


def test_a_helo_name_over_255_octets_is_refused_and_received_lines_stay_short(client):
    """RFC 5321 §4.5.3.1.2: a domain has at most 255 octets; a longer HELO/EHLO name is 501.
    The Received field is folded, so its lines stay far below 998 characters with the
    longest name and address allowed (the next hop would refuse the message otherwise)."""
    c, target, _ = client()
    assert c.cmd("EHLO " + "a" * 256)[0] == 501
    helo = ("a" * 63 + ".") * 3 + "a" * 63
    assert c.cmd(f"EHLO {helo}")[0] == 250
    local = "l" * 64
    domain = ("d" * 60 + ".") * 3 + "test"
    transaction(c, rcpts=(f"{local}@{domain}",), params="")
    c.send(MSG + b".\r\n")
    assert c.reply()[0] == 250
    header = target.committed[0].header
    assert max(len(line) for line in header.split(b"\r\n")) < 500
    assert f"for <{local}@{domain}>".encode() in _received_field(header)


def test_idle_timeout(client):
    """read_timeout: an idle client gets 421 4.4.2 and is disconnected."""
    c, _, _ = client(body="read_timeout 200ms")
    code, lines = c.reply()
    assert code == 421 and "Idle timeout" in lines[0]
    assert c.closed()


# -- STARTTLS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["endpoint", "global"])
def test_starttls(client, tmp_path, where):
    """STARTTLS with the configured certificate; after TLS the client must EHLO again [RFC 3207]."""
    cert, key = make_cert(tmp_path)
    directive = f"tls {cert} {key}"
    c, target, _ = client(body=directive) if where == "endpoint" else client(top=directive)
    code, lines = c.cmd("EHLO client.test")
    assert "STARTTLS" in lines
    assert c.cmd("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
    c.sock = client_tls_context().wrap_socket(c.sock, server_hostname="mx.test")
    assert c.sock.getpeercert(binary_form=True)
    assert c.cmd("MAIL FROM:<a@x.test>")[0] == 503  # the EHLO before TLS is forgotten
    code, lines = c.cmd("EHLO client.test")
    assert code == 250 and "STARTTLS" not in lines and "REQUIRETLS" in lines
    assert c.cmd("STARTTLS")[0] == 502
    c.cmd("MAIL FROM:<a@x.test> REQUIRETLS")
    c.cmd("RCPT TO:<b@y.test>")
    c.cmd("DATA")
    c.send(MSG + b".\r\n")
    assert c.reply()[0] == 250
    d = target.committed[0]
    assert d.meta.requiretls is True
    assert b" with ESMTPS id " in d.header


def test_starttls_discards_pipelined_commands(client, tmp_path):
    """Commands pipelined after STARTTLS are plaintext injections and are discarded (CVE-2011-0411)."""
    cert, key = make_cert(tmp_path)
    c, target, _ = client(body=f"tls {cert} {key}")
    c.cmd("EHLO client.test")
    c.send(b"STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<evil@x.test>\r\n")
    assert c.reply()[0] == 220
    c.sock = client_tls_context().wrap_socket(c.sock, server_hostname="mx.test")
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("RCPT TO:<b@y.test>")[0] == 503
    assert target.deliveries == []


def test_starttls_with_smtplib(endpoint, tmp_path):
    """smtplib's starttls() works against the endpoint."""
    cert, key = make_cert(tmp_path)
    _, target, port = endpoint(body=f"tls {cert} {key}")
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
        s.starttls(context=client_tls_context())
        s.sendmail("a@x.test", ["b@y.test"], MSG)
    assert target.committed[0].header.count(b"ESMTPS") == 1


def test_a_tls_address_speaks_tls_from_the_first_byte(endpoint, tmp_path, free_port):
    """`smtp tls://host:port` is implicit TLS (RFC 8314), as in maddy: the greeting comes
    inside TLS, EHLO offers no STARTTLS, and the Received field says ESMTPS."""
    cert, key = make_cert(tmp_path)
    _, target, port = endpoint(body=f"tls {cert} {key}", listen=f"tls://127.0.0.1:{free_port}")
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=5, context=client_tls_context()) as s:
        code, text = s.ehlo("client.test")
        assert code == 250 and b"STARTTLS" not in text
        s.sendmail("a@x.test", ["b@y.test"], MSG)
    assert b"ESMTPS" in target.committed[0].header
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:  # no plaintext greeting
        plain.sendall(b"EHLO client.test\r\n")
        try:
            got = plain.recv(100)
        except ConnectionResetError:
            got = b""
        assert not got.startswith(b"220")


def test_a_tls_address_needs_a_certificate(build_config, free_port):
    """A tls:// address without a TLS configuration is a configuration error, not a
    listener that speaks plaintext on a TLS port."""
    with pytest.raises(ConfigError) as e:
        build_config(f"hostname mx.test\nsmtp tls://127.0.0.1:{free_port} {{\n deliver_to dummy\n}}\n",
                     require_endpoint=True)
    assert "without TLS configuration" in str(e.value) and e.value.line is not None


def test_starttls_failed_handshake_closes(client, tmp_path):
    """A client that sends garbage instead of a TLS handshake is disconnected."""
    cert, key = make_cert(tmp_path)
    c, _, _ = client(body=f"tls {cert} {key}")
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS")[0] == 220
    c.send(b"this is not TLS\r\n" * 20)
    assert c.closed()


def test_tls_off_overrides_global(client, tmp_path):
    """`tls off` in the endpoint turns off a global certificate."""
    cert, key = make_cert(tmp_path)
    c, _, _ = client(top=f"tls {cert} {key}", body="tls off")
    assert "STARTTLS" not in c.cmd("EHLO client.test")[1]


# -- limits -----------------------------------------------------------------------------------------


def test_limits_slot_is_released_after_each_transaction(client):
    """`limits`: the message slot taken at MAIL is given back by commit, RSET and QUIT."""
    c, target, _ = client(body="limits {\n all concurrency 1\n}")
    for _ in range(3):
        transaction(c)
        c.send(MSG + b".\r\n")
        assert c.reply()[0] == 250
    assert c.cmd("MAIL FROM:<a@x.test>")[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("MAIL FROM:<a@x.test>")[0] == 250
    assert len(target.deliveries) == 5


def test_limits_refusal_is_the_mail_reply(client, monkeypatch):
    """A limit that cannot be taken → 451 4.4.5 at MAIL."""
    c, target, ep = client(body="limits {\n all concurrency 1\n}")
    monkeypatch.setattr(ep.limits, "wait", 0.05)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@x.test>")[0] == 250
    c2 = Client(ep.addresses[0].port)
    c2.reply()
    c2.cmd("EHLO other.test")
    code, lines = c2.cmd("MAIL FROM:<a@x.test>")
    c2.close()
    assert code == 451 and lines[0].startswith("4.4.5")


def test_a_session_killed_while_it_waits_for_a_slot_ends_B_119_E_7(client):
    """B-119/E-7: stop kills the sessions still open after shutdown_timeout; one waiting for
    a limits slot gets the 451 4.4.5 of a timeout, then the connection ends (the kill is
    not lost in the error: the session does not serve on)."""
    c, target, ep = client(body="limits {\n all concurrency 1\n}\nshutdown_timeout 1s")
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@x.test>")[0] == 250  # holds the only slot
    c2 = Client(ep.addresses[0].port)
    c2.reply()
    c2.cmd("EHLO other.test")
    c2.send(b"MAIL FROM:<b@x.test>\r\n")  # waits for the slot (5 s)
    gevent.sleep(0.2)
    ep.stop(0.2)
    code, lines = c2.reply()
    assert code == 451 and lines[0].startswith("4.4.5")
    assert c2.reply()[0] == 421  # shutting down
    assert c2.closed()
    assert len(ep._sessions) == 0
    c2.close()


# -- the check directive -------------------------------------------------------------------------------


def test_check_block_errors(build_config):
    """check {} children are check.* modules: unknown names and wrong roles are positioned errors."""
    for body, phrase in [
        ("check {\n  frobnicate\n }", "unknown module: frobnicate"),
        ("check {\n  dummy\n }", "cannot be used here"),
        ("check x {\n }", "check takes no arguments"),
    ]:
        with pytest.raises(ConfigError) as e:
            build_config(f"hostname mx.test\nsmtp tcp://127.0.0.1:0 {{\n deliver_to dummy\n {body}\n}}\n")
        assert phrase in str(e.value) and e.value.line in (6, 7)


def test_empty_check_block(build_config):
    """An empty check block is no checks."""
    rt = build_config("hostname mx.test\nsmtp tcp://127.0.0.1:0 {\n deliver_to dummy\n check { }\n}\n")
    assert [m for m in rt.modules if m.mod_name == "smtp"][0].checks == ()


def test_check_error_kinds(client, monkeypatch):
    """A check's SMTPError is the reply; any other exception is 451 4.3.0 and not shown to the client."""

    class Boom:
        def check_body(self, meta, mail_from, rcpts, header, body, *, source_host=""):
            raise RuntimeError("secret internals")

    c, target, ep = client()
    monkeypatch.setattr(ep, "checks", (Boom(),))
    transaction(c)
    c.send(MSG + b".\r\n")
    assert c.reply() == (451, ["4.3.0 Internal server error"])
    assert target.committed == [] and target.deliveries[0].aborted


def test_stop_with_open_session(endpoint):
    """Stopping the endpoint with a session open ends it with 421 after shutdown_timeout."""
    ep, _, port = endpoint(body="shutdown_timeout 100ms")
    c = Client(port)
    c.reply()
    ep.stop(1)
    code, _ = c.reply()
    assert code == 421
    assert c.closed()
