"""The scenario table resolved into objects: addresses assigned, hosts and zones indexed.

Nothing here touches the system; ``load_world()`` is cheap and deterministic, so tests can
use it at collection time (for parametrisation) without the harness running.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address

from . import scenarios as _table

# ---------------------------------------------------------------------------- address plan
NETNS = "mlh"
RESOLVER = "127.0.0.1"  # unbound, validating; also on ::1
RESOLVER_ULA = "fd00:1ab::53"  # the same unbound on a non-loopback address (C-59)
NSD = "127.0.0.2"  # authoritative for ".", "test." and every scenario zone
DEAD_RESOLVER = "127.0.0.3"  # every packet to it is dropped (a resolver that never answers)
ADDRCONFIG4 = "127.0.0.10"  # makes getaddrinfo(AI_ADDRCONFIG) return IPv4 answers
ULA_PREFIX = "fd00:1ab::"
ULA_BASE = "fd00:1ab::1"  # makes AI_ADDRCONFIG return IPv6 answers
MX_NET4 = "127.0.1."  # MX listeners 127.0.1.N
MX_NET6 = "fd00:1ab::1:"  # MX listeners fd00:1ab::1:N (N in hex)
STS_NET4 = "127.0.2."  # MTA-STS HTTPS hosts 127.0.2.N
SMTP_PORT = 25
TTL = 300
POLICY_MAX_AGE = 86400
OVERSIZED_POLICY_BYTES = 70 * 1024

SERVER_KINDS = {
    "smtpd",
    "refused",
    "blackhole",
    "never-greets",
    "stall-after-data",
    "greet-554",
    "greet-421",
    "starttls-454",
    "sink",
    "nxdomain",
}
BADPEER_KINDS = {"never-greets", "stall-after-data", "greet-554", "greet-421", "starttls-454"}
CERT_KINDS = {"ca", "selfsigned", "expired", "wildcard", "wrongname", "dane-ta"}
ZONE_KINDS = {"signed", "unsigned", "bogus"}
FETCH_KINDS = {"ok", "redirect", "404", "html", "selfsigned", "oversized"}


class ScenarioError(ValueError):
    """The scenario table is inconsistent."""


@dataclass
class Tlsa:
    usage: int
    selector: int
    mtype: int
    source: str  # self | issuer | other
    data: str = ""  # hex, filled in from the generated PKI

    @property
    def usable(self) -> bool:
        """Usable for DANE in SMTP (RFC 7672 §3.1): usage 2/3, selector 0/1, mtype 0/1/2."""
        return self.usage in (2, 3) and self.selector in (0, 1) and self.mtype in (0, 1, 2)

    @property
    def params(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype}"

    @property
    def rdata(self) -> str:
        return f"{self.params} {self.data}"


@dataclass
class Host:
    name: str
    scenario: str
    server: str = "smtpd"
    starttls: bool = True
    cert: str = "ca"
    family: str = "v4"
    tlsa: list[Tlsa] = field(default_factory=list)
    tlsa_bogus: bool = False
    cname: str | None = None
    discard: bool = False
    ehlo_discard: list[str] = field(default_factory=list)
    size_limit: int | None = None
    recipient_limit: int | None = None
    tls_protocols: str | None = None
    ipv4: str | None = None
    ipv6: str | None = None
    zone: str = ""
    domains: list[str] = field(default_factory=list)  # recipient domains it accepts

    @property
    def addresses(self) -> list[str]:
        return [a for a in (self.ipv4, self.ipv6) if a]

    @property
    def address(self) -> str:
        """The first address (IPv4 if it has one)."""
        if not self.addresses:
            raise ScenarioError(f"{self.name} has no address")
        return self.addresses[0]

    @property
    def tls(self) -> bool:
        """Does the listener offer STARTTLS?"""
        return self.server == "smtpd" and self.starttls

    @property
    def tlsa_owner(self) -> str:
        return f"_25._tcp.{self.name}"

    @property
    def cert_names(self) -> list[str]:
        """DNS names in the certificate's SAN (the first is also the CN)."""
        if self.cert == "wildcard":
            return ["*." + self.name.split(".", 1)[1]]
        if self.cert == "wrongname":
            return [_table.ELSEWHERE]
        return [self.name]


