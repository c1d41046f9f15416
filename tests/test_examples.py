"""Every file under examples/ and the embedded default configuration parse and configure."""

from pathlib import Path

import pytest

from maddylite.runtime import ConfigSource, Runtime, embedded_default_config

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.conf"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configures(path, tmp_path, monkeypatch):
    """An example parses, configures (no side effects) and has an endpoint."""
    rt = Runtime(ConfigSource(str(path)))
    rt.configure(require_endpoint=True)
    assert rt.modules, "an example must configure at least one module"
    assert any(m.mod_name == "smtp" for m in rt.modules)


def test_embedded_default_config_configures():
    """The embedded default configuration is valid and has an endpoint (A-103)."""
    rt = Runtime(ConfigSource(None, embedded_default_config()))
    rt.configure(require_endpoint=True)
    assert any(m.mod_name == "smtp" for m in rt.modules)


def test_examples_exist():
    """There is something to copy."""
    assert len(EXAMPLES) >= 2
