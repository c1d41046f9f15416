"""check.command: exit codes, placeholders, timeouts and config errors; quarantine end to end (B-23).

Checks run in an `smtp` endpoint started in-process; the programs are tiny shell scripts.
"""

import os
import socket
import time

import gevent
import gevent.event
import pytest
from maddylite.modules.checks.command import Action, CommandCheck, parse_action

from maddylite.config.directives import Directive, StringList
from maddylite.config.errors import ConfigError
from maddylite.interfaces import DeliveryTarget, MsgMetadata
from maddylite.registry import MODULES, ModuleBase, register
from maddylite.smtp.errors import SMTPError


class _Delivery:
    def __init__(self, target, meta, mail_from):
        self.target, self.meta, self.mail_from = target, meta, mail_from
        self.rcpts, self.header, self.body_bytes, self.committed = [], None, None, False

    def add_rcpt(self, rcpt):
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
        pass


if "test.check_record" not in MODULES:

    @register("test.check_record")
    class CheckRecord(ModuleBase):
        """CheckRecord is a test-only target that keeps the deliveries it gets."""

        roles = (DeliveryTarget,)
        directives = (Directive(name="note", type=StringList(), default=(), help="unused"),)

        def configure(self, inline, settings):
            """configure prepares the record."""
            self.deliveries = []
            self.done = gevent.event.Event()

        def start_delivery(self, meta, mail_from):
            """start_delivery records a new delivery."""
            d = _Delivery(self, meta, mail_from)
            self.deliveries.append(d)
            return d


def script(tmp_path, body, name="check.sh"):
    """script writes an executable shell script and returns its path."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def reply(self):
        lines = []
        while True:
            line = self.file.readline().decode().rstrip("\r\n")
            if not line:
                raise EOFError
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def send_message(self, data=b"From: a@x.test\r\nSubject: hi\r\n\r\nhello\r\n", rcpts=("b@y.test",),
                     sender="a@x.test"):
        assert self.reply()[0] == 220
        assert self.cmd("EHLO client.test")[0] == 250
        assert self.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        for r in rcpts:
            assert self.cmd(f"RCPT TO:<{r}>")[0] == 250
        assert self.cmd("DATA")[0] == 354
        self.sock.sendall(data + b".\r\n")
        return self.reply()

    def close(self):
        self.file.close()
        self.sock.close()


@pytest.fixture
def endpoint(build_config, free_port):
    """endpoint(check_text) starts an smtp endpoint with that check block; returns (target, port)."""
    runtimes = []

    def start(check_text, top="", deliver_to="test.check_record { }", prepare=None):
        rt = build_config(
            f"hostname mx.test\n{top}\n"
            f"smtp tcp://127.0.0.1:{free_port} {{\n deliver_to {deliver_to}\n check {{\n{check_text}\n }}\n}}\n"
        )
        if prepare is not None:
            prepare(rt)
        rt.start()
        runtimes.append(rt)
        ep = [m for m in rt.modules if m.mod_name == "smtp"][0]
        return ep.target, free_port, rt

    yield start
    for rt in runtimes:
        rt.stop(1)


# -- exit codes --------------------------------------------------------------------------------

EXIT_CODES = [
    pytest.param(0, "", (250, None), False, id="0-accepts"),
    pytest.param(1, "", (550, "5.7.1 Message rejected due to a local policy"), False, id="1-rejects"),
    pytest.param(2, "", (250, None), True, id="2-quarantines"),
    pytest.param(3, "", (451, "4.3.0 Internal server error"), False, id="unknown-code-tempfails"),
    pytest.param(3, "code 3 reject 450 4.7.1 \"Try again later\"", (450, "4.7.1 Try again later"), False,
                 id="custom-reject"),
    pytest.param(4, "code 4 reject 553", (553, "5.7.0 Message rejected due to a local policy"), False,
                 id="custom-reject-code-only"),
    pytest.param(1, "code 1 ignore", (250, None), False, id="ignore"),
    pytest.param(2, "code 2 reject", (550, "5.7.1 Message rejected due to a local policy"), False,
                 id="quarantine-remapped-to-reject"),
    pytest.param(5, "code 5 quarantine", (250, None), True, id="custom-quarantine"),
]


@pytest.mark.parametrize("exit_code,codes,expected,quarantined", EXIT_CODES)
def test_exit_codes(endpoint, tmp_path, exit_code, codes, expected, quarantined):
    """Exit 0 accepts; maddy's defaults 1 → reject, 2 → quarantine; `code` lines change the table."""
    prog = script(tmp_path, f"cat > /dev/null\nexit {exit_code}")
    target, port, _ = endpoint(f"  command {prog} {{\n {codes}\n  }}")
    c = Client(port)
    code, lines = c.send_message()
    c.close()
    assert code == expected[0]
    if expected[1] is not None:
        assert lines == [expected[1]]
        assert target.deliveries[0].committed is False
    else:
        d = target.deliveries[0]
        assert d.committed and d.meta.quarantine is quarantined


