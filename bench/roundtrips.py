"""roundtrips: round trips per message on a reused PIPELINING connection, counted at the sink.

The sink is bench/recsink.py on the bench MX's address (another port): it offers
PIPELINING and counts client→server turns (see its docstring). For every message after
the first on a connection, the turns from the previous message's end of data to its own
are that message's cost.

maddylite: bench/driver.py, one delivery at a time to b000.bench.test, conn_reuse_limit
high, so every message after the first reuses the connection.

Peer: the Postfix relay (bench/postfix.py) with the same messages preloaded in its queue
and flushed at once; its connection cache reuses connections for the backlog.

Goal: 2. Two figures: a sink that offers CHUNKING, as Postfix's smtpd does by default, and
one that does not. With CHUNKING, maddylite sends the content as one ``BDAT <size> LAST``
chunk in the same write as its command, after the RCPT replies: RSET+MAIL+RCPT, then
BDAT+content, two turns. Without it, behaviour.md B-95 forbids sending DATA before an RCPT
is known to have succeeded, so RSET+MAIL+RCPT, DATA and the content are three turns.
Postfix's smtp client never uses BDAT.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
from typing import Any

from bench import env
from bench.common import Figure
from bench.postfix import PostfixRelay, preload
from bench.recsink import example, per_message


class RecSink:
    def __init__(self, h: Any, port: int, out: str, chunking: bool) -> None:
        self.out = out
        self.proc = h.ns_popen([env.PY, "-m", "bench.recsink", env.sink_address(h), str(port), out,
                                "chunking" if chunking else "data-only"], cwd=str(env.REPO),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env.wait_listening(h, env.sink_address(h), port, self.proc)

    def sessions(self) -> list[list[list[str]]]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return list(json.load(open(self.out)))

    def __enter__(self) -> RecSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run(quick: bool) -> list[Figure]:
    h = env.harness()
    n = 50 if quick else 200
    reps = 3
    crlf, lf = env.message_files()
    root = env.workdir("roundtrips")
    port = env.free_port(h)
    out = str(root / "turns.json")
    figs = {chunking: Figure(f"roundtrips: client->server turns per message on a reused PIPELINING connection, "
                             f"sink {'offers CHUNKING' if chunking else 'without CHUNKING'}", "round trips/msg",
                             higher_is_better=False, goal="2")
            for chunking in (True, False)}
    examples: dict[bool, dict[str, str]] = {True: {}, False: {}}
    spec = {"config": env.engine_config(h, root / "state", "conn_reuse_limit 1000000"), "message": str(crlf),
            "domains": ["b000.bench.test"], "count": n, "parallel": 1, "port": port}
    for chunking, fig in figs.items():
        for _ in range(reps):
            with RecSink(h, port, out, chunking) as rec:
                r = env.run_driver(h, spec, "roundtrips")
                s = rec.sessions()
            if r["failed"]:
                raise RuntimeError(f"roundtrips: {r['failed']} deliveries failed: {r['errors']}")
            fig.ours.append(statistics.mean(per_message(s)))
            examples[chunking]["maddylite"] = example(s)
    problem = ""
    try:
        pf = PostfixRelay(h, "roundtrips-postfix", mx_port=port)
    except Exception as e:  # noqa: BLE001
        problem = f"peer not available: {e}"
        pf = None
    if pf is not None:
        try:
            for chunking, fig in figs.items():
                fig.peer_name = "Postfix"
                for _ in range(reps):
                    with RecSink(h, port, out, chunking) as rec:
                        preload(pf, lambda p: ["smtp-source", "-s", "5", "-m", str(n), "-d", "-F", str(lf), "-f",
                                               env.SENDER, "-M", "client.bench.test", "-t", "rcpt@b000.bench.test",
                                               f"127.0.0.1:{p}"], n)
                        pf.flush()
                        pf.wait_empty(120)
                        s = rec.sessions()
                    fig.peer.append(statistics.mean(per_message(s)))
                    examples[chunking]["Postfix"] = example(s)
        finally:
            pf.stop()
    for chunking, fig in figs.items():
        fig.note = "one message: " + "; ".join(f"{k}: {v}" for k, v in examples[chunking].items())
        if fig.ours and statistics.median(fig.ours) > 2:
            why = ["DATA waits for the RCPT reply (B-95), so the content is a turn of its own after DATA's"]
            if any(t.strip() == "RSET" for t in examples[chunking].get("maddylite", "").split("|")):
                why.append("the RSET that parks the connection waits for its reply in a turn of its own")
            fig.note += "; above the goal: " + "; ".join(why)
        if problem:
            fig.note += "; " + problem
    return list(figs.values())
