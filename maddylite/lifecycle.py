"""Lifetime: starts modules in dependency order, stops them in reverse, rolls back.

The builder lists instances in configuration-completion order, which puts every
dependency before its users; endpoints are moved last so that nothing accepts work
before the modules behind it are running (and they are stopped first). Early stop, the
first step of a reload, reaches the endpoints last instead: they keep accepting while the
queues wait for their attempts in progress.
"""

from __future__ import annotations

from collections.abc import Iterable

from maddylite.interfaces import Endpoint
from maddylite.log import Logger
from maddylite.registry import ModuleBase


class StartError(Exception):
    """StartError is a module that failed to start; everything started before was stopped."""

    def __init__(self, module: ModuleBase, cause: BaseException) -> None:
        super().__init__(f"{module.label}: {cause}")
        self.module = module
        self.cause = cause


class Lifetime:
    """Lifetime owns the start/stop order of one runtime's module instances."""

    def __init__(self, modules: Iterable[ModuleBase], log: Logger | None = None) -> None:
        mods = list(modules)
        self.modules = [m for m in mods if Endpoint not in m.roles] + [m for m in mods if Endpoint in m.roles]
        self.started: list[ModuleBase] = []
        self.log = log or Logger("lifetime")

    def start(self) -> None:
        """start starts every module; on a failure it stops the started ones and raises StartError."""
        for m in self.modules:
            try:
                m.start()
            except Exception as e:  # noqa: BLE001 - any failure rolls the whole start back
                self.started.append(m)  # a partial start still gets stop()
                self.stop(timeout=5.0)
                raise StartError(m, e) from e
            self.started.append(m)

    def early_stop(self) -> None:
        """early_stop asks every started module to stop taking new work: the others first,
        the endpoints last. A queue's early stop waits for its attempts in progress (E-2),
        which may take minutes; the endpoints keep accepting meanwhile (what they accept is
        on disk, where the new instance's queue finds it), so a reload does not leave the
        SMTP port unserved for that long."""
        order = [m for m in reversed(self.started) if Endpoint not in m.roles]
        order += [m for m in reversed(self.started) if Endpoint in m.roles]
        for m in order:
            try:
                m.early_stop()
            except Exception as e:  # noqa: BLE001
                self.log.error("early stop failed", e, module=m.label)

    def stop(self, timeout: float) -> None:
        """stop stops started modules in reverse order; idempotent."""
        while self.started:
            m = self.started.pop()
            try:
                m.stop(timeout)
            except Exception as e:  # noqa: BLE001 - one failing stop must not block the rest
                self.log.error("stop failed", e, module=m.label)
