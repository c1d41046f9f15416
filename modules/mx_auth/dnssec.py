"""dnssec: MX level ``dnssec`` when the MX answer was DNSSEC-validated.

Registered name: ``mx_auth.dnssec``. Roles: MXAuthPolicy. maddylite does not validate
signatures itself; it believes the AD bit of the MX answer only when it came from a
resolver on a loopback address (C-57, C-59, C-60; the resolver decides that in
maddylite.dns). A bogus answer is a SERVFAIL, so the MX lookup itself fails (C-63).
Takes no directives (C-66).
"""

from __future__ import annotations

from typing import Any

from maddylite.interfaces import MXAuthPolicy
from maddylite.policy import DeliveryPolicy, MXCandidate, MXLevel, PolicyModule
from maddylite.registry import ModuleBase, register


class _Check(DeliveryPolicy):
    def check_mx(self, cand: MXCandidate) -> MXLevel:
        return MXLevel.DNSSEC if cand.mx_authenticated else cand.mx_level


@register("mx_auth.dnssec")
class DNSSEC(PolicyModule, ModuleBase):
    """DNSSEC grants MX level dnssec to authenticated MX answers (``mx_auth.dnssec``)."""

    roles = (MXAuthPolicy,)

    def start_delivery(self, msg_meta: Any) -> DeliveryPolicy:
        """start_delivery returns the AD-bit check."""
        return _Check()
