"""The text distillation benchmark: a fine-tuned MiniLM teacher compressed into a BiLSTM and a
3-layer transformer cut from it, on SST-2 or AG News.

    python benchmarks/text.py --task sst2|agnews [--data-root DIR] [--seeds 0 1 2] [--out DIR]
                              [--full] [--rows ROW ...] [--jobs N]

Writes the manifests (DIR/manifests/*.csv, header `text,label`, labels as class names) from
the shipped files: SST-2 train / dev; AG News train / a fixed seeded 10 % validation split.
Trains the teacher once (experiment=<task>_teacher, reused when DIR/runs/teacher/seed0 holds a
finished run), then for each seed the rows below. Every setting
is chosen and every accuracy reported on SST-2 dev / the AG News validation split (the test sets
are withheld). Each run lives in DIR/runs/<row>/seed<k>/ and is skipped when its metrics.json
exists, so an interrupted benchmark resumes. On the CPU the student runs go to --jobs worker
processes (default: one per core, at most 4), each with its share of the cores as torch threads;
the latencies and the epoch-time ratio are measured afterwards, with nothing else running.
Writes DIR/RESULTS.md and DIR/results.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from av_digits import better_than, fmt, run
from cifar10 import timed_epochs

from mmkd.errors import MMKDError
from mmkd.loggers import read_csv_log

ROOT = Path(__file__).resolve().parents[1]
SST2_CLASSES = ("negative", "positive")  # stsa.binary labels 0 / 1

# What each protocol trains, per task. CPU, sized for 2 cores (SST-2's student rows, 3 seeds,
# in at most 90 minutes): 48 tokens; the teacher fine-tuned on every training text (SST-2 2
# epochs; AG News 1 epoch, its 9,001 articles fill all 48 tokens, SST-2's sentences about half);
# students on every training text too, BiLSTM 150 units per direction, 4 epochs (batch 64, the
# teacher-initialised embeddings frozen on SST-2, trained on AG News), the 3-layer transformer
# 3 epochs on SST-2 and 2 on AG News;
# K=4 stored views of which a quarter keep the text as it is (Tang et al. add their augmented
# sentences to the originals; a student that never sees a clean sentence is tested on clean
# ones) and, for SST-2, 2,000 GLUE phrases as the transfer set.
# Full: the papers' scale, for a GPU (128 tokens, 4 teacher epochs on everything, Tang et al.'s
# 300-unit BiLSTM and 20 views per sentence).
PROTOCOLS = {
    "cpu": {
        "max_length": 48,
        "teacher_epochs": {"sst2": 2, "agnews": 1},
        # every training text: a 4,000-sentence SST-2 subset cost the BiLSTM 2.5 points (3-seed
        # means 0.8154 vs 0.8406); a 2,000-article AG News subset (128 BiLSTM steps) left KD
        # below labels only, 0.7603 vs 0.8020
        "train_samples": {"sst2": None, "agnews": None},
        "bilstm_epochs": 4,
        # LSTM units per direction. Tang et al.'s 300 ran 4.2-5.8x faster than the teacher at
        # batch 1 depending on the CPU (3.3x on one): under the 5x target. SST-2, 3 seeds, the
        # same stores: 150 units 11.1x, KD with views 0.8421 (300: 0.8448), labels only 0.8310
        # (300: 0.8356), KD with views - labels only +1.11 points (300: +0.92)
        "bilstm_hidden": 150,
        # AG News, seed 0 (held-out 1,000): trained embeddings lift KD with views from 0.851 to
        # 0.871, labels only from 0.851 to 0.855; SST-2 was not swept again
        "bilstm_frozen_embeddings": {"sst2": True, "agnews": False},
        "student_batch": 64,
        "transformer_epochs": {"sst2": 3, "agnews": 2},
        "views": 4,
        "keep_prob": 0.25,
        "phrases": 2000,  # of GLUE's 60,614 training phrases, a fixed subset (transfer set)
    },
    "full": {
        "max_length": 128,
        "teacher_epochs": {"sst2": 4, "agnews": 4},
        "bilstm_epochs": 30,
        "bilstm_hidden": 300,  # Tang et al.
        "transformer_epochs": 10,
        "views": 20,
        "keep_prob": 0.25,
    },
    # checks the script end to end in a few minutes; no figures
    "smoke": {
        "max_length": 32,
        "teacher_epochs": {"sst2": 1, "agnews": 1},
        "teacher_samples": {"sst2": 256, "agnews": 256},
        "bilstm_epochs": 2,
        "bilstm_hidden": 150,
        "transformer_epochs": 1,
        "train_samples": {"sst2": 256, "agnews": 256},
        "eval_samples": 128,
        "views": 2,
        "phrases": 64,
    },
}
ROWS = ("teacher", "bilstm_labels_only", "bilstm_kd", "bilstm_kd_aug", "small_transformer_kd")
# logits KD alone (no token term): runs without issue 15's token terms, reported beside the rest
EXTRA_ROWS = ("small_transformer_kd_logits",)
TRANSFER_LABEL = {"sst2": " + transfer phrases"}  # the tasks with a transfer set (GLUE's phrases)
ROW_LABELS = {
    "teacher": "teacher: all-MiniLM-L6-v2 fine-tuned (6 layers, 384-d)",
    "bilstm_labels_only": "BiLSTM, labels only",
    "bilstm_kd": "BiLSTM, KD from stored teacher logits (sentences)",
    "bilstm_kd_aug": "BiLSTM, KD, augmented views",  # + TRANSFER_LABEL where a task has one
    "small_transformer_kd": "3 layers kept from the teacher (0, 2, 4), KD + token term",
    "small_transformer_kd_logits": "3 layers kept from the teacher (0, 2, 4), KD on logits only",
}
PUBLISHED = {
    "sst2": (
        "Published (SST-2 *test* set, 1,821 sentences; ours is dev, the test set is withheld): "
        "Tang et al. 2019, BiLSTM 86.7 % → 90.7 % distilled from BERT-large (94.9 %) on ~20 "
        "augmented views per sentence plus word2vec embeddings; DistilBERT (Sanh et al. 2019) "
        "SST-2 *dev* 91.3 % vs BERT-base 92.7 %."
    ),
    "agnews": (
        "Published (official 7,600-article test set, trained on all 120,000): char-CNN "
        "87.2-89.8 %, fastText 92.5 %, BERT-base fine-tuned ≈ 94-95 % (Zhang et al. 2015; "
        "Joulin et al. 2017). Ours trains on 9,001 articles and reports a held-out 1,000."
    ),
}


def per_task(value: Any, task: str) -> Any:
    """A protocol setting that may differ per task ({task: value}) or not (a plain value)."""
    return value[task] if isinstance(value, dict) else value


def write_sst2_manifests(data_root: Path, folder: Path) -> dict[str, Path]:
    """DIR/{train,dev}.csv (header text,label; labels as class names) from stsa.binary.*."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "dev"):
        source = data_root / "sst2" / f"stsa.binary.{split}"
        if not source.is_file():
            raise SystemExit(f"{source} not found (--data-root: the folder holding sst2/)")
        rows = []
        for line_no, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            label, _, text = line.partition(" ")
            if label not in ("0", "1") or not text.strip():
                raise SystemExit(f"{source} line {line_no}: not `LABEL SENTENCE`: {line!r}")
            rows.append((text, SST2_CLASSES[int(label)]))
        paths[split] = write_csv(folder / f"{split}.csv", rows)
    return paths


