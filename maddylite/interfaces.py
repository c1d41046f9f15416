"""Roles a module can play, as typing Protocols, with their calling contracts.

A module class lists the roles it implements in its ``roles`` class attribute; when a
directive references a module, the builder checks the instance against the role the
directive expects (A-89). ``tests/test_registry.py`` checks that every registered class
structurally satisfies the roles it declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class MsgMetadata:
    """MsgMetadata describes one message travelling through the server.

    ``smtputf8``, ``requiretls``, ``body_8bit`` come from the MAIL command parameters;
    ``tls_required_no`` is set when the header has ``TLS-Required: No`` (B-81);
    ``quarantine`` is set by checks (B-23); ``src_ip`` is the submitting client's
    address when known (B-116). The queue persists everything but ``src_ip`` (D-31).
    """

    id: str
    smtputf8: bool = False
    requiretls: bool = False
    body_8bit: bool = False
    tls_required_no: bool = False
    quarantine: bool = False
    src_ip: str | None = None
    original_rcpts: dict[str, str] = field(default_factory=dict)
    size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """to_json returns the persistent fields (everything but the client address)."""
        return {
            "id": self.id,
            "smtputf8": self.smtputf8,
            "requiretls": self.requiretls,
            "body_8bit": self.body_8bit,
            "tls_required_no": self.tls_required_no,
            "quarantine": self.quarantine,
            "original_rcpts": dict(self.original_rcpts),
            "size": self.size,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MsgMetadata:
        """from_json rebuilds metadata saved by :meth:`to_json`."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@runtime_checkable
class Module(Protocol):
    """Module is what every registered class provides.

    ``__init__(mod_name, instance_name, runtime)`` has no side effects. ``configure``
    validates and resolves references and is pure (no sockets, greenlets, files or
    directories), which keeps ``check-config`` and reload dry runs safe. ``start``
    acquires resources; ``stop(timeout)`` is idempotent and works after a partial start.
    """

    mod_name: str
    instance_name: str

    def start(self) -> None:
        """start acquires resources (listeners, greenlets, disk state)."""

    def stop(self, timeout: float) -> None:
        """stop releases everything start acquired, within ``timeout`` seconds."""


@runtime_checkable
class Endpoint(Protocol):
    """Endpoint is a module that accepts work from outside (an SMTP listener).

    The runtime starts endpoints last and stops them first. ``early_stop`` stops
    accepting new connections before a replacement runtime starts (reload).
    """

    def start(self) -> None:
        """start begins listening (sockets come from the runtime's listener pool)."""

    def stop(self, timeout: float) -> None:
        """stop closes listeners and lets open sessions finish within ``timeout``."""

    def early_stop(self) -> None:
        """early_stop stops accepting new sessions without closing open ones."""


@runtime_checkable
class Delivery(Protocol):
    """Delivery is one message on its way through a target.

    The caller (endpoint or queue) calls ``add_rcpt`` for each recipient, then ``body``
    (or ``body_per_rcpt``), then exactly one of ``commit`` or ``abort``. Methods are
    called from one greenlet at a time. Errors are ``maddylite.smtp.errors.SMTPError``
    values; their class (temporary or permanent) decides between retry and bounce.
    """

    def add_rcpt(self, rcpt: str) -> None:
        """add_rcpt adds one recipient; raises SMTPError if it is refused."""

    def body(self, header: bytes, body: bytes) -> None:
        """body sends the message to every accepted recipient; raises on failure."""

    def body_per_rcpt(self, header: bytes, body: bytes) -> Mapping[str, Exception | None]:
        """body_per_rcpt sends the message and reports the outcome per recipient."""

    def commit(self) -> None:
        """commit finishes the delivery."""

    def abort(self) -> None:
        """abort cancels the delivery; nothing further is sent."""


@runtime_checkable
class DeliveryTarget(Protocol):
    """DeliveryTarget is a module that messages are delivered to (``deliver_to``).

    ``start_delivery`` may be called concurrently from many greenlets; each returned
    Delivery is used by one greenlet. An SMTPError raised here refuses the message.
    """

    def start_delivery(self, meta: MsgMetadata, mail_from: str) -> Delivery:
        """start_delivery begins one message's delivery."""
        ...


@runtime_checkable
class MXAuthPolicy(Protocol):
    """MXAuthPolicy is one ``mx_auth`` policy (mtasts, dnssec, dane, local_policy).

    ``start_delivery`` is called once per message delivery by target.remote and returns
    a per-delivery object whose hooks run before connecting to each MX (may raise the MX
    level or veto the MX) and after TLS (may raise the TLS level or veto the
    connection). Vetoes are SMTPError values, temporary unless the spec says otherwise.
    """

    def start_delivery(self, msg_meta: MsgMetadata) -> Any:
        """start_delivery returns the per-delivery policy object."""
        ...


@runtime_checkable
class MXAuthGroup(Protocol):
    """MXAuthGroup is the ``mx_auth`` block: an ordered set of MXAuthPolicy instances."""

    def policies(self) -> tuple[MXAuthPolicy, ...]:
        """policies returns the policies in their declared execution order."""
        ...


@runtime_checkable
class Limits(Protocol):
    """Limits is a ``limits`` block: rate and concurrency limits shared by its users.

    ``take_msg`` / ``release_msg`` bracket a message (scopes all, ip, source);
    ``take_dest`` / ``release_dest`` bracket one destination-domain transaction. A
    ``take_*`` call that cannot get a slot within its wait bound raises SMTPError
    ``451 4.4.5``. Safe to call from many greenlets at once.
    """

    def take_msg(self, src_ip: str, source_domain: str) -> None:
        """take_msg waits for the message-level slots."""

    def release_msg(self, src_ip: str, source_domain: str) -> None:
        """release_msg gives back the message-level slots."""

    def take_dest(self, domain: str) -> None:
        """take_dest waits for a destination slot."""

    def release_dest(self, domain: str) -> None:
        """release_dest gives back a destination slot."""


@runtime_checkable
class Check(Protocol):
    """Check is one module of an endpoint's ``check { }`` block (``check.<name>``).

    The endpoint calls ``check_body`` once per message, from the session's greenlet,
    after the whole DATA was received and before the target's ``body``; calls for
    different messages run concurrently. ``header`` and ``body`` are the message as it
    will be delivered (the header ends with its last field's CRLF; the empty line is not
    part of either). The result is ``"accept"`` or ``"quarantine"``; for the latter the
    endpoint sets ``meta.quarantine`` and goes on, so that target.remote refuses the
    message (B-23). To reject the message, raise SMTPError: the endpoint replies with
    its codes (a 4xx asks the client to retry) and the target's delivery is aborted.
    """

    def check_body(
        self,
        meta: MsgMetadata,
        mail_from: str,
        rcpts: tuple[str, ...],
        header: bytes,
        body: bytes,
        *,
        source_host: str = "",
    ) -> str:
        """check_body inspects one message and returns ``"accept"`` or ``"quarantine"``."""
        ...
