"""Typed values: durations, data sizes, booleans, integers, enums (behaviour.md A-68..A-76)."""

import pytest

from maddylite.config import values
from maddylite.config.errors import ConfigError


@pytest.mark.parametrize(
    "args,seconds",
    [
        (["0"], 0), (["0s"], 0), (["-0"], 0), (["1h"], 3600), (["1h", "5m"], 3900),
        (["1h5m"], 3900), (["1.5h"], 5400), (["90s"], 90), (["500ms"], 0.5),
        (["1us"], 1e-6), (["1µs"], 1e-6), ([".5s"], 0.5), (["5.s"], 5), (["+5m"], 300),
        (["1m1m"], 120), (["1m", "1m"], 120), (["2562047h"], 2562047 * 3600),
    ],
    ids=lambda v: "A-68 " + " ".join(v) if isinstance(v, list) else str(v),
)
def test_duration_valid_A_68(args, seconds):
    """A-68: valid durations and their exact values."""
    assert values.parse_duration(args) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["5"], "missing unit in duration"), (["1.5"], "missing unit in duration"),
        (["0.0"], "missing unit in duration"), (["00"], "missing unit in duration"),
        (["5m30"], "missing unit in duration"), (["-5m"], "duration must not be negative"),
        (["1d"], 'unknown unit "d"'), (["1H"], "unknown unit"), (["1e3s"], "unknown unit"),
        (["1h 5m"], "invalid duration"), (["1h", "-5m"], "duration \"1h-5m\""), ([""], "invalid duration"),
        (["2562048h"], "invalid duration"), ([], "at least one argument is required"),
    ],
    ids=lambda v: "A-69 " + "|".join(v) if isinstance(v, list) else "",
)
def test_duration_invalid_A_69(args, phrase):
    """A-69: invalid durations are errors naming the problem."""
    with pytest.raises(ConfigError) as e:
        values.parse_duration(args)
    assert phrase in str(e.value)


@pytest.mark.parametrize(
    "args,size",
    [
        (["32M"], 33554432), (["3M", "5K"], 3150848), (["3M 5K"], 3150848), (["5b"], 5),
        (["5B"], 5), (["1G"], 1073741824), (["1M", "1M"], 2097152), (["007K"], 7168),
        (["0"], 0), (["0K"], 0),
    ],
    ids=lambda v: "A-70 " + " ".join(v) if isinstance(v, list) else str(v),
)
def test_data_size_valid_A_70(args, size):
    """A-70: data sizes with binary suffixes."""
    assert values.parse_data_size(args) == size


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["32M5K"], "unexpected digit after a suffix"), (["1024"], "unknown unit suffix"),
        (["1k"], "unknown unit suffix"), (["1m"], "unknown unit suffix"), (["1KB"], "unknown unit suffix"),
        (["1.5M"], "unknown unit suffix"), (["-1M"], "missing a number"), (["KB"], "missing a number"),
        (["10", "M"], "unknown unit suffix"), (["3M  5K"], "missing a number"), ([""], "missing a number"),
        (["0X"], "unknown unit suffix"),
    ],
    ids=lambda v: "A-71 " + "|".join(v) if isinstance(v, list) else "",
)
def test_data_size_invalid_A_71(args, phrase):
    """A-71: invalid data sizes, including 0X which maddy accepts."""
    with pytest.raises(ConfigError) as e:
        values.parse_data_size(args)
    assert phrase in str(e.value)


@pytest.mark.parametrize(
    "args,expected",
    [([], True), (["yes"], True), (["true"], True), (["on"], True), (["1"], True), (["YES"], True),
     (["True"], True), (["no"], False), (["false"], False), (["off"], False), (["0"], False), (["FALSE"], False)],
)
def test_bool_valid_A_72(args, expected):
    """A-72: boolean spellings, case-insensitive; no argument means true."""
    assert values.parse_bool(args) is expected


@pytest.mark.parametrize("args,phrase", [(["y"], "bool argument should be 'yes' or 'no'"),
                                         (["enabled"], "bool argument should be 'yes' or 'no'"),
                                         ([""], "bool argument should be 'yes' or 'no'"),
                                         (["yes", "no"], "expected exactly 1 argument")])
def test_bool_invalid_A_72(args, phrase):
    """A-72: anything else is an error."""
    with pytest.raises(ConfigError, match=phrase):
        values.parse_bool(args)


@pytest.mark.parametrize("text,value", [("10", 10), ("+10", 10), ("-1", -1), ("010", 10)])
def test_int_valid_A_73(text, value):
    """A-73: decimal integers with optional sign and leading zeros."""
    assert values.parse_int([text]) == value


@pytest.mark.parametrize("args,phrase", [(["0x10"], "invalid integer: 0x10"), (["1e3"], "invalid integer: 1e3"),
                                         (["1_000"], "invalid integer: 1_000"), ([" 10"], "invalid integer:  10"),
                                         (["1", "2"], "expected 1 argument"),
                                         (["150s"], "invalid integer: 150s")])
def test_int_invalid_A_73_A_74(args, phrase):
    """A-73/A-74: hex, exponents, underscores, spaces and units are not integers."""
    with pytest.raises(ConfigError) as e:
        values.parse_int(args)
    assert phrase in str(e.value)


def test_enum_A_75():
    """A-75: enums are exact and list the valid values."""
    assert values.parse_enum(["ram"], ("ram", "fs")) == "ram"
    with pytest.raises(ConfigError) as e:
        values.parse_enum(["RAM"], ("ram", "fs"))
    assert "invalid argument, valid values are: [ram fs]" in str(e.value)


def test_string_A_76():
    """A-76: string directives take exactly one argument."""
    assert values.parse_string(["a"]) == "a"
    with pytest.raises(ConfigError, match="expected 1 argument"):
        values.parse_string(["a", "b"])


@pytest.mark.parametrize("port", ["²", "٢٥", "-1", "65536", ""])
def test_an_endpoint_port_is_ascii_digits_in_range(port):
    """A-73 (decimal digits): a port of other digits than 0-9, or out of range, is a
    configuration error, not a crash (``int("²")``) and not port 25 (``int("٢٥")``)."""
    from maddylite.config.directives import parse_address

    with pytest.raises(ConfigError) as e:
        parse_address(f"tcp://127.0.0.1:{port}")
    assert "bad port" in str(e.value)
    assert parse_address("tcp://127.0.0.1:25").port == 25


def test_ascii_digits_and_integer_text():
    assert values.ascii_digits("0123") and not values.ascii_digits("²") and not values.ascii_digits("١٢")
    assert not values.ascii_digits("") and not values.ascii_digits("+1")
    assert values.integer_text("-12") and values.integer_text("+0") and not values.integer_text("--1")
    assert not values.integer_text("١") and not values.integer_text("1.0")

