"""Shared fixtures: config parsing and building, free ports, and the real-peer harness.

gevent's monkey patching comes first, so that blocking clients in tests (smtplib) and
the servers under test (gevent) cooperate in one process.
"""

from gevent import monkey

monkey.patch_all()

import importlib.util  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _register(name: str, path: Path, package: bool) -> None:
    """Make ``import <name>`` (the harness, the shared test helpers) work without putting
    tests/ on sys.path.

    Putting tests/ on sys.path would make its mirror folders (tests/modules, ...)
    importable as top-level packages and hide packaging mistakes.
    """
    if name in sys.modules or not path.exists():
        return
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if package else None
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)


_register("harness", TESTS / "harness" / "__init__.py", package=True)
_register("smtpstream", TESTS / "smtpstream.py", package=False)


@pytest.fixture
def greenlet_starts(monkeypatch):
    """greenlet_starts lists the names of the greenlets started through ``gevent.Greenlet``
    (as the code under test makes its own) from here to the end of the test."""
    import gevent

    started: list[str] = []

    class Counting(gevent.Greenlet):
        def start(self) -> None:
            started.append(self.name)
            super().start()

    monkeypatch.setattr(gevent, "Greenlet", Counting)
    return started


@pytest.fixture
def free_port() -> int:
    """free_port returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def build_config(tmp_path):
    """build_config parses text and configures a Runtime (no endpoint required)."""
    from maddylite.config.parser import parse_string
    from maddylite.runtime import ConfigSource, Runtime

    def build(text: str, *, require_endpoint: bool = False, filename: str | None = None):
        name = filename or str(tmp_path / "maddylite.conf")
        if "state_dir" not in text:
            text = f"state_dir {tmp_path / 'state'}\nruntime_dir {tmp_path / 'run'}\n" + text
        nodes = parse_string(text, filename=name, base_dir=str(tmp_path))
        rt = Runtime(ConfigSource(name))
        rt.configure(require_endpoint=require_endpoint, nodes=nodes)
        return rt

    return build


if "harness" in sys.modules:
    from harness.fixtures import harness  # noqa: E402,F401  (the session-scoped real-peer fixture)
