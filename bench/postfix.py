"""The Postfix peer: a second Postfix instance in the namespace, set up as a relay.

Configured as its users configure an outbound relay with the same security as
maddylite's default configuration (harness-notes §5, "Reference relay"):
``smtp_dns_support_level = dnssec``, ``smtp_tls_security_level = dane``, the private CA
as ``smtp_tls_CAfile``, MTA-STS through postfix-mta-sts-resolver's ``mta-sts-daemon``
(``smtp_tls_policy_maps = socketmap:...``), default synchronous queue writes (cleanup
fsyncs before smtpd answers 250), default process and concurrency limits. Its queue is
on the same disk file system as maddylite's. ``smtp_tcp_port`` points it at the private
sink's port (the same MX lookups, the same sink as maddylite).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import env
from bench.common import stop_process

POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class MtaStsDaemon:
    """mta-sts-daemon (postfix-mta-sts-resolver) answering Postfix's socketmap lookups."""

    def __init__(self, h: Any, root: Path) -> None:
        self.h = h
        self.port = env.free_port(h)
        conf = root / "mta-sts-daemon.yml"
        conf.write_text(
            f"host: 127.0.0.1\nport: {self.port}\nreuse_port: true\nshutdown_timeout: 5\n"
            "cache:\n  type: internal\n  options:\n    cache_size: 10000\n"
            "default_zone:\n  strict_testing: false\n  timeout: 4\n"
        )
        self.log = open(root / "mta-sts-daemon.log", "wb")
        self.proc = h.ns_popen(["mta-sts-daemon", "-c", str(conf), "-v", "warn"], stdout=self.log, stderr=self.log)
        env.wait_listening(h, "127.0.0.1", self.port, self.proc, timeout=20)

    @property
    def map(self) -> str:
        return f"socketmap:inet:127.0.0.1:{self.port}:postfix"

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


