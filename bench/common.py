"""Shared pieces of the benchmarks: repetition, statistics, result records."""

from __future__ import annotations

import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    """Figure is one measured quantity: maddylite's runs, the peer's runs, and the unit."""

    name: str
    unit: str
    ours: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    peer_name: str = ""
    higher_is_better: bool = True
    goal: str = ""
    note: str = ""
    unavailable: str = ""

    @property
    def ratio(self) -> float | None:
        """ratio is ours/peer (for rates) or peer/ours (for times), medians; >1 means maddylite is better."""
        if not self.ours or not self.peer:
            return None
        a, b = statistics.median(self.ours), statistics.median(self.peer)
        if a == 0 or b == 0:
            return None
        return a / b if self.higher_is_better else b / a

    def render(self) -> str:
        """render returns the printed lines of this figure."""
        if self.unavailable:
            return f"{self.name}: not available ({self.unavailable})"

        def stats(xs: list[float]) -> str:
            return f"min {num(min(xs))} / median {num(statistics.median(xs))} / max {num(max(xs))} {self.unit}"

        lines = [f"{self.name}:", f"  maddylite   {stats(self.ours)}  (n={len(self.ours)})"]
        if self.peer:
            lines.append(f"  {self.peer_name:<11} {stats(self.peer)}  (n={len(self.peer)})")
        r = self.ratio
        if r is not None:
            lines.append(f"  ratio       {r:.3f} (>1 = maddylite better)" + (f"; goal {self.goal}" if self.goal else ""))
        elif self.goal:
            lines.append(f"  goal        {self.goal}")
        if r is not None and r < 1:
            verdict = "maddylite misses the goal" if self.peer_name == "goal" else f"maddylite loses to {self.peer_name}"
            lines.append(f"  verdict     {verdict}")
        if self.note:
            lines.append(f"  note        {self.note}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """as_dict is the JSON record of the figure."""
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def num(x: float) -> str:
    """num formats a measured value: thousands separated, four significant digits below."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def repeat(fn: Callable[[], float], n: int) -> list[float]:
    """repeat runs a measurement n times and returns the values."""
    return [fn() for _ in range(n)]


def timed(fn: Callable[[], Any]) -> float:
    """timed returns the seconds fn took."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stop_process(proc: subprocess.Popen) -> None:
    """stop_process ends a helper process: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
