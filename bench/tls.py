"""tls: delivery over STARTTLS, new handshakes and reused connections reported apart.

The sink is the harness's Postfix smtpd with STARTTLS (mx.bench-tls.test:25, certificate
from the private CA, discards after queueing) for t000..t009.bench-tls.test; it costs far
more per message than smtp-sink, so these rates are lower than the engine's.

maddylite: bench/driver.py (target.remote as in the default configuration, verifying the
certificate against the private CA), N messages, 20 at once, round robin over the ten
domains, with ``conn_reuse_limit 1`` (every message on a new connection: TCP, EHLO,
STARTTLS handshake, EHLO) and with ``conn_reuse_limit`` high (one handshake per
connection, then RSET/MAIL/RCPT/DATA on it).

Peer: smtp-source has no STARTTLS, so the peer is Postfix's own delivery agent: the
Postfix relay (bench/postfix.py, DANE level: no TLSA here, so opportunistic TLS) with the
same N messages preloaded in its queue and 20 smtp(8) processes (``maxproc 20``), timed
from ``postqueue -f`` to an empty queue. New handshakes: ``smtp_connection_cache_on_demand
= no``; reused: connection cache on (the default) and ``smtp_tls_connection_reuse = yes``
(TLS sessions kept by tlsproxy). Neither side resumes TLS sessions (Postfix's client
session cache is off by default; maddylite keeps none). Postfix's figure includes its
queue manager's work, so it is not the engine alone; read the ratio with that in mind.
"""

from __future__ import annotations

import time

from bench import env
from bench.common import Figure
from bench.postfix import PostfixRelay, preload

P = 20


def run(quick: bool) -> list[Figure]:
    h = env.harness()
    n = 100 if quick else 1000
    reps = 3
    crlf, lf = env.message_files()
    state = env.workdir("tls")
    domains = h.bench_domains(tls=True)
    modes = (("new handshake per message", "conn_reuse_limit 1", {"smtp_connection_cache_on_demand": "no",
                                                                  "smtp_tls_connection_reuse": "no"}),
             ("reused connections", "conn_reuse_limit 1000000", {"smtp_connection_cache_on_demand": "yes",
                                                                  "smtp_tls_connection_reuse": "yes"}))
    figs = []
    for label, _remote, _ in modes:
        figs.append(Figure(f"tls: {n:,} x 4 KB over STARTTLS to 10 domains, {P} at once, {label}", "msg/s",
                           peer_name="Postfix smtp"))
    pf: PostfixRelay | None = None
    problem = ""
    try:
        pf = PostfixRelay(h, "tls-postfix", mx_port=25, smtp_maxproc=str(P))
    except Exception as e:  # noqa: BLE001
        problem = f"peer not available: {e}"
    try:
        for _ in range(reps):
            for fig, (_, remote, pf_params) in zip(figs, modes, strict=True):
                spec = {"config": env.engine_config(h, state, remote), "message": str(crlf), "domains": domains,
                        "count": n, "parallel": P, "port": 25}
                r = env.run_driver(h, spec, "tls")
                if r["failed"]:
                    raise RuntimeError(f"tls: {r['failed']} deliveries failed: {r['errors']}")
                fig.ours.append(n / r["elapsed"])
                if pf is not None:
                    pf.set(**pf_params)
                    preload(pf, lambda p: [env.PY, "-m", "bench.inject", f"127.0.0.1:{p}", str(n), "10", str(lf),
                                           *domains], n)
                    t0 = time.monotonic()
                    pf.flush()
                    fig.peer.append(n / (pf.wait_empty(120 + n / 5) - t0))
        for i, (fig, (_, remote, _)) in enumerate(zip(figs, modes, strict=True)):
            fig.note = (f"peer: {pf.description}, {P} smtp processes, preloaded queue" if pf else problem)
            if (fig.ratio or 1.0) < 1.0:
                name = f"tls-{('new', 'reused')[i]}"
                prof = env.RESULTS / f"{name}.prof"
                env.RESULTS.mkdir(parents=True, exist_ok=True)
                spec = {"config": env.engine_config(h, state, remote), "message": str(crlf), "domains": domains,
                        "count": n, "parallel": P, "port": 25, "profile": str(prof)}
                r = env.run_driver(h, spec, f"{name}-profile")
                fig.note += ("; maddylite loses: " + env.save_profile(name, r, prof)
                             + "; top (own time): " + "; ".join(env.top_functions(r, 4)))
    finally:
        if pf is not None:
            pf.stop()
    return figs
