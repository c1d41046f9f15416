"""The built-in modules: this explicit list is the only place they are loaded from.

Importing a module file registers its classes (maddylite.registry.register). There is no
directory scanning.
"""

from maddylite.modules import (
    dummy,  # "dummy"
    limits,  # "limits"
    mx_auth,  # "mx_auth"
)
from maddylite.modules.checks import command  # "check.command"
from maddylite.modules.endpoint import smtp  # "smtp"
from maddylite.modules.mx_auth import (
    dane,  # "mx_auth.dane"
    dnssec,  # "mx_auth.dnssec"
    local_policy,  # "mx_auth.local_policy"
    mtasts,  # "mx_auth.mtasts"
    sts_preload,  # "mx_auth.sts_preload"
)
from maddylite.modules.target import (
    queue,  # "target.queue"
    remote,  # "target.remote"
)

__all__ = ["command", "dane", "dummy", "dnssec", "limits", "local_policy", "mtasts", "mx_auth", "queue", "remote", "smtp", "sts_preload"]
