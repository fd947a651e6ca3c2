"""The `mmkd` command: `mmkd train ...`, `mmkd evaluate RUN_DIR ...`, `mmkd export RUN_DIR ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mmkd.errors import MMKDError


def export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mmkd export", description="Export a run's student to ONNX or TorchScript."
    )
    parser.add_argument("run_dir", help="a finished run folder (holding student/)")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    parser.add_argument("--output", help="file to write (default: RUN_DIR/student/model.onnx)")
    parser.add_argument(
        "--model",
        default="student",
        help="which exported model folder of the run (default: student)",
    )
    args = parser.parse_args(argv)
    from pathlib import Path

    from mmkd.export import export_compiled

    try:
        path = export_compiled(Path(args.run_dir) / args.model, args.format, args.output)
    except MMKDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "evaluate", "export", "pack")
    if not args or args[0] not in commands:
        print(
            f"usage: mmkd {{{','.join(commands)}}} ...\n"
            "  mmkd train [experiment=NAME] [key=value ...]\n"
            "  mmkd evaluate RUN_DIR [key=value ...]\n"
            "  mmkd export RUN_DIR [--format onnx|torchscript] [--output PATH]\n"
            "  mmkd pack SOURCE OUT_DIR [--shard-size N]",
            file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if args and args[0] in ("-h", "--help") else 2
    command, rest = args[0], args[1:]
    if command == "train":
        from mmkd.train import main as train_main

        return train_main(rest)
    if command == "evaluate":
        from mmkd.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command == "pack":
        from mmkd.pack import pack_main

        return pack_main(rest)
    return export_main(rest)


if __name__ == "__main__":
    sys.exit(main())
