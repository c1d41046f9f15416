"""sts_preload: accepted for compatibility with maddy's configurations; does nothing.

Registered name: ``mx_auth.sts_preload``. Roles: MXAuthPolicy. maddy deprecated the
STARTTLS-Everywhere preload list; maddylite accepts the block with its ``source`` and
``enforce_testing`` directives and logs that it is deprecated (C-94).
"""

from __future__ import annotations

from typing import Any

from maddylite.config.directives import Bool, Directive, String
from maddylite.interfaces import MXAuthPolicy
from maddylite.log import Logger
from maddylite.policy import DeliveryPolicy, PolicyModule
from maddylite.registry import ModuleBase, register


@register("mx_auth.sts_preload")
class STSPreload(PolicyModule, ModuleBase):
    """STSPreload is a deprecated no-op (``mx_auth.sts_preload``)."""

    roles = (MXAuthPolicy,)
    directives = (
        Directive(name="source", type=String(), default=None, help="Ignored: the preload list is deprecated."),
        Directive(name="enforce_testing", type=Bool(), default=True, help="Ignored: the preload list is deprecated."),
    )

    def start(self) -> None:
        """start logs the deprecation."""
        Logger("mx_auth/sts_preload").warn("sts_preload is deprecated and does nothing")

    def start_delivery(self, msg_meta: Any) -> DeliveryPolicy:
        """start_delivery returns a policy that changes nothing."""
        return DeliveryPolicy()
