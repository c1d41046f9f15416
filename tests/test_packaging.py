"""Packaging guards: the wheel's package list, no stray top-level ``modules``, grammar reachable."""

import importlib.util
import re
import tomllib
from pathlib import Path

import maddylite.modules

REPO = Path(__file__).resolve().parent.parent


def _declared():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data["tool"]["setuptools"]


def test_package_list_matches_directories():
    """Every folder with __init__.py under maddylite/, modules/, grammar/ is in `packages`."""
    found = set()
    for top, dotted in (("maddylite", "maddylite"), ("modules", "maddylite.modules"), ("grammar", "maddylite.grammar")):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top)
            found.add(".".join([dotted, *rel.parts]) if rel.parts else dotted)
    assert set(_declared()["packages"]) == found


def test_no_top_level_modules_package():
    """No package named `modules` is importable (run tests with `pytest`, not `python -m pytest`)."""
    assert importlib.util.find_spec("modules") is None


def test_modules_path_points_into_modules_dir():
    """maddylite.modules is the repository's modules/ folder (editable install)."""
    paths = [Path(p).resolve() for p in maddylite.modules.__path__]
    assert paths == [REPO / "modules"] or all(p.name == "modules" for p in paths)


def test_grammar_loads_through_package():
    """The grammar is package data of maddylite.grammar."""
    from importlib import resources

    text = resources.files("maddylite.grammar").joinpath("maddy.lark").read_text()
    assert "%import" in text or ":" in text


def test_default_config_is_package_data():
    """The embedded default configuration ships inside the package."""
    assert "default.conf" in _declared()["package-data"]["maddylite"]
    from maddylite.runtime import embedded_default_config

    assert "smtp" in embedded_default_config()


def test_no_import_of_top_level_modules():
    """Source never imports the top-level name `modules`."""
    bad = re.compile(r"^\s*(import modules\b|from modules\b)", re.M)
    for base in ("maddylite", "modules", "tests", "bench"):
        for f in (REPO / base).rglob("*.py"):
            assert not bad.search(f.read_text()), f
