"""local_policy: minimum MX and TLS levels for every outbound connection.

Registered name: ``mx_auth.local_policy``. Roles: MXAuthPolicy. It runs last (C-1) and
compares the levels the other policies established with ``min_mx_level`` (before
connecting: no TCP connection to an MX below it, C-9) and ``min_tls_level`` (after
STARTTLS: the connection is closed with QUIT, C-10). Both default to ``none`` (C-6);
``local_policy off`` sets both to none (C-7).
"""

from __future__ import annotations

from typing import Any

from maddylite.config.directives import Directive, Enum, Settings
from maddylite.config.errors import ConfigError
from maddylite.interfaces import MXAuthPolicy
from maddylite.policy import (
    MX_LEVEL_NAMES,
    TLS_LEVEL_NAMES,
    DeliveryPolicy,
    MXCandidate,
    MXLevel,
    PolicyModule,
    TLSLevel,
)
from maddylite.registry import ModuleBase, register
from maddylite.smtp.errors import POLICY_MX_LEVEL, POLICY_TLS_LEVEL


class _Check(DeliveryPolicy):
    def __init__(self, min_mx: MXLevel, min_tls: TLSLevel) -> None:
        self.min_mx = min_mx
        self.min_tls = min_tls

    def check_mx(self, cand: MXCandidate) -> MXLevel:
        if cand.mx_level < self.min_mx:
            raise POLICY_MX_LEVEL.error(remote_server=cand.host, mx_level=str(cand.mx_level), required_mx_level=str(self.min_mx))
        return cand.mx_level

    def check_conn(self, cand: MXCandidate) -> TLSLevel:
        if cand.tls_level < self.min_tls:
            raise POLICY_TLS_LEVEL.error(remote_server=cand.host, tls_level=str(cand.tls_level), required_tls_level=str(self.min_tls))
        return cand.tls_level


@register("mx_auth.local_policy")
class LocalPolicy(PolicyModule, ModuleBase):
    """LocalPolicy enforces min_mx_level and min_tls_level (``mx_auth.local_policy``)."""

    roles = (MXAuthPolicy,)
    directives = (
        Directive(name="min_tls_level", type=Enum(choices=tuple(TLS_LEVEL_NAMES)), default="none", help="Lowest TLS level accepted: none, encrypted or authenticated."),
        Directive(name="min_mx_level", type=Enum(choices=tuple(MX_LEVEL_NAMES)), default="none", help="Lowest MX level accepted: none, mtasts or dnssec."),
    )

    def configure(self, inline: tuple[str, ...], settings: Settings) -> None:
        """configure reads the two minimums; ``off`` means both none."""
        self.off = inline == ("off",)
        if inline and not self.off:
            raise ConfigError(f"local_policy: unexpected argument: {inline[0]} (only 'off' is accepted)")
        self.min_mx = MXLevel.NONE if self.off else MX_LEVEL_NAMES[settings.min_mx_level]
        self.min_tls = TLSLevel.NONE if self.off else TLS_LEVEL_NAMES[settings.min_tls_level]

    def inline_words(self, words: tuple[str, ...], warn: Any) -> None:
        """inline_words: ``off`` was handled by configure."""

    def start_delivery(self, msg_meta: Any) -> DeliveryPolicy:
        """start_delivery returns the level checks."""
        return _Check(self.min_mx, self.min_tls)
