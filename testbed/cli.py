"""The ``testbed`` command line: parses arguments, dispatches to one module per command.

Each command lives in ``testbed/commands/<name>.py`` and exposes ``add_parser(subparsers)`` and
``run(args) -> int``. Command modules import heavy libraries (ray, llama_cpp) inside ``run`` so
that ``--help`` stays fast. This is the only module that exits the process: expected failures
(``TestbedError``) print one line and exit with their code (2 bad input, 1 run-time failure);
tracebacks only with ``--debug``. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rich.console import Console
from rich.markup import escape

from testbed import __version__
from testbed.errors import InputError, TestbedError

# Order is the order shown in --help.
COMMANDS = ["demo", "inventory", "experiment", "lab", "provision", "check", "up", "down", "models",
            "spec", "plan", "policy", "profile", "run", "simulate", "sweep", "report"]


class _Parser(argparse.ArgumentParser):
    """argparse that raises InputError instead of printing usage and exiting with 2 itself."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise InputError(message, source=f"{self.prog}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="testbed", description=(
        "Hardware-in-the-loop testbed for multi-user speculative LLM inference at the edge."))
    parser.add_argument("--version", action="version", version=f"testbed {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"testbed.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or bool(os.environ.get("TESTBED_DEBUG"))
    # emoji=False: a policy spec "mod:x" followed by ": ..." must not print as an emoji (":x:")
    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        code = args.func(args)
        return int(code or 0)
    except TestbedError as exc:
        if debug:
            err.print_exception()
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130
    except BrokenPipeError:
        # The reader went away (`testbed ... --json | head`): not an error of ours. Point
        # stdout at /dev/null so that flushing it at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
