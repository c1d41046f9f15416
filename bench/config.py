"""config: parse and build a generated 10,000-line configuration; SIGHUP to "new config serving".

Goals: < 1 s for the build, < 200 ms from SIGHUP to the new configuration serving. There
is no Postfix equivalent of either figure, so the goal itself is printed as the
reference (the ratio is goal / measured: > 1 means the goal is met).
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

from bench.common import Figure, repeat, timed


def generate_config(lines: int, state_dir: str) -> str:
    """generate_config writes many targets sharing &name policies and limits, ~``lines`` lines."""
    out = [
        f"state_dir {state_dir}",
        "hostname mx.bench.test",
        "mx_auth shared_policy {",
        "    dnssec",
        "    local_policy {",
        "        min_tls_level none",
        "        min_mx_level none",
        "    }",
        "}",
        "limits shared_limits {",
        "    all concurrency 100",
        "    destination rate 20 1s",
        "}",
    ]
    i = 0
    smtp_block: list[str] = []
    while len(out) + len(smtp_block) < lines - 12:
        out += [
            f"target.remote out{i} {{",
            "    mx_auth &shared_policy",
            "    limits &shared_limits",
            "    connect_timeout 2m",
            "    command_timeout 5m",
            "    conn_reuse_limit 10",
            "}",
        ]
        smtp_block.append(f"smtp tcp://127.0.0.1:{20000 + i} {{\n    deliver_to &out{i}\n}}")
        i += 1
    return "\n".join(out + smtp_block) + "\n"


def build_once(path: str) -> float:
    """build_once parses and configures the file in a fresh process (no cached imports)."""
    code = (
        "import time,sys;t0=time.perf_counter();"
        "from maddylite.runtime import Runtime,ConfigSource;"
        "rt=Runtime(ConfigSource(sys.argv[1]));t1=time.perf_counter();rt.configure();"
        "print(time.perf_counter()-t1)"
    )
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True)
    return float(r.stdout.strip())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reload_latency(tmp: str, rounds: int) -> list[float]:
    """reload_latency: SIGHUP → the new hostname in the greeting, on the default config's shape."""
    port = _free_port()
    conf = os.path.join(tmp, "reload.conf")

    def write(name: str) -> None:
        with open(conf, "w") as f:
            f.write(default_shaped_config(tmp, port, name))

    write("gen0.bench")
    proc = subprocess.Popen([sys.executable, "-m", "maddylite", "run", "--config", conf], stderr=subprocess.PIPE, text=True)
    out = []
    try:
        try:
            _wait_greeting(port, "gen0.bench", 20)
        except TimeoutError:
            proc.terminate()
            raise RuntimeError("server did not start: " + (proc.communicate(timeout=10)[1] or "")[-500:]) from None
        for i in range(1, rounds + 1):
            name = f"gen{i}.bench"
            write(name)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGHUP)
            _wait_greeting(port, name, 10)
            out.append(time.perf_counter() - t0)
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def default_shaped_config(tmp: str, port: int, name: str) -> str:
    """default_shaped_config is the embedded default configuration's shape on a chosen port."""
    from maddylite.runtime import embedded_default_config

    text = embedded_default_config().replace("tcp://127.0.0.1:2525", f"tcp://127.0.0.1:{port}")
    return f"state_dir {tmp}/state\nruntime_dir {tmp}/run\n" + text.replace("hostname localhost", f"hostname {name}")


def _wait_greeting(port: int, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=2) as s:
                code, msg = s.ehlo("bench")
                if msg.decode().startswith(name):
                    return
        except OSError:
            pass
        time.sleep(0.002)
    raise TimeoutError(f"{name} never served")


def run(quick: bool) -> list[Figure]:
    """run measures both figures."""
    n = 3 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.conf")
        with open(path, "w") as f:
            f.write(generate_config(10_000, os.path.join(tmp, "state")))
        build = Figure("config: parse+build 10,000 lines", "s", higher_is_better=False, peer_name="goal", goal="< 1 s")
        build.ours = repeat(lambda: build_once(path), n)
        build.peer = [1.0]
        reload = Figure("config: SIGHUP to new config serving", "s", higher_is_better=False, peer_name="goal", goal="< 0.2 s")
        reload.ours = reload_latency(tmp, n)
        reload.peer = [0.2]
        return [build, reload]


__all__ = ["run", "generate_config", "timed"]
