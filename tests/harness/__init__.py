"""Real-peer test harness: Postfix MXes, a validating unbound over signed zones (nsd),
nginx MTA-STS hosts and misbehaving servers, inside a network namespace.

From pytest: the session fixture ``harness`` in ``harness.fixtures`` (or
``require_harness()``).  By hand: ``python -m tests.harness up|down|status|shell|list``.
"""

from .core import Harness, HarnessError, LogMark, ReceivedMessage
from .model import Host, MtaSts, Scenario, Tlsa, load_world

__all__ = [
    "Harness",
    "HarnessError",
    "Host",
    "LogMark",
    "MtaSts",
    "ReceivedMessage",
    "Scenario",
    "Tlsa",
    "load_world",
]
