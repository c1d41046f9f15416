"""Entry point for ``python -m maddylite``."""

from maddylite.cli import main

raise SystemExit(main())
