"""The delivery-engine driver: target.remote alone, run inside the harness namespace.

    python -m bench.driver SPEC.json

SPEC (JSON): ``config`` (text of a maddylite configuration with one ``target.remote``),
``message`` (path of the message file, CRLF line ends), ``domains`` (recipient domains,
used round robin), ``count`` (messages), ``parallel`` (deliveries running at once),
``port`` (the MX port, 25 unless a private sink listens elsewhere), ``all_at_once``
(start every delivery as a greenlet up front, ``parallel`` of them past a semaphore:
"``count`` deliveries in flight"), ``profile`` (write cProfile stats of the delivery
phase to this path) and ``memory`` (trace allocations with tracemalloc and report the
top sites).

Prints one JSON line: elapsed seconds, the CPU seconds (user, system) the deliveries
took, delivered/failed counts, a sample of errors, the
resident set size when idle (modules started, messages loaded) and its peak during the
deliveries (VmHWM after resetting it through /proc/self/clear_refs).
"""

from gevent import monkey

monkey.patch_all()

import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import gevent  # noqa: E402
import gevent.lock  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _why(e: Exception) -> str:
    reason = getattr(e, "fields", {}).get("reason")
    return f"{e} ({reason})" if reason else str(e)


def _split(raw: bytes) -> tuple[bytes, bytes]:
    idx = raw.find(b"\r\n\r\n")
    return raw[: idx + 2], raw[idx + 4 :]


def main(spec_path: str) -> int:
    spec = json.load(open(spec_path))
    from maddylite.modules.target.remote import RemoteTarget

    from maddylite.config.parser import parse_string
    from maddylite.interfaces import MsgMetadata
    from maddylite.log import batch_lines
    from maddylite.runtime import ConfigSource, Runtime

    RemoteTarget.smtp_port = int(spec.get("port", 25))
    rt = Runtime(ConfigSource(spec_path + ".conf"))
    rt.configure(require_endpoint=False, nodes=parse_string(spec["config"], filename=spec_path + ".conf"))
    for m in rt.modules:
        m.start()
    batch_lines()  # log lines are batched per turn of the event loop, as in `maddylite run`
    target = next(m for m in rt.modules if m.mod_name == "target.remote")

    raw = open(spec["message"], "rb").read()
    header, body = _split(raw)
    domains = spec["domains"]
    n, par = int(spec["count"]), int(spec["parallel"])
    # the preloaded message set: one header per message (its own Message-ID), the body
    headers = [header.replace(b"<bench@", f"<bench-{i}@".encode(), 1) for i in range(n)]
    bodies = [body] * n  # one body object: the message store is not the engine's cost
    sender = spec.get("sender", "sender@relay.bench.test")
    errors: list[str] = []
    delivered = 0

    def one(i: int) -> None:
        nonlocal delivered
        rcpt = f"r{i}@{domains[i % len(domains)]}"
        meta = MsgMetadata(id=f"m{i}", size=len(headers[i]) + 2 + len(bodies[i]))
        try:
            d = target.start_delivery(meta, sender)
        except Exception as e:  # noqa: BLE001
            errors.append(_why(e))
            return
        try:
            d.add_rcpt(rcpt)
            d.body(headers[i], bodies[i])
        except Exception as e:  # noqa: BLE001
            errors.append(_why(e))
            d.abort()
            return
        d.commit()
        delivered += 1

    gevent.sleep(0.05)
    idle_kb = _status_kb("VmRSS")
    peak_reset = _reset_peak()
    if spec.get("memory"):
        tracemalloc.start(1)
    prof = cProfile.Profile() if spec.get("profile") else None
    best: dict = {"traced": 0, "snapshot": None}

    def watch_memory() -> None:
        # the snapshot worth reading is the one at the peak, not after the deliveries
        while True:
            gevent.sleep(0.5)
            cur = tracemalloc.get_traced_memory()[0]
            if cur > max(best["traced"] * 1.25, 4 << 20):
                best["traced"], best["snapshot"] = cur, tracemalloc.take_snapshot()

    watcher = gevent.spawn(watch_memory) if spec.get("memory") else None
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    if prof:
        prof.enable()
    if spec.get("all_at_once"):
        sem = gevent.lock.BoundedSemaphore(par)

        def gated(i: int) -> None:
            with sem:
                one(i)

        gevent.joinall([gevent.spawn(gated, i) for i in range(n)])
    else:
        nxt = iter(range(n))

        def worker() -> None:
            for i in nxt:
                one(i)

        gevent.joinall([gevent.spawn(worker) for _ in range(par)])
    if prof:
        prof.disable()
    elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = _status_kb("VmHWM") if peak_reset else 0
    out = {
        "elapsed": elapsed,
        "cpu_user": ru1.ru_utime - ru0.ru_utime,
        "cpu_sys": ru1.ru_stime - ru0.ru_stime,
        "delivered": delivered,
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],
        "idle_rss_kb": idle_kb,
        "peak_rss_kb": peak_kb,
        "end_rss_kb": _status_kb("VmRSS"),
    }
    if watcher is not None:
        watcher.kill()
        snap = best["snapshot"] or tracemalloc.take_snapshot()
        out["traced_peak_kb"] = tracemalloc.get_traced_memory()[1] // 1024
        out["memory_top"] = [f"Python heap at its peak: {best['traced'] // 1024} KiB traced"]
        out["memory_top"] += [str(s) for s in snap.statistics("lineno")[:15]]
        tracemalloc.stop()
    if prof:
        prof.dump_stats(spec["profile"])
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
        out["profile_top"] = s.getvalue()
    for m in reversed(rt.modules):
        m.stop(5.0)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
