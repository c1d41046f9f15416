"""Logging in maddy's style: ``module: message key=value ...`` on stderr, or JSON lines.

A :class:`Logger` is cheap to create and carries a module label and a debug flag. The
output sink is process-wide (:func:`configure_output`); ``log`` in the configuration
chooses it (``stderr`` or ``off``, or a file path), and SIGUSR1 reopens a log file.

The server batches its lines (:func:`batch_lines`): the lines logged while the event loop
runs greenlets are written together, in one write, before the loop next waits for events,
and at exit. A busy server then does not pay a system call per line; a line is still
out before the process sleeps.
"""

from __future__ import annotations

import atexit
import json
import re
import sys
import time
from typing import IO, Any

import gevent

#: The log file, or None for whatever sys.stderr is when a line is written.
_out: IO[str] | None = None
_json = False
_path: str | None = None
_enabled = True
#: Lines waiting for the end of the event loop's turn, or None: every line is written at once.
_batch: list[str] | None = None
_flush_scheduled = False


def batch_lines(on: bool = True) -> None:
    """batch_lines turns batching on or off (off writes what is waiting first)."""
    global _batch
    if on and _batch is None:
        _batch = []
    elif not on and _batch is not None:
        flush()
        _batch = None


def flush() -> None:
    """flush writes the lines waiting in the batch, in one write."""
    global _flush_scheduled
    _flush_scheduled = False
    if not _batch:
        return
    text = "".join(_batch)
    _batch.clear()
    _write(text)


atexit.register(flush)


def _write(text: str) -> None:
    out = _out if _out is not None else sys.stderr
    try:
        out.write(text)
        out.flush()
    except (OSError, ValueError):
        pass


def configure_output(targets: tuple[str, ...] = ("stderr",), json_format: bool = False) -> None:
    """configure_output selects where log lines go: ``stderr``, ``off`` or a file path."""
    global _out, _json, _path, _enabled
    flush()  # what was logged before goes where it was meant to
    _json = json_format
    _enabled = True
    _path = None
    target = targets[0] if targets else "stderr"
    if target == "off":
        _enabled = False
    elif target in ("stderr", "syslog", "stdout"):
        _out = sys.stdout if target == "stdout" else None
    else:
        _path = target
        _out = open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115


def reopen() -> None:
    """reopen reopens a log file (SIGUSR1), so that rotated logs are released."""
    global _out
    flush()
    if _path is not None:
        old = _out
        _out = open(_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        if old is not None:
            old.close()


#: a value with one of these characters (or an empty one) is written quoted
_NEEDS_QUOTES = re.compile(r'[ ="\n\t]|^$')


def _fmt_value(v: Any) -> str:
    if type(v) is int:
        return str(v)
    s = v if type(v) is str else str(v)
    if _NEEDS_QUOTES.search(s):
        return json.dumps(s, ensure_ascii=False)
    return s


class Logger:
    """Logger writes structured lines for one module instance."""

    def __init__(self, name: str, debug: bool = False) -> None:
        self.name = name
        self.debug_enabled = debug

    def child(self, name: str, debug: bool | None = None) -> Logger:
        """child returns a logger for a sub-component (``remote/pool``)."""
        return Logger(f"{self.name}/{name}" if self.name else name, self.debug_enabled if debug is None else debug)

    def _emit(self, level: str, msg: str, fields: dict[str, Any]) -> None:
        if not _enabled:
            return
        if _json:
            rec: dict[str, Any] = {"ts": time.time(), "level": level, "module": self.name, "msg": msg}
            rec.update({k: (v if isinstance(v, (int, float, bool)) or v is None else str(v)) for k, v in fields.items()})
            line = json.dumps(rec, ensure_ascii=False)
        else:
            prefix = f"{self.name}: " if self.name else ""
            tag = "[debug] " if level == "debug" else ""
            kv = " ".join([f"{k}={_fmt_value(v)}" for k, v in fields.items()])
            line = f"{tag}{prefix}{msg}" + (f"\t{kv}" if kv else "")
        _emit_line(line + "\n")

    def info(self, msg: str, **fields: Any) -> None:
        """info logs an ordinary event."""
        self._emit("info", msg, fields)

    def warn(self, msg: str, **fields: Any) -> None:
        """warn logs a problem that did not stop anything."""
        self._emit("warn", msg, fields)

    def error(self, msg: str, err: BaseException | str | None = None, **fields: Any) -> None:
        """error logs a failure, with the error text as the ``reason`` field."""
        if err is not None:
            fields = {"reason": str(err), **fields}
        self._emit("error", msg, fields)

    def debug(self, msg: str, **fields: Any) -> None:
        """debug logs only when debug output is on for this module."""
        if self.debug_enabled:
            self._emit("debug", msg, fields)


def _emit_line(text: str) -> None:
    global _flush_scheduled
    if _batch is None:
        _write(text)
        return
    _batch.append(text)
    if not _flush_scheduled:
        _flush_scheduled = True
        # a loop callback runs once the running greenlets have yielded, before the loop
        # polls for events again
        gevent.get_hub().loop.run_callback(flush)
