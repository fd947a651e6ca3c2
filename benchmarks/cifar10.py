"""The CIFAR-10 distillation benchmark: labels only vs KD from a live teacher vs KD from the
teacher store, on augmented real images; with --methods, the distillation methods side by side.

    python benchmarks/cifar10.py [--data-root DIR] [--seeds 0 1 2] [--out DIR] [--full]
    python benchmarks/cifar10.py --methods [--seeds 0 1 2]   # hint, attention, similarity, dkd

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
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from av_digits import better_than, epoch_seconds, fmt, run, standard_error_of_difference

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
# --methods: each method from the teacher store (K views, float16, features included), same
# protocol, seeds and validation split as the KD rows; "+ CE" methods add cross-entropy (weight 1)
METHODS = {
    "hint": ["losses=cifar_hint"],
    "attention": ["losses=cifar_attention"],
    "similarity": ["losses=cifar_similarity"],
    "dkd": ["losses=dkd"],
}
METHOD_LABELS = {
    "labels_only": "labels only (CE)",
    "kd_store": "KD (T=4) + 0.5 CE",
    "hint": "FitNets hint, stages.1 (x1) + CE",
    "attention": "attention transfer, 3 stages (x1000) + CE",
    "similarity": "similarity-preserving, stages.2 (x3000) + CE",
    "dkd": "DKD (alpha 1, beta 8, T=4, 1-epoch warm-up) + CE",
}
# what the papers report for the same kind of pair on the official CIFAR test set
PUBLISHED_METHODS = (
    "Published (official CIFAR test sets, 240 epochs, CRD benchmark of Tian et al. 2020 on "
    "CIFAR-100, ResNet-56 → ResNet-20, student 69.06 %): KD +1.60, FitNets −0.05, AT +1.49, "
    "SP +0.43 points; DKD +2.68 points (Zhao et al. 2022, same pair). CIFAR-10, WRN-40-1 → "
    "WRN-16-1 (91.2 %): KD +0.4, AT +0.6 points (Zagoruyko & Komodakis 2017)."
)
TIMING_VARIANTS = ("labels_only", "kd_store", *METHODS)
TIMING_EPOCHS = 2  # the first epoch (warm-up) is left out: epoch 2 is timed

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
    parser.add_argument(
        "--methods", action="store_true", help="hint, attention, similarity and dkd rows"
    )
    parser.add_argument(
        "--timing",
        action="store_true",
        help=f"time {TIMING_EPOCHS}-epoch runs of every variant back to back (seed 0)",
    )
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
    method_runs = {
        name: [*extra, f"distill.store.views={protocol['views']}", "distill.store.dtype=float16"]
        for name, extra in METHODS.items()
    }
    if args.methods or args.timing:
        return run_methods(args, out, protocol, students, variants, method_runs, record, started)
    for seed in args.seeds:  # the variants of one seed run back to back: timings compare
        for variant, extra in variants.items():
            record(f"{variant}/seed{seed}", [*students, *extra, f"run.seed={seed}"])

    report = summarise(out, args.seeds, protocol, results, teacher_metrics)
    report["wall_s"] = time.perf_counter() - started
    report["after_teacher_wall_s"] = time.perf_counter() - after_teacher
    report["teacher"]["trained_in_this_run"] = not teacher_existed
    write_report(out, args, protocol, results, report)
    return 0


def run_methods(
    args: argparse.Namespace,
    out: Path,
    protocol: dict,
    students: list[str],
    variants: dict[str, list[str]],
    method_runs: dict[str, list[str]],
    record: Any,
    started: float,
) -> int:
    """--methods: every method for every seed (labels-only and stored KD reuse their runs), and
    --timing: each variant for TIMING_EPOCHS epochs back to back, for epoch-time ratios."""
    every = {"labels_only": variants["labels_only"], "kd_store": variants["kd_store"]}
    every.update(method_runs)
    results: dict[str, dict[str, float]] = {}
    if args.methods:
        for seed in args.seeds:
            for variant, extra in every.items():
                name = f"{variant}/seed{seed}"
                results[name] = record(name, [*students, *extra, f"run.seed={seed}"])
    timing: dict[str, float] = {}
    if args.timing:
        for variant in TIMING_VARIANTS:
            name = f"timing/{variant}"
            record(
                name,
                [
                    *students,
                    *every[variant],
                    f"trainer.max_epochs={TIMING_EPOCHS}",
                    "run.test=false",
                    "run.seed=0",
                ],
            )
            timing[variant] = statistics.median(timed_epochs(out / "runs" / name))
    path = out / "methods.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    report = {
        "runs": {**previous.get("runs", {}), **results},
        "timing_epoch_s": timing or previous.get("timing_epoch_s", {}),
        "seeds": args.seeds if results else previous.get("seeds", args.seeds),
        "protocol": protocol,
        "wall_s": time.perf_counter() - started,
    }
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    write_methods_report(out, report)
    return 0


def write_methods_report(out: Path, report: dict) -> None:
    """DIR/METHODS.md: accuracy per method (mean ± std over seeds), its difference from
    labels-only with the combined standard error, and its epoch time over labels-only."""
    seeds, runs, timing = report["seeds"], report["runs"], report["timing_epoch_s"]
    protocol = report["protocol"]
    acc = {
        v: [runs[f"{v}/seed{s}"]["student/accuracy"] for s in seeds if f"{v}/seed{s}" in runs]
        for v in METHOD_LABELS
    }
    base = acc["labels_only"]
    lines = [
        "# CIFAR-10: distillation methods side by side",
        "",
        f"Command: `python benchmarks/cifar10.py --methods --timing --seeds "
        f"{' '.join(map(str, seeds))}` on {platform.machine()} with "
        f"{torch.get_num_threads()} torch threads (CPU). Same protocol, seeds and 5,000-image "
        f"validation split as RESULTS_cifar10.md: teacher {protocol['teacher_model']}, student "
        f"{protocol['student_model']}, {protocol['student_epochs']} epochs on "
        f"{protocol['train_images'] or 45_000:,} images, teacher outputs and features from the "
        f"teacher store (K={protocol['views']} views, float16 for the method rows).",
        "",
        "| method | accuracy (mean ± std) | − labels-only (± combined s.e.) | beyond noise | "
        f"epoch / labels-only epoch ({TIMING_EPOCHS}-epoch runs, seed 0) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant, label in METHOD_LABELS.items():
        values = acc[variant]
        if not values:
            continue
        ratio = (
            f"{timing[variant] / timing['labels_only']:.3f}"
            if variant in timing and "labels_only" in timing
            else "not timed"
        )
        if variant == "labels_only" or not base:
            delta, verdict = "", ""
        else:
            gain = statistics.fmean(values) - statistics.fmean(base)
            noise = standard_error_of_difference(values, base)
            if noise is None:  # one seed: no spread, so no noise to compare with
                delta = f"{gain * 100:+.2f} points (one seed)"
                verdict = better_than(values, base)[1]
            else:
                delta = f"{gain * 100:+.2f} (± {noise * 100:.2f}) points"
                verdict = (
                    "no: within noise"
                    if abs(gain) <= noise
                    else "yes"
                    if gain > 0
                    else "yes: below labels-only"
                )
        lines.append(f"| {label} | {fmt(values)} | {delta} | {verdict} | {ratio} |")
    if timing:
        lines += [
            "",
            "Epoch seconds ("
            + ("epoch 2" if TIMING_EPOCHS == 2 else f"median of epochs 2-{TIMING_EPOCHS}")
            + ", training batches only, seed 0): "
            + ", ".join(f"{v} {t:.1f}" for v, t in timing.items())
            + ".",
        ]
    lines += ["", PUBLISHED_METHODS]
    (out / "METHODS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


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
    noise = standard_error_of_difference(kd, base)  # None with one seed
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
        f"| stored-view KD − labels-only accuracy | {gain * 100:+.2f} points "
        + (
            f"(combined standard error {noise * 100:.2f}) | > standard error | "
            f"{'yes' if gain > noise else 'no: within noise'} |"
            if noise is not None
            else "(one seed) | > standard error | "
            f"{better_than(acc['kd_store'], acc['labels_only'])[1]} |"
        ),
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