def write_csv(path: Path, rows: Iterable[tuple[str, str]]) -> Path:
    """A manifest with a header `text,label`, written atomically, and only when its content
    changed, so its mtime says when its rows last changed. (The teacher store once keyed a
    manifest by size and mtime, and every invocation rebuilt every store; it now keys the rows.)"""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(("text", "label"))
    writer.writerows(rows)
    content = buffer.getvalue().encode("utf-8")
    if path.is_file() and path.read_bytes() == content:
        return path
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)
    return path


def write_agnews_manifests(data_root: Path, folder: Path) -> dict[str, Path]:
    """DIR/{train,val}.csv from agnews/train.tsv (TEXT<TAB>CLASS, no header): a fixed seeded
    10 % held out as validation (AGNEWS_VAL_SEED), so every run and seed sees the same split."""
    import random

    source = data_root / "agnews" / "train.tsv"
    if not source.is_file():
        raise SystemExit(f"{source} not found (--data-root: the folder holding agnews/)")
    rows = []
    for line_no, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        text, tab, label = line.rpartition("\t")
        if not tab or not text.strip() or not label.strip():
            raise SystemExit(f"{source} line {line_no}: not `TEXT<TAB>CLASS`")
        rows.append((text, label))
    order = list(range(len(rows)))
    random.Random(AGNEWS_VAL_SEED).shuffle(order)
    held = set(order[: len(rows) // 10])
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "train": write_csv(folder / "train.csv", [r for i, r in enumerate(rows) if i not in held]),
        "val": write_csv(folder / "val.csv", [r for i, r in enumerate(rows) if i in held]),
    }


AGNEWS_VAL_SEED = 0


def data_overrides(task: str, data_root: Path, out: Path) -> list[str]:
    """The data settings every run of the task shares (manifests written under DIR/manifests)."""
    if task == "sst2":
        manifests = write_sst2_manifests(data_root, out / "manifests")
        train, val = manifests["train"], manifests["dev"]
    else:
        manifests = write_agnews_manifests(data_root, out / "manifests")
        train, val = manifests["train"], manifests["val"]
    return [f"data.root={data_root}", f"data.manifest.train={train}", f"data.manifest.val={val}"]


def student_rows(
    task: str, protocol: dict, teacher_dir: Path, transfer: Path | None
) -> dict[str, list[str]]:
    """Each student row's overrides on top of experiment=<task>_kd (seed added by the caller).

    bilstm_kd_aug and the token term of small_transformer_kd use the text augmentation views and
    token-level terms of the keys agreed in TEXT_CONTRACT.md (issue 15, items 5-6)."""
    bilstm = [
        f"trainer.max_epochs={protocol['bilstm_epochs']}",
        f"student.text_rnn.init_from={teacher_dir}",
        f"student.text_rnn.max_length={protocol['max_length']}",
        f"student.text_rnn.hidden_size={protocol['bilstm_hidden']}",
        "student.text_rnn.freeze_embeddings="
        f"{per_task(protocol.get('bilstm_frozen_embeddings', False), task)}",
    ]
    small = [
        "student=text_small",
        f"student.text.init_from={teacher_dir}",
        "student.text.keep_layers=[0,2,4]",
        f"trainer.max_epochs={per_task(protocol['transformer_epochs'], task)}",
        "optim.lr=1.0e-4",
        "distill.store.views=1",
    ]
    return {
        "bilstm_labels_only": [*bilstm, "losses=supervised", "distill.store.views=null"],
        "bilstm_kd": [*bilstm, "distill.store.views=1"],
        "bilstm_kd_aug": [
            *bilstm,
            f"distill.store.views={protocol['views']}",
            *TEXT_AUG_OVERRIDES,
            f"teacher.text.augment.keep_prob={protocol.get('keep_prob', 0.0)}",
            f"student.text_rnn.augment.keep_prob={protocol.get('keep_prob', 0.0)}",
            f"teacher.text.augment.ngram_prob={per_task(NGRAM_PROB, task)}",
            f"student.text_rnn.augment.ngram_prob={per_task(NGRAM_PROB, task)}",
            *([f"data.manifest.transfer={transfer}"] if transfer else []),
        ],
        "small_transformer_kd": [*small, *TOKEN_TERM_OVERRIDES],
        "small_transformer_kd_logits": small,
    }


# Tang et al.'s masking (p 0.1) and n-gram sampling (p 0.25; NGRAM_PROB) as stored views, the
# same on teacher and student, and the token-level term of small_transformer_kd: the keys of
# issue 15's text augmentation and token terms (branch textaug, TEXT_CONTRACT.md); SST-2 adds
# GLUE's phrases as an unlabelled transfer set (data.manifest.transfer)
TEXT_AUG_OVERRIDES = [
    "teacher.text.augment.mask_prob=0.1",
    "student.text_rnn.augment.mask_prob=0.1",
    "distill.store.dtype=float16",
]
# n-gram sampling replaces a text by 1-5 of its words: a phrase of a sentence, but no longer a
# news article (AG News, seed 0: K=4 views with it 0.845, labels only 0.849, sentences alone 0.859)
NGRAM_PROB = {"sst2": 0.25, "agnews": 0.0}
TOKEN_TERM_OVERRIDES = ["losses=text_tokens", "distill.store.dtype=float16"]


def write_phrases_manifest(data_root: Path, folder: Path, limit: int | None) -> Path:
    """DIR/phrases.csv (header text,label, the train manifest's layout) from GLUE's training
    phrases (phrases.train.tsv); `limit`: a fixed seeded subset. Its labels are never read."""
    import random

    source = data_root / "sst2" / "phrases.train.tsv"
    with source.open(encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if limit is not None and limit < len(rows):
        rows = random.Random(0).sample(rows, limit)
    return write_csv(
        folder / "phrases.csv",
        ((r["sentence"].strip(), SST2_CLASSES[int(r["label"])]) for r in rows),
    )


def final_val_accuracy(run_dir: Path) -> float:
    """The student's accuracy on the validation split after the last epoch (the split every
    figure here is reported on), from the run's CSV log."""
    rows = [r for r in read_csv_log(run_dir) if "val/accuracy" in r]
    if not rows:
        raise RuntimeError(f"{run_dir}: no val/accuracy logged")
    return float(rows[-1]["val/accuracy"])


def latencies(folders: dict[str, Path], seconds: float, rounds: int = 3) -> dict[str, dict]:
    """Parameters and batch-1 CPU latency (ms, median of interleaved rounds) of each exported
    model on one real sentence, and whether it exports to ONNX."""
    from mmkd.export import export_compiled, load_exported
    from mmkd.latency import count_parameters, cpu_latency_ms

    loaded = {name: load_exported(folder) for name, folder in folders.items() if folder.is_dir()}
    sentence = "a stirring , funny and finally transporting re-imagining of beauty and the beast"
    batches = {}
    for name, exported in loaded.items():
        pre = exported.model.make_preprocessor()
        batches[name] = pre.collate([pre(sentence, train=False)])
    times: dict[str, list[float]] = {name: [] for name in loaded}
    for _ in range(rounds):
        for name, exported in loaded.items():
            times[name].append(cpu_latency_ms(exported.model, batches[name], seconds))
    out = {}
    for name, exported in loaded.items():
        try:
            onnx = str(export_compiled(folders[name], "onnx"))
        except Exception as err:
            onnx = f"failed: {type(err).__name__}: {str(err).splitlines()[0]}"
        out[name] = {
            "params": count_parameters(exported.model),
            "latency_ms": statistics.median(times[name]),
            "onnx": onnx,
        }
    return out


def data_share(overrides: Sequence[str], batches: int = 12, rounds: int = 3) -> dict[str, float]:
    """Share of a labels-only student epoch spent outside the model: seconds to draw `batches`
    training batches from the loader (token cache, padding, collate; the loader's start
    included) against seconds of the model's forward, backward and optimizer step on those
    batches, alternated `rounds` times (medians)."""
    from itertools import islice

    from mmkd.config import compose, validate
    from mmkd.data import build_splits
    from mmkd.data.datamodule import DistillDataModule
    from mmkd.models import build_models

    cfg = compose(list(overrides))
    validate(cfg)
    splits = build_splits(cfg.data)
    _, students = build_models(cfg, splits)
    student = students["student"].train()
    pre = {"student": student.make_preprocessor()}
    data = DistillDataModule(
        cfg.data,
        splits,
        pre,
        pre,
        seed=0,
        token_cache_dir=Path(cfg.distill.cache_dir) / "tokens" if cfg.distill.cache_dir else None,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loader_s, model_s = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        drawn = list(islice(iter(data.train_dataloader()), batches))
        loader_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for batch in drawn:
            out = student(batch["inputs"]["student"])
            loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model_s.append(time.perf_counter() - started)
    loader, model = statistics.median(loader_s), statistics.median(model_s)
    return {"loader_s": loader, "model_s": model, "share": loader / (loader + model)}


def epoch_ratio(
    base: Sequence[str], rows: dict[str, list[str]], work: Path, rounds: int = 3
) -> dict:
    """Stored-view KD epoch over labels-only epoch for the BiLSTM, timed in interleaved rounds
    of one-epoch runs on a fixed 2,000-text subset (after a warm-up round that builds the store
    and the token cache), so that machine load hits both alike: the median of the per-round
    ratios of wall time and of this process's CPU time (0 loader workers on CPU)."""
    from overhead import mmkd_epoch

    variants = {"labels_only": rows["bilstm_labels_only"], "kd_store": rows["bilstm_kd"]}
    timed: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for round_no in range(rounds + 1):
        for name, overrides in variants.items():
            seconds = mmkd_epoch(
                [
                    *base,
                    *overrides,
                    "trainer.max_epochs=1",
                    "data.max_train_samples=2000",
                    "data.subset_seed=0",
                    "run.seed=0",
                    "run.test=false",
                ],
                work / name,
            )
            if round_no:  # round 0 warms up
                timed[name].append(seconds)
    wall = [k[0] / b[0] for k, b in zip(timed["kd_store"], timed["labels_only"], strict=True)]
    cpu = [k[1] / b[1] for k, b in zip(timed["kd_store"], timed["labels_only"], strict=True)]
    return {
        "wall": statistics.median(wall),
        "cpu": statistics.median(cpu),
        "wall_rounds": wall,
        "cpu_rounds": cpu,
        "epoch_s": {name: statistics.median(t[0] for t in v) for name, v in timed.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("sst2", "agnews"), required=True)
    parser.add_argument(
        "--data-root",
        default=os.environ.get("MMKD_DATA_ROOT", str(ROOT.parent / "shared" / "data")),
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="default: runs/text_<task>")
    parser.add_argument("--full", action="store_true", help="the papers' scale (GPU)")
    parser.add_argument("--smoke", action="store_true", help="a tiny protocol to test the script")
    parser.add_argument("--teacher-only", action="store_true", help="stop after the teacher")
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train the rows of --seeds and stop: no latency, cost or report (seeds run as "
        "parallel processes; a last invocation without it measures and reports)",
    )
    parser.add_argument(
        "--rows", nargs="+", choices=(*ROWS[1:], *EXTRA_ROWS), default=list(ROWS[1:])
    )
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="student runs trained at once, each in its own process (default: one per CPU core, "
        "at most 4, on the CPU; 1 otherwise)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from DIR/results.json"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        out = Path(args.out or ROOT / "runs" / f"text_{args.task}").resolve()
        saved = json.loads((out / "results.json").read_text())
        results = saved.pop("runs")
        args.seeds = saved["seeds"]
        write_report(out, args.task, args, saved, results)
        return 0
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    protocol = PROTOCOLS["full" if args.full else "smoke" if args.smoke else "cpu"]
    task = args.task
    out = Path(args.out or ROOT / "runs" / f"text_{task}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root).resolve()
    common = [
        *data_overrides(task, data_root, out),
        f"trainer.accelerator={args.accelerator}",
        f"student.text.max_length={protocol['max_length']}",
    ]
    if protocol.get("eval_samples"):
        common.append(f"data.max_eval_samples={protocol['eval_samples']}")
    results: dict[str, dict[str, float]] = {}

    def record(name: str, overrides: Sequence[str]) -> dict[str, float]:
        results[name] = run(out, name, overrides)
        return results[name]

    teacher_samples = protocol.get("teacher_samples", {}).get(task)
    teacher_subset = (
        [f"data.max_train_samples={teacher_samples}", "data.subset_seed=0"]
        if teacher_samples
        else []
    )
    record(
        "teacher/seed0",
        [
            f"experiment={task}_teacher",
            f"trainer.max_epochs={protocol['teacher_epochs'][task]}",
            *teacher_subset,
            *common,
        ],
    )
    if args.teacher_only:
        return 0
    after_teacher = time.perf_counter()
    teacher_dir = out / "runs" / "teacher" / "seed0" / "student"
    students = [
        f"experiment={task}_kd",
        f"teacher.weights={teacher_dir}",
        f"distill.cache_dir={out / 'teacher_store'}",
        *[o for o in common if not o.startswith("student.text.max_length")],
    ]
    if protocol.get("student_batch"):
        students.append(f"data.batch_size={protocol['student_batch']}")
    train_samples = protocol.get("train_samples", {}).get(task)
    if train_samples:
        students += [f"data.max_train_samples={train_samples}", "data.subset_seed=0"]
    transfer = (
        write_phrases_manifest(data_root, out / "manifests", protocol.get("phrases"))
        if task == "sst2"
        else None
    )
    rows = student_rows(task, protocol, teacher_dir, transfer)
    failed: dict[str, str] = {}
    tasks = [(seed, row) for seed in args.seeds for row in args.rows]
    reused = sum((out / "runs" / row / f"seed{s}" / "metrics.json").is_file() for s, row in tasks)
    jobs = args.jobs or (min(os.cpu_count() or 1, 4) if args.accelerator == "cpu" else 1)
    if jobs > 1 and not args.train_only and len(tasks) > 1:
        train_in_workers(args, out, tasks, jobs)  # the loop below then finds every run finished
    for seed in args.seeds:  # the rows of one seed run back to back: their epoch times compare
        for row in args.rows:
            name = f"{row}/seed{seed}"
            overrides = [*students, *rows[row], f"run.seed={seed}", "run.test=false"]
            if row.startswith("small_transformer_kd"):
                overrides.append(f"student.text.max_length={protocol['max_length']}")
            try:
                record(name, overrides)
                results[name]["student/accuracy"] = final_val_accuracy(out / "runs" / name)
            except MMKDError as err:  # a row this branch cannot run yet (a config key)
                failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                print(f"[benchmark] {name} failed: {failed[name]}", flush=True)
    if args.train_only:
        return 0
    costs = latencies(
        {
            "teacher": teacher_dir,
            **{
                row: out / "runs" / row / f"seed{args.seeds[0]}" / "student"
                for row in ("bilstm_labels_only", "small_transformer_kd", *EXTRA_ROWS)
            },
        },
        seconds=0.5 if args.smoke else 2.0,
    )
    share = data_share(
        [
            *students,
            *rows["bilstm_labels_only"],
            f"run.dir={out / 'runs' / 'data_share'}",
        ]
    )
    report = summarise(out, args.seeds, results, failed, costs, share)
    report["epoch_ratio"] = epoch_ratio(students, rows, out / "runs" / "epoch_timing")
    report["protocol"] = protocol
    report["wall_s"] = time.perf_counter() - started
    report["after_teacher_wall_s"] = time.perf_counter() - after_teacher
    report["jobs"] = jobs
    report["student_threads"] = student_threads(jobs)
    report["runs_reused"] = reused
    write_report(out, task, args, report, results)
    return 0


# the slowest rows first, so that the last runs to finish are short ones
ROW_COST_ORDER = (
    "bilstm_kd_aug",
    "small_transformer_kd",
    "small_transformer_kd_logits",
    "bilstm_kd",
    "bilstm_labels_only",
)


def student_threads(jobs: int) -> int:
    """Torch threads of each of `jobs` student processes: OMP_NUM_THREADS, or a share of the
    cores."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // jobs))


def worker_threads(report: dict) -> str:
    """', each with N torch thread(s)' when the student runs had their own processes."""
    threads = report.get("student_threads")
    return f", each with {threads} torch thread(s)" if threads and report.get("jobs", 1) > 1 else ""


def worker_order(tasks: Sequence[tuple[int, str]], seeds: Sequence[int]) -> list[tuple[int, str]]:
    """(seed, row) in the order the workers take them: seed by seed, slowest row first."""
    return sorted(tasks, key=lambda t: (list(seeds).index(t[0]), ROW_COST_ORDER.index(t[1])))


def train_in_workers(
    args: argparse.Namespace, out: Path, tasks: Sequence[tuple[int, str]], jobs: int
) -> None:
    """Train every (seed, row) of `tasks` in `jobs` processes at once, each this script with
    --train-only for one run (a run already finished returns at once). Seed by seed, slowest
    row first: a seed's rows use different teacher stores, so they do not wait for each other;
    the next seed's runs find the stores built. Each process gets its share of the cores as
    torch threads unless OMP_NUM_THREADS is set, and logs to DIR/logs/<row>_seed<k>.log."""
    order = worker_order(tasks, args.seeds)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(student_threads(jobs)))
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    protocol = ["--full"] if args.full else ["--smoke"] if args.smoke else []

    def train_one(seed_row: tuple[int, str]) -> None:
        seed, row = seed_row
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *("--task", args.task, "--data-root", args.data_root, "--out", str(out)),
            *("--seeds", str(seed), "--rows", row, "--accelerator", args.accelerator),
            "--train-only",
            *protocol,
        ]
        log = logs / f"{row}_seed{seed}.log"
        print(f"[benchmark] {row}/seed{seed}: training (log {log})", flush=True)
        with log.open("w") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        if code.returncode != 0:
            print(f"[benchmark] {row}/seed{seed}: exit {code.returncode}, see {log}", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(train_one, order))


def summarise(
    out: Path,
    seeds: Sequence[int],
    results: dict[str, dict[str, float]],
    failed: dict[str, str],
    costs: dict[str, dict],
    share: dict[str, float],
) -> dict:
    """Accuracy per row and seed, the targets' figures, epoch times, costs."""
    accuracy = {
        row: [
            results[f"{row}/seed{s}"]["student/accuracy"]
            for s in seeds
            if f"{row}/seed{s}" in results
        ]
        for row in (*ROWS[1:], *EXTRA_ROWS)
    }
    accuracy["teacher"] = [results["teacher/seed0"]["student/accuracy"]]
    epoch = {
        row: [
            statistics.median(timed_epochs(out / "runs" / row / f"seed{s}"))
            for s in seeds
            if f"{row}/seed{s}" in results
        ]
        for row in (*ROWS[1:], *EXTRA_ROWS)
    }
    # stored-view KD over labels-only, per seed (the rows of a seed ran back to back)
    ratios = [
        statistics.median(timed_epochs(out / "runs" / "bilstm_kd" / f"seed{s}"))
        / statistics.median(timed_epochs(out / "runs" / "bilstm_labels_only" / f"seed{s}"))
        for s in seeds
        if f"bilstm_kd/seed{s}" in results and f"bilstm_labels_only/seed{s}" in results
    ]
    return {
        "seeds": list(seeds),
        "accuracy": accuracy,
        "epoch_s": epoch,
        "kd_over_labels_only_epoch": ratios,
        "costs": costs,
        "data_share": share,
        "failed": failed,
        "teacher_wall_s": results["teacher/seed0"].get("wall_s"),
    }


EVAL_SPLIT = {"sst2": "SST-2 dev (872 sentences)", "agnews": "the held-out 10 % (1,000 articles)"}


def target(name: str, figure: str, met: bool | str) -> str:
    """A row of the targets table."""
    verdict = met if isinstance(met, str) else "yes" if met else "no"
    return f"| {name} | {figure} | {verdict} |"


def write_report(
    out: Path,
    task: str,
    args: argparse.Namespace,
    report: dict,
    results: dict[str, dict[str, float]],
) -> None:
    """DIR/results.json (every run's metrics + the summary) and DIR/RESULTS.md."""
    (out / "results.json").write_text(
        json.dumps({"runs": results, **report}, indent=2, sort_keys=True, default=str)
    )
    acc, costs, protocol = report["accuracy"], report["costs"], report["protocol"]
    frozen = per_task(protocol.get("bilstm_frozen_embeddings", False), task)
    teacher = acc["teacher"][0]
    seeds = " ".join(map(str, args.seeds))
    students_s = sum(m.get("wall_s", 0.0) for name, m in results.items() if name != "teacher/seed0")
    lines = [
        f"# Text distillation benchmark: {task}",
        "",
        f"Command: `python benchmarks/text.py --task {task}{' --full' if args.full else ''} "
        f"--seeds {seeds}` on {platform.machine()} with {torch.get_num_threads()} torch threads "
        f"({args.accelerator}). The student runs sum to {students_s / 60:.1f} min of wall time "
        f"(each run's own, as recorded when it finished; an interrupted attempt is not counted), "
        f"the teacher {results['teacher/seed0'].get('wall_s', 0) / 60:.1f} min; this invocation "
        f"{report['wall_s'] / 60:.1f} min, {report.get('after_teacher_wall_s', 0) / 60:.1f} after "
        f"the teacher, with {report.get('jobs', 1)} student run(s) at a time"
        f"{worker_threads(report)} "
        f"({report.get('runs_reused', 0)} runs found finished and reused; the latencies, the data "
        "share and the epoch ratio are measured anew at the end). "
        f"Each run's own wall time: teacher {results['teacher/seed0'].get('wall_s', 0) / 60:.1f} "
        f"min; students "
        + ", ".join(
            f"{name} {m['wall_s'] / 60:.1f}"
            for name, m in results.items()
            if name != "teacher/seed0" and "wall_s" in m
        )
        + " min.",
        "",
        f"Protocol: {protocol['max_length']} tokens; teacher all-MiniLM-L6-v2 fine-tuned "
        f"{protocol['teacher_epochs'][task]} epoch(s) (AdamW 1e-4, warm-up 10 %, weight decay "
        f"0.01) on {protocol.get('teacher_samples', {}).get(task) or 'all'} training texts; "
        f"students on {protocol.get('train_samples', {}).get(task) or 'all'} training texts (a "
        f"fixed subset when not all), K={protocol.get('views')} stored views (keep_prob "
        f"{protocol.get('keep_prob', 0.0)}, masking p 0.1, n-gram sampling p "
        f"{per_task(NGRAM_PROB, task)}), "
        f"BiLSTM {protocol.get('bilstm_hidden', 300)} units per direction, "
        f"{protocol['bilstm_epochs']} epochs (AdamW 2e-3, the teacher's token "
        f"embeddings {'frozen' if frozen else 'trained'}), 3-layer transformer "
        f"{per_task(protocol['transformer_epochs'], task)} epochs (AdamW 1e-4); KD T=2 + 0.5 CE "
        "from stored "
        f"teacher logits. Accuracy on {EVAL_SPLIT[task]} after the last epoch; mean ± std over "
        f"seeds {', '.join(map(str, args.seeds))} (teacher: one run).",
        "",
        "| row | accuracy | params | CPU batch-1 ms | teacher ms / student ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    model_of = {
        "teacher": "teacher",
        "bilstm_labels_only": "bilstm_labels_only",
        "bilstm_kd": "bilstm_labels_only",
        "bilstm_kd_aug": "bilstm_labels_only",
        "small_transformer_kd": "small_transformer_kd",
        "small_transformer_kd_logits": "small_transformer_kd_logits",
    }
    teacher_ms = costs.get("teacher", {}).get("latency_ms")

    def label(row: str) -> str:
        return ROW_LABELS[row] + (TRANSFER_LABEL.get(task, "") if row == "bilstm_kd_aug" else "")

    for row in (*ROWS, *EXTRA_ROWS):
        values = acc.get(row) or []
        cost = costs.get(model_of[row], {})
        ms = cost.get("latency_ms")
        speedup = f"{teacher_ms / ms:.1f}x" if ms and teacher_ms and row != "teacher" else ""
        lines.append(
            f"| {label(row)} | {fmt(values) if values else 'not run'} | "
            f"{cost['params'] / 1e6:.2f}M | {ms:.2f} | {speedup} |"
            if cost
            else f"| {label(row)} | {fmt(values) if values else 'not run'} |  |  |  |"
        )
    lines += ["", "| target | figure | met |", "| --- | --- | --- |"]
    if acc["bilstm_kd_aug"] and acc["bilstm_labels_only"]:
        value, verdict = better_than(acc["bilstm_kd_aug"], acc["bilstm_labels_only"])
        lines.append(
            f"| bilstm_kd_aug > bilstm_labels_only beyond the combined s.e. | {value} | {verdict} |"
        )
    else:
        lines.append(
            "| bilstm_kd_aug > bilstm_labels_only beyond the combined s.e. | not run | no |"
        )
    if acc["bilstm_kd"] and acc["bilstm_labels_only"]:
        value, verdict = better_than(acc["bilstm_kd"], acc["bilstm_labels_only"])
        lines.append(f"| (beside it) bilstm_kd − bilstm_labels_only | {value} | {verdict} |")
    small = "small_transformer_kd" if acc["small_transformer_kd"] else EXTRA_ROWS[0]
    if acc[small]:
        gap = teacher - statistics.fmean(acc[small])
        lines.append(
            target(
                "small_transformer_kd within 2 points of the teacher",
                f"{gap * 100:.2f} points below",
                gap <= 0.02,
            )
        )
    else:
        lines.append("| small_transformer_kd within 2 points of the teacher | not run | no |")
    timing = report.get("epoch_ratio")
    if timing:
        rounds = ", ".join(f"{r:.3f}" for r in timing["cpu_rounds"])
        lines.append(
            target(
                "stored-view KD epoch / labels-only epoch (BiLSTM, 2,000 texts, interleaved "
                f"one-epoch runs; CPU time, rounds {rounds}; wall {timing['wall']:.3f})",
                f"{timing['cpu']:.3f}",
                timing["cpu"] <= 1.15,
            )
        )
    for row in ("bilstm_labels_only", "small_transformer_kd", *EXTRA_ROWS):
        ms = costs.get(row, {}).get("latency_ms")
        if ms and teacher_ms:
            lines.append(
                target(
                    f"{row} batch-1 CPU latency ≥ 5x below the teacher's",
                    f"{teacher_ms / ms:.1f}x",
                    teacher_ms / ms >= 5,
                )
            )
    teacher_s = results["teacher/seed0"].get("wall_s", 0.0)
    after_teacher_s, jobs = report.get("after_teacher_wall_s"), report.get("jobs", 1)
    if report.get("runs_reused") == 0 and after_teacher_s:  # this invocation trained every run
        what = (
            f"the benchmark after the teacher ≤ 90 min ({jobs} run(s) at a time, the "
            "measurements and this report included)"
        )
        students_time = after_teacher_s
    else:  # runs of earlier invocations reused: only their own times add up
        what = "student runs ≤ 90 min of wall time (sum; runs of earlier invocations reused)"
        students_time = students_s
    lines.append(
        target(
            f"{what}, teacher ≤ 60 min",
            f"{students_time / 60:.1f} min, {teacher_s / 60:.1f} min",
            students_time <= 90 * 60 and teacher_s <= 60 * 60,
        )
    )
    share = report["data_share"]
    lines += [
        "",
        f"Share of a labels-only BiLSTM epoch spent outside the model (loader: token cache, "
        f"padding, collate; 12 batches, median of 3 alternated rounds): "
        f"{share['share'] * 100:.1f} % "
        f"({share['loader_s']:.2f} s loader, {share['model_s']:.2f} s forward + backward + step).",
        "ONNX export: "
        + "; ".join(
            f"{k} {v['onnx'] if v['onnx'].startswith('failed') else 'ok'}" for k, v in costs.items()
        )
        + ".",
        "Epoch seconds (median of epochs after the first), per seed: "
        + "; ".join(
            f"{row} " + ", ".join(f"{x:.1f}" for x in v)
            for row, v in report["epoch_s"].items()
            if v
        )
        + ".",
    ]
    if report["failed"]:
        lines += [
            "",
            "Rows that did not run: " + "; ".join(f"{k}: {v}" for k, v in report["failed"].items()),
        ]
    lines += ["", PUBLISHED[task]]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