@dataclass
class MtaSts:
    domain: str
    mode: str
    mx: list[str]
    crlf: bool = False
    fetch: str = "ok"
    redirect_to: str | None = None
    ip: str = ""
    body: bytes = b""

    @property
    def host(self) -> str:
        return f"mta-sts.{self.domain}"

    @property
    def url(self) -> str:
        return f"https://{self.host}/.well-known/mta-sts.txt"

    @property
    def policy_id(self) -> str:
        return hashlib.sha256(self.body).hexdigest()[:20]

    @property
    def txt(self) -> str:
        return f"v=STSv1; id={self.policy_id};"

    @property
    def valid(self) -> bool:
        """Should a correct client end up with this policy?"""
        return self.fetch == "ok"

    @property
    def expected_status(self) -> int:
        return {"redirect": 301, "404": 404}.get(self.fetch, 200)

    @property
    def expected_content_type(self) -> str:
        return "text/html" if self.fetch == "html" else "text/plain"


@dataclass
class Scenario:
    name: str
    domain: str
    domains: list[str]
    zone_name: str
    zone: str
    mx: list[tuple[int, str]]
    hosts: dict[str, Host]
    mta_sts: MtaSts | None
    expect: str
    via: str | None
    spec: list[str]

    @property
    def null_mx(self) -> bool:
        return any(h == "." for _, h in self.mx)

    @property
    def mx_hosts(self) -> list[str]:
        """MX host names in preference order (null MX excluded)."""
        return [h for _, h in sorted(self.mx) if h != "."]

    @property
    def signed(self) -> bool:
        return self.zone == "signed"

    def host(self, name: str | None = None) -> Host:
        """A host of this scenario; by default the first MX (or the implicit-MX host)."""
        if name is None:
            name = self.mx_hosts[0] if self.mx_hosts else self.domain
        return self.hosts[name]


@dataclass
class World:
    scenarios: dict[str, Scenario]
    hosts: dict[str, Host]
    zones: dict[str, str]  # child zones of test. -> signing
    sts: dict[str, MtaSts]

    def final_host(self, name: str) -> Host:
        """Follow CNAMEs to the host that actually serves."""
        host = self.hosts[name]
        seen = {name}
        while host.cname:
            if host.cname in seen:
                raise ScenarioError(f"CNAME loop at {name}")
            seen.add(host.cname)
            host = self.hosts[host.cname]
        return host

    def zone_of(self, name: str) -> str:
        name = name.rstrip(".")
        best = ""
        for zone in self.zones:
            if (name == zone or name.endswith("." + zone)) and len(zone) > len(best):
                best = zone
        if not best:
            raise ScenarioError(f"{name} is in no zone of the table")
        return best

    def scenario_of_domain(self, domain: str) -> Scenario | None:
        domain = domain.lower().rstrip(".")
        for sc in self.scenarios.values():
            if domain in sc.domains:
                return sc
        return None

    @property
    def smtpd_hosts(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.server == "smtpd" and not h.cname]

    @property
    def badpeer_hosts(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.server in BADPEER_KINDS]

    @property
    def sink_hosts(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.server == "sink"]

    @property
    def blackhole_hosts(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.server == "blackhole"]

    @property
    def ipv6_addresses(self) -> list[str]:
        return [h.ipv6 for h in self.hosts.values() if h.ipv6]


def _parse_tlsa(spec: str, where: str) -> Tlsa:
    parts = spec.split()
    if len(parts) != 4 or parts[3] not in ("self", "issuer", "other"):
        raise ScenarioError(f"{where}: bad tlsa spec {spec!r}")
    return Tlsa(int(parts[0]), int(parts[1]), int(parts[2]), parts[3])


def _policy_body(sts: MtaSts) -> bytes:
    lines = ["version: STSv1", f"mode: {sts.mode}"]
    lines += [f"mx: {mx}" for mx in sts.mx]
    lines.append(f"max_age: {POLICY_MAX_AGE}")
    eol = "\r\n" if sts.crlf else "\n"
    body = eol.join(lines) + eol
    if sts.fetch == "oversized":
        pad = []
        n = 0
        while len(body) + sum(len(p) for p in pad) <= OVERSIZED_POLICY_BYTES:
            pad.append(f"x-padding-{n:05d}: {'a' * 100}{eol}")
            n += 1
        body += "".join(pad)
    return body.encode()


