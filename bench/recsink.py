"""A recording SMTP sink that counts round trips: python -m bench.recsink ADDR PORT OUT.json [chunking]

A round trip (a "turn") is one flight of client data that the client waits to have
answered: the sink reads whatever the client sends, keeps reading while more arrives
within SETTLE seconds (so that pipelined commands written in several pieces count once),
holds its answer HOLD seconds more, reading on (what the client sends meanwhile did not
wait for the answer, so it belongs to the same flight), then answers every complete
command in one write and waits for the client again. A client that waits for each reply
costs one turn per command; a client that pipelines RSET, MAIL and RCPT costs one turn for
the three; a command written without waiting for its reply (a RSET that parks a
connection) joins the flight that follows it.

It offers PIPELINING, 8BITMIME, SIZE and ENHANCEDSTATUSCODES (and CHUNKING, as Postfix's
smtpd does, when the fourth argument is ``chunking``), no STARTTLS, accepts everything and
discards it. On SIGTERM it writes, per connection, the list of turns (the command verbs of
each turn, ``.`` for the end of a message's data or of its last BDAT chunk) to OUT.json
and exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable

SETTLE = 0.005
HOLD = 0.01
EHLO = (b"250-recsink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 52428800\r\n"
        b"250 ENHANCEDSTATUSCODES\r\n")
EHLO_CHUNKING = EHLO.replace(b"250 ENHANCED", b"250-CHUNKING\r\n250 ENHANCED")
ehlo_reply = EHLO

sessions: list[list[list[str]]] = []
lock = threading.Lock()


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        turns: list[list[str]] = []
        with lock:
            sessions.append(turns)
        sock.sendall(b"220 recsink.bench.test ESMTP\r\n")
        buf = b""
        in_data = False
        chunk_left, chunk_last = 0, False
        while True:
            sock.settimeout(300)
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            more = _read_on(sock, lambda: SETTLE)  # the rest of this flight
            later = _read_on(sock, _until(time.monotonic() + HOLD))  # sent while the answer is held
            if more is None or later is None:
                return
            buf += more + later
            replies: list[bytes] = []
            verbs: list[str] = []
            quit_seen = False
            while True:
                if chunk_left:
                    take = min(chunk_left, len(buf))
                    buf, chunk_left = buf[take:], chunk_left - take
                    if chunk_left:
                        break
                    verbs.append("." if chunk_last else "<chunk>")
                    replies.append(b"250 2.0.0 Ok: queued\r\n")
                    continue
                if in_data:
                    end = buf.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    buf = buf[end + 5:]
                    in_data = False
                    verbs.append(".")
                    replies.append(b"250 2.0.0 Ok: queued\r\n")
                    continue
                nl = buf.find(b"\r\n")
                if nl < 0:
                    break
                line, buf = buf[:nl], buf[nl + 2:]
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("ascii", "replace")
                verbs.append(verb)
                if verb in ("EHLO",):
                    replies.append(ehlo_reply)
                elif verb == "BDAT" and ehlo_reply is EHLO_CHUNKING:
                    size, _, last = line[5:].decode("ascii", "replace").partition(" ")
                    chunk_left, chunk_last = int(size), last.strip().upper() == "LAST"
                    if not chunk_left:
                        verbs.append("." if chunk_last else "<chunk>")
                        replies.append(b"250 2.0.0 Ok\r\n")
                elif verb == "DATA":
                    replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    in_data = True
                    buf = b"\r\n" + buf  # so that an empty body still ends at "\r\n.\r\n"
                elif verb == "QUIT":
                    replies.append(b"221 2.0.0 Bye\r\n")
                    quit_seen = True
                    break
                else:
                    replies.append(b"250 2.0.0 Ok\r\n")
            if replies:
                turns.append(verbs)
                sock.settimeout(300)
                try:
                    sock.sendall(b"".join(replies))
                except OSError:
                    return
            if quit_seen:
                return


def _until(deadline: float) -> Callable[[], float]:
    return lambda: deadline - time.monotonic()


def _read_on(sock: socket.socket, window: Callable[[], float]) -> bytes | None:
    """_read_on reads what arrives while each next piece comes within window() seconds;
    None when the connection failed."""
    got = b""
    while (left := window()) > 0:
        sock.settimeout(left)
        try:
            more = sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            break
        except OSError:
            return None
        if not more:
            break
        got += more
    return got


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def main(addr: str, port: int, out: str, chunking: bool = False) -> None:
    global ehlo_reply
    ehlo_reply = EHLO_CHUNKING if chunking else EHLO
    srv = Server((addr, port), Handler)

    def dump(*_: object) -> None:
        with lock:
            data = json.dumps(sessions)
        with open(out, "w") as f:
            f.write(data)
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    srv.serve_forever()


def per_message(sessions_: list[list[list[str]]]) -> list[int]:
    """per_message: for every message after the first on a connection, the turns from the
    previous message's end of data to its own (the cost of a message on a reused connection)."""
    out = []
    for turns in sessions_:
        dots = [i for i, verbs in enumerate(turns) if "." in verbs]
        out += [b - a for a, b in zip(dots, dots[1:], strict=False)]
    return out


def example(sessions_: list[list[list[str]]]) -> str:
    """example shows the turns of one message on a reused connection, e.g. ``RSET RSET MAIL RCPT | BDAT .``."""
    for turns in sessions_:
        dots = [i for i, verbs in enumerate(turns) if "." in verbs]
        if len(dots) >= 2:
            return " | ".join(" ".join(v) for v in turns[dots[0] + 1: dots[1] + 1])
    return "-"


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:5] == ["chunking"])
