"""limits: rate and concurrency limits shared by the modules that reference them.

Registered name: ``limits``. Roles: Limits. Syntax (one rule per line, A-97)::

    limits outbound_limits {
        all rate 20 1s
        all concurrency 10
        destination concurrency 2
        ip rate 5 1m
    }

Scopes: ``all`` (one counter), ``ip`` (per submitting client address; 127.0.0.1 when
unknown, B-116), ``source`` (per sender domain; all null senders share one bucket,
B-117), ``destination`` (per recipient domain, B-115). Kinds: ``rate <burst> [period]``
(a token bucket refilled to ``burst`` every ``period``, default 1 s, B-113) and
``concurrency <max>``. 0 means no limit (B-121). A wait is bounded (5 s by default); when
it runs out the caller gets ``451 4.4.5 High load, try again later`` (B-112, B-114).
A top-level instance referenced with ``&name`` from several modules shares its counters
(B-120); a reload creates fresh counters (E-10).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import gevent
import gevent.event
import gevent.lock

from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode
from maddylite.config.values import integer_text, parse_duration_text
from maddylite.interfaces import Limits as LimitsRole
from maddylite.registry import Builder, ModuleBase, register
from maddylite.smtp.errors import HIGH_LOAD, Cancelled

SCOPES = ("all", "ip", "source", "destination")
KINDS = ("rate", "concurrency")
#: How long a caller waits for a slot before 451 4.4.5.
DEFAULT_WAIT = 5.0
#: Keyed scopes forget idle keys beyond this many entries.
MAX_KEYS = 100_000

_REASONS = {
    "all": "Global limit timeout",
    "ip": "IP limit timeout",
    "source": "Source limit timeout",
    "destination": "Destination limit timeout",
}


class TokenBucket:
    """TokenBucket allows ``burst`` takes per ``period``; refilled to ``burst`` each period."""

    def __init__(self, burst: int, period: float, clock=time.monotonic) -> None:
        self.burst = burst
        self.period = period
        self.clock = clock
        self.tokens = burst
        self.epoch = clock()

    def _refill(self) -> None:
        now = self.clock()
        if now - self.epoch >= self.period:
            periods = int((now - self.epoch) // self.period)
            self.epoch += periods * self.period
            self.tokens = self.burst

    def take(self, deadline: float, cancel: gevent.event.Event | None = None) -> bool:
        """take waits for a token until ``deadline`` (a clock value); False on timeout or cancel."""
        while True:
            if cancel is not None and cancel.is_set():
                return False
            self._refill()
            if self.tokens > 0:
                self.tokens -= 1
                return True
            wake = self.epoch + self.period
            if wake > deadline:
                return False  # the refill comes too late; failing now spares the wait
            delay = max(0.0, wake - self.clock())
            if cancel is not None:
                cancel.wait(timeout=delay)
            else:
                gevent.sleep(delay)

    def idle(self) -> bool:
        """idle tells whether the bucket is full (forgetting it changes nothing)."""
        self._refill()
        return self.tokens >= self.burst


class Concurrency:
    """Concurrency allows at most ``limit`` holders at once."""

    def __init__(self, limit: int) -> None:
        self.sem = gevent.lock.BoundedSemaphore(limit)
        self.limit = limit

    def take(self, timeout: float, cancel: gevent.event.Event | None = None) -> bool:
        """take waits up to ``timeout`` seconds for a slot; False on timeout or cancel."""
        if cancel is None:
            return bool(self.sem.acquire(timeout=timeout))
        deadline = time.monotonic() + timeout
        while not cancel.is_set():
            if self.sem.acquire(blocking=False):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            gevent.wait([self.sem, cancel], timeout=remaining, count=1)
        return False

    def release(self) -> None:
        """release gives a slot back."""
        self.sem.release()

    def idle(self) -> bool:
        """idle tells whether nobody holds a slot."""
        return self.sem.counter >= self.limit


@dataclass
class Rule:
    """Rule is one line of a limits block."""

    scope: str
    kind: str
    value: int
    period: float = 1.0


class _Scope:
    """_Scope holds the limiters of one scope: one set, or one set per key."""

    def __init__(self, name: str, rate: Rule | None, conc: Rule | None) -> None:
        self.name = name
        self.rate = rate
        self.conc = conc
        self.rates: dict[str, TokenBucket] = {}
        self.concs: dict[str, Concurrency] = {}

    @property
    def active(self) -> bool:
        return self.rate is not None or self.conc is not None

    def _gc(self) -> None:
        for table in (self.rates, self.concs):
            if len(table) > MAX_KEYS:
                for k in [k for k, v in table.items() if v.idle()]:
                    del table[k]

    def take(self, key: str, wait: float, cancel: gevent.event.Event) -> None:
        """take waits for this scope's slots; a timeout, a shutdown (``cancel``) or a killed
        waiter all end in the same 451 4.4.5 error (B-112, B-119)."""
        deadline = time.monotonic() + wait
        try:
            if self.rate is not None:
                bucket = self.rates.get(key)
                if bucket is None:
                    self._gc()
                    bucket = self.rates[key] = TokenBucket(self.rate.value, self.rate.period)
                if not bucket.take(deadline, cancel):
                    raise HIGH_LOAD.error(reason=_REASONS[self.name])
            if self.conc is not None:
                sem = self.concs.get(key)
                if sem is None:
                    self._gc()
                    sem = self.concs[key] = Concurrency(self.conc.value)
                if not sem.take(max(0.0, deadline - time.monotonic()), cancel):
                    raise HIGH_LOAD.error(reason=_REASONS[self.name])
        except gevent.GreenletExit:
            err = HIGH_LOAD.error(reason=_REASONS[self.name])
            raise Cancelled(err.code, err.enhanced, err.message, fields=err.fields) from None

    def release(self, key: str) -> None:
        if self.conc is not None:
            sem = self.concs.get(key)
            if sem is not None:
                sem.release()


def parse_rule(node: ConfigNode) -> Rule:
    """parse_rule reads ``<scope> <kind> <args>`` (A-97)."""
    if node.has_block:
        raise ConfigError("can't declare block here")
    words = [node.name, *node.args]
    if len(words) < 2:
        raise ConfigError("at least two arguments are required")
    scope, kind, args = words[0], words[1], words[2:]
    if scope not in SCOPES:
        raise ConfigError(f"unknown limit scope: {scope}")
    if kind not in KINDS:
        raise ConfigError(f"unknown limit kind: {kind}")

    def number(text: str) -> int:
        if not integer_text(text):
            raise ConfigError(f"invalid integer: {text}")
        value = int(text)
        if value < 0:
            raise ConfigError(f"{kind} value must not be negative: {text}")
        return value

    if kind == "rate":
        if not args:
            raise ConfigError("at least burst size is needed")
        if len(args) > 2:
            raise ConfigError("too many arguments")
        period = parse_duration_text(args[1]) if len(args) == 2 else 1.0
        if period <= 0:
            raise ConfigError("rate period must be positive")
        return Rule(scope, kind, number(args[0]), period)
    if not args:
        raise ConfigError("max concurrency value is needed")
    if len(args) > 1:
        raise ConfigError("too many arguments")
    return Rule(scope, kind, number(args[0]))


@register("limits")
class Limits(ModuleBase):
    """Limits holds rate and concurrency limiters keyed by scope (registered as ``limits``)."""

    roles = (LimitsRole,)
    #: Seconds a caller waits for a slot before 451 4.4.5 (B-112).
    wait = DEFAULT_WAIT

    def configure_block(self, inline: Sequence[str], block: ConfigNode, builder: Builder) -> None:
        """configure_block reads the rule lines; the last rule of a scope and kind wins."""
        if inline:
            raise ConfigError("limits: inline arguments are not used").at_node(block)
        rules: dict[tuple[str, str], Rule] = {}
        for node in block.block:
            try:
                rule = parse_rule(node)
            except ConfigError as e:
                raise e.at_node(node) from None
            if rule.value > 0:
                rules[(rule.scope, rule.kind)] = rule
            else:
                rules.pop((rule.scope, rule.kind), None)
        self.rules = tuple(rules.values())
        self.scopes = {s: _Scope(s, rules.get((s, "rate")), rules.get((s, "concurrency"))) for s in SCOPES}
        self.closed = gevent.event.Event()

    def stop(self, timeout: float) -> None:
        """stop wakes every waiter with 451 4.4.5 (B-119); the counters die with the instance."""
        self.closed.set()

    def _msg_keys(self, src_ip: str | None, source_domain: str) -> list[tuple[_Scope, str]]:
        return [
            (self.scopes["all"], ""),
            (self.scopes["ip"], src_ip or "127.0.0.1"),
            (self.scopes["source"], source_domain.lower()),
        ]

    def take_msg(self, src_ip: str | None, source_domain: str) -> None:
        """take_msg waits for the all, ip and source slots (held until release_msg), at
        most ``wait`` seconds for all of them together (B-112)."""
        taken: list[tuple[_Scope, str]] = []
        deadline = time.monotonic() + self.wait
        try:
            for scope, key in self._msg_keys(src_ip, source_domain):
                if scope.active:
                    scope.take(key, max(0.0, deadline - time.monotonic()), self.closed)
                    taken.append((scope, key))
        except BaseException:
            for scope, key in reversed(taken):
                scope.release(key)
            raise

    def release_msg(self, src_ip: str | None, source_domain: str) -> None:
        """release_msg gives back what take_msg took."""
        for scope, key in self._msg_keys(src_ip, source_domain):
            if scope.active:
                scope.release(key)

    def take_dest(self, domain: str) -> None:
        """take_dest waits for the destination slot of ``domain``."""
        scope = self.scopes["destination"]
        if scope.active:
            scope.take(domain.lower(), self.wait, self.closed)

    def release_dest(self, domain: str) -> None:
        """release_dest gives back the destination slot of ``domain``."""
        scope = self.scopes["destination"]
        if scope.active:
            scope.release(domain.lower())
