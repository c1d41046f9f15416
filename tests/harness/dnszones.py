"""Zones, DNSSEC keys and signatures, nsd.conf and unbound.conf."""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .model import (
    NSD,
    RESOLVER,
    RESOLVER_ULA,
    TTL,
    ULA_PREFIX,
    World,
)

SIG_VALIDITY = 94608000  # 3 years
BOGUS_SIG = ("20200101000000", "20200201000000")


class DnsBuildError(RuntimeError):
    pass


def _run(argv: list[str], cwd: Path | None = None) -> str:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise DnsBuildError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _flip(hexdata: str) -> str:
    c = hexdata[0].lower()
    return ("0" if c != "0" else "1") + hexdata[1:]


class ZoneSet:
    """All zone texts of the world, then keys, signatures and the DS chain."""

    def __init__(self, world: World, root: Path):
        self.world = world
        self.root = root  # <workdir>/dns
        self.zdir = root / "zones"
        self.kdir = root / "keys"
        self.serial = int(time.time())
        # zone -> list of (owner, type, rdata)
        self.records: dict[str, list[tuple[str, str, str]]] = {}
        # zone -> {flipped TLSA rdata: real rdata} for bogus-TLSA post-editing
        self.bogus_tlsa: dict[str, dict[str, str]] = {}
        self.ds: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ zone contents
    def _soa(self, zone: str) -> list[tuple[str, str, str]]:
        z = fqdn(zone) if zone != "." else "."
        hm = "hostmaster." + (z if z != "." else "test.")
        return [
            (z, "SOA", f"ns.test. {hm} {self.serial} 3600 900 604800 {TTL}"),
            (z, "NS", "ns.test."),
        ]

    def child_records(self, zone: str) -> list[tuple[str, str, str]]:
        w = self.world
        recs = self._soa(zone)
        flips: dict[str, str] = {}
        for sc in w.scenarios.values():
            for d in sc.domains:
                if w.zone_of(d) != zone:
                    continue
                for pref, host in sorted(sc.mx):
                    recs.append((fqdn(d), "MX", f"{pref} {fqdn(host) if host != '.' else '.'}"))
            sts = sc.mta_sts
            if sts and w.zone_of(sts.domain) == zone:
                recs.append((fqdn(f"_mta-sts.{sts.domain}"), "TXT", f'"{sts.txt}"'))
                recs.append((fqdn(sts.host), "A", sts.ip))
                recs.append(
                    (fqdn(f"_smtp._tls.{sts.domain}"), "TXT",
                     f'"v=TLSRPTv1; rua=mailto:tlsrpt@{sts.domain}"')
                )
        for h in w.hosts.values():
            if h.zone != zone:
                continue
            if h.cname:
                recs.append((fqdn(h.name), "CNAME", fqdn(h.cname)))
            if h.ipv4:
                recs.append((fqdn(h.name), "A", h.ipv4))
            if h.ipv6:
                recs.append((fqdn(h.name), "AAAA", h.ipv6))
            for t in h.tlsa:
                if not t.data:
                    raise DnsBuildError(f"TLSA data of {h.name} not generated")
                rdata = t.rdata
                if h.tlsa_bogus:
                    flipped = f"{t.params} {_flip(t.data)}"
                    flips[flipped] = rdata
                    rdata = flipped
                recs.append((fqdn(h.tlsa_owner), "TLSA", rdata))
        if flips:
            self.bogus_tlsa[zone] = flips
        return recs

    def test_records(self) -> list[tuple[str, str, str]]:
        recs = self._soa("test")
        recs.append(("ns.test.", "A", NSD))
        for zone in sorted(self.world.zones):
            recs.append((fqdn(zone), "NS", "ns.test."))
            recs += [(fqdn(zone), "DS", ds) for ds in self.ds.get(zone, [])]
        return recs

    def root_records(self) -> list[tuple[str, str, str]]:
        recs = self._soa(".")
        recs.append(("test.", "NS", "ns.test."))
        recs += [("test.", "DS", ds) for ds in self.ds.get("test", [])]
        recs.append(("ns.test.", "A", NSD))
        return recs

    def _zone_text(self, recs: list[tuple[str, str, str]]) -> str:
        lines = [f"$TTL {TTL}"]
        lines += [f"{o}\t{TTL}\tIN\t{t}\t{r}" for o, t, r in recs]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ keys and signing
    def _file(self, zone: str) -> str:
        return "root" if zone == "." else zone

    def _keygen(self, zone: str) -> None:
        kd = self.kdir / self._file(zone)
        kd.mkdir(parents=True, exist_ok=True)
        name = "." if zone == "." else fqdn(zone)
        for extra in (["-f", "KSK"], []):
            _run(["dnssec-keygen", "-q", "-K", str(kd), "-a", "ECDSAP256SHA256", *extra,
                  "-L", str(TTL), name])

    def _ksk(self, zone: str) -> Path:
        kd = self.kdir / self._file(zone)
        for p in sorted(kd.glob("K*.key")):
            if re.search(r"IN\s+DNSKEY\s+257\s", p.read_text()):
                return p
        raise DnsBuildError(f"no KSK for {zone}")

    def _ds_of(self, zone: str) -> list[str]:
        out = _run(["dnssec-dsfromkey", "-2", str(self._ksk(zone))])
        return [line.split(None, 3)[3] for line in out.splitlines() if " DS " in line]

    def _sign(self, zone: str, signing: str, recs: list[tuple[str, str, str]]) -> None:
        f = self._file(zone)
        src = self.zdir / f"{f}.zone"
        src.write_text(self._zone_text(recs))
        if signing == "unsigned":
            (self.zdir / f"{f}.zone.signed").write_text(src.read_text())
            return
        kd = self.kdir / f
        if signing == "bogus":
            times = ["-P", "-s", BOGUS_SIG[0], "-e", BOGUS_SIG[1]]
        else:
            times = ["-s", "now-86400", "-e", f"now+{SIG_VALIDITY}"]
        origin = "." if zone == "." else fqdn(zone)
        out = self.zdir / f"{f}.zone.signed"
        _run(["dnssec-signzone", "-q", "-S", "-K", str(kd), "-d", str(kd), "-O", "full",
              "-N", "keep", "-o", origin, "-f", str(out), *times, str(src)], cwd=kd)
        flips = self.bogus_tlsa.get(zone)
        if flips:
            self._restore_tlsa(out, flips)

    @staticmethod
    def _restore_tlsa(path: Path, flips: dict[str, str]) -> None:
        norm = {" ".join(k.split()[:3]) + " " + k.split()[3].upper(): v for k, v in flips.items()}
        lines = []
        done = 0
        for line in path.read_text().splitlines():
            tok = line.split()
            if len(tok) >= 7 and tok[3] == "TLSA":
                key = " ".join(tok[4:7]) + " " + "".join(tok[7:]).upper()
                if key in norm:
                    line = "\t".join(tok[:4]) + "\t" + norm[key]
                    done += 1
            lines.append(line)
        if done != len(flips):
            raise DnsBuildError(f"bogus TLSA: restored {done} of {len(flips)} records")
        path.write_text("\n".join(lines) + "\n")

    def build(self) -> dict:
        """Generate keys, sign children, then test., then the root. Returns state info."""
        self.zdir.mkdir(parents=True, exist_ok=True)
        self.kdir.mkdir(parents=True, exist_ok=True)
        w = self.world
        signed = [z for z, s in w.zones.items() if s != "unsigned"]
        with ThreadPoolExecutor(max_workers=8) as ex:
            list(ex.map(self._keygen, [".", "test", *signed]))
            children = {z: self.child_records(z) for z in w.zones}
            list(ex.map(lambda z: self._sign(z, w.zones[z], children[z]), list(w.zones)))
            ds = dict(zip(signed, ex.map(self._ds_of, signed), strict=True))
        self.ds.update(ds)
        self._sign("test", "signed", self.test_records())
        self.ds["test"] = self._ds_of("test")
        self._sign(".", "signed", self.root_records())
        root_ds = self._ds_of(".")
        anchor = self.root / "root.ds"
        anchor.write_text("".join(f". IN DS {d}\n" for d in root_ds))
        return {
            "trust_anchor": str(anchor),
            "signed_until": int(time.time()) + SIG_VALIDITY - 86400,
            "zones": ["."] + ["test"] + sorted(w.zones),
        }


