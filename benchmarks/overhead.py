"""mmkd against hand-written PyTorch, side by side in one process, in interleaved rounds so
that machine noise hits every variant alike.

    python benchmarks/overhead.py teacher.weights=RUN_DIR/student [key=value ...]
    python benchmarks/overhead.py cifar [--images 10000] [--rounds 5] [--data-root DIR]

The default (AV-digits) mode times mmkd's training step against a minimal hand-written loop
doing the same distillation (same teacher, student, batch and optimizer) on one batch kept in
memory: the framework's cost without the data path.

`cifar` times whole training epochs of a ResNet-8 on a CIFAR-10 subset (batch 128, reflect
pad-crop + flip), data path included: (a) a hand-written loop (images decoded once into one
uint8 tensor, batch augmentation, no DataLoader), (b) mmkd labels-only, (c) mmkd KD from the
teacher store, (d) mmkd labels-only without the decode cache (data.decode_cache=false), in
rounds a b c d a b c d ...; it reports the median of the per-round ratios, the cost of the
first decode and the decode cache's size, and writes them to --out (Markdown) and beside it
(JSON). The teacher is an untrained ResNet-20 (timing does not depend on its weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from mmkd.config import compose, validate
from mmkd.data import build_splits
from mmkd.data.datamodule import RoleCollate
from mmkd.distill_module import DistillModule
from mmkd.models import build_models


class StepClock(pl.Callback):
    """Wall-clock start and end of every training batch."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())


def one_batch(cfg: DictConfig, module: DistillModule, splits: Any) -> dict[str, Any]:
    """The first `data.batch_size` training samples, collated for every role (teacher too)."""
    roles = {"teacher": module.teacher, **module.students}
    collate = RoleCollate(
        {r: m.make_preprocessor() for r, m in roles.items()},
        train=True,
        keep_labels=True,
        num_classes=splits.num_classes,
    )
    return collate([splits.train[i] for i in range(cfg.data.batch_size)])


def mmkd_steps(
    module: DistillModule, batch: dict[str, Any], steps: int, log_dir: str
) -> list[float]:
    """Seconds of each of `steps` training steps of mmkd's LightningModule on `batch`."""
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=CSVLogger(log_dir),
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    return [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)]


def plain_steps(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: dict[str, Any],
    steps: int,
    cfg: DictConfig,
) -> list[float]:
    """The same distillation, written out by hand: KD (T²-scaled KL) + weighted CE, AdamW."""
    temperature, kd_w, ce_w = cfg.losses.kd.temperature, cfg.losses.kd.weight, cfg.losses.ce.weight
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    student.train()
    teacher.eval()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(batch["inputs"]["teacher"]).logits
        logits = student(batch["inputs"]["student"]).logits
        kd = (
            F.kl_div(
                F.log_softmax(logits / temperature, -1),
                F.log_softmax(teacher_logits / temperature, -1),
                reduction="batchmean",
                log_target=True,
            )
            * temperature**2
        )
        loss = kd_w * kd + ce_w * F.cross_entropy(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - start)
    return times


def measure_overhead(
    cfg: DictConfig, steps: int = 40, rounds: int = 5, warmup: int = 3
) -> dict[str, float]:
    """Median step time of each in `rounds` interleaved rounds of `steps` steps; the ratio is
    the median of the per-round ratios (a noisy moment then skews one round, not the result)."""
    validate(cfg)
    pl.seed_everything(0, verbose=False)
    splits = build_splits(cfg.data)
    teachers, students = build_models(cfg, splits)
    module = DistillModule.from_config(cfg, teachers, students, splits.class_names)
    batch = one_batch(cfg, module, splits)
    teacher = module.teacher  # the one teacher (build_models returns {name: teacher})
    plain_teacher, plain_student = copy.deepcopy(teacher), copy.deepcopy(students["student"])
    ours: list[float] = []
    plain: list[float] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(rounds):
            a = mmkd_steps(module, batch, steps + warmup, log_dir)[warmup:]
            b = plain_steps(plain_teacher, plain_student, batch, steps + warmup, cfg)[warmup:]
            ratios.append(statistics.median(a) / statistics.median(b))
            ours += a
            plain += b
    return {
        "mmkd_ms": statistics.median(ours) * 1e3,
        "plain_ms": statistics.median(plain) * 1e3,
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
        "steps": steps,
        "rounds": rounds,
        "batch_size": cfg.data.batch_size,
    }