class PostfixRelay:
    """PostfixRelay is the peer relay: smtpd on 127.0.0.1:<port> → queue → smtp to the MXes."""

    def __init__(self, h: Any, name: str, *, mx_port: int, smtp_maxproc: str = "-", extra: dict[str, str] | None = None,
                 mta_sts: bool = True) -> None:
        self.h = h
        self.root = env.workdir(name)
        self.etc = self.root / "etc"
        self.queue = self.root / "queue"
        self.logdir = self.root / "log"
        for d in (self.etc, self.queue, self.root / "data", self.logdir):
            d.mkdir(parents=True)
        os.chown(self.root / "data", *_ids("postfix"))
        self.port = env.free_port(h)
        self.mx_port = mx_port
        self.smtp_maxproc = smtp_maxproc
        self.extra = dict(extra or {})
        self.sts: MtaStsDaemon | None = None
        self.sts_problem = ""
        if mta_sts:
            try:
                self.sts = MtaStsDaemon(h, self.root)
                self.extra.setdefault("smtp_tls_policy_maps", self.sts.map)
            except Exception as e:  # noqa: BLE001 - the figure says what the peer lacked
                self.sts_problem = f"mta-sts-daemon unavailable ({e}); the peer runs without MTA-STS"
        try:
            self._start()
        except BaseException:
            if self.sts is not None:
                self.sts.stop()
            raise

    def _start(self) -> None:
        h = self.h
        self.write_config()
        p = h.ns_run(["postfix", "-c", str(self.etc), "check"], timeout=60)
        if p.returncode != 0:
            raise env.Unavailable(f"postfix check failed: {(p.stdout + p.stderr).strip()[-300:]}")
        if self.sts is not None:
            self.sts_problem = self._check_sts()
        self.log = open(self.logdir / "master.out", "wb")
        self.proc = h.ns_popen([POSTFIX_MASTER, "-c", str(self.etc), "-d"], stdout=self.log, stderr=self.log)
        try:
            env.wait_listening(h, "127.0.0.1", self.port, self.proc, timeout=30)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _check_sts(self) -> str:
        """_check_sts asks the resolver for an enforced MTA-STS domain of the harness; it
        must answer ``secure match=...`` (the bench domains themselves have no policy)."""
        doms = [sc.domain for sc in self.h.scenarios.values() if sc.mta_sts and "enforce" in sc.name]
        if not doms or self.sts is None:
            return ""
        p = self.h.ns_run(["postmap", "-c", str(self.etc), "-q", doms[0], self.sts.map], timeout=30)
        if not p.stdout.startswith("secure"):
            return f"mta-sts-daemon gave no policy for {doms[0]} ({(p.stdout + p.stderr).strip()[-200:]})"
        return ""

    @property
    def description(self) -> str:
        s = "Postfix relay (dnssec, dane" + (", MTA-STS via mta-sts-daemon" if self.sts else "") + ", sync queue)"
        return s

    def main_cf(self) -> str:
        r = self.root
        params = {
            "compatibility_level": "3.6",
            "config_directory": str(self.etc),
            "queue_directory": str(self.queue),
            "data_directory": f"{r}/data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "relay.bench.test",
            "mydomain": "bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtp_dns_support_level": "dnssec",
            "smtp_tls_security_level": "dane",
            "smtp_tls_CAfile": str(self.h.ca_pem_path),
            "smtp_tcp_port": str(self.mx_port),
            "notify_classes": "resource, software",
            "biff": "no",
            "maillog_file": f"{self.logdir}/postfix.log",
            "maillog_file_prefixes": str(self.logdir),
        }
        params.update(self.extra)
        return "# maddylite benchmark: the Postfix peer relay\n" + "".join(f"{k} = {v}\n" for k, v in params.items())

    def master_cf(self) -> str:
        return "\n".join([
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
            "pickup    unix  n - n 60 1 pickup",
            "cleanup   unix  n - n - 0 cleanup",
            "qmgr      unix  n - n 300 1 qmgr",
            "tlsmgr    unix  - - n 1000? 1 tlsmgr",
            "rewrite   unix  - - n - - trivial-rewrite",
            "bounce    unix  - - n - 0 bounce",
            "defer     unix  - - n - 0 bounce",
            "trace     unix  - - n - 0 bounce",
            "verify    unix  - - n - 1 verify",
            "flush     unix  n - n 1000? 0 flush",
            "proxymap  unix  - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            f"smtp      unix  - - n - {self.smtp_maxproc} smtp",
            f"relay     unix  - - n - {self.smtp_maxproc} smtp",
            "showq     unix  n - n - - showq",
            "error     unix  - - n - - error",
            "retry     unix  - - n - - error",
            "discard   unix  - - n - - discard",
            "anvil     unix  - - n - 1 anvil",
            "scache    unix  - - n - 1 scache",
            "tlsproxy  unix  - - n - 0 tlsproxy",
            "postlog   unix-dgram n - n - 1 postlogd",
        ]) + "\n"

    def write_config(self) -> None:
        past = time.time() - 60
        for name, text in (("main.cf", self.main_cf()), ("master.cf", self.master_cf())):
            p = self.etc / name
            p.write_text(text)
            # Postfix programs wait until a just-written main.cf is a few seconds old
            os.utime(p, (past, past))

    def set(self, **params: str) -> None:
        """set changes main.cf parameters and reloads (SIGHUP to the master)."""
        self.extra.update(params)
        self.write_config()
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def queued(self) -> dict[str, int]:
        """queued counts the queue files per queue."""
        out = {}
        for q in QUEUES:
            n = 0
            for _, _, files in os.walk(self.queue / q):
                n += len(files)
            out[q] = n
        return out

    def wait_queued(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.queued()):
                return
            time.sleep(0.02)
        raise RuntimeError(f"postfix peer: {what} not reached in {timeout:.0f} s: {self.queued()} (log: {self.logdir}/postfix.log)")

    def wait_empty(self, timeout: float = 300) -> float:
        """wait_empty returns the time.monotonic() at which the queue was seen empty."""
        self.wait_queued(lambda q: sum(q.values()) == 0, timeout, "an empty queue")
        return time.monotonic()

    def flush(self) -> None:
        """flush asks for every deferred message to be tried now (postqueue -f)."""
        p = self.h.ns_run(["postqueue", "-c", str(self.etc), "-f"], timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"postqueue -f failed: {p.stderr[-300:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self.sts is not None:
            self.sts.stop()

    def __enter__(self) -> PostfixRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ids(user: str) -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def preload(pf: PostfixRelay, argv_for: Any, count: int, timeout: float = 300) -> None:
    """preload fills the peer's queue with ``count`` messages that wait (defer_transports =
    smtp) and then re-enables delivery; the caller then times ``flush()`` to an empty queue.
    ``argv_for(port)`` is the smtp-source command that injects them."""
    pf.set(defer_transports="smtp")
    env.run_timed(pf.h, argv_for(pf.port), timeout=timeout)
    pf.wait_queued(lambda q: q["deferred"] == count and q["incoming"] + q["active"] + q["maildrop"] == 0, timeout,
                   f"{count} deferred messages")
    pf.set(defer_transports="")
