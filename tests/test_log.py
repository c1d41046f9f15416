"""Log output: batching of lines per turn of the event loop (maddylite.log.batch_lines)."""

import subprocess
import sys

import gevent
import pytest

from maddylite import log


class CountingStream:
    """CountingStream records each write, as a file would receive it."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def stream(monkeypatch):
    s = CountingStream()
    monkeypatch.setattr(log, "_out", s)
    monkeypatch.setattr(log, "_json", False)
    monkeypatch.setattr(log, "_enabled", True)
    yield s
    log.batch_lines(False)


def test_unbatched_lines_are_written_one_by_one(stream):
    lg = log.Logger("t")
    lg.info("one", n=1)
    lg.info("two", n=2)
    assert stream.writes == ["t: one\tn=1\n", "t: two\tn=2\n"]


def test_batched_lines_go_out_in_one_write_when_the_loop_turns(stream):
    log.batch_lines()
    lg = log.Logger("t")

    def burst(i: int) -> None:
        lg.info("line", i=i)

    for g in [gevent.spawn(burst, i) for i in range(5)]:
        g.join()
    gevent.sleep(0)  # the loop has turned: the batch is out
    assert stream.writes == ["".join(f"t: line\ti={i}\n" for i in range(5))]


def test_a_batched_line_is_not_written_before_the_greenlet_yields(stream):
    log.batch_lines()
    log.Logger("t").info("held")
    assert stream.writes == []
    gevent.sleep(0)
    assert stream.writes == ["t: held\n"]


def test_turning_batching_off_or_flushing_writes_what_waits(stream):
    log.batch_lines()
    log.Logger("t").info("first")
    log.batch_lines(False)
    assert stream.writes == ["t: first\n"]
    log.batch_lines()
    log.Logger("t").info("second")
    log.flush()
    assert stream.writes == ["t: first\n", "t: second\n"]


def test_batched_lines_are_written_at_exit_without_a_turn_of_the_loop():
    code = ("from maddylite import log\nlog.batch_lines()\nlog.Logger('t').info('last words')\n"
            "raise SystemExit(3)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 3
    assert p.stderr == "t: last words\n"
