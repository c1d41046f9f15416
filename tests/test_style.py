"""House rules as tests: help text, docstrings, lowercase errors, no bare except."""

import ast
import re
from pathlib import Path

import pytest

from maddylite.registry import MODULES, load_builtins

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(REPO / "maddylite").rglob("*.py"), *(REPO / "modules").rglob("*.py")])

load_builtins()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_has_docstring_and_help(name):
    """Every registered module has a docstring, and every directive a help text."""
    cls = MODULES[name]
    assert cls.__doc__ and cls.__doc__.strip()
    import sys

    assert sys.modules[cls.__module__].__doc__, f"{cls.__module__} needs a module docstring"
    for d in cls.directives:
        assert d.help.strip(), f"{name}.{d.name}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_bare_except(path):
    """No bare `except:` anywhere."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler):
            assert node.type is not None, f"{path}:{node.lineno}: bare except"


_MSG = re.compile(r"ConfigError\(\s*f?\"([^\"]*)\"")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_errors_are_lowercase_sentences(path):
    """ConfigError messages start lowercase and have no trailing period."""
    for m in _MSG.finditer(path.read_text()):
        msg = m.group(1)
        if not msg or msg.startswith("{"):
            continue
        assert not msg[0].isupper(), f"{path}: {msg!r}"
        assert not msg.endswith("."), f"{path}: {msg!r}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_satisfies_declared_roles(name):
    """Every registered class has the methods of the roles it declares (an interface guard)."""
    cls = MODULES[name]
    for role in cls.roles:
        missing = [m for m in dir(role) if not m.startswith("_") and callable(getattr(role, m, None)) and not hasattr(cls, m)]
        assert not missing, f"{name} lacks {missing} of {role.__name__}"
