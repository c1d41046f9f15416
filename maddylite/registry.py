"""The module registry and the builder that turns a config tree into module instances.

Registration: ``@register("target.remote")`` on a :class:`ModuleBase` subclass; a
duplicate or malformed name raises at import time. The built-ins are imported by the
explicit list in ``maddylite.modules``.

Building (:class:`Builder`): top-level blocks are indexed by instance name and alias;
globals are processed once; endpoints are configured in file order, and every other
block is configured lazily on its first ``&name`` reference, so that one top-level
instance is one shared object. Reference cycles, unknown and wrong-kind references,
duplicates and unused blocks are positioned ConfigErrors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from maddylite.config.directives import Directive, Settings, process
from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode
from maddylite.interfaces import Endpoint

if TYPE_CHECKING:  # pragma: no cover
    from maddylite.runtime import Runtime

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")

#: Registered module classes by module name.
MODULES: dict[str, type[ModuleBase]] = {}

T = TypeVar("T", bound="type[ModuleBase]")


def register(name: str) -> Callable[[T], T]:
    """register adds a module class under ``name`` (dotted, lowercase)."""

    def deco(cls: T) -> T:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"malformed module name: {name!r}")
        if name in MODULES:
            raise ValueError(f"module {name!r} is already registered by {MODULES[name].__qualname__}")
        if not cls.__doc__:
            raise ValueError(f"module {name!r} needs a docstring")
        cls.name = name
        MODULES[name] = cls
        return cls

    return deco


def lookup(name: str) -> type[ModuleBase] | None:
    """lookup returns the class registered under ``name``, loading the built-ins first."""
    load_builtins()
    return MODULES.get(name)


def load_builtins() -> None:
    """load_builtins imports the explicit list of built-in modules (idempotent)."""
    import maddylite.modules  # noqa: F401  (the import registers them)


class ModuleBase:
    """ModuleBase is the base of every module: identity, directives and lifecycle.

    Subclasses set ``directives`` (a tuple of :class:`Directive`) and ``roles`` (the
    interfaces they implement), and override :meth:`configure`, :meth:`start` and
    :meth:`stop`. ``inline_args`` says how many arguments an inline use may carry
    (``target queue /var/q``): 0 means none.
    """

    #: The registered module name, set by @register.
    name: ClassVar[str] = ""
    #: Directive declarations, the single source for processing and documentation.
    directives: ClassVar[tuple[Directive, ...]] = ()
    #: Interfaces (classes from maddylite.interfaces) this module implements.
    roles: ClassVar[tuple[type, ...]] = ()
    #: Maximum number of inline arguments; 0 rejects them.
    inline_args: ClassVar[int] = 0

    def __init__(self, mod_name: str, instance_name: str, runtime: Runtime | None) -> None:
        self.mod_name = mod_name
        self.instance_name = instance_name
        self.runtime = runtime
        self.settings: Settings = Settings()

    @property
    def short_name(self) -> str:
        """short_name is the last part of the module name, used as a message prefix."""
        return self.mod_name.rsplit(".", 1)[-1]

    @property
    def label(self) -> str:
        """label names the instance in logs: ``target.remote/outbound``."""
        if self.instance_name and self.instance_name != self.mod_name:
            return f"{self.mod_name}/{self.instance_name}"
        return self.mod_name

    def configure_block(self, inline: Sequence[str], block: ConfigNode, builder: Builder) -> None:
        """configure_block processes the block with the declared directives, then configure()."""
        if len(inline) > self.inline_args:
            raise ConfigError(f"{self.short_name}: inline arguments are not used").at_node(block)
        settings = process(
            self.directives,
            block.block,
            block=block,
            globals_=builder.global_values,
            builder=builder,
        )
        self.settings = settings
        try:
            self.configure(tuple(inline), settings)
        except ConfigError as e:
            raise e.at_node(block) from None

    def configure(self, inline: tuple[str, ...], settings: Settings) -> None:
        """configure validates settings and derives values; it must be free of side effects."""

    def start(self) -> None:
        """start acquires resources; the default has none."""

    def stop(self, timeout: float) -> None:
        """stop releases resources; idempotent and safe after a partial start."""

    def early_stop(self) -> None:
        """early_stop stops taking new work before a replacement starts (reload)."""

    def resume(self) -> None:
        """resume undoes early_stop when a reload failed and this runtime stays (E-11)."""

    def refresh(self) -> None:
        """refresh re-reads external data without a config change (optional)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


