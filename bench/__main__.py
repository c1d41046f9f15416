"""python -m bench [NAME...] [--quick] [--json FILE] | --compare OLD.json NEW.json"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable

from bench.common import Figure

#: name -> module in bench/ whose run(quick) returns the figures (imported when run).
BENCHES = {
    "config": "bench.config",
    "engine": "bench.engine",
    "relay": "bench.relay",
    "acceptance": "bench.relay",  # measured in the relay runs (the same injections)
    "roundtrips": "bench.roundtrips",
    "stall": "bench.stall",
    "tls": "bench.tls",
}


def _runner(name: str) -> Callable[[bool], list[Figure]]:
    return importlib.import_module(BENCHES[name]).run  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    """main runs the chosen benchmarks (all by default) and prints every figure."""
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHES)}")
    p.add_argument("--quick", action="store_true", help="a smoke run (under two minutes)")
    p.add_argument("--json", default="bench/results/latest.json", help="where to write the results")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two result files")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    rev = _revision()
    print(f"# maddylite benchmarks, {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs), {rev}, quick={args.quick}")
    print(f"# python: {_interpreter()}")
    figures = []
    done: set[str] = set()
    for name in names:
        if BENCHES[name] in done:
            continue  # relay and acceptance come from the same runs
        done.add(BENCHES[name])
        t0 = time.monotonic()
        try:
            figs = _runner(name)(args.quick)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
            print(f"{name}: not available ({type(e).__name__}: {e})")
            continue
        for f in figs:
            print(f.render(), flush=True)
            figures.append(f.as_dict())
        print(f"# {name}: {time.monotonic() - t0:.0f} s", flush=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fp:
        json.dump({"date": time.time(), "quick": args.quick, "revision": rev, "machine": platform.node(),
                   "python": _interpreter(),
                   "figures": figures}, fp, indent=1)
    print(f"# results written to {args.json}")
    return 0


def _interpreter() -> str:
    """_interpreter names the Python that runs maddylite here: its build changes every
    figure (a distribution's optimised build against a plain source build)."""
    base = getattr(sys, "_base_executable", sys.executable)
    return f"{platform.python_version()} {os.path.realpath(base)} ({platform.python_compiler()})"


def _revision() -> str:
    """_revision names the code measured: the commit, and whether the code differs from it."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "maddylite", "modules"], cwd=repo, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "revision unknown"
    return f"commit {head}" + (" with uncommitted changes in maddylite/ or modules/" if dirty else "")


def compare(old: str, new: str) -> int:
    """compare prints the median change of every figure present in both files."""
    a = {f["name"]: f for f in json.load(open(old))["figures"]}
    b = {f["name"]: f for f in json.load(open(new))["figures"]}
    import statistics

    for name in sorted(set(a) & set(b)):
        if not a[name]["ours"] or not b[name]["ours"]:
            continue
        ma, mb = statistics.median(a[name]["ours"]), statistics.median(b[name]["ours"])
        print(f"{name}: {ma:.4g} -> {mb:.4g} {b[name]['unit']} ({(mb - ma) / ma * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