def test_program_that_does_not_read_its_input(endpoint, tmp_path):
    """A program may exit without reading the message (a large one, so the pipe fills)."""
    prog = script(tmp_path, "exit 2")
    target, port, _ = endpoint(f"  command {prog}")
    c = Client(port)
    code, _ = c.send_message(b"Subject: big\r\n\r\n" + (b"y" * 900 + b"\r\n") * 2000)
    c.close()
    assert code == 250 and target.deliveries[0].meta.quarantine is True


def test_killed_by_signal_tempfails(endpoint, tmp_path):
    """A program killed by a signal has no exit code to map: 451 4.3.0."""
    prog = script(tmp_path, "kill -9 $$")
    _, port, _ = endpoint(f"  command {prog}")
    c = Client(port)
    assert c.send_message() == (451, ["4.3.0 Internal server error"])
    c.close()


def test_several_checks_run_in_order(endpoint, tmp_path):
    """Every check runs; one quarantine is enough; a later reject wins over an earlier quarantine."""
    log = tmp_path / "order"
    q = script(tmp_path, f"echo q >> {log}\nexit 2", "q.sh")
    r = script(tmp_path, f"echo r >> {log}\nexit 1", "r.sh")
    ok = script(tmp_path, f"echo ok >> {log}\nexit 0", "ok.sh")
    target, port, _ = endpoint(f"  command {q}\n  command {ok}\n  command {r}")
    c = Client(port)
    assert c.send_message()[0] == 550
    c.close()
    assert log.read_text().split() == ["q", "ok", "r"]
    assert not target.deliveries[0].committed


# -- placeholders and input ---------------------------------------------------------------------


def test_placeholders_and_stdin(endpoint, tmp_path):
    """Placeholders expand in arguments (whole argument or inside one); stdin is the whole message."""
    out = tmp_path / "out"
    prog = script(tmp_path, f'for a in "$@"; do printf "%s|" "$a" >> {out}.args; done\ncat > {out}.stdin\nexit 0')
    target, port, _ = endpoint(
        f"  command {prog} {{sender}} {{rcpts}} {{source_ip}} {{source_host}} {{msg_id}} "
        f"--from={{sender}} {{address}} {{auth_user}} {{unknown}} x{{y"
    )
    c = Client(port)
    assert c.send_message(rcpts=("B@Y.test", "c@y.test"), sender="A@X.TEST")[0] == 250
    c.close()
    d = target.deliveries[0]
    args = (tmp_path / "out.args").read_text().split("|")[:-1]
    assert args == ["A@x.test", "B@y.test\nc@y.test", "127.0.0.1", "client.test", d.meta.id,
                    "--from=A@x.test", "", "", "{unknown}", "x{y"]
    stdin = (tmp_path / "out.stdin").read_bytes()
    assert stdin == d.header + b"\r\n" + d.body_bytes
    assert stdin.startswith(b"Received: ") and stdin.endswith(b"Subject: hi\r\n\r\nhello\r\n")


def test_program_in_path(build_config, tmp_path, monkeypatch):
    """A bare program name is looked up in $PATH when the configuration is read."""
    script(tmp_path, "exit 0", "my-filter")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    rt = build_config("hostname mx.test\nsmtp tcp://127.0.0.1:0 {\n deliver_to dummy\n check {\n  command my-filter\n }\n}\n")
    check = [m for m in rt.modules if m.mod_name == "check.command"][0]
    assert check.program == str(tmp_path / "my-filter")


# -- timeout -----------------------------------------------------------------------------------------


def test_timeout_kills_the_process_group(endpoint, tmp_path):
    """A program that runs too long is killed with its children; the client gets 451 4.3.0."""
    pidfile = tmp_path / "child.pid"
    prog = script(tmp_path, f"sleep 30 &\necho $! > {pidfile}\nwait")
    _, port, _ = endpoint(f"  command {prog} {{\n   timeout 300ms\n  }}")
    c = Client(port)
    started = time.monotonic()
    assert c.send_message() == (451, ["4.3.0 Internal server error"])
    assert time.monotonic() - started < 5
    c.close()
    child = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        gevent.sleep(0.05)
    else:
        pytest.fail("the program's child survived the timeout")


