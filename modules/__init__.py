"""The built-in modules: this explicit list is the only place they are loaded from.

Importing a module file registers its classes (maddylite.registry.register). There is no
directory scanning.
"""

from maddylite.modules import (
    dummy,  # "dummy"
    limits,  # "limits"
    mx_auth,  # "mx_auth"
)
from maddylite.modules.endpoint import smtp  # "smtp"
from maddylite.modules.mx_auth import (
    dnssec,  # "mx_auth.dnssec"
    local_policy,  # "mx_auth.local_policy"
    sts_preload,  # "mx_auth.sts_preload"
)
from maddylite.modules.target import remote  # "target.remote"

__all__ = ["dummy", "dnssec", "limits", "local_policy", "mx_auth", "remote", "smtp", "sts_preload"]