@dataclass
class _Block:
    node: ConfigNode
    cls: type[ModuleBase]
    instance_name: str
    inline: tuple[str, ...]


def role_name(role: type) -> str:
    """role_name is the human name of an interface: MXAuthGroup → 'mx_auth group'."""
    return {
        "DeliveryTarget": "delivery target",
        "MXAuthGroup": "mx_auth group",
        "MXAuthPolicy": "mx_auth policy",
        "Limits": "limits block",
        "Endpoint": "endpoint",
    }.get(role.__name__, role.__name__)


class Builder:
    """Builder configures the module instances of one configuration tree.

    It is used once: :meth:`build` returns the instances in configuration-completion
    order (dependencies first), which is the order the lifetime starts them in.
    ``global_specs`` is the declaration of the global directives.
    """

    def __init__(
        self,
        nodes: Sequence[ConfigNode],
        global_specs: Iterable[Directive],
        runtime: Runtime | None = None,
    ) -> None:
        load_builtins()
        self.nodes = list(nodes)
        self.global_specs = tuple(global_specs)
        self.runtime = runtime
        self.global_values: dict[str, Any] = {}
        self.globals: Settings = Settings()
        self._blocks: dict[str, _Block] = {}
        self._endpoint_blocks: list[_Block] = []
        self._instances: dict[str, ModuleBase] = {}
        self._stack: list[tuple[str, ConfigNode]] = []
        self.order: list[ModuleBase] = []
        self.endpoints: list[ModuleBase] = []
        self.warnings: list[str] = []

    # -- building ----------------------------------------------------------------

    def build(self, *, require_endpoint: bool = True) -> list[ModuleBase]:
        """build configures everything and runs the whole-config checks (A-103)."""
        global_names = {d.name for d in self.global_specs}
        global_nodes = []
        for node in self.nodes:
            if node.name in global_names:
                global_nodes.append(node)
                continue
            cls = lookup(node.name)
            if cls is None:
                raise ConfigError(f"unknown module or global directive: {node.name}").at_node(node)
            self._index_block(node, cls)
        self.globals = process(self.global_specs, global_nodes, block=None, builder=self)
        self.global_values = {k: v for k, v in self.globals.as_dict().items() if v is not None}

        for blk in self._endpoint_blocks:
            inst = self._create(blk.cls, blk.instance_name, blk.inline, blk.node)
            self.endpoints.append(inst)
        if not self._endpoint_blocks:
            if require_endpoint:
                err = ConfigError("at least one endpoint should be configured")
                if self.nodes:
                    raise err.at_node(self.nodes[0])
                source = getattr(self.runtime, "source", None)  # an empty file: its start
                raise err.at(source.name, 1, 1) if source is not None else err
            self.warnings.append("at least one endpoint should be configured")
            # With no endpoint no block counts as unused, but every block is checked.
            for name, blk in list(self._blocks.items()):
                if name == blk.instance_name:
                    self.get_instance(name, blk.node)
        else:
            seen: set[int] = set()
            for blk in self._blocks.values():
                if id(blk) in seen:
                    continue
                seen.add(id(blk))
                if blk.instance_name not in self._instances:
                    raise ConfigError("unused configuration block").at_node(blk.node)
        return self.order

    def _index_block(self, node: ConfigNode, cls: type[ModuleBase]) -> None:
        if Endpoint in cls.roles:
            self._endpoint_blocks.append(_Block(node, cls, cls.name, tuple(node.args)))
            return
        names = list(node.args) or [node.name]
        blk = _Block(node, cls, names[0], ())
        for n in names:
            if n.startswith("&"):
                raise ConfigError(f"invalid instance name: {n}").at_node(node)
            if n in self._blocks:
                raise ConfigError(f"config block named {n} already exists").at_node(node)
            self._blocks[n] = blk

    def _create(
        self, cls: type[ModuleBase], instance_name: str, inline: Sequence[str], node: ConfigNode
    ) -> ModuleBase:
        inst = cls(cls.name, instance_name, self.runtime)
        inst.configure_block(inline, node, self)
        self.order.append(inst)
        return inst

    # -- references ----------------------------------------------------------------

    def get_instance(self, name: str, ref: ConfigNode) -> ModuleBase:
        """get_instance returns the shared top-level instance ``name``, configuring it once."""
        blk = self._blocks.get(name)
        if blk is None:
            raise ConfigError(f"no such instance registered: {name}").at_node(ref)
        key = blk.instance_name
        if key in self._instances:
            return self._instances[key]
        if any(k == key for k, _ in self._stack):
            chain = [f"{k} ({n.pos()})" for k, n in self._stack] + [f"{key} ({ref.pos()})"]
            start = next(i for i, (k, _) in enumerate(self._stack) if k == key)
            raise ConfigError("reference cycle: " + " -> ".join(chain[start:])).at_node(ref)
        self._stack.append((key, ref))
        try:
            inst = self._create(blk.cls, blk.instance_name, (), blk.node)
        finally:
            self._stack.pop()
        self._instances[key] = inst
        return inst

    def instance(self, name: str) -> ModuleBase | None:
        """instance returns the configured top-level instance called ``name`` (or an alias)."""
        blk = self._blocks.get(name)
        return self._instances.get(blk.instance_name) if blk is not None else None

    def current_instance(self) -> str | None:
        """current_instance is the top-level instance being configured right now, if any."""
        return self._stack[-1][0] if self._stack else None

    def resolves_to(self, ref: str, instance_name: str) -> bool:
        """resolves_to tells whether ``&name`` refers to the instance ``instance_name``."""
        if not ref.startswith("&"):
            return False
        blk = self._blocks.get(ref[1:])
        return blk is not None and blk.instance_name == instance_name

    def module_from_node(self, node: ConfigNode, *, role: type, namespace: str = "") -> Any:
        """module_from_node resolves a module-valued directive: ``&name`` or an inline block.

        ``node.args[0]`` is ``&name`` or a module name looked up as
        ``<namespace>.<name>`` first, then bare (A-92); the remaining arguments are the
        inline module's arguments and the node's block is its configuration.
        """
        if not node.args:
            # ``mx_auth { ... }`` or a bare ``mx_auth``: the directive names the module.
            return self.inline_module(node.name, (), node, role=role, namespace=namespace, ref=node)
        first = node.args[0]
        if first.startswith("&"):
            if len(node.args) != 1 or node.has_block:
                raise ConfigError(
                    "exactly one argument is required to use existing config block"
                ).at_node(node)
            inst = self.get_instance(first[1:], node)
            self.check_role(inst, role, node, first[1:])
            return inst
        return self.inline_module(first, node.args[1:], node, role=role, namespace=namespace, ref=node)

    def inline_module(
        self,
        name: str,
        inline: Sequence[str],
        block: ConfigNode,
        *,
        role: type,
        namespace: str,
        ref: ConfigNode,
    ) -> ModuleBase:
        """inline_module creates a private instance of module ``name`` from ``block``."""
        cls = None
        if namespace:
            cls = lookup(f"{namespace}.{name}")
        if cls is None:
            cls = lookup(name)
        if cls is None:
            raise ConfigError(f"unknown module: {name} (namespace: {namespace})").at_node(ref)
        if role not in cls.roles:
            raise ConfigError(
                f"module {cls.name} cannot be used here: a {role_name(role)} is expected"
            ).at_node(ref)
        return self._create(cls, "", inline, block)

    def check_role(self, inst: ModuleBase, role: type, node: ConfigNode, name: str) -> None:
        """check_role rejects an instance that does not play ``role`` (A-89)."""
        if role not in type(inst).roles:
            raise ConfigError(
                f"instance {name} is a {inst.mod_name} block, "
                f"but a {role_name(role)} is expected here"
            ).at_node(node)
