"""Shared flights: one greenlet per question at a time, whoever asks.

Many deliveries to one domain start at the same moment and ask the same questions (the
MTA-STS policy of the domain, the TLSA records of its MX). Each question runs once: a
caller that asks while the same question is running gets the running greenlet and reads
its result with ``get()``. Once it has finished, the next caller starts a new one; what
stays valid longer is the business of the caches behind it (DNS, the policy store).
Every caller releases what it took; a greenlet that nobody needs any more is killed.
A greenlet costs memory for as long as it runs, so sharing keeps the memory of many
deliveries in flight close to that of the distinct questions.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import gevent
import gevent.pool

__all__ = ["SharedFlights"]


class SharedFlights:
    """SharedFlights starts at most one greenlet per key at a time, in the given group."""

    def __init__(self) -> None:
        self._running: dict[Hashable, gevent.Greenlet] = {}
        self._users: dict[Hashable, int] = {}

    def spawn(self, group: gevent.pool.Group, key: Hashable, name: str,
              func: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """spawn returns the running greenlet for *key*, or starts ``func(*args)`` as one.

        Callers share it: they read it (``get``/``join``), never kill it, and hand it back
        with :meth:`release` when they are done or no longer need it.
        """
        g = self._running.get(key)
        if g is None or g.dead:
            g = group.spawn(func, *args)
            g.name = name
            self._running[key] = g
            self._users[key] = 0
            g.rawlink(lambda done: self._forget(key, done))
        self._users[key] += 1
        return g

    def release(self, key: Hashable, g: gevent.Greenlet) -> None:
        """release hands back one use of *g*; the last user's release kills it if it still runs."""
        running = self._running.get(key)
        if running is None or running is not g:
            return  # finished (or replaced) already
        self._users[key] -= 1
        if self._users[key] <= 0:
            self._forget(key, running)
            running.kill(block=False)

    def running(self) -> int:
        """running is the number of keys with a greenlet still running."""
        return sum(1 for g in self._running.values() if not g.dead)

    def _forget(self, key: Hashable, done: gevent.Greenlet) -> None:
        if self._running.get(key) is done:
            del self._running[key]
            del self._users[key]
