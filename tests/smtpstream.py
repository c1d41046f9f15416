"""What a client sends in an SMTP session, as a fake server reads it: command lines,
message contents (DATA, dot-unstuffed) and BDAT chunks [RFC 3030], from bytes as they
arrive.

The fake servers of the client tests (tests/smtp) and of the delivery tests
(tests/modules/target) read with it; what they answer and record stays their own.
"""

from __future__ import annotations

from typing import Any


class CommandStream:
    """CommandStream splits the bytes a client sends into the items a server answers."""

    def __init__(self) -> None:
        self.buf = b""
        self._data: bytes | None = None  # the DATA content so far, while one is coming
        self._chunk_left: int | None = None  # bytes of a BDAT chunk still to come
        self._chunk_last = False
        self._chunk = b""

    def feed(self, data: bytes) -> None:
        """feed adds bytes as they were read."""
        self.buf += data

    def start_data(self) -> None:
        """start_data: a message content ending with CRLF.CRLF follows (after a 354)."""
        self._data = b""

    def start_chunk(self, line: str) -> None:
        """start_chunk: the BDAT command *line* announces a chunk of its size."""
        size, _, last = line[5:].partition(" ")
        self._chunk_left, self._chunk_last, self._chunk = int(size), last.strip().upper() == "LAST", b""

    def next(self) -> tuple[str, Any] | None:
        """next returns the next complete item, or None when more bytes are needed:
        ``("chunk", (data, last))``, ``("message", content)`` or ``("line", command)``."""
        if self._chunk_left is not None:  # the reply follows the whole chunk (possibly empty)
            take = self.buf[: self._chunk_left]
            self._chunk += take
            self.buf = self.buf[len(take):]
            self._chunk_left -= len(take)
            if self._chunk_left:
                return None
            self._chunk_left = None
            data, self._chunk = self._chunk, b""
            return "chunk", (data, self._chunk_last)
        if self._data is not None:
            body = self._data + self.buf
            self.buf = b""
            if body.startswith(b".\r\n"):
                raw, self.buf = b"", body[3:]
            else:
                idx = body.find(b"\r\n.\r\n")
                if idx < 0:
                    self._data = body
                    return None
                raw, self.buf = body[: idx + 2], body[idx + 5:]
            self._data = None
            msg = raw.replace(b"\r\n..", b"\r\n.")
            if msg.startswith(b".."):
                msg = msg[1:]
            return "message", msg
        if b"\n" not in self.buf:
            return None
        raw_line, self.buf = self.buf.split(b"\n", 1)
        return "line", raw_line.rstrip(b"\r").decode("utf-8", "replace")


def ehlo_reply(greets: str, extensions: list[str] | tuple[str, ...]) -> bytes:
    """ehlo_reply is a multi-line 250 reply: the greeting line, then one per extension."""
    lines = [greets, *extensions]
    out = [f"250-{ln}" for ln in lines[:-1]] + [f"250 {lines[-1]}"]
    return ("\r\n".join(out) + "\r\n").encode()


def hooked_reply(replies: dict[str, Any], session: Any, verb: str, line: str, default: bytes) -> Any:
    """hooked_reply is what a test set for *verb* in *replies* (bytes, or a callable given
    the session and the command line that may return None for the default), else *default*."""
    hook = replies.get(verb)
    if hook is None:
        return default
    if callable(hook):
        value = hook(session, line)
        return default if value is None else value
    return hook
