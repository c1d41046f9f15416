"""The benchmarks' environment: the real-peer harness, private sinks, the message set.

Everything that is measured runs inside the harness's network namespace, where
unbound (validating) answers for the signed ``bench.test`` and ``bench-tls.test`` zones:
b000..b099.bench.test have ``MX 10 mx.bench.test`` (127.0.1.61), t000..t009.bench-tls.test
``MX 10 mx.bench-tls.test`` (a Postfix smtpd with STARTTLS that discards).

The harness's own smtp-sink on mx.bench.test:25 is shared with whoever else uses the
harness, so the benchmarks start their own smtp-sink on the same address and another
port: the MX lookups and address lookups are unchanged, only the port differs
(target.remote's ``smtp_port`` hook, Postfix's ``smtp_tcp_port``). That sink can be told
to stop after N messages (``-M``), which is how "the sink accepted the last message" is
timed, and to wait before answering the final dot (``-W .:1``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import stop_process

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
#: Queues (maddylite's and the Postfix peer's) live on a disk file system, not on /run (tmpfs),
#: so that fsync costs what it costs on a real server.
WORK = Path(os.environ.get("MADDYLITE_BENCH_DIR", "/var/tmp/maddylite-bench"))
PY = sys.executable
SENDER = "sender@relay.bench.test"
MSG_SIZE = 4096


class Unavailable(RuntimeError):
    """A figure cannot be measured here; the message says why."""


def harness() -> Any:
    """harness returns the running real-peer harness (started idempotently)."""
    init = REPO / "tests" / "harness" / "__init__.py"
    if "harness" not in sys.modules:
        if not init.exists():
            raise Unavailable("tests/harness is missing")
        spec = importlib.util.spec_from_file_location("harness", init, submodule_search_locations=[str(init.parent)])
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules["harness"] = mod
        spec.loader.exec_module(mod)
    from harness.core import HarnessError  # type: ignore[import-not-found]
    from harness.fixtures import get_harness  # type: ignore[import-not-found]

    try:
        return get_harness()
    except HarnessError as e:
        raise Unavailable(str(e)) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_used_ports: set[int] = set()


def free_port(h: Any) -> int:
    """free_port returns a TCP port that is free inside the namespace (and not handed out before)."""
    while True:
        p = int(h.ns_call(_free_port))
        if p not in _used_ports:
            _used_ports.add(p)
            return p


def workdir(name: str) -> Path:
    """workdir returns a fresh, world-readable directory for one benchmark."""
    d = WORK / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for p in (WORK, d):
        p.chmod(0o755)
    return d


def message_files() -> tuple[Path, Path]:
    """message_files writes the 4 KB message: CRLF (the driver, for target.remote) and LF
    (smtp-source -F, which appends CRLF to every line). The same bytes go on the wire."""
    WORK.mkdir(parents=True, exist_ok=True)
    WORK.chmod(0o755)
    hdr = (f"From: <{SENDER}>\r\nTo: <rcpt@b000.bench.test>\r\nSubject: benchmark message\r\n"
           "Message-ID: <bench@relay.bench.test>\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
    line = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"
    body = ""
    while len(hdr) + len(body) + len(line) <= MSG_SIZE:
        body += line
    body += "x" * (MSG_SIZE - len(hdr) - len(body) - 2) + "\r\n"
    text = hdr + body
    assert len(text) == MSG_SIZE
    crlf, lf = WORK / "msg.eml", WORK / "msg.lf"
    crlf.write_bytes(text.encode())
    lf.write_bytes(text.replace("\r\n", "\n").encode())
    for p in (crlf, lf):
        p.chmod(0o644)
    return crlf, lf


def sink_address(h: Any, tls: bool = False) -> str:
    """sink_address is the IPv4 address of the bench MX (plain smtp-sink or the TLS sink)."""
    return str(h.host("mx.bench-tls.test" if tls else "mx.bench.test").ipv4)


def raise_nofile(limit: int = 65536) -> None:
    """raise_nofile lifts this process's descriptor limit (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(limit, soft), max(hard, limit))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        pass


