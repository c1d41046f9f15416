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

    from lark import Lark

    text = resources.files("maddylite.grammar").joinpath("maddy.lark").read_text()
    parser = Lark.open_from_package("maddylite.grammar", "maddy.lark", parser="lalr")
    assert parser.options.parser == "lalr" and text.strip()


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


def test_wheel_installs_and_runs_from_elsewhere(tmp_path):
    """A built wheel holds maddylite, maddylite.modules and the grammar, and no top-level `modules`;
    installed into a fresh venv it runs `maddylite check-config` from another directory."""
    import subprocess
    import sys
    import sysconfig
    import zipfile

    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                   check=True, cwd=tmp_path, timeout=300)
    (wheel,) = dist.glob("maddylite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "maddylite/grammar/maddy.lark" in names and "maddylite/default.conf" in names
    assert "maddylite/modules/target/remote.py" in names
    assert not any(n.startswith("modules/") for n in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)], check=True, timeout=300)
    # The dependencies come from the test environment, without its editable maddylite.
    deps = sysconfig.get_paths()["purelib"]
    (Path(site) / "deps.pth").write_text(deps + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    example = REPO / "examples" / "outbound-relay.conf"
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "maddylite", "check-config", str(example)],
                       cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import maddylite, importlib.util as u; print(maddylite.__file__, u.find_spec('modules'))"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith(site) and r.stdout.strip().endswith("None"), r.stdout + r.stderr
