"""The network namespace: creation, addresses, firewall, and running things inside it."""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19


class NetnsError(RuntimeError):
    pass


def run(argv: list[str], *, check: bool = True, input: str | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def ns_inode(ns: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / ns).st_ino
    except OSError:
        return None


def pid_in_ns(pid: int, ns: str) -> bool:
    ino = ns_inode(ns)
    try:
        return ino is not None and os.stat(f"/proc/{pid}/ns/net").st_ino == ino
    except OSError:
        return False


def resolv_conf_path(ns: str) -> Path:
    return Path("/etc/netns") / ns / "resolv.conf"


def nft_ruleset(table: str, drop4: list[tuple[str, int | None]],
                drop6: list[tuple[str, int | None]]) -> str:
    rules = []
    for addr, port in drop4:
        rules.append(f"ip daddr {addr} " + (f"tcp dport {port} " if port else "") + "counter drop")
    for addr, port in drop6:
        rules.append(f"ip6 daddr {addr} " + (f"tcp dport {port} " if port else "") + "counter drop")
    body = "\n    ".join(rules)
    return (
        f"table inet {table} {{\n  chain input {{\n"
        f"    type filter hook input priority 0; policy accept;\n    {body}\n  }}\n}}\n"
    )


def setup(ns: str, *, ipv4: list[str], ipv6: list[str], resolv_conf: str, nft: str,
          sysctls: dict[str, str]) -> None:
    """Create (or complete) the namespace. Idempotent."""
    if not exists(ns):
        run(["ip", "netns", "add", ns])
    batch = ["link set lo up"]
    batch += [f"addr replace {a}/32 dev lo" for a in ipv4]
    batch += [f"addr replace {a}/128 dev lo nodad" for a in ipv6]
    run(["ip", "-n", ns, "-batch", "-"], input="\n".join(batch) + "\n")
    for k, v in sysctls.items():
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{k}={v}"], check=False)
    conf = resolv_conf_path(ns)
    conf.parent.mkdir(parents=True, exist_ok=True)
    if not conf.exists() or conf.read_text() != resolv_conf:
        conf.write_text(resolv_conf)
    table = "maddylite_harness"
    run(["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=f"table inet {table}\ndelete table inet {table}\n" + nft)


def delete(ns: str) -> None:
    if exists(ns):
        run(["ip", "netns", "del", ns], check=False)
    conf_dir = Path("/etc/netns") / ns
    if conf_dir.exists():
        for p in conf_dir.iterdir():
            p.unlink()
        conf_dir.rmdir()


def listening(pid: int) -> set[tuple[str, int, str]]:
    """(address, port, proto) of TCP LISTEN and UDP sockets in ``pid``'s net namespace."""
    found: set[tuple[str, int, str]] = set()
    for proto, fname, v6 in (("tcp", "tcp", False), ("tcp", "tcp6", True),
                             ("udp", "udp", False), ("udp", "udp6", True)):
        try:
            text = Path(f"/proc/{pid}/net/{fname}").read_text()
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            f = line.split()
            if proto == "tcp" and f[3] != "0A":
                continue
            hexaddr, hexport = f[1].split(":")
            found.add((_addr(hexaddr, v6), int(hexport, 16), proto))
    return found


def _addr(h: str, v6: bool) -> str:
    import ipaddress

    raw = bytes.fromhex(h)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # four little-endian 32-bit words
    b = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(b))


# ---------------------------------------------------------------------------- processes
def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # zombie or kernel thread
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def alive(pid: int, expect_cmd: list[str], ns: str) -> bool:
    """Is ``pid`` still the process we started (same command line, in our namespace)?"""
    cl = cmdline(pid)
    if cl is None:
        return False
    # nginx rewrites its title to "nginx: master process <argv...>"
    if cl[: len(expect_cmd)] != expect_cmd and " ".join(expect_cmd) not in " ".join(cl):
        return False
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
        if st.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except OSError:
        return False
    return pid_in_ns(pid, ns)


def stop(pid: int, expect_cmd: list[str], ns: str, *, sig: int = signal.SIGTERM,
         timeout: float = 15.0) -> bool:
    """Signal one process we started, after checking it is still ours; wait for it."""
    if not alive(pid, expect_cmd, ns):
        _reap(pid)
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not alive(pid, expect_cmd, ns):
            return True
        time.sleep(0.02)
    if alive(pid, expect_cmd, ns):
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            _reap(pid)
            if not alive(pid, expect_cmd, ns):
                break
            time.sleep(0.02)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def spawn(ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start a foreground daemon inside the namespace, in its own session.

    ``ip netns exec`` execs the command, so the returned pid is the daemon's.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, close_fds=True,
        )
    # wait for ip(8) to exec the daemon, so the pid's command line is the daemon's
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cl = cmdline(p.pid)
        if p.poll() is not None:
            raise NetnsError(f"{argv[0]} exited at once with status {p.returncode}")
        if cl and cl[:3] != ["ip", "netns", "exec"]:
            break
        time.sleep(0.005)
    _children.append(p)
    return p.pid


# Popen objects of daemons this process started (kept so they can be reaped)
_children: list[subprocess.Popen] = []


# ---------------------------------------------------------------------------- in-process calls
_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def enter(ns: str) -> None:
    """Move the calling (single-threaded, forked) process into ``ns`` the way
    ``ip netns exec`` does: network namespace plus a private mount namespace in which
    ``/etc/netns/<ns>/*`` is bind-mounted over ``/etc``."""
    libc = _lib()
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
    try:
        _check(libc.setns(fd, CLONE_NEWNET), "setns")
    finally:
        os.close(fd)
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
    etc = Path("/etc/netns") / ns
    if etc.is_dir():
        for p in etc.iterdir():
            target = Path("/etc") / p.name
            if target.exists():
                _check(libc.mount(str(p).encode(), str(target).encode(), None, MS_BIND, None),
                       f"bind {p}")


def call(ns: str, func: Callable[..., Any], *args: Any, timeout: float = 60.0,
         **kwargs: Any) -> Any:
    """Run ``func(*args, **kwargs)`` in a forked child inside ``ns``; return its result.

    The result (or the exception) must be picklable.  Exceptions are re-raised here.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        status = 0
        try:
            try:
                enter(ns)
                payload = (True, func(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - shipped to the parent
                tb = traceback.format_exc()
                try:
                    pickle.dumps(e)
                    payload = (False, (e, tb))
                except Exception:
                    payload = (False, (RuntimeError(f"{type(e).__name__}: {e}"), tb))
            data = pickle.dumps(payload)
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    import select

    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"ns call {getattr(func, '__name__', func)} timed out")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not chunks:
        raise NetnsError("ns call child died without a result")
    ok, value = pickle.loads(b"".join(chunks))
    if ok:
        return value
    exc, tb = value
    try:
        exc.add_note("in the namespace:\n" + tb)
    except AttributeError:
        pass
    raise exc