def test_the_exit_decides_not_the_end_of_stderr(endpoint, tmp_path):
    """A program that exits 0 while a child of its keeps stderr open is judged at its exit:
    the message is accepted at once, not refused when the timeout runs out."""
    prog = script(tmp_path, "sleep 30 &\nexit 0")
    target, port, _ = endpoint(f"  command {prog} {{\n   timeout 5s\n  }}")
    c = Client(port)
    started = time.monotonic()
    assert c.send_message()[0] == 250
    assert time.monotonic() - started < 2.5
    c.close()


def test_a_flood_on_stderr_is_read_and_dropped(endpoint, tmp_path):
    """A program that writes much to stderr and reads no stdin is judged by its exit code;
    only the start of stderr is kept (for the log line), the rest is read and dropped."""
    from maddylite.modules.checks import command as command_mod

    prog = script(tmp_path, "echo 'first line of the report' >&2\nhead -c 20000000 /dev/zero >&2\nexit 1")
    _, port, rt = endpoint(f"  command {prog} {{\n   timeout 20s\n  }}")
    check = [m for m in rt.modules if m.mod_name == "check.command"][0]
    kept = []
    real = check._run

    def spy(*a, **kw):
        out = real(*a, **kw)
        kept.append(out)
        return out

    check._run = spy
    c = Client(port)
    code, _ = c.send_message()
    c.close()
    assert code == 550  # exit 1: reject
    (exit_code, text), = kept
    assert exit_code == 1 and text == "first line of the report"
    assert command_mod.STDERR_KEEP == 4096


def test_missing_program_at_run_time(endpoint, tmp_path):
    """A program removed after configuration cannot start: 451 4.3.0, not a crash."""
    prog = script(tmp_path, "exit 0")
    _, port, _ = endpoint(f"  command {prog}")
    prog.unlink()
    c = Client(port)
    assert c.send_message() == (451, ["4.3.0 Internal server error"])
    c.close()


# -- configuration -------------------------------------------------------------------------------------

CONFIG_ERRORS = [
    pytest.param("command", "at least one argument is required", id="no-program"),
    pytest.param("command /nonexistent/prog", "is not an executable file", id="missing-file"),
    pytest.param("command no-such-program-xyz", "executable file not found in $PATH", id="not-in-path"),
    pytest.param("command {prog} {{\n code 0 reject\n }}", "invalid exit code: 0", id="exit-code-0"),
    pytest.param("command {prog} {{\n code x reject\n }}", "invalid exit code: x", id="exit-code-word"),
    pytest.param("command {prog} {{\n code ² reject\n }}", "invalid exit code: ²", id="exit-code-superscript"),
    pytest.param("command {prog} {{\n code 1 reject ٥٥٠\n }}", "invalid reply code", id="reply-code-arabic-digits"),
    pytest.param("command {prog} {{\n code 1 reject 550 ٥.7.1\n }}", "invalid enhanced code", id="enhanced-arabic-digit"),
    pytest.param("command {prog} {{\n code 1\n }}", "at least two arguments", id="code-without-action"),
    pytest.param("command {prog} {{\n code 1 explode\n }}", "invalid action explode", id="bad-action"),
    pytest.param("command {prog} {{\n code 1 reject 250\n }}", "invalid reply code: 250", id="reject-2xx"),
    pytest.param("command {prog} {{\n code 1 reject 550 4.7.1\n }}", "does not match", id="class-mismatch"),
    pytest.param("command {prog} {{\n code 1 reject 550 5.7\n }}", "invalid enhanced code", id="bad-enhanced"),
    pytest.param('command {prog} {{\n code 1 reject 550 5.7.1 ""\n }}', "message can't be empty", id="empty-message"),
    pytest.param("command {prog} {{\n code 1 ignore now\n }}", "ignore takes no arguments", id="ignore-args"),
    pytest.param("command {prog} {{\n run_on rcpt\n }}", "run_on", id="run-on-rcpt"),
    pytest.param("command {prog} {{\n frob 1\n }}", "unexpected directive: frob", id="unknown-directive"),
]


@pytest.mark.parametrize("text,phrase", CONFIG_ERRORS)
def test_config_errors(build_config, tmp_path, text, phrase):
    """Bad check.command blocks are configuration errors with a position."""
    prog = script(tmp_path, "exit 0")
    with pytest.raises(ConfigError) as e:
        build_config("hostname mx.test\nsmtp tcp://127.0.0.1:0 {\n deliver_to dummy\n check {\n  "
                     + text.format(prog=prog) + "\n }\n}\n")
    assert phrase in str(e.value)
    assert e.value.line is not None and e.value.line >= 7