# ---------------------------------------------------------------------------- daemons' configs
def nsd_conf(world: World, dns_root: Path, run_dir: Path) -> str:
    zdir = dns_root / "zones"
    out = [
        "server:",
        f"  ip-address: {NSD}",
        "  port: 53",
        "  server-count: 1",
        '  username: ""',
        '  chroot: ""',
        '  database: ""',
        f'  zonelistfile: "{run_dir}/nsd.zonelist"',
        f'  xfrdfile: "{run_dir}/nsd.xfrd.state"',
        f'  xfrdir: "{run_dir}"',
        f'  pidfile: "{run_dir}/nsd.pid"',
        f'  logfile: "{run_dir.parent / "log" / "nsd.log"}"',
        f'  zonesdir: "{zdir}"',
        "  verbosity: 1",
        "  hide-version: yes",
        "  refuse-any: no",
        "  do-ip6: no",
        "remote-control:",
        "  control-enable: no",
    ]
    for zone in [".", "test", *sorted(world.zones)]:
        f = "root" if zone == "." else zone
        out += ["zone:", f'  name: "{zone}"', f'  zonefile: "{f}.zone.signed"']
    return "\n".join(out) + "\n"


def unbound_conf(trust_anchor: Path, run_dir: Path, log_dir: Path) -> str:
    return f"""server:
  interface: {RESOLVER}
  interface: ::1
  interface: {RESOLVER_ULA}
  port: 53
  do-ip6: yes
  access-control: 127.0.0.0/8 allow
  access-control: ::1/128 allow
  access-control: {ULA_PREFIX}/64 allow
  do-not-query-localhost: no
  username: ""
  chroot: ""
  directory: "{run_dir}"
  pidfile: "{run_dir}/unbound.pid"
  logfile: "{log_dir}/unbound.log"
  use-syslog: no
  log-time-ascii: yes
  verbosity: 1
  val-log-level: 2
  log-servfail: yes
  num-threads: 1
  so-reuseport: no
  module-config: "validator iterator"
  trust-anchor-file: "{trust_anchor}"
  local-zone: "test." transparent
  cache-max-ttl: 300
  cache-max-negative-ttl: 60
  prefetch: no
  serve-expired: no
  qname-minimisation: no
  harden-referral-path: no
  val-permissive-mode: no
  minimal-responses: no

stub-zone:
  name: "."
  stub-addr: {NSD}

remote-control:
  control-enable: yes
  control-interface: "{run_dir}/unbound.ctl"
  control-use-cert: no
"""
