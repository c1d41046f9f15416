"""The Harness: build the private Internet from the scenario table, run it, observe it."""

from __future__ import annotations

import bisect
import contextlib
import email
import email.policy
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from . import netns
from .dnszones import ZoneSet, nsd_conf, unbound_conf
from .model import (
    ADDRCONFIG4,
    DEAD_RESOLVER,
    NETNS,
    NSD,
    RESOLVER,
    RESOLVER_ULA,
    SMTP_PORT,
    ULA_BASE,
    Host,
    Scenario,
    World,
    build_world,
)
from .postfix import PostfixConfig, smtp_sink_argv
from .web import HTTPS_PORT, nginx_conf, write_policies

POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
DEFAULT_WORKDIR = Path("/run/maddylite-harness")
RESIGN_MARGIN = 180 * 86400
PACKAGE_DIR = Path(__file__).resolve().parent
# sources whose change invalidates the generated world (plus BUILD_VERSION below, bumped
# when _build()/_service_defs() change what is generated or run)
_GENERATORS = ("scenarios.py", "model.py", "pki.py", "dnszones.py", "postfix.py", "web.py",
               "badpeers.py")
BUILD_VERSION = 1
RESOLV_CONF = f"nameserver {RESOLVER}\noptions trust-ad edns0\n"
SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65000",
    "net.ipv4.tcp_tw_reuse": "1",
    "net.core.somaxconn": "4096",
}
REQUIRED_TOOLS = ("ip", "nsd", "unbound", "nginx", "postfix", "smtp-sink", "dnssec-keygen",
                  "dnssec-signzone", "dnssec-dsfromkey", "dig", "nft", "openssl")


class HarnessError(RuntimeError):
    """The harness cannot be built or started; the message says why."""


@dataclass
class LogMark:
    """Byte offsets into the harness's logs; counts and log lines can start here."""

    offsets: dict[str, int] = field(default_factory=dict)


@dataclass
class ReceivedMessage:
    """One message as an MX delivered it (headers included)."""

    path: Path
    domain: str
    local: str
    raw: bytes

    @property
    def recipient(self) -> str:
        return f"{self.local}@{self.domain}"

    @cached_property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)  # type: ignore[return-value]

    @cached_property
    def received(self) -> str:
        """The top Received header (the one the receiving MX added), unfolded."""
        m = re.search(rb"^Received:(.*?)(?=^\S)", self.raw, re.M | re.S)
        return re.sub(r"\s+", " ", m.group(1).decode("utf-8", "replace")).strip() if m else ""

    @property
    def received_by(self) -> str | None:
        """Host name of the MX that received the message (``by X (Postfix)``)."""
        m = re.search(r"\bby (\S+) \(Postfix\)", self.received)
        return m.group(1) if m else None

    @property
    def tls(self) -> bool:
        """Did the message arrive over TLS?"""
        return bool(re.search(r"\(using TLS|\bwith (?:UTF8SMTP|ESMTP|LMTP)S", self.received))

    @property
    def tls_version(self) -> str | None:
        m = re.search(r"\(using (TLSv[\d.]+)", self.received)
        return m.group(1) if m else None

    @property
    def protocol(self) -> str | None:
        """ESMTP, ESMTPS, UTF8SMTPS, SMTP, ..."""
        m = re.search(r"\bwith (\S+)", self.received)
        return m.group(1) if m else None

    @property
    def envelope_sender(self) -> str | None:
        v = self.message.get("Return-Path")
        return str(v).strip().strip("<>") if v is not None else None


@dataclass
class MxSession:
    """One SMTP session as an MX saw it."""

    host: str
    client: str  # e.g. "unknown[127.0.0.1]:40312"
    commands: list[str] = field(default_factory=list)  # as sent, e.g. "MAIL FROM:<a@b>"
    replies: list[str] = field(default_factory=list)  # Postfix MXes only
    tls: bool = False
    closed: bool = False

    def count(self, command: str) -> int:
        verb = command.strip().upper()
        return sum(1 for c in self.commands if c.split(" ", 1)[0].upper() == verb)


