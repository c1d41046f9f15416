"""Small misbehaving SMTP servers, run as one process inside the namespace.

Usage: python badpeers.py CONFIG.json LOGFILE

CONFIG is a list of {"host": name, "addr": ip, "port": 25, "mode": mode}.  Modes:

never-greets      accept, read and discard until the client closes; never write
greet-554         greet "554 5.3.2 No SMTP service here"; QUIT -> 221, anything else -> 503
greet-421         greet "421 4.3.2 Service not available" and close
starttls-454      advertise STARTTLS, answer it "454 4.7.0 TLS not available"; MAIL -> 530
stall-after-data  EHLO/MAIL/RCPT/DATA as usual, read the message up to the final dot, then
                  never answer and keep draining

Each event is one log line: ``<time> <host> <peer> connect|close|cmd <VERB> <line>``.
This file is self-contained (no imports from the harness package).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

LOG = None


def log(host: str, peer: str, what: str) -> None:
    LOG.write(f"{time.time():.6f} {host} {peer} {what}\n")
    LOG.flush()


async def reply(w: asyncio.StreamWriter, text: str) -> None:
    w.write(text.encode() + b"\r\n")
    await w.drain()


async def session(r, w, host: str, mode: str) -> None:
    addr, port = w.get_extra_info("peername")[:2]
    peer = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    log(host, peer, "connect")
    try:
        if mode == "never-greets":
            while await r.read(65536):
                pass
            return
        if mode == "greet-421":
            await reply(w, "421 4.3.2 Service not available")
            return
        if mode == "greet-554":
            await reply(w, "554 5.3.2 No SMTP service here")
        else:
            await reply(w, f"220 {host} ESMTP harness {mode}")
        while True:
            line = await r.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = text.split(" ", 1)[0].upper()
            log(host, peer, f"cmd {verb} {text}")
            if verb == "QUIT":
                await reply(w, "221 2.0.0 Bye")
                return
            if mode == "greet-554":
                await reply(w, "503 5.5.1 No SMTP service here")
            elif verb == "EHLO":
                ext = ["PIPELINING", "8BITMIME"]
                if mode == "starttls-454":
                    ext.append("STARTTLS")
                lines = [host, *ext]
                await reply(w, "\r\n".join(
                    f"250{'-' if i < len(lines) - 1 else ' '}{x}" for i, x in enumerate(lines)))
            elif verb == "HELO":
                await reply(w, f"250 {host}")
            elif verb == "STARTTLS" and mode == "starttls-454":
                await reply(w, "454 4.7.0 TLS not available")
            elif verb in ("MAIL", "RCPT") and mode == "starttls-454":
                await reply(w, "530 5.7.0 Must issue a STARTTLS command first")
            elif verb in ("MAIL", "RCPT", "RSET", "NOOP"):
                await reply(w, "250 2.0.0 OK")
            elif verb == "DATA" and mode == "stall-after-data":
                await reply(w, "354 End data with <CR><LF>.<CR><LF>")
                while True:
                    body = await r.readline()
                    if not body:
                        return
                    if body in (b".\r\n", b".\n"):
                        break
                log(host, peer, "stalled after final dot")
                while await r.read(65536):
                    pass
                return
            else:
                await reply(w, "502 5.5.2 Command not implemented")
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        log(host, peer, "close")
        try:
            w.close()
        except Exception:
            pass


async def main(config_path: str) -> None:
    with open(config_path) as f:
        config = json.load(f)
    servers = []
    for item in config:
        async def handler(r, w, host=item["host"], mode=item["mode"]):
            await session(r, w, host, mode)

        servers.append(await asyncio.start_server(
            handler, host=item["addr"], port=item.get("port", 25), reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    LOG = open(sys.argv[2], "a", buffering=1)
    asyncio.run(main(sys.argv[1]))
