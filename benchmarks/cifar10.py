"""The CIFAR-10 distillation benchmark: labels only vs KD from a live teacher vs KD from the
teacher store, on augmented real images.

    python benchmarks/cifar10.py [--data-root DIR] [--seeds 0 1 2] [--out DIR] [--full]

Trains a teacher once with labels and augmentation (reused when DIR/runs/teacher/seed0 holds a
finished run), then for each seed the same student (a) with labels only, (b) with KD from the
live teacher, (c) with KD from the teacher store holding K augmented views per image, all with
the same augmentation. Every setting is chosen and every accuracy reported on a fixed, seeded
5,000-image validation split of CIFAR-10's training images (the official test set is withheld).
Writes DIR/RESULTS.md and DIR/results.json; each run lives in DIR/runs/<variant>/seed<k>/.
The default protocol is sized for 2 CPU cores; --full is the papers' protocol, for a GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from av_digits import epoch_seconds, fmt, run

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("labels_only", "kd_store", "kd_live")

# What each protocol trains. CPU: a 5-epoch ResNet-20 teacher on all 45,000 training images,
# ResNet-8 students for 10 epochs on a fixed 10,000-image subset, K = 10 stored views (one new
# view per epoch, as the live teacher sees). Full: the papers' schedules on all 45,000 images.
PROTOCOLS = {
    "cpu": {
        "teacher_model": "resnet20_cifar",
        "teacher_epochs": 5,
        "student_model": "resnet8_cifar",
        "student_epochs": 10,
        "train_images": 10_000,
        "views": 10,
    },
    "full": {
        "teacher_model": "resnet56_cifar",
        "teacher_epochs": 200,
        "student_model": "resnet20_cifar",
        "student_epochs": 200,
        "train_images": None,
        "views": 50,
    },
    # checks the script end to end in a few minutes (tests/test_benchmarks.py); no figures
    "smoke": {
        "teacher_model": "resnet8_cifar",
        "teacher_epochs": 1,
        "teacher_images": 512,
        "student_model": "resnet8_cifar",
        "student_epochs": 2,
        "train_images": 256,
        "eval_images": 256,
        "views": 2,
    },
}
PUBLISHED = (
    "Published (original CIFAR-10 arrays, official test set, 160-240 epochs): ResNet-20 "
    "91.9 %, ResNet-56 93.6 % (torchdistill); WRN-16-1 91.2 % → 91.6 % with KD from a "
    "WRN-40-1 at 93.4 % (Zagoruyko & Komodakis 2017)."
)


def store_build_seconds(run_dir: Path) -> float | None:
    """The teacher-store build time a run logged (None when it found the store built)."""
    with (run_dir / "logs" / "metrics.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row.get("time/store_build_s"):
                return float(row["time/store_build_s"])
    return None


def standard_error(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        default=os.environ.get("MMKD_DATA_ROOT", str(ROOT.parent / "shared" / "data")),
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "runs" / "cifar10"))
    parser.add_argument("--full", action="store_true", help="the papers' protocol (GPU)")
    parser.add_argument("--smoke", action="store_true", help="a tiny protocol to test the script")
    parser.add_argument("--teacher-only", action="store_true", help="stop after the teacher")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    protocol = PROTOCOLS["full" if args.full else "smoke" if args.smoke else "cpu"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"data.root={Path(args.data_root).resolve()}",
        f"trainer.accelerator={args.accelerator}",
    ]
    if protocol.get("eval_images"):
        common.append(f"data.max_eval_samples={protocol['eval_images']}")
    teacher_subset = (
        [f"data.max_train_samples={protocol['teacher_images']}", "data.subset_seed=0"]
        if protocol.get("teacher_images")
        else []
    )
    results: dict[str, dict[str, float]] = {}

    def record(name: str, overrides: Sequence[str]) -> dict[str, float]:
        results[name] = run(out, name, overrides)
        return results[name]

    teacher_existed = (out / "runs" / "teacher" / "seed0" / "metrics.json").is_file()
    teacher_metrics = record(
        "teacher/seed0",
        [
            "experiment=cifar10_teacher",
            f"student.timm.model={protocol['teacher_model']}",
            f"trainer.max_epochs={protocol['teacher_epochs']}",
            *teacher_subset,
            *common,
        ],
    )
    if args.teacher_only:
        print(json.dumps(teacher_metrics, indent=2))
        return 0
    after_teacher = time.perf_counter()
    teacher_dir = out / "runs" / "teacher" / "seed0" / "student"
    students = [
        "experiment=cifar10_kd",
        f"teacher.weights={teacher_dir}",
        f"student.timm.model={protocol['student_model']}",
        f"trainer.max_epochs={protocol['student_epochs']}",
        f"distill.cache_dir={out / 'teacher_store'}",
        *common,
    ]
    if protocol["train_images"]:
        students += [f"data.max_train_samples={protocol['train_images']}", "data.subset_seed=0"]
    variants = {
        "labels_only": ["losses=supervised", "distill.store.views=null"],
        "kd_store": [f"distill.store.views={protocol['views']}"],
        "kd_live": ["distill.store.views=null"],
    }
    for seed in args.seeds:  # the variants of one seed run back to back: timings compare
        for variant, extra in variants.items():
            record(f"{variant}/seed{seed}", [*students, *extra, f"run.seed={seed}"])

    report = summarise(out, args.seeds, protocol, results, teacher_metrics)
    report["wall_s"] = time.perf_counter() - started
    report["after_teacher_wall_s"] = time.perf_counter() - after_teacher
    report["teacher"]["trained_in_this_run"] = not teacher_existed
    write_report(out, args, protocol, results, report)
    return 0


def timed_epochs(run_dir: Path) -> list[float]:
    """Training-epoch seconds after the first (which pays start-up and warm-up)."""
    seconds = epoch_seconds(run_dir)
    return seconds[1:] if len(seconds) > 1 else seconds


def summarise(
    out: Path,
    seeds: Sequence[int],
    protocol: dict,
    results: dict[str, dict[str, float]],
    teacher: dict[str, float],
) -> dict:
    """Accuracies, epoch-time ratios (per seed, variants of a seed run back to back), verdicts."""
    accuracy = {v: [results[f"{v}/seed{s}"]["student/accuracy"] for s in seeds] for v in VARIANTS}
    epoch = {
        v: [statistics.median(timed_epochs(out / "runs" / v / f"seed{s}")) for s in seeds]
        for v in VARIANTS
    }
    ratios = {
        name: [epoch[v][i] / epoch["labels_only"][i] for i in range(len(seeds))]
        for name, v in (
            ("kd_store_over_labels_only", "kd_store"),
            ("kd_live_over_labels_only", "kd_live"),
        )
    }
    builds = [store_build_seconds(out / "runs" / "kd_store" / f"seed{s}") for s in seeds]
    kd, base = accuracy["kd_store"], accuracy["labels_only"]
    gain = statistics.fmean(kd) - statistics.fmean(base)
    noise = math.hypot(standard_error(kd), standard_error(base))
    store_vs_live = statistics.fmean(kd) - statistics.fmean(accuracy["kd_live"])
    return {
        "protocol": protocol,
        "seeds": list(seeds),
        "teacher": {
            "accuracy": teacher["student/accuracy"],
            "params": teacher.get("student/params"),
            "wall_s": teacher.get("wall_s"),
        },
        "accuracy": accuracy,
        "epoch_s": epoch,
        "ratios": {name: statistics.fmean(values) for name, values in ratios.items()},
        "ratios_per_seed": ratios,
        "store_build_s": next((b for b in builds if b is not None), None),
        "kd_gain": gain,
        "kd_gain_standard_error": noise,
        "kd_store_minus_kd_live": store_vs_live,
        "student_params": results[f"labels_only/seed{seeds[0]}"].get("student/params"),
    }


def write_report(
    out: Path,
    args: argparse.Namespace,
    protocol: dict,
    results: dict[str, dict[str, float]],
    report: dict,
) -> None:
    """DIR/results.json (every run's metrics + the summary) and DIR/RESULTS.md."""
    (out / "results.json").write_text(
        json.dumps({"runs": results, **report}, indent=2, sort_keys=True, default=str)
    )
    seeds = report["seeds"]
    acc, ratios = report["accuracy"], report["ratios"]
    images = protocol["train_images"] or 45_000
    store_ratio = ratios["kd_store_over_labels_only"]
    live_ratio = ratios["kd_live_over_labels_only"]
    gain, noise = report["kd_gain"], report["kd_gain_standard_error"]
    delta = report["kd_store_minus_kd_live"]
    lines = [
        "# CIFAR-10 distillation benchmark",
        "",
        f"Command: `python benchmarks/cifar10.py{' --full' if args.full else ''} --seeds "
        f"{' '.join(map(str, seeds))}` on {platform.machine()} with "
        f"{torch.get_num_threads()} torch threads ({args.accelerator}); whole benchmark "
        f"{report['wall_s'] / 60:.1f} min"
        + (", teacher included" if report["teacher"]["trained_in_this_run"] else "")
        + f"; after the teacher (store build, {len(seeds) * len(VARIANTS)} student runs and "
        f"their evaluation) {report['after_teacher_wall_s'] / 60:.1f} min.",
        "",
        f"Protocol: teacher {protocol['teacher_model']} trained {protocol['teacher_epochs']} "
        f"epochs with labels on the 45,000 training images left after a fixed, seeded "
        f"5,000-image validation split; students {protocol['student_model']} "
        f"({report['student_params'] / 1e6:.3f}M parameters), {protocol['student_epochs']} "
        f"epochs on {images:,} of those images (a fixed subset), batch 128, SGD 0.1 + cosine, "
        f"augmentation pad-4 random crop + horizontal flip for teacher and student; KD T=4, "
        f"weight 1, + 0.5 x cross-entropy; store: K={protocol['views']} views, cycled by "
        f"epoch, the student replaying the teacher's view. Accuracy on the 5,000 validation "
        f"images; mean ± std over seeds {', '.join(map(str, seeds))}.",
        "",
        "| measure | value | target | met |",
        "| --- | --- | --- | --- |",
        f"| teacher accuracy ({protocol['teacher_model']}) | "
        f"{report['teacher']['accuracy']:.4f} |  |  |",
        f"| labels-only student accuracy | {fmt(acc['labels_only'])} |  |  |",
        f"| KD student, live teacher | {fmt(acc['kd_live'])} |  |  |",
        f"| KD student, teacher store (K={protocol['views']}) | {fmt(acc['kd_store'])} |  |  |",
        f"| stored-view KD epoch / labels-only epoch | {store_ratio:.3f} | ≤ 1.15 | "
        f"{'yes' if store_ratio <= 1.15 else 'no'} |",
        f"| live KD epoch / labels-only epoch | {live_ratio:.3f} | (beside it) |  |",
        f"| stored-view KD − live KD accuracy | {delta * 100:+.2f} points | ≥ −0.3 points | "
        f"{'yes' if delta >= -0.003 else 'no'} |",
        f"| stored-view KD − labels-only accuracy | {gain * 100:+.2f} points (combined "
        f"standard error {noise * 100:.2f}) | > standard error | "
        f"{'yes' if gain > noise else 'no: within noise'} |",
    ]
    build = report["store_build_s"]
    lines += [
        "",
        f"Teacher: {report['teacher']['wall_s'] / 60:.1f} min to train (its own run, "
        f"`DIR/runs/teacher/seed0`). Store build: "
        + (f"{build:.0f} s" if build is not None else "found already built")
        + f" for {images:,} images x {protocol['views']} views (+ validation), once, shared "
        "by every seed.",
        "Epoch seconds, median of the training epochs after the first (validation excluded), "
        "per seed: "
        + "; ".join(f"{v} " + ", ".join(f"{x:.1f}" for x in report["epoch_s"][v]) for v in VARIANTS)
        + ".",
        "",
        PUBLISHED,
    ]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