def test_config_values(build_config, tmp_path):
    """The exit code table starts from maddy's defaults and `code` lines override entries."""
    prog = script(tmp_path, "exit 0")
    rt = build_config(
        "hostname mx.test\nsmtp tcp://127.0.0.1:0 {\n deliver_to dummy\n check {\n"
        f"  command {prog} a b {{\n   code 1 quarantine\n   code 7 reject 451 4.7.0 \"later\"\n   timeout 5s\n  }}\n"
        " }\n}\n"
    )
    check = [m for m in rt.modules if m.mod_name == "check.command"][0]
    assert isinstance(check, CommandCheck)
    assert check.args == ("a", "b") and check.timeout == 5.0
    assert check.actions == {1: Action("quarantine"), 2: Action("quarantine"),
                             7: Action("reject", 451, (4, 7, 0), "later")}
    smtp = [m for m in rt.modules if m.mod_name == "smtp"][0]
    assert smtp.checks == (check,)


@pytest.mark.parametrize("args,expected", [
    (["reject"], Action("reject", 550, (5, 7, 1), "Message rejected due to a local policy")),
    (["reject", "554"], Action("reject", 554, (5, 7, 0), "Message rejected due to a local policy")),
    (["reject", "421", "4.3.2", "bye"], Action("reject", 421, (4, 3, 2), "bye")),
    (["quarantine"], Action("quarantine")),
    (["quarantine", "550"], Action("quarantine")),
    (["ignore"], Action("ignore")),
])
def test_parse_action(args, expected):
    """parse_action reads maddy's action syntax."""
    assert parse_action(args) == expected


def test_check_body_direct(build_config, tmp_path):
    """check_body can be called directly (the Check role) and raises SMTPError to reject."""
    prog = script(tmp_path, 'test "$1" = "a@x.test" && exit 1\nexit 0')
    rt = build_config(f"hostname mx.test\nsmtp tcp://127.0.0.1:0 {{\n deliver_to dummy\n check {{\n  command {prog} {{sender}}\n }}\n}}\n")
    check = [m for m in rt.modules if m.mod_name == "check.command"][0]
    meta = MsgMetadata(id="m1")
    with pytest.raises(SMTPError) as e:
        check.check_body(meta, "a@x.test", ("b@y.test",), b"Subject: x\r\n", b"body\r\n")
    assert (e.value.code, e.value.enhanced) == (550, (5, 7, 1))
    assert check.check_body(meta, "other@x.test", ("b@y.test",), b"", b"") == "accept"


# -- quarantine end to end: the remote refuses it (B-23) ---------------------------------------------


class NoDNS:
    """NoDNS is a resolver that records any use (a quarantined message must cause none)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kw):
            self.calls.append(name)
            raise AssertionError(f"DNS used: {name}{args}")

        return call


def test_quarantined_message_is_refused_by_remote_B_23(endpoint, tmp_path):
    """B-23: check exit 2 → queued with quarantine set → target.remote refuses every recipient with
    550 5.7.0 without DNS or connection → the queue bounces it (DSN) and forgets it."""
    prog = script(tmp_path, "cat >/dev/null; exit 2")
    top = (
        "autogenerated_msg_domain mx.test\n"
        "test.check_record bounces { }\n"
        "target.remote out { }\n"
        "target.queue q {\n target &out\n bounce {\n  deliver_to &bounces\n }\n}\n"
    )
    resolver = NoDNS()

    def inject(rt):
        rt.instance("out").resolver = resolver  # start() keeps an injected resolver

    _, port, rt = endpoint(f"  command {prog}", top=top, deliver_to="&q", prepare=inject)
    c = Client(port)
    code, _ = c.send_message(rcpts=("one@example.test", "two@example.test"))
    c.close()
    assert code == 250
    bounces = rt.instance("bounces")
    assert bounces.done.wait(timeout=10), "no DSN arrived"
    assert resolver.calls == []
    dsn = bounces.deliveries[0]
    assert dsn.mail_from == "" and dsn.rcpts == ["a@x.test"]
    text = (dsn.header + b"\r\n" + dsn.body_bytes).decode()
    assert text.count("Status: 5.7.0") == 2
    assert "Refusing to deliver a quarantined message" in text
    queue = rt.instance("q")
    for _ in range(50):
        if not queue.list_ids():
            break
        gevent.sleep(0.05)
    assert queue.list_ids() == []
