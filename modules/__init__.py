"""The built-in modules: this explicit list is the only place they are loaded from.

Importing a module file registers its classes (maddylite.registry.register). There is no
directory scanning.
"""

from maddylite.modules import (
    dummy,  # noqa: F401  "dummy"
    limits,  # noqa: F401  "limits"
)
from maddylite.modules.endpoint import smtp  # noqa: F401  "smtp"

__all__ = ["dummy", "dnssec", "limits", "local_policy", "mx_auth", "remote", "smtp", "sts_preload"]
