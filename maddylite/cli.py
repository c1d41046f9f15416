"""The ``maddylite`` command: run, check-config, deliver, queue, mtasts, directives, --version.

``run`` serves in the foreground; ``check-config`` validates a configuration without
starting anything (exit 1 with every error, each positioned); ``directives`` prints
the reference of a module rendered from its directive declarations.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from maddylite import __version__


def _cmd_run(args: argparse.Namespace) -> int:
    from gevent import monkey

    monkey.patch_all()
    from maddylite.runtime import find_config, run_server

    return run_server(find_config(args.config))


def _cmd_check_config(args: argparse.Namespace) -> int:
    from maddylite.config.errors import ConfigError, ConfigErrors
    from maddylite.runtime import Runtime, find_config

    source = find_config(args.path or args.config)
    rt = Runtime(source)
    try:
        rt.configure(require_endpoint=False)
    except ConfigErrors as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        return 1
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    for w in rt.warnings:
        print(f"{source.name}: warning: {w}", file=sys.stderr)
    print(f"{source.name}: configuration is valid ({len(rt.modules)} module instances)")
    return 0


def _cmd_directives(args: argparse.Namespace) -> int:
    from maddylite.docs import module_names, render_globals, render_module

    if not args.module:
        print(render_globals())
        print("Modules:")
        for name in module_names():
            print(f"  {name}")
        return 0
    try:
        print(render_module(args.module))
    except KeyError:
        print(f"maddylite: unknown module: {args.module}", file=sys.stderr)
        return 2
    return 0


#: sysexits.h: the input could not be read (``deliver`` exits 0, 75 or 69 once it has a message).
EX_NOINPUT = 66


def _guard(fn):  # noqa: ANN001, ANN202 - decorator
    """_guard turns a ConfigError into a positioned message and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from maddylite.config.errors import ConfigError

        try:
            return int(fn(args))
        except ConfigError as e:
            print(f"maddylite: {e}", file=sys.stderr)
            return 1

    return run


@_guard
def _cmd_deliver(args: argparse.Namespace) -> int:
    from gevent import monkey

    monkey.patch_all()
    from maddylite.runtime import find_config
    from maddylite.tools import deliver

    source = find_config(args.config)
    try:
        raw = sys.stdin.buffer.read()
    except (OSError, AttributeError, ValueError) as e:  # closed, unreadable or absent stdin
        print(f"maddylite: cannot read the message from standard input: {e}", file=sys.stderr)
        return EX_NOINPUT
    return deliver(source, args.target, args.mail_from, args.to, raw)


@_guard
def _cmd_queue(args: argparse.Namespace) -> int:
    from maddylite.runtime import find_config
    from maddylite.tools import queue_drop, queue_flush, queue_list

    source = find_config(args.config)
    if args.action == "list":
        return queue_list(source)
    if args.action == "flush":
        return queue_flush(source, args.id)
    if not args.id:
        print("maddylite: queue drop needs a message id", file=sys.stderr)
        return 2
    return queue_drop(source, args.id)


@_guard
def _cmd_mtasts(args: argparse.Namespace) -> int:
    from gevent import monkey

    monkey.patch_all()
    from maddylite.runtime import find_config
    from maddylite.tools import mtasts_command

    if args.action == "list" and args.domain:
        print("maddylite: mtasts list takes no domain", file=sys.stderr)
        return 2
    return mtasts_command(find_config(args.config), args.action, args.domain)


def build_parser() -> argparse.ArgumentParser:
    """build_parser returns the argument parser of the ``maddylite`` command."""
    p = argparse.ArgumentParser(prog="maddylite", description="A secure outbound mail server.")
    p.add_argument("--version", action="version", version=f"maddylite {__version__}")
    p.add_argument("--config", help="configuration file (default: $MADDYLITE_CONFIG, the platform config dir, then the embedded default)")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run the server in the foreground")
    r.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    r.set_defaults(func=_cmd_run)
    c = sub.add_parser("check-config", help="validate a configuration without starting anything")
    c.add_argument("path", nargs="?")
    c.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    c.set_defaults(func=_cmd_check_config)
    dl = sub.add_parser("deliver", help="send one message (read from stdin) through a target now")
    dl.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    dl.add_argument("--target", help="instance name of the target (default: the only target.remote)")
    dl.add_argument("--from", dest="mail_from", required=True, help="envelope sender ('' for <>)")
    dl.add_argument("--to", nargs="+", required=True, help="recipients")
    dl.set_defaults(func=_cmd_deliver)
    q = sub.add_parser("queue", help="inspect and steer the queues of a configuration")
    q.add_argument("action", choices=("list", "flush", "drop"))
    q.add_argument("id", nargs="?")
    q.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    q.set_defaults(func=_cmd_queue)
    mt = sub.add_parser("mtasts", help="show, drop or re-fetch cached MTA-STS policies")
    mt.add_argument("action", choices=("list", "purge", "refresh"))
    mt.add_argument("domain", nargs="?")
    mt.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    mt.set_defaults(func=_cmd_mtasts)
    d = sub.add_parser("directives", help="print the directive reference of a module")
    d.add_argument("module", nargs="?")
    d.set_defaults(func=_cmd_directives)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """main is the console entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if not hasattr(args, "config"):
        args.config = None
    try:
        return int(args.func(args))
    except BrokenPipeError:
        return 0
