"""``maddylite run`` with the MX port pointed at a private sink: python -m bench.serve CONFIG MX_PORT.

The only difference from ``maddylite run --config CONFIG`` is target.remote's
``smtp_port`` (its test hook): MX and address lookups are the same, the TCP port is the
benchmark's own sink on the bench MX's address.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from maddylite.modules.target.remote import RemoteTarget  # noqa: E402

from maddylite.cli import main  # noqa: E402

if __name__ == "__main__":
    RemoteTarget.smtp_port = int(sys.argv[2])
    sys.exit(main(["run", "--config", sys.argv[1]]))
