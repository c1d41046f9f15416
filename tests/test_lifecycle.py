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


def test_early_stop_reaches_the_endpoints_last_E_2_E_6():
    """E-2/E-6: early stop asks the other modules first (a queue's waits for its attempts
    in progress) and the endpoints last, so they keep accepting during that wait."""
    log = []

    class Early(Mod):
        def early_stop(self):
            log.append(("early_stop", self.instance_name))

    lt = Lifetime([Early("queue", log), Early("ep", log, roles=(Endpoint,)), Early("remote", log)])
    lt.start()
    lt.early_stop()
    assert [e for e in log if e[0] == "early_stop"] == [
        ("early_stop", "remote"), ("early_stop", "queue"), ("early_stop", "ep")]


def test_a_reload_gives_old_sessions_the_endpoints_shutdown_timeout_E_7(build_config, monkeypatch):
    """E-7: the old instance's sessions may finish within the endpoint's shutdown_timeout
    (3m default; here the longer of two endpoints), not the 30 s grace of other modules."""
    from maddylite.runtime import Server

    rt = build_config("hostname h.example\n"
                      "smtp tcp://127.0.0.1:0 {\n deliver_to dummy\n}\n"
                      "smtp tcp://127.0.0.1:0 {\n deliver_to dummy\n shutdown_timeout 10m\n}\n",
                      require_endpoint=True)
    assert rt.session_grace() == 600.0
    assert build_config("hostname h.example\nsmtp tcp://127.0.0.1:0 {\n deliver_to dummy\n}\n").session_grace() == 180.0
    stopped = []
    monkeypatch.setattr(rt, "stop", stopped.append)
    server = Server.__new__(Server)
    server.log = rt.log
    server._stop_old(rt)
    assert stopped == [600.0]


def test_a_unix_listener_creates_its_runtime_directory(tmp_path):
    """`unix://path` is relative to the runtime directory, which (under /run) is empty after
    a boot: it is created (mode 0700), not a failed start."""
    import os
    import socket

    from maddylite.config.directives import parse_address
    from maddylite.listeners import ListenerPool

    run = tmp_path / "run" / "maddylite"
    pool = ListenerPool()
    addr = parse_address("unix://smtp.sock")
    sock = pool.acquire(addr, str(run))
    try:
        assert (run / "smtp.sock").exists() and oct(os.stat(run).st_mode & 0o777) == "0o700"
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(run / "smtp.sock"))
    finally:
        pool.release(addr)
        sock.close()
