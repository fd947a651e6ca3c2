"""Cost of the start-up decoding check of validation + test data (`data.check_eval_data`).

    python benchmarks/eval_check_cost.py [--data-root ../shared/data]

Builds the FSDD and CIFAR-10 splits as their experiments do and times `check_decodes` over
val + test (test = val when a dataset has no test split of its own)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mmkd.config import compose
from mmkd.data import build_splits
from mmkd.data.check import check_decodes

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"fsdd": "fsdd_supervised", "cifar10": "cifar10_teacher"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    for name, experiment in EXPERIMENTS.items():
        cfg = compose([f"experiment={experiment}", f"data.root={args.data_root.absolute()}"])
        splits = build_splits(cfg.data)
        samples = len(splits.val) + (0 if splits.test is splits.val else len(splits.test))
        start = time.perf_counter()
        check_decodes([("val", splits.val), ("test", splits.test)])
        seconds = time.perf_counter() - start
        print(f"{name}: {samples} val + test samples decoded in {seconds:.2f} s", flush=True)


if __name__ == "__main__":
    main()
