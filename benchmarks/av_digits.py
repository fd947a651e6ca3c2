"""The AV-digits benchmark: every experiment of configs/experiment/ on the real data, 3 seeds.

    python benchmarks/av_digits.py [--data-root ../shared/data] [--seeds 0 1 2] [--out DIR]

Trains the MNIST image teacher once (seed 0), then for each seed: same-modality compression
(KD student and its labels-only baseline), cross-modal transfer to an audio student without
audio labels, its supervised reference, and binding of audio and image students to the MiniLM
text space. Then times an epoch with and without the teacher cache against a student-only
epoch, and mmkd's training step against a minimal hand-written PyTorch loop. Writes
DIR/RESULTS.md (mean ± std over seeds, each target checked) and DIR/results.json (every
number of every run). Runs go to DIR/runs/. Everything runs in this one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import measure_overhead

from mmkd.config import compose
from mmkd.loggers import read_csv_log
from mmkd.train import train

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.extra={enable_model_summary: false}"]
TIMING_EXPERIMENT = "mnist_compress"  # the student whose epochs are timed
TIMING_EPOCHS = 2
FIRST_TIMED_EPOCH = 2  # epoch 1 is left out of the epoch-time figure (first batches, warm-up)


def run(out: Path, name: str, overrides: Sequence[str]) -> dict[str, float]:
    """One training run in this process; returns its metrics.json (reused if already there)."""
    run_dir = out / "runs" / name
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():  # re-running the benchmark resumes where it stopped
        return json.loads(metrics_file.read_text())
    started = time.perf_counter()
    # run.resume=true: a run interrupted by a previous attempt continues from its checkpoint
    metrics = train(compose([*overrides, f"run.dir={run_dir}", "run.resume=true", *QUIET]))
    metrics["wall_s"] = time.perf_counter() - started
    metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"[benchmark] {name}: {metrics['wall_s']:.0f} s", flush=True)
    return metrics


def epoch_seconds(run_dir: Path) -> list[float]:
    """Training seconds of every epoch of a run, in order, from its CSV log."""
    return [r["time/train_epoch_s"] for r in read_csv_log(run_dir) if "time/train_epoch_s" in r]


def timed_epochs_label(epochs_logged: int, first: int = FIRST_TIMED_EPOCH) -> str:
    """Which epochs the epoch-time figure is the median of, from how many were logged."""
    if epochs_logged < first:
        raise ValueError(f"{epochs_logged} epochs logged; the timing starts at epoch {first}")
    if epochs_logged == first:
        return f"epoch {first} of {epochs_logged}"
    return f"median of epochs {first}-{epochs_logged}"


def timed_epoch_seconds(seconds: Sequence[float], first: int = FIRST_TIMED_EPOCH) -> float:
    """The median training time of epochs `first`.. (1-based) of one run."""
    return statistics.median(seconds[first - 1 :])


def samples_label(max_train_samples: int | None) -> str:
    """The training-set size of the timed runs, from their saved config."""
    if max_train_samples is None:
        return "the whole training split"
    return f"{max_train_samples:,} training images (data.max_train_samples)"


def standard_error_of_difference(a: Sequence[float], b: Sequence[float]) -> float | None:
    """sqrt(s_a²/n_a + s_b²/n_b): the noise of mean(a) − mean(b); None with fewer than 2 seeds."""
    if len(a) < 2 or len(b) < 2:
        return None
    return math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def better_than(a: Sequence[float], b: Sequence[float]) -> tuple[str, str]:
    """(value, verdict) of the target mean(a) > mean(b): "yes" only when the difference exceeds
    its combined standard error, "**no**" when it is below minus it, else "within noise"."""
    difference = statistics.fmean(a) - statistics.fmean(b)
    noise = standard_error_of_difference(a, b)
    if noise is None:
        return f"{difference:+.4f}", "unknown: one seed cannot estimate the noise"
    value = f"{difference:+.4f} (s.e. {noise:.4f})"
    tolerance = 5e-5  # means equal at the reported 4 decimals (e.g. float32 0.996) are no loss
    if difference > noise + tolerance:
        return value, "yes"
    if difference < -noise - tolerance:
        return value, "**no**"
    return value, "within noise"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 4) -> str:
    """ "mean ± std" of `values`."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run every experiment and timing (reusing finished runs), then write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "runs" / "benchmark"))
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from finished runs"
    )
    parser.add_argument(
        "--two-teachers",
        action="store_true",
        help="only the teacher, the single-teacher audio runs and the two-teacher run "
        "(writes TWO_TEACHERS.md)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = [f"data.root={Path(args.data_root).resolve()}"]
    cache = [f"distill.cache_dir={out / 'teacher_cache'}"]
    results: dict[str, dict[str, float]] = {}

    def record(name: str, overrides: Sequence[str]) -> dict[str, float]:
        results[name] = run(out, name, overrides)
        return results[name]

    record("mnist_teacher", ["experiment=mnist_teacher", *data])
    teacher = f"teacher.weights={out / 'runs' / 'mnist_teacher' / 'student'}"
    if args.two_teachers and args.report_only:
        write_two_teacher_report(out, args, finished_runs(out))
        return 0
    if args.two_teachers:
        image = f"teachers.image.weights={out / 'runs' / 'mnist_teacher' / 'student'}"
        # the two-teacher row first; the single-teacher rows after it (the report falls back to
        # RESULTS.md for a row not rerun here). The report is rewritten after every run.
        for name, extra in (
            ("av_digits_two_teachers", [image]),
            ("av_digits_xmodal", [teacher]),
            ("av_digits_bind_text", ["extra_students={}"]),  # the audio student alone
        ):
            for seed in args.seeds:
                s = [f"run.seed={seed}", *data, *cache]
                record(f"{name}/seed{seed}", [f"experiment={name}", *extra, *s])
                write_two_teacher_report(out, args, finished_runs(out))
        return 0
    for seed in args.seeds:
        s = [f"run.seed={seed}", *data]
        record(f"mnist_compress/seed{seed}", ["experiment=mnist_compress", teacher, *cache, *s])
        record(
            f"mnist_scratch/seed{seed}",
            ["experiment=mnist_compress", teacher, "losses=supervised", *s],
        )
        record(f"fsdd_supervised/seed{seed}", ["experiment=fsdd_supervised", *s])
        record(f"av_digits_xmodal/seed{seed}", ["experiment=av_digits_xmodal", teacher, *cache, *s])
        record(f"av_digits_bind_text/seed{seed}", ["experiment=av_digits_bind_text", *cache, *s])

    # epoch time: student-only vs distillation with / without the teacher cache (same student,
    # same data; epochs from FIRST_TIMED_EPOCH on are compared)
    timing = [
        f"experiment={TIMING_EXPERIMENT}",
        teacher,
        f"trainer.max_epochs={TIMING_EPOCHS}",
        "run.test=false",
        "run.export=false",
        *data,
    ]
    epochs: dict[str, list[float]] = {}
    for name, extra in {
        "student_only": ["losses=supervised"],
        "cached": ["distill.cache=true", *cache],
        "uncached": ["distill.cache=false"],
    }.items():
        record(f"epoch_time/{name}", [*timing, *extra])
        epochs[name] = epoch_seconds(out / "runs" / "epoch_time" / name)
    timed_config = OmegaConf.load(out / "runs" / "epoch_time" / "student_only" / "config.yaml")

    overhead_started = time.perf_counter()
    overhead = measure_overhead(
        compose(["experiment=mnist_compress", teacher, "distill.cache=false", *data, "run.seed=0"])
    )
    # compute time of every run (also of runs reused from an earlier, interrupted attempt)
    elapsed = sum(m["wall_s"] for m in results.values()) + time.perf_counter() - overhead_started
    write_report(out, args, results, epochs, timed_config.data.max_train_samples, overhead, elapsed)
    return 0


# where RESULTS.md (the full benchmark, same protocol) has each single-teacher row
RESULTS_ROWS = {
    "av_digits_xmodal": "cross-modal: audio student, no audio labels (FSDD test)",
    "av_digits_bind_text": "binding: zero-shot audio accuracy (text prompts)",
}


def results_md_row(name: str, seeds: int) -> list[float] | None:
    """mean ± std of a single-teacher row from benchmarks/RESULTS.md, as `seeds` values with
    that mean and sample std (what the noise estimate needs), or None if absent."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    label = RESULTS_ROWS.get(name)
    if label is None or not path.is_file():
        return None
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] == label:
            mean, std = (float(x) for x in cells[1].split("±"))
            spread = std * math.sqrt((seeds - 1) / 2) if seeds > 1 else 0.0
            return [mean - spread, mean, mean + spread][:seeds] if seeds == 3 else [mean]
    return None


TWO_TEACHER_ROWS = (
    ("image teacher only (av_digits_xmodal: kd + contrastive + embed)", "av_digits_xmodal"),
    (
        "text teacher only (av_digits_bind_text, audio student alone; zero-shot)",
        "av_digits_bind_text",
    ),
    ("image + text teachers (av_digits_two_teachers)", "av_digits_two_teachers"),
)


def write_two_teacher_report(
    out: Path, args: argparse.Namespace, results: dict[str, dict[str, float]]
) -> None:
    """TWO_TEACHERS.md: the audio student's FSDD test accuracy taught by each teacher alone and
    by both, mean ± std over seeds, with the two-teacher run's difference from each."""
    two = per_seed(results, "av_digits_two_teachers", "student/accuracy")
    seeds = len(two)
    lines = [
        "# AV-digits: one audio student, two teachers",
        "",
        f"Command: `python benchmarks/av_digits.py --two-teachers --seeds "
        f"{' '.join(map(str, args.seeds))}` on {platform.machine()} with "
        f"{torch.get_num_threads()} torch threads (CPU). The audio student (fsdd_cnn) never sees "
        "an audio label; accuracy on the FSDD test split (recordings 0-4 of every speaker), "
        f"mean ± std over seeds ({seeds} for the two-teacher row). The MNIST image teacher is "
        "trained once (seed 0).",
        "",
        "| teachers | audio student accuracy | two teachers − this row |",
        "| --- | --- | --- |",
    ]
    for label, name in TWO_TEACHER_ROWS:
        values = per_seed(results, name, "student/accuracy")
        if name != "av_digits_two_teachers" and len(values) < len(args.seeds):
            # not rerun for every seed: the full benchmark's row (same protocol, 3 seeds)
            values = results_md_row(name, 3) or []
            label += " — from RESULTS.md"
        if not values:
            continue
        if name == "av_digits_two_teachers":
            lines.append(f"| {label} | {fmt(values)} |  |")
            continue
        value, verdict = better_than(two, values)
        lines.append(f"| {label} | {fmt(values)} | {value}: {verdict} |")
    teacher = results["mnist_teacher"]["student/accuracy"]
    lines += ["", f"Image teacher (MNIST test accuracy): {teacher:.4f}."]
    text = "\n".join(lines) + "\n"
    (out / "TWO_TEACHERS.md").write_text(text)
    (out / "two_teachers.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(text)


def finished_runs(out: Path) -> dict[str, dict[str, float]]:
    """The metrics of every finished run under OUT/runs (NAME or NAME/seedK)."""
    runs = {}
    for path in sorted((out / "runs").glob("**/metrics.json")):
        runs[str(path.parent.relative_to(out / "runs"))] = json.loads(path.read_text())
    return runs


def per_seed(results: dict[str, dict[str, float]], experiment: str, key: str) -> list[float]:
    """`key` of every seed's run of `experiment`."""
    return [m[key] for name, m in results.items() if name.startswith(f"{experiment}/")]


def write_report(
    out: Path,
    args: argparse.Namespace,
    results: dict[str, dict[str, float]],
    epochs: dict[str, list[float]],
    timed_samples: int | None,
    overhead: dict[str, float],
    elapsed: float,
) -> None:
    """Write RESULTS.md and results.json; every label says what was measured, from the inputs."""

    def get(experiment: str, key: str) -> list[float]:
        return per_seed(results, experiment, key)

    mean = statistics.fmean
    teacher = results["mnist_teacher"]
    kd_acc, scratch_acc = (
        get("mnist_compress", "student/accuracy"),
        get("mnist_scratch", "student/accuracy"),
    )
    teacher_acc = get("mnist_compress", "teacher/accuracy")
    params_ratio = mean(get("mnist_compress", "teacher/params")) / mean(
        get("mnist_compress", "student/params")
    )
    latency_ratios = [
        t / s
        for t, s in zip(
            get("mnist_compress", "teacher/latency_ms"),
            get("mnist_compress", "student/latency_ms"),
            strict=True,
        )
    ]
    xmodal = get("av_digits_xmodal", "student/accuracy")
    supervised = get("fsdd_supervised", "student/accuracy")
    zero_shot_audio = get("av_digits_bind_text", "student/accuracy")
    zero_shot_image = get("av_digits_bind_text", "image/accuracy")
    rows: list[tuple[str, str, str, str]] = []

    def check(what: str, value: str, target: str, ok: bool | str | None) -> None:
        """A row; `ok`: True/False (met or not), a verdict in words, or None (no target)."""
        mark = ok if isinstance(ok, str) else "" if ok is None else "yes" if ok else "**no**"
        rows.append((what, value, target, mark))

    check("compression: teacher accuracy (MNIST test)", fmt(teacher_acc), "", None)
    check("compression: KD student accuracy", fmt(kd_acc), "", None)
    check("compression: labels-only student accuracy", fmt(scratch_acc), "", None)
    check(
        "compression: parameters teacher / student",
        f"{params_ratio:.1f}x",
        "≥ 10x",
        params_ratio >= 10,
    )
    check(
        "compression: CPU latency teacher / student (batch 1)",
        fmt(latency_ratios, 2) + "x",
        "≥ 3x",
        mean(latency_ratios) >= 3,
    )
    ratio = mean(kd_acc) / mean(teacher_acc)
    check("compression: student / teacher accuracy", f"{ratio:.4f}", "≥ 0.99", ratio >= 0.99)
    gain, verdict = better_than(kd_acc, scratch_acc)
    check("compression: KD student − labels-only student", gain, "> 0 beyond noise", verdict)
    check("cross-modal: audio student, no audio labels (FSDD test)", fmt(xmodal), "", None)
    check("cross-modal: supervised audio student (fsdd_supervised)", fmt(supervised), "", None)
    ratio = mean(xmodal) / mean(supervised)
    check("cross-modal: no-label / supervised accuracy", f"{ratio:.4f}", "≥ 0.95", ratio >= 0.95)
    check("binding: zero-shot audio accuracy (text prompts)", fmt(zero_shot_audio), "", None)
    check("binding: zero-shot image accuracy (text prompts)", fmt(zero_shot_image), "", None)
    ratio = mean(zero_shot_audio) / mean(supervised)
    check("binding: zero-shot audio / supervised audio", f"{ratio:.4f}", "≥ 0.9", ratio >= 0.9)
    for direction in ("audio_to_image", "image_to_audio"):
        for metric in ("R@1", "R@5", "mAP"):
            values = get("av_digits_bind_text", f"retrieval/{direction}/{metric}")
            check(
                f"binding: retrieval {direction.replace('_to_', '→')} {metric}",
                fmt(values),
                "reported",
                None,
            )
    seconds = {name: timed_epoch_seconds(values) for name, values in epochs.items()}
    epochs_logged = {len(values) for values in epochs.values()}
    if len(epochs_logged) != 1:
        raise ValueError(f"the timing runs logged different numbers of epochs: {epochs_logged}")
    cached = seconds["cached"] / seconds["student_only"]
    uncached = seconds["uncached"] / seconds["student_only"]
    check("cache: epoch time cached / student-only", f"{cached:.3f}", "≤ 1.15", cached <= 1.15)
    check("cache: epoch time uncached / student-only", f"{uncached:.3f}", "(beside it)", None)
    step = overhead["ratio"]
    check("overhead: mmkd step / hand-written PyTorch step", f"{step:.3f}", "≤ 1.05", step <= 1.05)

    lines = [
        f"# AV-digits benchmark — {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `python benchmarks/av_digits.py --seeds {' '.join(map(str, args.seeds))}`  ",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only.  ",
        f"Seeds: {', '.join(map(str, args.seeds))} (mean ± sample std); the teacher is trained "
        f"once (seed 0, {teacher['student/accuracy']:.4f} test accuracy).  ",
        f"Wall time of all its runs and timings: {elapsed / 60:.1f} min.",
        "",
        "| measure | value | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for what, value, target, mark in rows:
        lines.append(f"| {what} | {value} | {target} | {mark} |")
    lines += [
        "",
        f"Epoch seconds ({timed_epochs_label(epochs_logged.pop())}, training batches only, "
        f"{TIMING_EXPERIMENT} student, {samples_label(timed_samples)}): student-only "
        f"{seconds['student_only']:.2f}, cached {seconds['cached']:.2f}, uncached "
        f"{seconds['uncached']:.2f}.  ",
        f"Training step (batch {overhead['batch_size']}, median of {overhead['steps']} steps x "
        f"{overhead['rounds']} interleaved rounds): mmkd {overhead['mmkd_ms']:.2f} ms, "
        f"hand-written {overhead['plain_ms']:.2f} ms.",
        "",
        "Configs: `configs/experiment/{mnist_teacher,mnist_compress,av_digits_xmodal,"
        "fsdd_supervised,av_digits_bind_text}.yaml`; the labels-only baseline is "
        "`experiment=mnist_compress losses=supervised`. Per-run metrics: `results.json`.",
    ]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "runs": results,
                "epoch_seconds": epochs,
                "timed_epoch_seconds": seconds,
                "overhead": overhead,
                "elapsed_s": elapsed,
            },
            indent=2,
            sort_keys=True,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
