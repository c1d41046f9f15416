"""The injector: smtp-source in 50 parallel lanes over 100 domains (run inside the namespace).

    python -m bench.inject HOST:PORT COUNT LANES MSGFILE DOMAIN...

smtp-source sends every message of one run to one recipient address, so the messages
are spread over the domains by running it per domain: lane i sends to domains i,
i+LANES, ... one after another, each with ``smtp-source -s 1 -m COUNT/len(DOMAINS) -d``
(one session, reused for every message of that domain). LANES sessions run at once.
Prints one JSON line: the seconds from the first connection to the last message
accepted, and the failures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

SENDER = "sender@relay.bench.test"


def main(argv: list[str]) -> int:
    target, count, lanes, msg, domains = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4:]
    per = count // len(domains)
    failures: list[str] = []

    def lane(i: int) -> None:
        for d in domains[i::lanes]:
            r = subprocess.run(["smtp-source", "-s", "1", "-m", str(per), "-d", "-F", msg, "-f", SENDER,
                                "-M", "client.bench.test", "-t", f"rcpt@{d}", target], capture_output=True, text=True)
            if r.returncode != 0:
                failures.append(f"{d}: exit {r.returncode}: {r.stderr.strip()[-200:]}")

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"elapsed": time.perf_counter() - t0, "sent": per * len(domains), "failures": failures}))
    for f in failures[:5]:
        print(f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
