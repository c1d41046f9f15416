"""Golden tests for maddylite/config/parser.py: whole configurations and their results.

Each ``golden/*.conftest`` file holds configuration text, a separator line of ten dashes,
then either the expected tree (``ConfigNode.render()`` of each top-level node) or one line
``error: <file>:<line>:<col>: <message>``. The configuration is parsed under the golden
file's own name, so error positions point into the golden file itself.

Run with ``MADDYLITE_UPDATE_GOLDEN=1`` to rewrite the expected part from the current
output (then review the diff).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maddylite.config.errors import ConfigError
from maddylite.config.parser import parse_string

GOLDEN = Path(__file__).resolve().parent / "golden"
SEPARATOR = "-" * 10
ENV = {"GOLDEN_HOST": "mx.example.org", "GOLDEN_NAME": "debug"}
CASES = sorted(GOLDEN.glob("*.conftest"))


def split(path: Path) -> tuple[str, str]:
    """split returns the configuration and the expected text of a golden file."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    assert SEPARATOR in lines, f"{path.name}: no separator line"
    cut = lines.index(SEPARATOR)
    return "\n".join(lines[:cut]) + "\n", "\n".join(lines[cut + 1 :]).strip("\n")


def actual(path: Path, config: str) -> str:
    """actual renders what the parser makes of ``config``."""
    try:
        nodes = parse_string(config, filename=path.name, env=ENV, base_dir=str(GOLDEN))
    except ConfigError as err:
        assert err.positioned
        return f"error: {err}"
    return "\n".join(node.render() for node in nodes)


def test_enough_golden_files():
    """The golden set covers both trees and errors."""
    errors = [p for p in CASES if p.name.startswith("err_")]
    assert len(CASES) >= 15 and len(errors) >= 8


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden(path):
    config, expected = split(path)
    got = actual(path, config)
    if os.environ.get("MADDYLITE_UPDATE_GOLDEN") == "1" and got != expected:
        path.write_text(f"{config}{SEPARATOR}\n{got}\n", encoding="utf-8")
        pytest.skip("golden file updated")
    assert got == expected
