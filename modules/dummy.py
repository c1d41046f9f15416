"""dummy: a delivery target that accepts every message and discards it (maddy's ``dummy``).

Registered name: ``dummy``. Roles: DeliveryTarget. Useful for tests and for trying a
configuration without sending mail anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

from maddylite.interfaces import DeliveryTarget, MsgMetadata
from maddylite.registry import ModuleBase, register


class _DummyDelivery:
    """_DummyDelivery accepts every recipient and drops the body."""

    def __init__(self, target: Dummy) -> None:
        self.target = target
        self.rcpts: list[str] = []

    def add_rcpt(self, rcpt: str) -> None:
        self.rcpts.append(rcpt)

    def body(self, header: bytes, body: bytes) -> None:
        self.target.bodies += 1

    def body_per_rcpt(self, header: bytes, body: bytes) -> Mapping[str, Exception | None]:
        self.body(header, body)
        return {r: None for r in self.rcpts}

    def commit(self) -> None:
        self.target.committed += 1

    def abort(self) -> None:
        pass


@register("dummy")
class Dummy(ModuleBase):
    """Dummy accepts and discards every message (registered as ``dummy``)."""

    roles = (DeliveryTarget,)

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        #: Messages whose body was received and committed (for tests and debugging).
        self.bodies = 0
        self.committed = 0

    def start_delivery(self, meta: MsgMetadata, mail_from: str) -> _DummyDelivery:
        """start_delivery returns a delivery that accepts everything."""
        return _DummyDelivery(self)
