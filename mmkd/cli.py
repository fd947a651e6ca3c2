"""The `mmkd` command: `mmkd train ...`, `mmkd evaluate RUN_DIR ...`, `mmkd export RUN_DIR ...`.

Each subcommand is a module with `command(argv) -> int`, listed in `COMMANDS`; adding one is one
entry there. `run_command` is the one wrapper they all share: logging set-up, and a one-line
`error: ...` (exit code 2, or the error's own `exit_code`) instead of a traceback for any
`MMKDError`. The module is imported only when its subcommand runs, so `mmkd --help` is quick.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

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
    "layers": Command("mmkd.layers", "mmkd layers [experiment=NAME] [key=value ...]"),
}


def run_command(name: str, argv: Sequence[str] | None = None) -> int:
    """Run subcommand `name` with `argv` (default: the process arguments after the program)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    handler = importlib.import_module(COMMANDS[name].module).command
    try:
        return handler(args)
    except MMKDError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)


def usage() -> str:
    """The top-level help: every subcommand's usage line."""
    lines = [f"usage: mmkd {{{','.join(COMMANDS)}}} ...", ""]
    lines += [f"  {command.usage}" for command in COMMANDS.values()]
    lines.append("\n`mmkd COMMAND --help` describes one command.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The `mmkd` console entry point: dispatch to the subcommand named first."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not args or args[0] not in COMMANDS:
        problem = f"unknown command {args[0]!r}\n" if args else ""
        print(f"{problem}{usage()}", file=sys.stderr)
        return 2
    return run_command(args[0], args[1:])


if __name__ == "__main__":
    sys.exit(main())