def build_world(table: list[dict] | None = None) -> World:
    table = _table.SCENARIOS if table is None else table
    scenarios: dict[str, Scenario] = {}
    hosts: dict[str, Host] = {}
    zones: dict[str, str] = {}
    sts_all: dict[str, MtaSts] = {}
    host_keys = {f.name for f in Host.__dataclass_fields__.values()} - {
        "name", "scenario", "tlsa", "ipv4", "ipv6", "zone", "domains"}
    for entry in table:
        name = entry["name"]
        if name in scenarios:
            raise ScenarioError(f"duplicate scenario {name}")
        if "domains" in entry:
            pat = entry["domains"]
            domains = [pat["pattern"].format(i) for i in range(pat["count"])]
        else:
            domains = [entry["domain"]]
        zone_name = entry.get("zone_name", domains[0])
        signing = entry.get("zone", "signed")
        if signing not in ZONE_KINDS:
            raise ScenarioError(f"{name}: zone {signing!r}")
        for z, s in [(zone_name, signing), *entry.get("extra_zones", {}).items()]:
            if z in zones and zones[z] != s:
                raise ScenarioError(f"{name}: zone {z} signed two ways")
            if s not in ZONE_KINDS:
                raise ScenarioError(f"{name}: zone {z} signing {s!r}")
            zones[z] = s
        sc_hosts: dict[str, Host] = {}
        for hname, spec in entry.get("hosts", {}).items():
            unknown = set(spec) - host_keys - {"tlsa"}
            if unknown:
                raise ScenarioError(f"{name}/{hname}: unknown keys {sorted(unknown)}")
            if hname in hosts:
                raise ScenarioError(f"host {hname} defined twice")
            h = Host(name=hname, scenario=name, **{k: v for k, v in spec.items() if k != "tlsa"})
            h.tlsa = [_parse_tlsa(t, f"{name}/{hname}") for t in spec.get("tlsa", [])]
            if h.server not in SERVER_KINDS:
                raise ScenarioError(f"{name}/{hname}: server {h.server!r}")
            if h.cert not in CERT_KINDS:
                raise ScenarioError(f"{name}/{hname}: cert {h.cert!r}")
            if h.family not in ("v4", "v6", "dual"):
                raise ScenarioError(f"{name}/{hname}: family {h.family!r}")
            hosts[hname] = sc_hosts[hname] = h
        mx = [(int(p), str(h).rstrip(".") or ".") for p, h in entry.get("mx", [])]
        sts = None
        if "mta_sts" in entry:
            m = entry["mta_sts"]
            sts = MtaSts(
                domain=domains[0],
                mode=m["mode"],
                mx=list(m.get("mx", [])),
                crlf=bool(m.get("crlf", False)),
                fetch=m.get("fetch", "ok"),
                redirect_to=m.get("redirect_to"),
            )
            if sts.fetch not in FETCH_KINDS:
                raise ScenarioError(f"{name}: fetch {sts.fetch!r}")
            sts.body = _policy_body(sts)
            sts_all[sts.domain] = sts
        scenarios[name] = Scenario(
            name=name,
            domain=domains[0],
            domains=domains,
            zone_name=zone_name,
            zone=signing,
            mx=mx,
            hosts=sc_hosts,
            mta_sts=sts,
            expect=entry.get("expect", ""),
            via=entry.get("via"),
            spec=list(entry.get("spec", [])),
        )
    world = World(scenarios=scenarios, hosts=hosts, zones=zones, sts=sts_all)

    # zones of hosts, CNAME targets, MX references, accepted domains
    for h in hosts.values():
        h.zone = world.zone_of(h.name)
        if h.cname and h.cname not in hosts:
            raise ScenarioError(f"{h.name}: CNAME target {h.cname} is not in the table")
    for sc in scenarios.values():
        for d in sc.domains:
            world.zone_of(d)
        targets = list(sc.mx_hosts)
        if not sc.mx and sc.domain in hosts:
            targets = [sc.domain]
        for t in targets:
            if t not in hosts:
                raise ScenarioError(f"{sc.name}: MX {t} is not in the table")
            fh = world.final_host(t)
            for d in sc.domains:
                if d not in fh.domains:
                    fh.domains.append(d)
        if sc.via is not None and sc.via not in hosts:
            raise ScenarioError(f"{sc.name}: via {sc.via} is not in the table")
        if sc.mta_sts and sc.mta_sts.redirect_to and sc.mta_sts.redirect_to not in sts_all:
            raise ScenarioError(f"{sc.name}: redirect_to has no policy")

    # addresses, in table order
    n4 = n6 = 0
    for h in hosts.values():
        if h.cname or h.server == "nxdomain":
            continue
        if h.family in ("v4", "dual"):
            n4 += 1
            if n4 > 250:
                raise ScenarioError("too many IPv4 MX hosts")
            h.ipv4 = f"{MX_NET4}{n4}"
        if h.family in ("v6", "dual"):
            n6 += 1
            h.ipv6 = str(IPv6Address(f"{MX_NET6}{n6:x}"))
    for i, sts in enumerate(sts_all.values(), start=1):
        sts.ip = str(IPv4Address(f"{STS_NET4}{i}"))
    return world


@lru_cache(maxsize=1)
def load_world() -> World:
    """The world described by ``scenarios.py`` (cached; treat it as read-only)."""
    return build_world()
