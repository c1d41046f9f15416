"""Value parsers for directive arguments: booleans, integers, durations, data sizes.

Each parser takes the directive's argument list and returns the typed value or raises a
position-less :class:`ConfigError`; the directive processor attaches the position. The
accepted spellings are those of maddy's ``framework/config/map.go`` with the corrections
listed in behaviour.md (A-68..A-76).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from maddylite.config.errors import ConfigError

_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}


def parse_bool(args: Sequence[str]) -> bool:
    """parse_bool reads a boolean; no argument means true (A-72)."""
    if not args:
        return True
    if len(args) != 1:
        raise ConfigError("expected exactly 1 argument")
    word = args[0].lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError("bool argument should be 'yes' or 'no'")


_INT_RE = re.compile(r"[+-]?[0-9]+")


def ascii_digits(text: str) -> bool:
    """ascii_digits tells whether ``text`` is one or more of 0-9. (``str.isdigit`` also takes
    ``²`` and the digits of other scripts, which ``int`` refuses or reads as numbers.)"""
    return text.isascii() and text.isdigit()


def integer_text(text: str) -> bool:
    """integer_text tells whether ``text`` is a decimal integer with an optional sign (A-73)."""
    return _INT_RE.fullmatch(text) is not None


def parse_int(args: Sequence[str], *, minimum: int | None = None, maximum: int | None = None) -> int:
    """parse_int reads one decimal integer with an optional sign (A-73)."""
    if len(args) != 1:
        raise ConfigError("expected 1 argument")
    text = args[0]
    if not integer_text(text):
        raise ConfigError(f"invalid integer: {text}")
    value = int(text, 10)
    if minimum is not None and value < minimum:
        raise ConfigError(f"value must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"value must be at most {maximum}, got {value}")
    return value


_FLOAT_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")


def parse_float(args: Sequence[str], *, minimum: float | None = None) -> float:
    """parse_float reads one decimal number such as ``1.2`` (no exponent, no inf/nan)."""
    if len(args) != 1:
        raise ConfigError("expected 1 argument")
    if not _FLOAT_RE.fullmatch(args[0]):
        raise ConfigError(f"invalid number: {args[0]}")
    value = float(args[0])
    if minimum is not None and value < minimum:
        raise ConfigError(f"value must be at least {minimum}, got {args[0]}")
    return value


# Go's time.ParseDuration units, in nanoseconds.
_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_MAX_NS = (1 << 63) - 1
_DUR_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


def parse_duration_text(text: str) -> float:
    """parse_duration_text parses Go duration syntax and returns seconds (A-68, A-69).

    The value is computed in integer nanoseconds (as Go does) so that ``2562047h`` is
    accepted and ``2562048h`` (above 2^63-1 ns) is not.
    """
    orig = text
    if text == "":
        raise ConfigError('invalid duration ""')
    neg = False
    if text[0] in "+-":
        neg = text[0] == "-"
        text = text[1:]
    if text == "0":
        return 0.0
    if text == "":
        raise ConfigError(f'invalid duration "{orig}"')
    total_ns = 0
    pos = 0
    while pos < len(text):
        m = _DUR_PART.match(text, pos)
        if m is None or m.end() == pos:
            raise ConfigError(f'invalid duration "{orig}"')
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if whole == "" and not frac:
            raise ConfigError(f'invalid duration "{orig}"')
        if unit == "":
            raise ConfigError(f'missing unit in duration "{orig}"')
        if unit not in _UNITS_NS:
            raise ConfigError(f'unknown unit "{unit}" in duration "{orig}"')
        scale = _UNITS_NS[unit]
        part = int(whole or "0") * scale
        if frac:
            part += int(frac) * scale // (10 ** len(frac))
        total_ns += part
        if total_ns > _MAX_NS:
            raise ConfigError(f'invalid duration "{orig}"')
        pos = m.end()
    if neg and total_ns != 0:
        raise ConfigError("duration must not be negative")
    return total_ns / 1e9


def parse_duration(args: Sequence[str]) -> float:
    """parse_duration joins the arguments without a separator and parses them (A-68)."""
    if not args:
        raise ConfigError("at least one argument is required")
    text = "".join(args)
    if any(ch.isspace() for ch in text):
        raise ConfigError(f'invalid duration "{text}"')
    return parse_duration_text(text)


_SIZE_SUFFIX = {"G": 1024**3, "M": 1024**2, "K": 1024, "B": 1, "b": 1}


def parse_data_size(args: Sequence[str]) -> int:
    """parse_data_size reads ``32M``, ``3M 5K`` and similar binary sizes (A-70, A-71)."""
    if not args:
        raise ConfigError("at least one argument is required")
    text = " ".join(args)
    total = 0
    for part in text.split(" "):
        if part == "":
            raise ConfigError("missing a number")
        digits = 0
        while digits < len(part) and part[digits].isascii() and part[digits].isdigit():
            digits += 1
        if digits == 0:
            raise ConfigError(f"missing a number in data size: {part}")
        number = int(part[:digits])
        rest = part[digits:]
        if rest == "":
            if number == 0:
                continue
            raise ConfigError(f"unknown unit suffix in data size: {part}")
        if rest[0] not in _SIZE_SUFFIX:
            raise ConfigError(f"unknown unit suffix in data size: {part}")
        if len(rest) > 1:
            if rest[1].isdigit():
                raise ConfigError(f"unexpected digit after a suffix in data size: {part}")
            raise ConfigError(f"unknown unit suffix in data size: {part}")
        total += number * _SIZE_SUFFIX[rest[0]]
    return total


def parse_enum(args: Sequence[str], allowed: Sequence[str]) -> str:
    """parse_enum accepts exactly one of ``allowed``, case-sensitively (A-75)."""
    if len(args) != 1:
        raise ConfigError("expected 1 argument")
    if args[0] not in allowed:
        raise ConfigError(f"invalid argument, valid values are: [{' '.join(allowed)}]")
    return args[0]


def parse_string(args: Sequence[str]) -> str:
    """parse_string takes exactly one argument (A-76)."""
    if len(args) != 1:
        raise ConfigError("expected 1 argument")
    return args[0]
