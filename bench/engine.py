"""engine: the delivery engine alone against the machine's SMTP limit.

maddylite: bench/driver.py configures a target.remote as the default configuration has
it (mtasts, dnssec, dane, local_policy) with ``conn_reuse_limit`` high, and delivers N
preloaded 4 KB messages, one recipient each, round robin over b000..b099.bench.test,
with P deliveries at once (P greenlets). Every message goes through MX lookup (cached by
unbound), the policies and the connection pool exactly as in the server.

Peer: Postfix's ``smtp-source -s P -m N -d -F msg`` straight to the same sink: P
sessions, each reusing its connection; no DNS, no policy, no queue. That is the
fastest an SMTP client can push these messages into this sink on this machine.

Goal: ratio >= 0.5.
"""

from __future__ import annotations

from bench import env
from bench.common import Figure

P = 20


def run(quick: bool) -> list[Figure]:
    h = env.harness()
    n = 2000 if quick else 10_000
    reps = 3 if quick else 5
    crlf, lf = env.message_files()
    state = env.workdir("engine")
    fig = Figure(f"engine: {n:,} x 4 KB to 100 domains, {P} at once, reused connections", "msg/s",
                 peer_name="smtp-source", goal=">= 0.5")
    with env.Sink(h) as sink:
        spec = {
            "config": env.engine_config(h, state, "conn_reuse_limit 1000000"),
            "message": str(crlf), "domains": h.bench_domains(), "count": n, "parallel": P, "port": sink.port,
        }
        peer_argv = ["smtp-source", "-s", str(P), "-m", str(n), "-d", "-F", str(lf), "-f", env.SENDER,
                     "-M", "relay.bench.test", "-t", "rcpt@b000.bench.test", f"{sink.addr}:{sink.port}"]
        env.run_driver(h, {**spec, "count": min(n, 500)}, "engine-warmup")  # DNS and MTA-STS caches warm
        for _ in range(reps):
            r = env.run_driver(h, spec, "engine")
            if r["failed"]:
                raise RuntimeError(f"engine: {r['failed']} deliveries failed: {r['errors']}")
            fig.ours.append(n / r["elapsed"])
            fig.peer.append(n / env.run_timed(h, peer_argv))
        if (fig.ratio or 0) < 0.5:
            prof = env.RESULTS / "engine.prof"
            env.RESULTS.mkdir(parents=True, exist_ok=True)
            r = env.run_driver(h, {**spec, "profile": str(prof)}, "engine-profile")
            fig.note = ("maddylite loses: below the goal. " + env.save_profile("engine", r, prof)
                        + "; top (own time): " + "; ".join(env.top_functions(r, 4)))
    return [fig]
