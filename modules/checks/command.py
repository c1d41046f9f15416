"""check.command: run a program on each message and act on its exit code (maddy's ``command``).

Registered name: ``check.command``. Roles: Check. Syntax, inside an endpoint's
``check { }`` block::

    check {
        command /usr/local/bin/scan --from {sender} --ip {source_ip} {rcpts} {
            code 1 reject
            code 2 quarantine
            code 3 reject 450 4.7.1 "Try again later"
            code 4 ignore
            timeout 30s
        }
    }

The first argument is the program: an absolute path, or a name looked up in ``$PATH``
when the configuration is read. It is run directly, not through a shell, with the message
(header and body, CRLF line ends) on its standard input, once per message after DATA
(``run_on body``, the only stage offered). Its standard output is ignored; the first
line of its standard error is logged when it does not exit with 0.

Placeholders in the arguments (maddy's names; a placeholder must be a whole ``{name}``,
an unknown one is left as written, an unavailable one becomes an empty string, and an
argument is never removed):

- ``{source_ip}``: the client's IP address (empty for a unix socket client);
- ``{source_host}``: the name the client gave in EHLO/HELO;
- ``{msg_id}``: the message's internal id;
- ``{sender}``: the envelope sender (MAIL FROM), normalised;
- ``{rcpts}``: the accepted recipients, normalised, one per line in one argument;
- ``{address}``, ``{auth_user}``, ``{source_rdns}``: always empty here (no per-address
  stage, no authentication, no reverse DNS lookups).

Exit codes: 0 accepts. The defaults are maddy's: 1 rejects the message with
``550 5.7.1 "Message rejected due to a local policy"``, 2 quarantines it (the endpoint
sets ``quarantine`` and target.remote will refuse it, B-23). ``code N reject [smtp-code
[enhanced-code [message]]]``, ``code N quarantine`` and ``code N ignore`` change the
mapping. Any other exit code, death by a signal, a program that cannot be started and
the ``timeout`` (the whole process group is killed) fail the message temporarily with
``451 4.3.0 "Internal server error"``, so the client retries.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from dataclasses import dataclass
from typing import Any

import gevent
from gevent import subprocess as gsubprocess

from maddylite.config.directives import Bool, Custom, Directive, Duration, Enum, Settings
from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode
from maddylite.config.values import ascii_digits
from maddylite.interfaces import Check, MsgMetadata
from maddylite.log import Logger
from maddylite.registry import ModuleBase, register
from maddylite.smtp.codes import EnhancedCode, is_valid_code
from maddylite.smtp.errors import SMTPError

#: The placeholder syntax (maddy's): letters, digits and underscores in braces.
PLACEHOLDER = re.compile(r"\{[a-zA-Z0-9_]+\}")
#: Default timeout for one run of the program.
DEFAULT_TIMEOUT = 60.0
#: Characters of the program's standard error kept for the log.
STDERR_LOG_LIMIT = 300
#: Bytes of the program's stderr kept (the rest is read and dropped).
STDERR_KEEP = 4096
#: Seconds stderr may stay open after the program exited (a child of its may hold it).
STDERR_GRACE = 0.5


def _feed(stream: Any, data: bytes) -> None:
    """_feed writes the message to the program's stdin and closes it; a program that does
    not read it all (and exits) is no error."""
    try:
        stream.write(data)
        stream.close()
    except (OSError, ValueError):
        pass


def _head(stream: Any, kept: bytearray, keep: int) -> None:
    """_head reads a stream to its end, keeping its first ``keep`` bytes in ``kept`` (there
    as they come, for a caller that stops waiting before the end)."""
    read = getattr(stream, "read1", stream.read)
    try:
        while chunk := read(65536):
            if len(kept) < keep:
                kept += chunk[: keep - len(kept)]
    except (OSError, ValueError):
        pass


@dataclass(frozen=True)
class Action:
    """Action is what an exit code means: ``reject`` (with its reply), ``quarantine`` or ``ignore``."""

    kind: str
    code: int = 550
    enhanced: EnhancedCode = (5, 7, 1)
    message: str = "Message rejected due to a local policy"

    def error(self) -> SMTPError:
        """error builds the rejection (a fresh exception each time)."""
        return SMTPError(self.code, self.enhanced, self.message)


#: maddy's default mapping: exit 1 rejects, exit 2 quarantines.
DEFAULT_ACTIONS: dict[int, Action] = {1: Action("reject"), 2: Action("quarantine")}


def _parse_enhanced(text: str) -> EnhancedCode:
    parts = text.split(".")
    if len(parts) != 3 or not all(ascii_digits(p) and len(p) <= 3 for p in parts):
        raise ConfigError(f"invalid enhanced code: {text} (expected N.N.N)")
    return int(parts[0]), int(parts[1]), int(parts[2])


def parse_action(args: list[str]) -> Action:
    """parse_action reads ``reject [code [enhanced [message]]]``, ``quarantine`` or ``ignore``.

    Like maddy, an explicit reject reply starts from ``554 5.7.0 "Message rejected due to a
    local policy"`` and replaces what is given. The enhanced code's class must match the
    basic code's [RFC 3463 §2].
    """
    if not args:
        raise ConfigError("expected an action: reject, quarantine or ignore")
    kind = args[0]
    if kind not in ("reject", "quarantine", "ignore"):
        raise ConfigError(f"invalid action {kind}, valid values are: reject quarantine ignore")
    if kind != "reject":
        if len(args) > 1 and kind == "ignore":
            raise ConfigError("ignore takes no arguments")
        return Action(kind)  # quarantine's reply arguments are accepted and unused, as in maddy
    rest = args[1:]
    if not rest:
        return Action("reject")
    if len(rest) > 3:
        raise ConfigError("reject takes at most 3 arguments: code, enhanced code and message")
    if not ascii_digits(rest[0]) or not is_valid_code(int(rest[0])) or int(rest[0]) // 100 not in (4, 5):
        raise ConfigError(f"invalid reply code: {rest[0]} (a 4xx or 5xx code is expected)")
    code = int(rest[0])
    enhanced = (code // 100, 7, 0)
    if len(rest) > 1:
        enhanced = _parse_enhanced(rest[1])
        if enhanced[0] != code // 100:
            raise ConfigError(f"enhanced code {rest[1]} does not match the class of {code}")
    message = "Message rejected due to a local policy"
    if len(rest) > 2:
        if not rest[2].strip():
            raise ConfigError("message can't be empty")
        message = rest[2]
    return Action("reject", code, enhanced, message)


def _parse_code(node: ConfigNode, builder: Any) -> tuple[int, Action]:
    """_parse_code reads one ``code <exit code> <action...>`` line."""
    if node.has_block:
        raise ConfigError("can't declare block here")
    if len(node.args) < 2:
        raise ConfigError("at least two arguments are required: <code> <action>")
    text = node.args[0]
    if not ascii_digits(text) or not 1 <= int(text) <= 255:
        raise ConfigError(f"invalid exit code: {text} (1 to 255)")
    return int(text), parse_action(list(node.args[1:]))


@register("check.command")
class CommandCheck(ModuleBase):
    """CommandCheck runs a program on each message and maps its exit code (``check.command``)."""

    roles = (Check,)
    inline_args = 256

    directives = (
        Directive(name="run_on", type=Enum(choices=("body",)), default="body", help="When the program runs; only 'body' (after DATA, with the message on stdin) is offered."),
        Directive(name="code", type=Custom(fn=_parse_code, syntax_text="<exit code> reject [code [enhanced [message]]] | quarantine | ignore"), repeatable=True, default=(), help="What an exit code means; the defaults are 'code 1 reject' and 'code 2 quarantine'."),
        Directive(name="timeout", type=Duration(), default=DEFAULT_TIMEOUT, help="How long the program may run; then it is killed and the message fails temporarily (0 = 60s)."),
        Directive(name="debug", type=Bool(), inherit_global=True, default=False, help="Verbose logging."),
    )

    def configure(self, inline: tuple[str, ...], settings: Settings) -> None:
        """configure finds the program and builds the exit code table."""
        if not inline:
            raise ConfigError("command: at least one argument is required (command name)")
        program = inline[0]
        if os.sep in program:
            if not (os.path.isfile(program) and os.access(program, os.X_OK)):
                raise ConfigError(f"command: {program} is not an executable file")
            self.program = program
        else:
            found = shutil.which(program)
            if found is None:
                raise ConfigError(f"command: executable file not found in $PATH: {program}")
            self.program = found
        self.args = inline[1:]
        self.actions = dict(DEFAULT_ACTIONS)
        for exit_code, action in settings.code:
            self.actions[exit_code] = action
        self.timeout = settings.timeout or DEFAULT_TIMEOUT
        self.log = Logger("check.command", settings.debug)

    # -- role: Check ------------------------------------------------------------------

    def check_body(
        self,
        meta: MsgMetadata,
        mail_from: str,
        rcpts: tuple[str, ...],
        header: bytes,
        body: bytes,
        *,
        source_host: str = "",
    ) -> str:
        """check_body runs the program on the message and returns accept or quarantine.

        A rejecting exit code raises the configured SMTPError; every failure to get an
        exit code that the table knows raises ``451 4.3.0`` (temporary).
        """
        values = {
            "{source_ip}": meta.src_ip or "",
            "{source_host}": source_host,
            "{source_rdns}": "",
            "{msg_id}": meta.id,
            "{auth_user}": "",
            "{sender}": mail_from,
            "{rcpts}": "\n".join(rcpts),
            "{address}": "",
        }
        argv = [self.program, *(self.expand(a, values) for a in self.args)]
        exit_code, stderr = self._run(argv, header + b"\r\n" + body, meta)
        if exit_code == 0:
            return "accept"
        action = self.actions.get(exit_code) if exit_code is not None and exit_code > 0 else None
        if action is None:
            self.log.error("unexpected result", msg_id=meta.id, cmd=self.program, exit_code=exit_code, stderr=stderr)
            raise SMTPError(451, (4, 3, 0), "Internal server error", fields={"check": "command"})
        self.log.info(f"message {action.kind}", msg_id=meta.id, cmd=self.program, exit_code=exit_code, stderr=stderr)
        if action.kind == "reject":
            raise action.error()
        if action.kind == "quarantine":
            return "quarantine"
        return "accept"

    @staticmethod
    def expand(arg: str, values: dict[str, str]) -> str:
        """expand replaces the known placeholders of one argument (unknown ones stay)."""
        return PLACEHOLDER.sub(lambda m: values.get(m.group(0), m.group(0)), arg)

    # -- private helpers ----------------------------------------------------------------

    def _run(self, argv: list[str], message: bytes, meta: MsgMetadata) -> tuple[int | None, str]:
        """_run runs the program; returns (exit code or None, start of stderr)."""
        try:
            # A new session makes the program the leader of its own process group, so a
            # timeout also kills what it started (a shell script's children).
            proc = gsubprocess.Popen(argv, stdin=gsubprocess.PIPE, stdout=gsubprocess.DEVNULL,
                                     stderr=gsubprocess.PIPE, close_fds=True, start_new_session=True)
        except OSError as e:
            self.log.error("cannot start", e, msg_id=meta.id, cmd=self.program)
            return None, ""
        # stdin is fed and stderr drained by greenlets of their own; the verdict is the
        # exit, not the end of stderr (a background child may keep it open), and only the
        # start of stderr is kept, however much the program writes
        feeder = gevent.spawn(_feed, proc.stdin, message)
        err = bytearray()
        reader = gevent.spawn(_head, proc.stderr, err, STDERR_KEEP)
        try:
            code = proc.wait(timeout=self.timeout)
        except gsubprocess.TimeoutExpired:
            self.log.error("timed out, killed", msg_id=meta.id, cmd=self.program, timeout=self.timeout)
            self._kill(proc)
            return None, ""
        except BaseException:
            self._kill(proc)  # the session was killed (server stop): no orphan left behind
            raise
        finally:
            feeder.kill()
        reader.join(timeout=STDERR_GRACE)
        reader.kill()
        self._close(proc)
        text = bytes(err).decode("utf-8", "replace").strip().split("\n", 1)[0][:STDERR_LOG_LIMIT]
        return code, text

    @classmethod
    def _kill(cls, proc: Any) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        with gevent.Timeout(5, False):
            proc.wait()
        cls._close(proc)

    @staticmethod
    def _close(proc: Any) -> None:
        for pipe in (proc.stdin, proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except (OSError, RuntimeError):
                pass
