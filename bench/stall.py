"""stall: many deliveries to a sink that waits 1 s before answering the final dot.

The sink is smtp-sink with ``-W .:1`` (one second before the reply to the end of data).
N deliveries are handed to the engine (bench/driver.py, target.remote as in the default
configuration, default connection settings), at most P at once, the way target.queue's
max_parallelism runs them. The ideal completion time is 1 s x N / P.

- completion: measured time / ideal, for maddylite and for ``smtp-source -s P -m N -d``
  to the same sink (the machine's limit at that parallelism). Goal: <= 1.5.
- memory: peak resident set size of the maddylite process above its idle size (modules
  started, messages loaded; VmHWM after resetting it). Goal: <= 60 MB.

Full run: N = 10,000 with P = 1,000 (the goals' setup: N deliveries handed to the engine,
P in a session at once, ideal N / P), and N = P = 10,000 as a stress case without a goal
(every delivery in a session at once; its memory is bounded below by one greenlet per
session, see bench/floor.py). Quick run: N = 1,000, P = 500.
"""

from __future__ import annotations

import statistics

from bench import env
from bench.common import Figure

GOAL_MB = 60.0


def _case(h: object, n: int, par: int, reps: int, quick: bool, stress: bool = False) -> list[Figure]:
    crlf, lf = env.message_files()
    state = env.workdir(f"stall-{n}-{par}")
    ideal = n / par
    label = f"stall: {n:,} deliveries, {par:,} at once, sink waits 1 s at the final dot"
    if stress:
        label = f"stall, stress case without a goal: {n:,} deliveries, all in a session at once"
    done = Figure(f"{label}: completion time / ideal ({ideal:g} s)", "x ideal", higher_is_better=False,
                  peer_name="smtp-source", goal="" if stress else "<= 1.5")
    mem = Figure(f"{label}: peak RSS above idle", "MB", higher_is_better=False)
    if not stress:
        mem.peer_name, mem.goal, mem.peer = "goal", f"<= {GOAL_MB:g} MB", [GOAL_MB]
    # Room for every connection the engine may hold, not only the P busy ones: a delivery
    # whose domain has no idle connection at hand opens another while idle ones of other
    # domains wait in the pool (about 1.5 x P here). A sink at its limit leaves the rest
    # unaccepted until its own 100 s timeout closes an idle connection: a stall that
    # measures the sink, not the engine.
    with env.Sink(h, wait_dot=1, max_conns=2 * par + 1000) as sink:
        spec = {"config": env.engine_config(h, state), "message": str(crlf), "domains": h.bench_domains(),
                "count": n, "parallel": par, "port": sink.port}
        peer_argv = ["smtp-source", "-s", str(par), "-m", str(n), "-d", "-F", str(lf), "-f", env.SENDER,
                     "-M", "relay.bench.test", "-t", "rcpt@b000.bench.test", f"{sink.addr}:{sink.port}"]
        idle = []
        for _ in range(reps):
            r = env.run_driver(h, spec, "stall", timeout=300 + 20 * ideal)
            if r["failed"]:
                raise RuntimeError(f"stall: {r['failed']} deliveries failed: {r['errors']}")
            done.ours.append(r["elapsed"] / ideal)
            mem.ours.append((r["peak_rss_kb"] - r["idle_rss_kb"]) / 1024)
            idle.append(r["idle_rss_kb"] / 1024)
            done.peer.append(env.run_timed(h, peer_argv, timeout=300 + 20 * ideal) / ideal)
        per = statistics.median(mem.ours) * 1024 / par
        notes = [f"idle RSS {statistics.median(idle):.0f} MB, {per:.0f} KB more per delivery in progress"]
        floor = _greenlet_floor_kb()
        if floor is not None:
            recv_kb, bare_kb, c_kb = floor
            notes.append(f"a greenlet blocked in a gevent recv alone costs {recv_kb:.1f} KB, a bare greenlet "
                         f"parked in one Python call {bare_kb:.1f} KB, of which {bare_kb - c_kb:.1f} KB is the frame "
                         f"stack CPython gives a greenlet that runs Python code (bench/floor.py): "
                         f"{recv_kb * par / 1024:.0f} MB and {bare_kb * par / 1024:.0f} MB for {par:,} deliveries "
                         "waiting at once")
        lost = []
        if statistics.median(done.ours) > 1.5:
            lost.append("completion")
        if statistics.median(mem.ours) > GOAL_MB:
            lost.append("memory")
        if "completion" in lost:
            # a smaller run (at most 2,000 deliveries; 500 when quick) shows where the time
            # goes without the profiler's overhead on 10,000
            pn = min(n, 500 if quick else 2000)
            prof = env.RESULTS / f"stall-{n}-{par}.prof"
            env.RESULTS.mkdir(parents=True, exist_ok=True)
            r = env.run_driver(h, {**spec, "count": pn, "parallel": min(par, pn), "profile": str(prof)},
                               f"stall-profile-{n}-{par}", timeout=600)
            notes.append(f"maddylite {'is above the goal figure' if stress else 'misses the completion goal'}; profiled on {pn:,} deliveries, {min(par, pn):,} at once: "
                         + env.save_profile(f"stall-{n}-{par}", r, prof)
                         + "; top (own time): " + "; ".join(env.top_functions(r, 3)))
        if "memory" in lost:
            pn = min(n, 1000)
            r = env.run_driver(h, {**spec, "count": pn, "parallel": min(par, pn), "memory": True},
                               f"stall-memory-{n}-{par}", timeout=600)
            txt = env.RESULTS / f"stall-{n}-{par}-memory.txt"
            env.RESULTS.mkdir(parents=True, exist_ok=True)
            txt.write_text("\n".join(_short(x) for x in r["memory_top"]) + "\n")
            notes.append(f"maddylite {'is above the goal figure' if stress else 'misses the memory goal'}; on {pn:,} deliveries at once under tracemalloc the RSS grew "
                         f"{(r['peak_rss_kb'] - r['idle_rss_kb']) / 1024:.0f} MB, of which the Python heap "
                         f"{r['traced_peak_kb'] / 1024:.0f} MB (the rest lies outside it: greenlet stack copies, allocator "
                         f"slack, tracemalloc's own tables): {txt.relative_to(env.REPO)}; top sites: "
                         + "; ".join(_short(x) for x in r["memory_top"][1:3]))
        done.note = mem.note = "; ".join(notes)
    return [done, mem]


def _greenlet_floor_kb() -> tuple[float, float, float] | None:
    """_greenlet_floor_kb runs bench/floor.py: the RSS of one greenlet blocked in recv, of
    one bare greenlet, and of one greenlet that runs no Python code."""
    import json
    import subprocess

    env.raise_nofile(10_000)
    p = subprocess.run([env.PY, "-m", "bench.floor", "2000"], cwd=str(env.REPO), capture_output=True, text=True,
                       timeout=120, check=False)
    if p.returncode != 0:
        return None
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return (float(out["kb_per_greenlet"]), float(out["kb_per_bare_greenlet"]),
            float(out["kb_per_greenlet_without_python_frames"]))


def _short(line: str) -> str:
    return line.replace(str(env.REPO) + "/", "")


def run(quick: bool) -> list[Figure]:
    h = env.harness()
    if quick:
        return _case(h, 1000, 500, 3, quick)
    return _case(h, 10_000, 1000, 3, quick) + _case(h, 10_000, 10_000, 3, quick, stress=True)
