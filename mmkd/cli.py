"""The `mmkd` command: `mmkd train ...`, `mmkd evaluate RUN_DIR ...`, `mmkd export RUN_DIR ...`.

Each subcommand is a module with `command(argv) -> int`, listed in `COMMANDS`; adding one is one
entry there. Every command, and `mmkd` itself, parses its arguments with one kind of parser,
`command_parser` (argparse: `--help`, usage errors with exit code 2); config overrides stay
positional `key=value` arguments. `run_command` is the one wrapper they all share: logging
set-up, and a one-line `error: ...` (exit code 2, or the error's own `exit_code`) instead of a
traceback for any `MMKDError`. The module is imported only when its subcommand runs, so
`mmkd --help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from mmkd import __version__
from mmkd.errors import MMKDError


@dataclass(frozen=True)
class Command:
    """A subcommand: the module holding its `command(argv)` and one line of usage."""

    module: str
    usage: str


COMMANDS: dict[str, Command] = {
    "train": Command("mmkd.train", "mmkd train [experiment=NAME] [group=name] [key=value ...]"),
    "evaluate": Command("mmkd.evaluate", "mmkd evaluate RUN_DIR [key=value ...]"),
    "export": Command(
        "mmkd.export", "mmkd export RUN_DIR [--format onnx|torchscript] [--output PATH]"
    ),
    "pack": Command("mmkd.pack", "mmkd pack SOURCE OUT_DIR [--shard-size N] [--on-error skip]"),
    "store": Command("mmkd.store_command", "mmkd store list|gc ROOT [--verify] [--dry-run]"),
    "layers": Command("mmkd.layers_command", "mmkd layers [experiment=NAME] [key=value ...]"),
}


class UsageExit(SystemExit):
    """--help was answered, or the arguments were refused (the parser printed why). A
    SystemExit, so that uncaught it still ends the process with its code, as argparse does."""


class CommandParser(argparse.ArgumentParser):
    """argparse's parser, raising UsageExit where argparse would exit the process, so that
    `main` and `run_command` return the exit code (the console script passes it on)."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        raise UsageExit(status)


def command_parser(
    name: str, description: str | None, *, overrides: bool = False, **kwargs: Any
) -> CommandParser:
    """The parser of `mmkd NAME`; `description` (usually the module's docstring) is its --help
    text, kept as written. With `overrides`, the trailing positional `key=value` arguments
    are collected in `args.overrides`."""
    parser = CommandParser(
        prog=f"mmkd {name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )
    if overrides:
        add_overrides(parser)
    return parser


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The trailing positional `key=value` config overrides, in `args.overrides` (after any
    positional argument added before)."""
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],  # none given is fine (argparse would otherwise list it as required)
        metavar="key=value",
        help="config overrides: experiment=NAME, group=option, dotted.key=value",
    )


def run_command(name: str, argv: Sequence[str] | None = None) -> int:
    """Run subcommand `name` with `argv` (default: the process arguments after the program)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    handler = importlib.import_module(COMMANDS[name].module).command
    try:
        return handler(args)
    except UsageExit as done:
        return done.code
    except MMKDError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)


def usage() -> str:
    """The top-level usage: every subcommand's usage line."""
    lines = [f"mmkd {{{','.join(COMMANDS)}}} ...", ""]
    lines += [f"  {command.usage}" for command in COMMANDS.values()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The `mmkd` console entry point: dispatch to the subcommand named first."""
    parser = CommandParser(
        prog="mmkd",
        usage=usage(),
        description="Train compact cross-modal students from frozen teachers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`mmkd COMMAND --help` describes one command.",
    )
    parser.add_argument("command", metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("--version", action="version", version=f"mmkd {__version__}")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # the command name alone: its arguments (--help included) are its own parser's
        parsed = parser.parse_args(args[:1])
        if parsed.command not in COMMANDS:
            parser.error(f"unknown command {parsed.command!r}")
    except UsageExit as done:
        return done.code
    return run_command(parsed.command, args[1:])


if __name__ == "__main__":
    sys.exit(main())
