"""The memory floor of a delivery in flight: python -m bench.floor [N]

A delivery waiting for a reply is a greenlet blocked in a gevent socket's recv. This
measures what that alone costs: N greenlets, each blocked in recv on its own socket pair
(made before the first measurement), and the growth of the resident set size divided by
N. Prints one JSON line: ``{"n": N, "kb_per_greenlet": ...}``. bench/stall.py quotes it
next to the memory goal, as the part no change to maddylite's own code can remove.
"""

from __future__ import annotations

import json
import socket
import sys

import gevent
import gevent.socket


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main(n: int) -> None:
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
    print(json.dumps({"n": n, "kb_per_greenlet": (after - before) / n}))
    for _, b in pairs:
        b.sendall(b"x")
    gevent.joinall(greenlets, timeout=10)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
