"""Command line: python -m tests.harness up|down|status|shell|list [--json]."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .core import Harness, HarnessError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.harness",
                                 description="real-peer test harness")
    ap.add_argument("command", choices=["up", "down", "status", "shell", "list"])
    ap.add_argument("--json", action="store_true", help="machine-readable status/list")
    ap.add_argument("--workdir", help="generated state (default $MADDYLITE_HARNESS_DIR or "
                    "/run/maddylite-harness)")
    ap.add_argument("--ns", help="network namespace (default $MADDYLITE_HARNESS_NETNS or mlh)")
    ap.add_argument("--force", action="store_true", help="down: even if a test session uses it")
    args = ap.parse_args(argv)
    h = Harness(args.workdir, args.ns)
    try:
        if args.command == "up":
            t0 = time.monotonic()
            h.up(started_by="cli")
            print(f"harness up in {time.monotonic() - t0:.2f}s: netns {h.ns}, "
                  f"workdir {h.workdir}, CA {h.ca_pem_path}")
        elif args.command == "down":
            h.down(force=args.force)
            print("harness down")
        elif args.command == "status":
            st = h.status()
            if args.json:
                print(json.dumps(st, indent=1))
            else:
                print(f"netns {st['netns']} {'exists' if st['netns_exists'] else 'absent'}; "
                      f"workdir {st['workdir']}; built: {st['built']}; "
                      f"started by: {st['started_by']}")
                for name, s in st["services"].items():
                    state = ("running" if s["running"] else "stopped") + (
                        "" if s["listening"] or not s["running"] else " (not listening)")
                    print(f"  {name:24} {state:10} pid {s['pid']}")
            return 0 if all(s["running"] for s in st["services"].values()) else 3
        elif args.command == "list":
            rows = []
            for sc in h.scenarios.values():
                mx = ", ".join(f"{p} {m}" for p, m in sorted(sc.mx)) or "(no MX)"
                addrs = {m: h.world.final_host(m).addresses for m in sc.mx_hosts
                         if m in h.world.hosts}
                rows.append({"name": sc.name, "domain": sc.domain, "zone": sc.zone,
                             "mx": mx, "addresses": addrs, "expect": sc.expect})
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                for r in rows:
                    print(f"{r['name']:20} {r['domain']:26} {r['zone']:8} {r['mx']}")
                    print(f"{'':20} -> {r['expect']}")
        elif args.command == "shell":
            h.up(started_by="cli")
            env = h.ns_env({"PS1": f"[netns {h.ns}] \\w# "})
            print(f"shell in netns {h.ns}; SSL_CERT_FILE={h.ca_pem_path}; exit to leave",
                  file=sys.stderr)
            shell = os.environ.get("SHELL", "/bin/bash")
            os.execvpe("ip", ["ip", "netns", "exec", h.ns, shell, "--norc", "-i"]
                       if shell.endswith("bash") else ["ip", "netns", "exec", h.ns, shell], env)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