# --------------------------------------------------------------------------- CIFAR mode

ROOT = Path(__file__).resolve().parents[1]
CIFAR_VARIANTS = {  # name -> overrides on top of the common ones
    "labels_only": ["losses=supervised", "distill.store.views=null"],
    "kd_store": [],
    "labels_only_uncached": [
        "losses=supervised",
        "distill.store.views=null",
        "data.decode_cache=false",
    ],
}


def cifar_overrides(args: argparse.Namespace, work: Path) -> list[str]:
    return [
        "experiment=cifar10_kd",
        f"data.root={args.data_root}",
        f"data.max_train_samples={args.images}",
        "data.max_eval_samples=500",
        "data.subset_seed=0",
        f"data.decode_cache_dir={work / 'decoded'}",
        "teacher.weights=null",
        f"distill.store.views={args.views}",
        f"distill.cache_dir={work / 'store'}",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.extra={enable_model_summary: false}",
        "run.test=false",
        "run.export=false",
        "run.seed=0",
    ]


class HandLoop:
    """The hand-written baseline: the images decoded once into one uint8 tensor, reflect-padded
    once; each batch cropped and flipped with one gather, normalised, trained with SGD."""

    def __init__(self, cfg: DictConfig, paths: list[Path], labels: list[int]) -> None:
        from PIL import Image

        from mmkd.adapters import build_adapter
        from mmkd.adapters.cifar_models import CIFAR_MEAN, CIFAR_STD

        started = time.perf_counter()
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        self.decode_seconds = time.perf_counter() - started
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
        self.padded = F.pad(images, (4, 4, 4, 4), mode="reflect").to(torch.uint8)
        self.labels = torch.tensor(labels)
        self.mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        self.model = build_adapter(cfg.student)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
        self.batch_size = cfg.data.batch_size
        self.generator = torch.Generator().manual_seed(0)

    def epoch(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one training epoch."""
        started, cpu = time.perf_counter(), time.process_time()
        self.model.train()
        n, size = len(self.labels), self.batch_size
        order = torch.randperm(n, generator=self.generator)
        span = torch.arange(32)
        for first in range(0, n, size):
            index = order[first : first + size]
            b = len(index)
            top = torch.randint(0, 9, (b, 1), generator=self.generator) + span
            left = torch.randint(0, 9, (b, 1), generator=self.generator) + span
            flip = torch.rand(b, generator=self.generator) < 0.5
            left = torch.where(flip[:, None], left.flip(1), left)
            crops = self.padded[index[:, None, None], :, top[:, :, None], left[:, None, :]]
            x = crops.permute(0, 3, 1, 2).float().div_(255).sub_(self.mean).div_(self.std)
            loss = F.cross_entropy(self.model({"pixels": x}).logits, self.labels[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - started, time.process_time() - cpu


class CpuEpochClock(pl.Callback):
    """CPU seconds of this process over each training epoch: on a loaded machine far steadier
    than wall time (with 0 loader workers all the data path runs in this process)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds: list[float] = []

    def on_train_epoch_start(self, *args: Any) -> None:
        self.start = time.process_time()

    def on_train_epoch_end(self, *args: Any) -> None:
        self.seconds.append(time.process_time() - self.start)


def mmkd_epoch(overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """(wall seconds (its EpochTimer's figure), CPU seconds) of the training epoch of a
    one-epoch mmkd run."""
    from av_digits import epoch_seconds

    from mmkd.train import train

    shutil.rmtree(run_dir, ignore_errors=True)
    clock = CpuEpochClock()
    train(compose([*overrides, f"run.dir={run_dir}"]), callbacks=[clock])
    return epoch_seconds(run_dir)[-1], clock.seconds[-1]


def cifar_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="overhead.py cifar", description=__doc__)
    parser.add_argument("--data-root", default=os.environ.get("MMKD_DATA_ROOT", "../shared/data"))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first, not counted")
    parser.add_argument("--views", type=int, default=2, help="stored views (K)")
    parser.add_argument("--work", type=Path, default=Path("runs/overhead_cifar"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/RESULTS_overhead_cifar.md")
    parser.add_argument("--skip-uncached", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=0, help="data.num_workers (-1: mmkd chooses)"
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, all variants"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mmkd.data.datamodule import DistillDataModule
    from mmkd.data.decode_cache import DecodedDataset, entry_bytes
    from mmkd.data.workers import available_cores
    from mmkd.models import build_models

    started = time.perf_counter()
    work = args.work.resolve()
    common = cifar_overrides(args, work)
    if args.workers >= 0:  # 0 (default): every CPU second of the data path is this process's
        common.append(f"data.num_workers={args.workers}")
    variants = {k: v for k, v in CIFAR_VARIANTS.items()}
    if args.skip_uncached:
        variants.pop("labels_only_uncached")
    # the first decode: the decode cache built from scratch (train subset + 500 val images)
    shutil.rmtree(work / "decoded", ignore_errors=True)
    cfg = compose([*common, *variants["labels_only"]])
    splits = build_splits(cfg.data)
    _, students = build_models(cfg, splits)
    pre = {"student": students["student"].make_preprocessor()}
    t0 = time.perf_counter()
    datamodule = DistillDataModule(cfg.data, splits, pre, pre, seed=0)
    decode_seconds = time.perf_counter() - t0
    train_set = datamodule.train_set
    assert isinstance(train_set, DecodedDataset), "the decode cache is off for this split"
    cache_bytes = entry_bytes(train_set.folder)
    workers = datamodule.loader_settings
    # the hand loop's images: the same subset, decoded with PIL into one tensor
    root = Path(cfg.data.folder.train)
    ids = [train_set.sample_id(i) for i in range(len(train_set))]
    labels = [int(train_set.entries[i]["fields"]["label"]) for i in range(len(train_set))]
    hand = HandLoop(cfg, [root / i for i in ids], labels)
    print(
        f"[overhead cifar] decode cache built in {decode_seconds:.1f} s "
        f"({cache_bytes / 1e6:.1f} MB); hand loop decoded in {hand.decode_seconds:.1f} s",
        flush=True,
    )
    seconds: dict[str, list[float]] = {"hand": [], **{name: [] for name in variants}}
    cpu: dict[str, list[float]] = {"hand": [], **{name: [] for name in variants}}
    # the store is built in the first KD run's setup, outside its timed epoch
    for r in range(args.warmup + args.rounds):
        row = {"hand": hand.epoch()}
        for name, extra in variants.items():
            row[name] = mmkd_epoch([*common, *extra], work / "runs" / name)
            torch.set_num_threads(args.threads)  # as it was, whatever the run chose
        shown = ", ".join(f"{k} {w:.2f} s (CPU {c:.2f} s)" for k, (w, c) in row.items())
        print(f"[overhead cifar] round {r}: {shown}", flush=True)
        if r >= args.warmup:
            for name, (wall, used) in row.items():
                seconds[name].append(wall)
                cpu[name].append(used)

    def per_round(values: dict[str, list[float]]) -> dict[str, list[float]]:
        return {
            name: [a / b for a, b in zip(values[name], values["hand"], strict=True)]
            for name in variants
        }

    ratios, cpu_ratios = per_round(seconds), per_round(cpu)
    result = {
        "images": args.images,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "views": args.views,
        "batch_size": int(cfg.data.batch_size),
        "cores": available_cores(),
        "torch_threads": args.threads,
        "num_workers": workers.num_workers,
        "workers_chosen": workers.chosen,
        "decode_cache_build_s": decode_seconds,
        "decode_cache_bytes": cache_bytes,
        "hand_decode_s": hand.decode_seconds,
        "epoch_s": seconds,
        "round_ratios": ratios,
        "ratio": {name: statistics.median(values) for name, values in ratios.items()},
        "epoch_cpu_s": cpu,
        "cpu_round_ratios": cpu_ratios,
        "cpu_ratio": {name: statistics.median(values) for name, values in cpu_ratios.items()},
        "median_epoch_s": {name: statistics.median(values) for name, values in seconds.items()},
        "wall_s": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python benchmarks/overhead.py cifar " + " ".join(argv),
    }
    write_cifar_report(args.out, result)
    print(json.dumps(result["ratio"], indent=2))
    return 0


TARGETS = {"labels_only": 1.05, "kd_store": 1.10}
LABELS = {
    "labels_only": "mmkd labels-only / hand-written loop",
    "kd_store": "mmkd KD from the store / hand-written labels-only loop",
    "labels_only_uncached": "mmkd labels-only, data.decode_cache=false / hand-written loop",
}


def write_cifar_report(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# CIFAR-10 data path: mmkd against a hand-written loop",
        "",
        f"`{result['command']}` on {result['date']} ({result['machine']}; "
        f"{result['cores']} cores available to the process, torch threads "
        f"{result['torch_threads']}). The machine was shared with other jobs while it ran: "
        "the figures are medians of per-round ratios from interleaved rounds. "
        f"Whole run: {result['wall_s'] / 60:.1f} min.",
        "",
        f"ResNet-8 (`student=cifar_resnet8`), {result['images']:,} CIFAR-10 training images, "
        f"batch {result['batch_size']}, reflect pad-crop 4 + horizontal flip; one training "
        f"epoch per variant per round, {result['rounds']} rounds after {result['warmup']} "
        "warm-up round(s); "
        f"KD from a store of {result['views']} views of an untrained ResNet-20 teacher. "
        f"mmkd chose {result['num_workers']} DataLoader workers "
        f"({'chosen from the measured batch cost' if result['workers_chosen'] else 'set'}).",
        "",
        "| ratio (median of rounds) | wall | per round | CPU | per round | target | met (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, value in result["ratio"].items():
        target = TARGETS.get(name)
        rounds = ", ".join(f"{v:.3f}" for v in result["round_ratios"][name])
        used = result["cpu_ratio"][name]
        cpu_rounds = ", ".join(f"{v:.3f}" for v in result["cpu_round_ratios"][name])
        met = "" if target is None else ("yes" if used <= target else "no")
        bound = "" if target is None else f"≤ {target:.2f}"
        lines.append(
            f"| {LABELS[name]} | {value:.3f} | {rounds} | {used:.3f} | {cpu_rounds} | {bound} "
            f"| {met} |"
        )
    epochs = ", ".join(f"{k} {v:.2f} s" for k, v in result["median_epoch_s"].items())
    lines += [
        "",
        f"Median epoch seconds: {epochs}. CPU: the process's CPU seconds over the epoch "
        "(time.process_time; every variant ran with 0 loader workers, so it covers the data "
        "path), far steadier than wall time on a loaded machine.",
        "",
        f"First decode: the decode cache of the {result['images']:,}-image train subset and 500 "
        f"validation images took {result['decode_cache_build_s']:.1f} s to build (once; later "
        f"runs open it), {result['decode_cache_bytes'] / 1e6:.1f} MB for the train subset "
        "(uint8, 32x32x3 per image). The hand-written loop's own decode of the same images "
        f"into one tensor took {result['hand_decode_s']:.1f} s.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["cifar"]:
        sys.exit(cifar_main(sys.argv[2:]))
    result = measure_overhead(
        compose(["experiment=mnist_compress", "distill.cache=false", *sys.argv[1:]])
    )
    print(result)
