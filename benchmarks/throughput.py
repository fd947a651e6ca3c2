"""Training throughput (samples/s) of student-only training and of distillation with and
without the teacher cache, for the default and the cross-modal experiments.

    python benchmarks/throughput.py --accelerator gpu --precision bf16-mixed \
        --teacher RUN_DIR/student [--data-root ../shared/data] [--epochs 2]

Written for the CUDA check (1 GPU, bf16); runs the same on CPU (--accelerator cpu). The
figure is the last epoch's `time/train_samples_per_s` (teacher-cache build excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mmkd.config import compose
from mmkd.loggers import read_csv_log
from mmkd.train import train

ROOT = Path(__file__).resolve().parents[1]


def samples_per_s(run_dir: Path) -> float:
    """The last epoch's training throughput from the run's CSV log."""
    rows = [r for r in read_csv_log(run_dir) if "time/train_samples_per_s" in r]
    return rows[-1]["time/train_samples_per_s"]


def main() -> int:
    """Train each experiment briefly in each mode and print samples/s as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument(
        "--teacher",
        help="RUN_DIR/student of an mnist_teacher run "
        "(for the cross-modal experiment; skipped without it)",
    )
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    common = [
        f"trainer.accelerator={args.accelerator}",
        "trainer.devices=1",
        f"trainer.precision={args.precision}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
        "run.test=false",
        "run.export=false",
    ]
    experiments = {"demo_bind": ["experiment=demo_bind"]}
    if args.teacher:
        experiments["av_digits_xmodal"] = [
            "experiment=av_digits_xmodal",
            f"teacher.weights={args.teacher}",
            f"data.root={args.data_root}",
        ]
    modes = {
        "student_only": [
            "teacher=none",
            "losses=supervised",
            "data.train_labels=true",
            "student.head.classifier=true",
        ],
        "distill_uncached": ["distill.cache=false"],
        "distill_cached": ["distill.cache=true"],
    }
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, base in experiments.items():
            for mode, extra in modes.items():
                run_dir = Path(tmp) / name / mode
                train(compose([*base, *common, *extra, f"run.dir={run_dir}"]))
                results.setdefault(name, {})[mode] = samples_per_s(run_dir)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