class Harness:
    """The real-peer harness.  ``Harness().up()`` is idempotent; see ``fixtures.py``."""

    def __init__(self, workdir: Path | str | None = None, ns: str | None = None):
        workdir = workdir or os.environ.get("MADDYLITE_HARNESS_DIR") or DEFAULT_WORKDIR
        ns = ns or os.environ.get("MADDYLITE_HARNESS_NETNS") or NETNS
        self.workdir = Path(workdir)
        self.ns = ns
        self.world: World = build_world()
        self.state: dict[str, Any] = {}
        self._mark: LogMark | None = None
        self._log_cache: dict[str, dict[str, Any]] = {}
        self._fingerprint = self._compute_fingerprint()

    # ------------------------------------------------------------------ paths
    @property
    def lock_path(self) -> Path:
        return self.workdir.with_name(self.workdir.name + ".lock")

    @property
    def users_lock_path(self) -> Path:
        return self.workdir.with_name(self.workdir.name + ".users")

    @property
    def state_path(self) -> Path:
        return self.workdir / "state.json"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "log"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def mail_root(self) -> Path:
        return self.workdir / "mail"

    @property
    def ca_pem_path(self) -> Path:
        """The private CA bundle (use as tls_client root_ca, or SSL_CERT_FILE)."""
        return self.workdir / "pki" / "ca.pem"

    @property
    def dane_ca_pem_path(self) -> Path:
        """The DANE-TA CA (deliberately not in ``ca_pem_path``)."""
        return self.workdir / "pki" / "dane-ca.pem"

    @property
    def resolv_conf_path(self) -> Path:
        """The namespace's resolv.conf (``ip netns exec`` mounts it on /etc/resolv.conf)."""
        return netns.resolv_conf_path(self.ns)

    @property
    def postfix_log_path(self) -> Path:
        return self.log_dir / "postfix.log"

    @property
    def badpeers_log_path(self) -> Path:
        return self.log_dir / "badpeers.log"

    @property
    def nginx_access_log_path(self) -> Path:
        return self.log_dir / "nginx-access.log"

    @property
    def unbound_conf_path(self) -> Path:
        return self.workdir / "dns" / "unbound.conf"

    @property
    def postfix_etc(self) -> Path:
        return self.workdir / "postfix" / "etc"

    # ------------------------------------------------------------------ scenario access
    @property
    def scenarios(self) -> dict[str, Scenario]:
        return self.world.scenarios

    def scenario(self, name: str) -> Scenario:
        """The scenario record: domain(s), MX list, hosts with addresses and TLSA data,
        MTA-STS policy, expectation."""
        try:
            return self.world.scenarios[name]
        except KeyError:
            raise KeyError(f"no scenario {name!r}; known: {sorted(self.world.scenarios)}") from None

    def host(self, name: str) -> Host:
        return self.world.hosts[name.rstrip(".").lower()]

    def bench_domains(self, tls: bool = False) -> list[str]:
        return list(self.scenario("bench-tls" if tls else "bench").domains)

    @staticmethod
    def new_address(domain: str, prefix: str = "t") -> str:
        """A recipient address nobody else uses (so concurrent tests do not collide)."""
        return f"{prefix}-{uuid.uuid4().hex[:12]}@{domain}"

    # ------------------------------------------------------------------ lifecycle
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in _GENERATORS:
            h.update(name.encode())
            h.update((PACKAGE_DIR / name).read_bytes())
        h.update(f"{BUILD_VERSION}|{self.workdir}|{self.ns}".encode())
        return h.hexdigest()

    def _load_state(self) -> None:
        try:
            self.state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            self.state = {}
        if self.state.get("fingerprint") == self._fingerprint:
            from .pki import apply_tlsa_state

            apply_tlsa_state(self.world, self.state.get("tlsa", {}))

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        os.replace(tmp, self.state_path)

    def _needs_build(self) -> str | None:
        if not self.state:
            return "no generated state"
        if self.state.get("fingerprint") != self._fingerprint:
            return "the scenario table or generators changed"
        if self.state.get("dns", {}).get("signed_until", 0) - time.time() < RESIGN_MARGIN:
            return "zone signatures close to expiry"
        return None

    def preflight(self) -> None:
        """Raise HarnessError if this machine cannot run the harness at all."""
        if os.geteuid() != 0:
            raise HarnessError("the real-peer harness needs root (network namespaces, port 25)")
        missing = [t for t in REQUIRED_TOOLS if not shutil.which(t, path=_sbin_path())]
        if missing:
            raise HarnessError(
                "missing tools: " + ", ".join(missing)
                + " (run scripts/install-harness-deps.sh as root)"
            )
        if not Path("/run").is_dir():
            raise HarnessError("/run does not exist")

    def up(self, started_by: str = "cli") -> Harness:
        """Build (if needed) and start everything; fast no-op when all is running."""
        os.environ["PATH"] = _sbin_path()
        self.preflight()
        with self._locked():
            self._load_state()
            reason = self._needs_build()
            if reason is None and self._healthy():
                if self._mark is None:
                    self._mark = self.mark()
                return self
            if reason is not None:
                self._stop_services()
                self._build()
                self.state["started_by"] = started_by
                self._save_state()
            elif not self.state.get("services"):
                self.state["started_by"] = started_by
            try:
                self._ensure_netns()
                self._start_services()
            except BaseException:
                # leave nothing half-running behind; the logs stay in the workdir
                self._stop_services()
                netns.delete(self.ns)
                raise
            self._save_state()
        if self._mark is None:
            self._mark = self.mark()
        return self

    def in_use_by_others(self) -> bool:
        """Does another process (a test session) hold the harness's users lock?"""
        try:
            fd = os.open(self.users_lock_path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def down(self, purge: bool = True, force: bool = False) -> None:
        """Stop every process the harness started (by pid, verified), delete the
        namespace and (with ``purge``) the generated files.  Refuses while another test
        session is using the harness, unless ``force``."""
        os.environ["PATH"] = _sbin_path()
        if not force and self.in_use_by_others():
            raise HarnessError("another test session is using the harness "
                               f"({self.users_lock_path} is locked); use --force to stop it")
        with self._locked():
            self._load_state()
            self._stop_services()
            netns.delete(self.ns)
            if purge and self.workdir.exists():
                shutil.rmtree(self.workdir)
            elif self.state:
                self.state["services"] = {}
                self._save_state()

    def status(self) -> dict[str, Any]:
        self._load_state()
        services = {}
        for name, svc in self._service_defs().items():
            rec = self.state.get("services", {}).get(name)
            ok = bool(rec) and netns.alive(rec["pid"], rec["cmd"], self.ns)
            listening = self._listening_ok(rec["pid"], svc["listen"]) if ok and rec else False
            services[name] = {
                "pid": rec["pid"] if rec else None,
                "running": ok,
                "listening": listening,
            }
        return {
            "workdir": str(self.workdir),
            "netns": self.ns,
            "netns_exists": netns.exists(self.ns),
            "built": bool(self.state) and self._needs_build() is None,
            "started_by": self.state.get("started_by"),
            "services": services,
        }

    def is_running(self) -> bool:
        self._load_state()
        return self._needs_build() is None and self._healthy()

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        from .pki import Pki, tlsa_state

        t0 = time.monotonic()
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        for d in (self.workdir, self.run_dir, self.log_dir, self.workdir / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        (self.workdir / "tmp").chmod(0o1777)
        self.mail_root.mkdir()
        shutil.chown(self.mail_root, "nobody", "nogroup")
        self.mail_root.chmod(0o755)
        self.world = build_world()
        pki_state = Pki(self.workdir / "pki").generate(self.world)
        dns_dir = self.workdir / "dns"
        dns_state = ZoneSet(self.world, dns_dir).build()
        (dns_dir / "nsd.conf").write_text(nsd_conf(self.world, dns_dir, self.run_dir))
        self.unbound_conf_path.write_text(
            unbound_conf(Path(dns_state["trust_anchor"]), self.run_dir, self.log_dir))
        PostfixConfig(self.world, self.workdir / "postfix", self.log_dir, self.mail_root,
                      self.workdir / "bin" / "deliver.sh", pki_state).write()
        # creates the queue directories with the right owners, and checks the config
        p = netns.run(["postfix", "-c", str(self.postfix_etc), "check-fatal"], check=False)
        if p.returncode != 0:
            raise HarnessError("postfix check failed: " + p.stderr.strip()
                               + self._tail("postfix.log"))
        finger = self.workdir / "posttls"
        finger.mkdir()
        (finger / "main.cf").write_text(
            "compatibility_level = 3.6\nsmtp_dns_support_level = dnssec\n"
            "smtp_host_lookup = dns\n")
        policies = write_policies(self.world, self.workdir / "www")
        (self.run_dir / "nginx-tmp").mkdir(exist_ok=True)
        (self.workdir / "nginx.conf").write_text(
            nginx_conf(self.world, policies, pki_state, self.run_dir, self.log_dir))
        badpeers = [
            {"host": h.name, "addr": a, "port": SMTP_PORT, "mode": h.server}
            for h in self.world.badpeer_hosts for a in h.addresses
        ]
        (self.workdir / "badpeers.json").write_text(json.dumps(badpeers, indent=1))
        for f in ("postfix.log", "badpeers.log", "nginx-access.log"):
            (self.log_dir / f).touch()
        self.state = {
            "fingerprint": self._fingerprint,
            "created": time.time(),
            "pki": pki_state,
            "dns": dns_state,
            "tlsa": tlsa_state(self.world),
            "services": {},
            "build_seconds": round(time.monotonic() - t0, 3),
        }

    def _ensure_netns(self) -> None:
        ipv6 = [ULA_BASE, RESOLVER_ULA, *self.world.ipv6_addresses]
        drop4: list[tuple[str, int | None]] = [(DEAD_RESOLVER, None)]
        drop6: list[tuple[str, int | None]] = []
        for h in self.world.blackhole_hosts:
            if h.ipv4:
                drop4.append((h.ipv4, SMTP_PORT))
            if h.ipv6:
                drop6.append((h.ipv6, SMTP_PORT))
        netns.setup(
            self.ns,
            ipv4=[ADDRCONFIG4],
            ipv6=ipv6,
            resolv_conf=RESOLV_CONF,
            nft=netns.nft_ruleset("maddylite_harness", drop4, drop6),
            sysctls=SYSCTLS,
        )

    # ------------------------------------------------------------------ services
    def _service_defs(self) -> dict[str, dict[str, Any]]:
        w = self.world
        py = _python()
        defs: dict[str, dict[str, Any]] = {
            "nsd": {
                "argv": ["nsd", "-d", "-c", str(self.workdir / "dns" / "nsd.conf")],
                "listen": {(NSD, 53, "udp"), (NSD, 53, "tcp")},
            },
            "unbound": {
                "argv": [self._unbound_binary(), "-d", "-c", str(self.unbound_conf_path)],
                "listen": {(a, 53, p) for a in (RESOLVER, "::1", RESOLVER_ULA)
                           for p in ("udp", "tcp")},
            },
            "nginx": {
                "argv": ["nginx", "-c", str(self.workdir / "nginx.conf"),
                         "-e", str(self.log_dir / "nginx-error.log")],
                "listen": {(s.ip, HTTPS_PORT, "tcp") for s in w.sts.values()},
            },
            "postfix": {  # the master in the foreground (postfix start is much slower)
                "argv": [POSTFIX_MASTER, "-c", str(self.postfix_etc), "-d"],
                "listen": {(a, SMTP_PORT, "tcp") for h in w.smtpd_hosts for a in h.addresses},
            },
        }
        for h in w.sink_hosts:
            defs[f"sink:{h.name}"] = {"argv": smtp_sink_argv(h),
                                      "listen": {(h.ipv4, SMTP_PORT, "tcp")}}
        if w.badpeer_hosts:
            defs["badpeers"] = {
                "argv": [py, str(PACKAGE_DIR / "badpeers.py"), str(self.workdir / "badpeers.json"),
                         str(self.badpeers_log_path)],
                "listen": {(a, SMTP_PORT, "tcp") for h in w.badpeer_hosts for a in h.addresses},
            }
        return defs

    def _unbound_binary(self) -> str:
        """Debian's AppArmor profile for /usr/sbin/unbound (attached by path) forbids
        reading the harness's files; where AppArmor is on, run a copy from the workdir."""
        if not apparmor_enabled():
            return "unbound"
        copy = self.workdir / "bin" / "unbound"
        if not copy.exists() and self.workdir.exists():
            src = shutil.which("unbound", path=_sbin_path()) or "/usr/sbin/unbound"
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy)
        return str(copy)

    def _listening_ok(self, pid: int, want: set) -> bool:
        return want <= netns.listening(pid)

    def _healthy(self) -> bool:
        if not netns.exists(self.ns):
            return False
        try:
            if self.resolv_conf_path.read_text() != RESOLV_CONF:
                return False
        except OSError:
            return False
        recs = self.state.get("services", {})
        defs = self._service_defs()
        sockets: set | None = None
        for name, svc in defs.items():
            rec = recs.get(name)
            if not rec or not netns.alive(rec["pid"], rec["cmd"], self.ns):
                return False
            if sockets is None:
                sockets = netns.listening(rec["pid"])
            if not svc["listen"] <= sockets:
                return False
        return True

    def _start_services(self) -> None:
        defs = self._service_defs()
        recs = self.state.setdefault("services", {})
        order = ["nsd", "unbound"] + [n for n in defs if n not in ("nsd", "unbound")]
        started: list[str] = []
        for name in order:
            svc = defs[name]
            rec = recs.get(name)
            if rec and netns.alive(rec["pid"], rec["cmd"], self.ns):
                if self._listening_ok(rec["pid"], svc["listen"]):
                    continue
                netns.stop(rec["pid"], rec["cmd"], self.ns)  # half-up: restart it
            recs.pop(name, None)
            pid = netns.spawn(self.ns, svc["argv"], self.log_dir / f"{_safe(name)}.out")
            recs[name] = {"pid": pid, "cmd": svc["argv"]}
            self._save_state()
            started.append(name)
            if name in ("nsd", "unbound"):
                self._wait_listening(name, svc["listen"])
            if name == "unbound":
                self._wait_dns()
        for name in started:
            if name not in ("nsd", "unbound"):
                self._wait_listening(name, defs[name]["listen"])

    def _wait_listening(self, name: str, want: set, timeout: float = 20.0) -> None:
        rec = self.state["services"][name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not netns.alive(rec["pid"], rec["cmd"], self.ns):
                raise HarnessError(f"{name} exited during start-up: "
                                   + self._tail(f"{_safe(name)}.out") + self._tail_for(name))
            have = netns.listening(rec["pid"])
            if want <= have:
                return
            time.sleep(0.02)
        missing = sorted(want - netns.listening(rec["pid"]))
        raise HarnessError(f"{name} is not listening on {missing[:5]} after {timeout}s"
                           + self._tail_for(name))

    def _wait_dns(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            p = self.ns_run(["dig", f"@{RESOLVER}", "+time=1", "+tries=1", "+dnssec", "test.",
                             "SOA"], timeout=5)
            out = p.stdout
            if "status: NOERROR" in out and re.search(r"flags:[^;]*\bad\b", out):
                return
            time.sleep(0.05)
        raise HarnessError("unbound does not validate test. SOA (want NOERROR with AD): "
                           + out[-800:] + self._tail("unbound.log"))

    def _stop_services(self) -> None:
        recs = self.state.get("services", {})
        order = [n for n in recs if n not in ("nsd", "unbound")] + ["unbound", "nsd"]
        for name in order:
            rec = recs.get(name)
            if not rec:
                continue
            sig = 3 if name == "nginx" else 15  # SIGQUIT: graceful nginx stop
            netns.stop(rec["pid"], rec["cmd"], self.ns, sig=sig)
            recs.pop(name, None)
        if self.state:
            self.state["services"] = {}
            if self.state_path.parent.exists():
                self._save_state()

    def _tail(self, fname: str, n: int = 15) -> str:
        try:
            lines = (self.log_dir / fname).read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return f"\n--- {fname} ---\n" + "\n".join(lines) if lines else ""

    def _tail_for(self, name: str) -> str:
        logs = {"nsd": "nsd.log", "unbound": "unbound.log", "nginx": "nginx-error.log",
                "postfix": "postfix.log", "badpeers": "badpeers.out"}
        return self._tail(logs.get(name, f"{_safe(name)}.out"))

    # ------------------------------------------------------------------ running things in the namespace
    def ns_env(self, extra: dict[str, str] | None = None, trust_ca: bool = True) -> dict[str, str]:
        """Environment for programs in the namespace: ``SSL_CERT_FILE`` = the harness CA
        (so OpenSSL/Python/aiohttp trust it as the *system* store; MTA-STS fetches need
        that), plus ``extra``."""
        env = dict(os.environ)
        env["PATH"] = _sbin_path()
        if trust_ca:
            env["SSL_CERT_FILE"] = str(self.ca_pem_path)
        env.update(extra or {})
        return env

    def ns_argv(self, argv: list[str], resolv_conf: str | None = None) -> list[str]:
        """``ip netns exec`` prefix; ``resolv_conf`` (text) replaces the namespace's
        resolv.conf for this process only."""
        pre = ["ip", "netns", "exec", self.ns]
        if resolv_conf is None:
            return pre + list(argv)
        d = self.workdir / "tmp"
        d.mkdir(exist_ok=True)
        path = d / f"resolv.{hashlib.sha256(resolv_conf.encode()).hexdigest()[:16]}.conf"
        if not path.exists():
            path.write_text(resolv_conf)
            path.chmod(0o644)
        return pre + ["sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                      str(path), *argv]

    def run_in_ns(self, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Same as ``ns_popen``."""
        return self.ns_popen(argv, **popen_kwargs)

    def ns_popen(self, argv: list[str], env: dict[str, str] | None = None,
                 resolv_conf: str | None = None, **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside the namespace.  ``env`` defaults to ``ns_env()``."""
        return subprocess.Popen(self.ns_argv(argv, resolv_conf),
                                env=self.ns_env() if env is None else env, **kw)

    def ns_run(self, argv: list[str], env: dict[str, str] | None = None,
               resolv_conf: str | None = None, timeout: float = 60, check: bool = False,
               **kw: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the namespace; output captured as text unless overridden."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.ns_argv(argv, resolv_conf),
                              env=self.ns_env() if env is None else env,
                              timeout=timeout, check=check, **kw)

    def ns_call(self, func: Callable[..., Any], *args: Any, timeout: float = 60,
                **kwargs: Any) -> Any:
        """Call ``func(*args, **kwargs)`` in a forked child that entered the namespace
        (network + resolv.conf, like ``ip netns exec``); returns the pickled result."""
        return netns.call(self.ns, func, *args, timeout=timeout, **kwargs)

    def dig(self, *args: str, server: str = RESOLVER) -> str:
        """``dig @server args...`` inside the namespace; returns its output."""
        return self.ns_run(["dig", f"@{server}", "+time=2", "+tries=1", *args], timeout=15).stdout

    def posttls_finger(self, destination: str, level: str = "dane",
                       args: tuple[str, ...] = (), timeout: float = 30) -> str:
        """Postfix's ``posttls-finger`` (a reference DANE/TLS client) inside the namespace,
        with DNSSEC on and the harness CA; returns its output (chat omitted)."""
        env = self.ns_env({"MAIL_CONFIG": str(self.workdir / "posttls")})
        p = self.ns_run(["posttls-finger", "-c", "-t", "5", "-T", "10", "-l", level,
                         "-F", str(self.ca_pem_path), *args, destination],
                        env=env, timeout=timeout)
        return p.stdout + p.stderr

    def flush_dns(self) -> None:
        """Drop unbound's caches for test. (after changing zones, or between tests)."""
        for cmd in (["flush_zone", "test."], ["flush_bogus"], ["flush_negative"],
                    ["flush_infra", "all"]):
            self.ns_run(["unbound-control", "-c", str(self.unbound_conf_path), *cmd], timeout=10)

    # ------------------------------------------------------------------ mailboxes
    def _mail_dirs(self, target: str) -> list[tuple[str, str, Path]]:
        target = target.strip().strip("<>")
        if "@" in target:
            local, domain = target.rsplit("@", 1)
            return [(domain.lower(), local.lower(), self.mail_root / domain.lower() / local.lower())]
        domain = target.lower().rstrip(".")
        base = self.mail_root / domain
        if not base.is_dir():
            return []
        return [(domain, p.name, p) for p in sorted(base.iterdir()) if p.is_dir()]

    def mailbox(self, domain_or_address: str) -> list[ReceivedMessage]:
        """Messages delivered to an address, or to every address of a domain (oldest first)."""
        out = []
        for domain, local, d in self._mail_dirs(domain_or_address):
            new = d / "new"
            if not new.is_dir():
                continue
            for f in new.iterdir():
                try:
                    out.append(ReceivedMessage(f, domain, local, f.read_bytes()))
                except FileNotFoundError:
                    continue
        out.sort(key=lambda m: m.path.name)
        return out

    def wait_mailbox(self, domain_or_address: str, count: int = 1,
                     timeout: float = 15) -> list[ReceivedMessage]:
        """Wait until at least ``count`` messages arrived (Postfix delivers asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.mailbox(domain_or_address)
            if len(msgs) >= count or time.monotonic() > deadline:
                if len(msgs) < count:
                    raise TimeoutError(
                        f"{domain_or_address}: {len(msgs)} of {count} messages after {timeout}s"
                        + self._tail("postfix.log", 10))
                return msgs
            time.sleep(0.05)

    def clear_mailboxes(self, domain_or_address: str | None = None) -> None:
        """Delete delivered messages (all, or one domain's or address's), and start log
        counts afresh (see ``mark``).  Other test sessions may share the harness: prefer
        ``new_address()`` recipients, or clear only your own domain/address."""
        if domain_or_address is not None:
            for _, _, d in self._mail_dirs(domain_or_address):
                shutil.rmtree(d, ignore_errors=True)
        elif self.mail_root.is_dir():
            for p in self.mail_root.iterdir():
                shutil.rmtree(p, ignore_errors=True)
        self._mark = self.mark()

    # ------------------------------------------------------------------ logs
    _LOGS = ("postfix.log", "badpeers.log", "nginx-access.log")

    def mark(self) -> LogMark:
        """Current end of the logs; pass as ``since=`` to count only what follows."""
        offs = {}
        for f in self._LOGS:
            try:
                offs[f] = (self.log_dir / f).stat().st_size
            except OSError:
                offs[f] = 0
        return LogMark(offs)

    def _read_log(self, fname: str, since: LogMark | None) -> list[str]:
        """Complete lines of a log from the mark on.  Lines already read are cached, so
        polling a growing log costs only the new bytes."""
        since = since if since is not None else self._mark
        start = since.offsets.get(fname, 0) if since else 0
        path = self.log_dir / fname
        try:
            st = path.stat()
        except OSError:
            return []
        c = self._log_cache.get(fname)
        if (c is None or c["ino"] != st.st_ino or st.st_size < c["end"]
                or start < c["base"]):
            c = {"ino": st.st_ino, "base": min(start, st.st_size), "end": min(start, st.st_size),
                 "offsets": [], "lines": []}
            self._log_cache[fname] = c
        if st.st_size > c["end"]:
            with open(path, "rb") as f:
                f.seek(c["end"])
                data = f.read(st.st_size - c["end"])
            cut = data.rfind(b"\n") + 1  # only complete lines
            pos = c["end"]
            for raw in data[:cut].splitlines(keepends=True):
                c["offsets"].append(pos)
                c["lines"].append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                pos += len(raw)
            c["end"] += cut
        i = bisect.bisect_left(c["offsets"], start)
        return c["lines"][i:]

    def _server_of(self, mx_host: str) -> Host:
        h = self.world.final_host(mx_host.rstrip(".").lower())
        return h

    def mx_log_lines(self, mx_host: str, since: LogMark | None = None) -> list[str]:
        """Log lines of one MX (Postfix ``postfix-mx/<host>/…`` lines, or the misbehaving
        server's lines) since ``since``; by default since the last ``clear_mailboxes()``, or
        since this Harness object was brought up."""
        h = self._server_of(mx_host)
        if h.server == "smtpd":
            tag = f" postfix-mx/{h.name}/"
            return [ln for ln in self._read_log("postfix.log", since) if tag in ln]
        if h.server in ("never-greets", "stall-after-data", "greet-554", "greet-421",
                        "starttls-454"):
            tag = f" {h.name} "
            return [ln for ln in self._read_log("badpeers.log", since) if tag in ln]
        raise ValueError(f"{h.name} ({h.server}) keeps no log")

    def wait_log(self, mx_host: str, pattern: str, count: int = 1, timeout: float = 10,
                 since: LogMark | None = None) -> list[str]:
        """Wait until ``count`` log lines of ``mx_host`` match the regex ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            hits = [ln for ln in self.mx_log_lines(mx_host, since) if rx.search(ln)]
            if len(hits) >= count:
                return hits
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mx_host}: {len(hits)} of {count} lines /{pattern}/")
            time.sleep(0.05)

    def mx_sessions(self, mx_host: str, since: LogMark | None = None) -> list[MxSession]:
        """SMTP sessions an MX saw, in order, with every command the client sent
        (Postfix MXes log each command verbosely; so do the misbehaving servers)."""
        h = self._server_of(mx_host)
        if h.server in ("refused", "blackhole", "nxdomain"):
            return []
        sessions: list[MxSession] = []
        current: dict[str, MxSession] = {}

        def sess(key: str, client: str = "") -> MxSession:
            if key not in current:
                current[key] = MxSession(h.name, client)
                sessions.append(current[key])
            return current[key]

        if h.server == "smtpd":
            rx = re.compile(r"/smtpd\[(\d+)\]: (.*)$")
            for ln in self.mx_log_lines(mx_host, since):
                m = rx.search(ln)
                if not m:
                    continue
                pid, msg = m.groups()
                if msg.startswith("connect from "):
                    current.pop(pid, None)
                    sess(pid, msg[len("connect from "):])
                elif msg.startswith("disconnect from "):
                    sess(pid).closed = True
                    current.pop(pid, None)
                elif msg.startswith(("< ", "> ")):
                    parts = msg[2:].split(": ", 1)
                    if len(parts) == 2:
                        (sess(pid).commands if msg[0] == "<" else sess(pid).replies).append(parts[1])
                elif " TLS connection established from " in msg:
                    sess(pid).tls = True
            return sessions
        for ln in self.mx_log_lines(mx_host, since):
            f = ln.split(" ", 4)  # time host peer event [rest]
            if len(f) < 4:
                continue
            peer, event = f[2], f[3]
            if event == "connect":
                current.pop(peer, None)
                sess(peer, peer)
            elif event == "close":
                sess(peer, peer).closed = True
                current.pop(peer, None)
            elif event == "cmd" and len(f) == 5:
                sess(peer, peer).commands.append(f[4].split(" ", 1)[1] if " " in f[4] else "")
        return sessions

    def mx_commands(self, mx_host: str, since: LogMark | None = None) -> list[str]:
        """Every command line the MX received (e.g. ``MAIL FROM:<a@b> SIZE=123``)."""
        return [c for s in self.mx_sessions(mx_host, since) for c in s.commands]

    def count_connections(self, mx_host: str, since: LogMark | None = None) -> int:
        """TCP sessions the MX accepted (``refused`` and ``blackhole`` hosts: always 0)."""
        return len(self.mx_sessions(mx_host, since))

    def count_commands(self, mx_host: str, command: str, since: LogMark | None = None) -> int:
        """How many times the MX received ``command`` (``MAIL``, ``RCPT``, ``DATA``,
        ``STARTTLS``, ``EHLO``, ``RSET``, ``QUIT``, ...)."""
        return sum(s.count(command) for s in self.mx_sessions(mx_host, since))

    def wait_sessions_closed(self, mx_host: str, timeout: float = 10,
                             since: LogMark | None = None) -> list[MxSession]:
        """Wait until every session the MX saw has ended (the log is written
        asynchronously); returns the sessions."""
        deadline = time.monotonic() + timeout
        while True:
            ss = self.mx_sessions(mx_host, since)
            if all(s.closed for s in ss) or time.monotonic() > deadline:
                return ss
            time.sleep(0.05)

    def count_sts_fetches(self, domain: str, since: LogMark | None = None) -> int:
        """HTTPS requests for ``domain``'s policy URL that nginx answered."""
        host = f"mta-sts.{domain.lower().rstrip('.')}"
        return sum(
            1 for ln in self._read_log("nginx-access.log", since)
            if ln.startswith(host + " ") and " /.well-known/mta-sts.txt " in ln
        )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _sbin_path() -> str:
    path = os.environ.get("PATH", "/usr/bin:/bin")
    parts = path.split(":")
    for p in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if p not in parts:
            parts.append(p)
    return ":".join(parts)


def apparmor_enabled() -> bool:
    if os.environ.get("MADDYLITE_HARNESS_APPARMOR") == "1":  # force the AppArmor path
        return True
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


def _python() -> str:
    import sys

    return sys.executable or "/usr/bin/python3"
