"""The memory floor of a delivery in flight: python -m bench.floor [N]

A delivery waiting for a reply is a greenlet blocked in a gevent socket's recv. This
measures what that alone costs: N greenlets, each blocked in recv on its own socket pair
(made before the first measurement), and the growth of the resident set size divided by
N. It also measures N bare greenlets (the greenlet library alone, no gevent, no socket),
each switched out in its first Python call: the least any greenlet that runs Python code
costs. And N greenlets whose code is a C function (they switch out before any Python
frame exists): the difference is the frame stack CPython 3.11 gives each greenlet that
runs Python code (a chunk of its own, of which at least one 4 KB page is resident).
Prints one JSON line: ``{"n": N, "kb_per_greenlet": ..., "kb_per_bare_greenlet": ...,
"kb_per_greenlet_without_python_frames": ...}``. bench/stall.py quotes them next to the
memory goal, as the part no change to maddylite's own code can remove.
"""

from __future__ import annotations

import json
import socket
import sys

import gevent
import gevent.socket
import greenlet


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main(n: int) -> None:
    c_kb, c_only = _c_only(n)  # first, and kept: freed memory would be reused below
    bare_kb, bare = _bare(n)
    pairs = [socket.socketpair() for _ in range(n)]
    socks = [gevent.socket.socket(fileno=a.detach()) for a, _ in pairs]
    gevent.sleep(0)
    before = _rss_kb()

    def wait(s: gevent.socket.socket) -> bytes:
        s.settimeout(60)
        return s.recv(4096)

    greenlets = [gevent.spawn(wait, s) for s in socks]
    gevent.sleep(0.2)
    after = _rss_kb()
    for _, b in pairs:
        b.sendall(b"x")
    gevent.joinall(greenlets, timeout=10)
    print(json.dumps({"n": n, "kb_per_greenlet": (after - before) / n, "kb_per_bare_greenlet": bare_kb,
                      "kb_per_greenlet_without_python_frames": c_kb}))
    del bare, c_only


def _bare(n: int) -> tuple[float, list[greenlet.greenlet]]:
    """_bare: the RSS of one bare greenlet switched out in its first Python call, and the
    greenlets (alive: the caller decides when their memory may be reused)."""
    main = greenlet.getcurrent()

    def park() -> None:  # one Python frame: a greenlet that runs Python code has one
        main.switch()

    bare = [greenlet.greenlet(park) for _ in range(n)]
    before = _rss_kb()
    for g in bare:
        g.switch()
    return (_rss_kb() - before) / n, bare


def _c_only(n: int) -> tuple[float, list[greenlet.greenlet]]:
    """_c_only: the RSS of one greenlet whose code is a C function (the main greenlet's
    switch, so it parks at once without running any Python code), and the greenlets."""
    main = greenlet.getcurrent()
    parked = [greenlet.greenlet(main.switch) for _ in range(n)]
    before = _rss_kb()
    for g in parked:
        g.switch()
    return (_rss_kb() - before) / n, parked


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