class Sink:
    """Sink is a private smtp-sink on the bench MX's address (another port).

    It runs with ``-c``: it prints ``sess=.. quit=.. mesg=N`` each time it receives a
    message's final dot; a reader thread follows that count, so that the moment the
    N-th message arrived is known (``wait_count``) while the sink keeps serving.
    """

    def __init__(self, h: Any, *, wait_dot: float = 0, max_conns: int = 2000, port: int | None = None) -> None:
        self.h = h
        self.addr = sink_address(h)
        self.port = port or free_port(h)
        argv = ["smtp-sink", "-u", "nobody", "-h", "sink.bench.test", "-C", "-F", "-c", "-m", str(max_conns), "-t", "100"]
        if wait_dot:
            argv += ["-W", f".:{wait_dot:g}"]
        argv += [f"{self.addr}:{self.port}", "4096"]
        raise_nofile(max_conns + 1000)
        self.count = 0
        self._want = 0
        self._hit: float | None = None
        self._cond = threading.Condition()
        self.proc = h.ns_popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_listening(h, self.addr, self.port, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            m = _MESG.findall(b)
            if not m:
                continue
            now = time.monotonic()
            with self._cond:
                self.count = int(m[-1])
                if self._want and self._hit is None and self.count >= self._want:
                    self._hit = now
                self._cond.notify_all()

    def expect(self, n: int) -> None:
        """expect starts waiting for n more messages (call before sending them)."""
        with self._cond:
            self._want = self.count + n
            self._hit = None

    def wait_count(self, timeout: float) -> float:
        """wait_count returns the time.monotonic() at which the expected message arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._hit is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"the sink has {self.count} of {self._want} messages after {timeout:.0f} s")
                self._cond.wait(min(left, 1.0))
            return self._hit

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_MESG = re.compile(rb"mesg=(\d+)")


def _can_connect(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=1):
            return True
    except OSError:
        return False


def wait_listening(h: Any, addr: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    """wait_listening waits until something in the namespace accepts on addr:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args[-3:]))} exited ({proc.returncode}) before listening")
        if h.ns_call(_can_connect, addr, port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {addr}:{port} after {timeout:.0f} s")


def run_timed(h: Any, argv: list[str], timeout: float = 600) -> float:
    """run_timed runs a command inside the namespace and returns its wall time measured there
    (so that `ip netns exec` itself is not counted). A non-zero exit is an error."""
    code = ("import subprocess,sys,time;t=time.perf_counter();r=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
            "print(time.perf_counter()-t);print(r.returncode);sys.stdout.write(r.stderr[-2000:])")
    p = h.ns_run([PY, "-c", code, *argv], timeout=timeout, cwd=str(REPO))
    lines = p.stdout.splitlines()
    if len(lines) < 2:
        raise RuntimeError(f"{argv[0]} did not run: {p.stderr[-500:]}")
    if int(lines[1]) != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... exited {lines[1]}: {' '.join(lines[2:])[-500:]}")
    return float(lines[0])


def run_driver(h: Any, spec: dict[str, Any], name: str, timeout: float = 900) -> dict[str, Any]:
    """run_driver runs bench/driver.py in the namespace with this spec; returns its JSON result."""
    d = WORK / "driver"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    path = d / f"{name}.json"
    path.write_text(json.dumps(spec))
    log = d / f"{name}.log"
    raise_nofile(int(spec.get("parallel", 100)) * 2 + 1000)
    with open(log, "wb") as lf:
        p = h.ns_run([PY, "-m", "bench.driver", str(path)], timeout=timeout, cwd=str(REPO), stderr=lf, capture_output=False,
                     stdout=subprocess.PIPE)
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"driver failed ({p.returncode}): {tail}")
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def engine_config(h: Any, state: Path, remote_extra: str = "") -> str:
    """engine_config is target.remote as the default configuration has it (mtasts, dnssec,
    dane, local_policy), trusting the harness's CA, plus ``remote_extra`` directives."""
    return (
        f"state_dir {state}\nruntime_dir {state}/run\nhostname relay.bench.test\n"
        f"tls_client {{\n    root_ca {h.ca_pem_path}\n}}\n"
        "mx_auth outbound_policy {\n    mtasts\n    dnssec\n    dane\n    local_policy\n}\n"
        f"target.remote outbound {{\n    mx_auth &outbound_policy\n    {remote_extra}\n}}\n"
    )


def save_profile(name: str, result: dict[str, Any], profile_path: Path) -> str:
    """save_profile writes the driver's top functions next to its cProfile stats file and
    returns the note that names them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    txt = RESULTS / f"{name}-profile.txt"
    txt.write_text(result.get("profile_top", "") + "\n".join(result.get("memory_top", [])) + "\n")
    return f"profile: {txt.relative_to(REPO)} (cProfile stats: {profile_path.relative_to(REPO)})"


def top_functions(result: dict[str, Any], n: int = 5) -> list[str]:
    """top_functions are the first rows of the driver's profile (by own time)."""
    rows = []
    started = False
    for line in result.get("profile_top", "").splitlines():
        if line.strip().startswith("ncalls"):
            started = True
            continue
        if started and line.strip():
            f = line.split(None, 5)
            if len(f) == 6:
                where = re.sub(r"\S*site-packages/", "", f[5].replace(str(REPO) + "/", ""))
                rows.append(f"{where} {f[1]}s")
        if len(rows) >= n:
            break
    return rows
