"""Directive declarations and the one processor that applies them.

A module declares each directive once, as keyword-only data::

    directives = (
        Directive(name="conn_reuse_limit", type=Int(), default=10,
                  help="How many transactions one SMTP connection may carry."),
        Directive(name="hostname", type=Hostname(), required=True, inherit_global=True,
                  help="Name sent in EHLO."),
    )

:func:`process` is the only code that reads a module block's child nodes: it reports
unknown, duplicate and missing-required directives and bad values with their positions,
fills in inherited globals and defaults, and returns a frozen :class:`Settings`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from maddylite.config import values
from maddylite.config.errors import ConfigError
from maddylite.config.nodes import ConfigNode

if TYPE_CHECKING:  # pragma: no cover
    from maddylite.registry import Builder


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


#: Marker for "this directive has no default value".
NO_DEFAULT: Any = _NoDefault()


class ValueType:
    """ValueType turns a directive node into a value; subclasses are the directive types.

    ``takes_block`` says whether the directive may carry a ``{ }`` block. ``syntax`` is
    the argument summary shown by ``maddylite directives``.
    """

    syntax = "value"
    takes_block = False

    def parse(self, node: ConfigNode, builder: Builder | None) -> Any:
        """parse returns the typed value of ``node`` or raises a position-less ConfigError."""
        if node.has_block and not self.takes_block:
            raise ConfigError("can't declare block here")
        return self.parse_args(node.args)

    def parse_args(self, args: Sequence[str]) -> Any:
        """parse_args parses the argument list of a block-less directive."""
        raise NotImplementedError

    def is_empty(self, value: Any) -> bool:
        """is_empty tells whether a value (usually an inherited global) counts as unset."""
        return value is None or value == "" or value == () or value == []


class Bool(ValueType):
    """Bool is ``yes|no`` (and maddy's other spellings); a bare directive means yes."""

    syntax = "yes|no"

    def parse_args(self, args: Sequence[str]) -> bool:
        return values.parse_bool(args)

    def is_empty(self, value: Any) -> bool:
        return value is None


@dataclass(frozen=True)
class Int(ValueType):
    """Int is one decimal integer, optionally bounded."""

    minimum: int | None = None
    maximum: int | None = None
    syntax = "integer"

    def parse_args(self, args: Sequence[str]) -> int:
        return values.parse_int(args, minimum=self.minimum, maximum=self.maximum)

    def is_empty(self, value: Any) -> bool:
        return value is None or value == 0


@dataclass(frozen=True)
class Float(ValueType):
    """Float is one decimal number (``retry_time_scale 1.2``)."""

    minimum: float | None = None
    syntax = "number"

    def parse_args(self, args: Sequence[str]) -> float:
        return values.parse_float(args, minimum=self.minimum)


class Duration(ValueType):
    """Duration is Go duration syntax, in seconds; parts may be separate arguments."""

    syntax = "duration"

    def parse_args(self, args: Sequence[str]) -> float:
        return values.parse_duration(args)


def format_duration(seconds: float) -> str:
    """format_duration renders seconds the way a config would write them: ``12m``, ``1h30m``, ``0``."""
    if seconds == 0:
        return "0"
    out = []
    rest = seconds
    for unit, size in (("h", 3600), ("m", 60)):
        if rest >= size:
            n = int(rest // size)
            out.append(f"{n}{unit}")
            rest -= n * size
    if rest:
        out.append(f"{rest:g}s")
    return "".join(out)


class DataSize(ValueType):
    """DataSize is a byte count written with G, M, K or B suffixes."""

    syntax = "size"

    def parse_args(self, args: Sequence[str]) -> int:
        return values.parse_data_size(args)


@dataclass(frozen=True)
class Enum(ValueType):
    """Enum is one of fixed words, mapped to a value (the word itself by default)."""

    choices: tuple[str, ...] = ()
    mapping: Mapping[str, Any] | None = None

    @property
    def syntax(self) -> str:  # type: ignore[override]
        return "|".join(self.choices)

    def parse_args(self, args: Sequence[str]) -> Any:
        word = values.parse_enum(args, self.choices)
        return self.mapping[word] if self.mapping else word


class String(ValueType):
    """String is exactly one argument."""

    syntax = "string"

    def parse_args(self, args: Sequence[str]) -> str:
        return values.parse_string(args)


@dataclass(frozen=True)
class StringList(ValueType):
    """StringList is one or more arguments kept as a tuple."""

    min_args: int = 1
    syntax = "values..."

    def parse_args(self, args: Sequence[str]) -> tuple[str, ...]:
        if len(args) < self.min_args:
            raise ConfigError(f"at least {self.min_args} argument(s) required")
        return tuple(args)


@dataclass(frozen=True)
class Address:
    """Address is a parsed network endpoint address: ``tcp://host:port`` and friends."""

    scheme: str
    host: str
    port: int
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_address(text: str) -> Address:
    """parse_address reads ``tcp://host:port``, ``tls://host:port`` or ``unix://path``."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("tcp", "tls", "unix"):
        raise ConfigError(f"invalid address {text!r}: expected tcp://host:port, tls://host:port or unix://path")
    if scheme == "unix":
        if not rest:
            raise ConfigError(f"invalid address {text!r}: empty socket path")
        return Address(scheme, "", 0, rest)
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ConfigError(f"invalid address {text!r}: expected [host]:port")
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"invalid address {text!r}: bad IPv6 address") from None
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host:
            raise ConfigError(f"invalid address {text!r}: expected host:port")
        if ":" in host:
            raise ConfigError(f"invalid address {text!r}: IPv6 addresses must be in brackets")
    if not values.ascii_digits(port_text) or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"invalid address {text!r}: bad port {port_text!r}")
    return Address(scheme, host, int(port_text))


class AddressList(ValueType):
    """AddressList is one or more endpoint addresses."""

    syntax = "address..."

    def parse_args(self, args: Sequence[str]) -> tuple[Address, ...]:
        if not args:
            raise ConfigError("at least one address is required")
        return tuple(parse_address(a) for a in args)


@dataclass(frozen=True)
class ModuleRef(ValueType):
    """ModuleRef is a module: ``&name`` (shared top-level instance) or an inline block.

    ``role`` is the interface the module must implement (see maddylite.interfaces);
    ``namespace`` is tried first for inline names (``remote`` → ``target.remote``).
    """

    role: type = object
    namespace: str = ""
    takes_block = True

    @property
    def syntax(self) -> str:  # type: ignore[override]
        return f"&name | module [args] {{ ... }}  ({getattr(self.role, '__name__', 'module')})"

    def parse(self, node: ConfigNode, builder: Builder | None) -> Any:
        if builder is None:  # pragma: no cover - documentation-only use
            raise ConfigError("module references need a builder")
        return builder.module_from_node(node, role=self.role, namespace=self.namespace)


@dataclass(frozen=True)
class Custom(ValueType):
    """Custom hands the whole node to a callable ``fn(node, builder) -> value``."""

    fn: Callable[[ConfigNode, Any], Any] = lambda node, builder: node
    syntax_text: str = "block"
    takes_block = True

    @property
    def syntax(self) -> str:  # type: ignore[override]
        return self.syntax_text

    def parse(self, node: ConfigNode, builder: Builder | None) -> Any:
        return self.fn(node, builder)


@dataclass(frozen=True, kw_only=True)
class Directive:
    """Directive declares one configuration directive of a module (or a global).

    All fields are keyword-only; ``help`` is mandatory. ``inherit_global`` takes the
    top-level directive of the same name when the block has none. ``repeatable`` keeps
    every occurrence (the value is then a tuple).
    """

    name: str
    type: ValueType
    help: str
    default: Any = NO_DEFAULT
    default_factory: Callable[[], Any] | None = None
    required: bool = False
    inherit_global: bool = False
    repeatable: bool = False

    def __post_init__(self) -> None:
        if not self.help.strip():
            raise ValueError(f"directive {self.name}: help text is mandatory")

    def default_value(self) -> Any:
        """default_value returns the declared default (or NO_DEFAULT)."""
        if self.default_factory is not None:
            return self.default_factory()
        return self.default

    def default_text(self) -> str:
        """default_text renders the default for documentation."""
        if self.required and self.default is NO_DEFAULT and self.default_factory is None:
            return "global directive value (required)" if self.inherit_global else "required"
        value = self.default
        if self.default_factory is not None:
            value = "computed"
        if value is NO_DEFAULT or value is None:
            text = "not set"
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(self.type, Duration) and isinstance(value, (int, float)):
            text = format_duration(float(value))
        else:
            text = str(value)
        if self.inherit_global:
            text = f"global directive value, else {text}"
        return text


@dataclass(frozen=True)
class Settings:
    """Settings is the frozen result of processing a block: attribute access by name."""

    _values: Mapping[str, Any] = field(default_factory=dict)
    #: The nodes each directive came from, for errors found later in configure().
    _nodes: Mapping[str, ConfigNode] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def get(self, name: str, default: Any = None) -> Any:
        """get returns a value or ``default``."""
        return self._values.get(name, default)

    def node(self, name: str) -> ConfigNode | None:
        """node returns the node a directive was read from, or None if defaulted."""
        return self._nodes.get(name)

    def given(self, name: str) -> bool:
        """given tells whether the directive was written in the block itself."""
        return name in self._nodes

    def as_dict(self) -> dict[str, Any]:
        """as_dict returns a plain copy of the values."""
        return dict(self._values)


def process(
    specs: Iterable[Directive],
    nodes: Iterable[ConfigNode],
    *,
    block: ConfigNode | None,
    globals_: Mapping[str, Any] | None = None,
    builder: Builder | None = None,
    allow_unknown: bool = False,
    unknown: list[ConfigNode] | None = None,
) -> Settings:
    """process applies directive declarations to a block's child nodes.

    ``block`` is the node that owns the children (its position is used for
    missing-directive errors). With ``allow_unknown`` the unknown children are appended
    to ``unknown`` instead of being errors (group modules such as ``mx_auth``).
    """
    table = {d.name: d for d in specs}
    seen: dict[str, ConfigNode] = {}
    out: dict[str, Any] = {}
    for node in nodes:
        spec = table.get(node.name)
        if spec is None:
            if allow_unknown:
                if unknown is not None:
                    unknown.append(node)
                continue
            raise ConfigError(f"unexpected directive: {node.name}").at_node(node)
        if node.name in seen and not spec.repeatable:
            raise ConfigError(f"duplicate directive: {node.name}").at_node(node)
        try:
            value = spec.type.parse(node, builder)
        except ConfigError as e:
            if not e.positioned and e.message and not e.message.startswith(node.name):
                e.message = f"{node.name}: {e.message}"
            raise e.at_node(node) from None
        if spec.repeatable:
            out[node.name] = out.get(node.name, ()) + (value,)
        else:
            out[node.name] = value
        seen.setdefault(node.name, node)
    globals_ = globals_ or {}
    for spec in table.values():
        if spec.name in out:
            continue
        if spec.inherit_global and spec.name in globals_:
            gval = globals_[spec.name]
            # maddy's rule: a zero or empty global does not satisfy a required directive.
            if not (spec.required and spec.type.is_empty(gval)):
                out[spec.name] = gval
                continue
        default = spec.default_value()
        if default is not NO_DEFAULT:
            out[spec.name] = default
            continue
        if spec.required:
            err = ConfigError(f"missing required directive: {spec.name}")
            if block is not None:
                err.at_node(block)
            raise err
        out[spec.name] = () if spec.repeatable else None
    return Settings(out, seen)
