"""Lifetime: start in order, stop in reverse, roll back a failed start, idempotent stop."""

import pytest

from maddylite.interfaces import Endpoint
from maddylite.lifecycle import Lifetime, StartError
from maddylite.registry import ModuleBase


class Mod(ModuleBase):
    """Mod records lifecycle calls."""

    def __init__(self, name, log, fail=False, roles=()):
        super().__init__("test", name, None)
        self.log, self.fail = log, fail
        self.roles = roles

    def start(self):
        self.log.append(("start", self.instance_name))
        if self.fail:
            raise OSError("port in use")

    def stop(self, timeout):
        self.log.append(("stop", self.instance_name))


def test_start_order_and_reverse_stop():
    """Dependencies first, endpoints last; stop in reverse; stop twice is harmless."""
    log = []
    ep = Mod("ep", log, roles=(Endpoint,))
    lt = Lifetime([Mod("a", log), ep, Mod("b", log)])
    lt.start()
    lt.stop(1)
    lt.stop(1)
    assert log == [("start", "a"), ("start", "b"), ("start", "ep"), ("stop", "ep"), ("stop", "b"), ("stop", "a")]


def test_failed_start_rolls_back():
    """A failing start stops everything started, itself included (partial start)."""
    log = []
    lt = Lifetime([Mod("a", log), Mod("b", log, fail=True), Mod("c", log)])
    with pytest.raises(StartError) as e:
        lt.start()
    assert "port in use" in str(e.value)
    assert log == [("start", "a"), ("start", "b"), ("stop", "b"), ("stop", "a")]
