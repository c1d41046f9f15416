"""mx_auth: the group of outbound security policies (MTA-STS, DNSSEC, DANE, local_policy).

Registered name: ``mx_auth``. Roles: MXAuthGroup. Each child of the block names a
policy module looked up as ``mx_auth.<name>`` (A-92, A-94); ``debug`` is accepted too.
However the block lists them, policies run in the order declared by :data:`ORDER`
(C-1), so that ``local_policy`` judges last, on the levels the others established. A
top-level group shared with ``&name`` is one object: one MTA-STS cache for every
target that references it (A-85).
"""

from __future__ import annotations

from collections.abc import Sequence

from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode
from maddylite.config.values import parse_bool
from maddylite.interfaces import MXAuthGroup as MXAuthGroupRole
from maddylite.interfaces import MXAuthPolicy
from maddylite.log import Logger
from maddylite.registry import Builder, ModuleBase, register

#: The order policies run in, whatever order the block lists them (C-1).
ORDER = ("mtasts", "sts_preload", "dane", "dnssec", "local_policy")


@register("mx_auth")
class MXAuth(ModuleBase):
    """MXAuth is the ``mx_auth`` block: an ordered set of policies (registered as ``mx_auth``)."""

    roles = (MXAuthGroupRole,)

    def configure_block(self, inline: Sequence[str], block: ConfigNode, builder: Builder) -> None:
        """configure_block creates each listed policy as a private child module."""
        if inline:
            raise ConfigError(f"unknown module: {inline[0]} (namespace: )").at_node(block)
        self.debug = bool(builder.global_values.get("debug", False))
        self.log = Logger("mx_auth", self.debug)
        found: dict[str, ModuleBase] = {}
        seen_debug = False
        for node in block.block:
            if node.name == "debug":
                if seen_debug:
                    raise ConfigError("duplicate directive: debug").at_node(node)
                seen_debug = True
                try:
                    if node.has_block:
                        raise ConfigError("can't declare block here")
                    self.debug = parse_bool(node.args)
                except ConfigError as e:
                    raise e.at_node(node) from None
                continue
            policy = builder.inline_module(node.name, node.args, node, role=MXAuthPolicy, namespace="mx_auth", ref=node)
            short = policy.mod_name.rsplit(".", 1)[-1]
            if short in found:
                raise ConfigError(f"duplicate policy block: {short}").at_node(node)
            found[short] = policy
            words = tuple(node.args)

            def warn(msg: str, node: ConfigNode = node) -> None:
                builder.warnings.append(f"{node.pos()}: {msg}")

            policy.inline_words(words, warn)  # type: ignore[attr-defined]
        self._policies = tuple(found[n] for n in ORDER if n in found) + tuple(
            p for n, p in found.items() if n not in ORDER
        )

    def start(self) -> None:
        """start logs the configuration warnings collected for this group."""

    def policies(self) -> tuple[MXAuthPolicy, ...]:
        """policies returns the policies in execution order."""
        return self._policies  # type: ignore[return-value]
