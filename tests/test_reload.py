"""Reload and signals end to end: `maddylite run` as a subprocess (behaviour.md E-1..E-13)."""

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time

import gevent
import pytest


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, hostname, ports, extra=""):
    listeners = " ".join(f"tcp://127.0.0.1:{p}" for p in ports)
    return (
        f"state_dir {tmp_path}/state\nruntime_dir {tmp_path}/run\n"
        f"smtp {listeners} {{\n    hostname {hostname}\n    deliver_to dummy\n    shutdown_timeout 30s\n}}\n{extra}"
    )


class Server:
    """Server runs `maddylite run` and collects its log lines."""

    def __init__(self, conf):
        self.conf = conf
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "maddylite", "run", "--config", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.reader = gevent.spawn(self._read)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_log(self, phrase, count=1, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(phrase in line for line in self.lines) >= count:
                return
            if self.proc.poll() is not None:
                break
            gevent.sleep(0.05)
        raise AssertionError(f"log line {phrase!r} (x{count}) not seen; log:\n" + "\n".join(self.lines))

    def signal(self, sig):
        self.proc.send_signal(sig)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=5)


def greeting(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        code, msg = s.ehlo("client.example")
        assert code == 250
        return msg.decode().splitlines()[0]


@pytest.fixture
def server_factory():
    servers = []

    def start(conf):
        srv = Server(conf)
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.close()


def test_sighup_reload_then_broken_config_then_sigterm_E_1_E_2_E_3(tmp_path, server_factory):
    """E-1/E-2/E-3: SIGHUP applies a new config; a broken one is logged with its position and the old one keeps serving; SIGTERM exits 0."""
    port = _free_port()
    conf = tmp_path / "maddylite.conf"
    conf.write_text(_config(tmp_path, "one.example", [port]))
    srv = server_factory(conf)
    srv.wait_log("server started")
    assert greeting(port).startswith("one.example")

    conf.write_text(_config(tmp_path, "two.example", [port]))
    srv.signal(signal.SIGHUP)
    srv.wait_log("new server started")
    srv.wait_log("old server stopped")
    for phrase in ("reloading server...", "configuration loaded"):
        assert any(phrase in line for line in srv.lines)
    assert greeting(port).startswith("two.example")

    conf.write_text(_config(tmp_path, "three.example", [port]) + "}\n")  # a stray brace on line 8
    srv.signal(signal.SIGHUP)
    srv.wait_log("failed to load new configuration")
    bad = [line for line in srv.lines if "failed to load new configuration" in line][0]
    assert f"{conf}:8:1:" in bad and "unexpected }" in bad
    assert greeting(port).startswith("two.example")

    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=20) == 0
    srv.wait_log("server stopped")


def test_sigusr2_reloads_and_sockets_stay_open_E_1_E_6(tmp_path, server_factory):
    """E-1/E-6: SIGUSR2 reloads; an unchanged address accepts connections throughout; a removed one stops listening."""
    keep, drop = _free_port(), _free_port()
    conf = tmp_path / "maddylite.conf"
    conf.write_text(_config(tmp_path, "one.example", [keep, drop]))
    srv = server_factory(conf)
    srv.wait_log("server started")

    refused = []
    stop = False

    def hammer():
        while not stop:
            try:
                with socket.create_connection(("127.0.0.1", keep), timeout=5):
                    pass
            except ConnectionRefusedError:
                refused.append(time.monotonic())
            gevent.sleep(0.005)

    g = gevent.spawn(hammer)
    conf.write_text(_config(tmp_path, "two.example", [keep]))
    for _ in range(3):  # a burst of signals coalesces
        srv.signal(signal.SIGUSR2)
    srv.wait_log("old server stopped")
    gevent.sleep(0.2)
    stop = True
    g.join(timeout=10)
    assert refused == []
    assert greeting(keep).startswith("two.example")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", drop), timeout=2).close()
    assert sum("new server started" in line for line in srv.lines) <= 2


def test_failed_start_keeps_old_runtime_E_11(tmp_path, server_factory):
    """E-11: the new config cannot bind its port; the old runtime resumes and keeps serving."""
    port = _free_port()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    busy_port = busy.getsockname()[1]
    conf = tmp_path / "maddylite.conf"
    conf.write_text(_config(tmp_path, "one.example", [port]))
    srv = server_factory(conf)
    srv.wait_log("server started")
    conf.write_text(_config(tmp_path, "two.example", [port, busy_port]))
    srv.signal(signal.SIGHUP)
    srv.wait_log("failed to start new configuration")
    assert greeting(port).startswith("one.example")
    busy.close()


def test_second_stop_signal_exits_at_once_E_13(tmp_path, server_factory):
    """E-13: a second SIGTERM during a graceful stop exits with status 1."""
    port = _free_port()
    conf = tmp_path / "maddylite.conf"
    conf.write_text(_config(tmp_path, "one.example", [port]))
    srv = server_factory(conf)
    srv.wait_log("server started")
    client = socket.create_connection(("127.0.0.1", port), timeout=5)  # an open session delays the stop
    client.recv(100)
    srv.signal(signal.SIGTERM)
    srv.wait_log("stopping server...")
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=20) == 1
    client.close()


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX only")
def test_run_without_endpoint_fails_A_103(tmp_path):
    """A-103: `maddylite run` refuses a configuration without an endpoint."""
    conf = tmp_path / "maddylite.conf"
    conf.write_text(f"state_dir {tmp_path}\nhostname h\ntarget.remote r {{ }}\n")
    r = subprocess.run([sys.executable, "-m", "maddylite", "run", "--config", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "at least one endpoint should be configured" in r.stderr


def test_open_sessions_finish_on_the_old_instance_E_7(tmp_path):
    """E-7: a session opened before a reload completes its message afterwards."""
    port = _free_port()
    conf = tmp_path / "maddylite.conf"
    conf.write_text(_config(tmp_path, "one.example", [port]))
    srv = Server(conf)
    try:
        srv.wait_log("server started")
        s = smtplib.SMTP("127.0.0.1", port, timeout=10)
        s.ehlo("client.example")
        s.mail("a@example.org")
        s.rcpt("b@example.net")
        conf.write_text(_config(tmp_path, "two.example", [port]))
        srv.signal(signal.SIGHUP)
        srv.wait_log("new server started")
        code, _ = s.data(b"Subject: across a reload\r\n\r\nbody\r\n")
        assert code == 250
        s.quit()
        srv.wait_log("old server stopped")
    finally:
        srv.close()
