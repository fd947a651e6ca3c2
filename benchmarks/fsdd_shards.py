"""FSDD supervised from files vs from shards packed out of a CLASS-SORTED manifest (issue 14).

    python benchmarks/fsdd_shards.py [--data-root ../shared/data] [--out runs/fsdd_shards]
        [--epochs 4] [--only files shards ddp]

Writes three class-sorted manifests holding exactly the files run's train / val / test samples
(the FSDD builder's split: official train minus its fixed holdout, the holdout, the official
test), packs each with `mmkd pack` (default shard size and seed), then trains
experiment=fsdd_supervised for --epochs: from the files, from the shards in one process, and
from the shards in two DDP processes (trainer=ddp_cpu: CPU, gloo). Each run is a `train.py`
subprocess whose command is printed; a run whose metrics.json exists is not run again, so the
script resumes where it stopped. Also reports the classes of the shards that data.webdataset.val
=null holds out of the train shards. Writes OUT/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from mmkd.config import compose
from mmkd.data import build_splits
from mmkd.data.base import HOLDOUT_SEED, sample_ids
from mmkd.data.webdataset import expand_shards

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false"]


def write_manifests(data_root: Path, out: Path) -> dict[str, Path]:
    """train / val / test manifests of the FSDD builder's splits, rows sorted by class."""
    cfg = compose(["experiment=fsdd_supervised", f"data.root={data_root}"])
    splits = build_splits(cfg.data)
    folder = data_root / "fsdd" / "recordings"
    paths = {}
    for split in ("train", "val", "test"):
        ids = sample_ids(getattr(splits, split))
        rows = sorted(
            ({"id": i, "audio": str(folder / i), "label": i.split("_")[0]} for i in ids),
            key=lambda r: (r["label"], r["id"]),
        )
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def pack_all(manifests: dict[str, Path], shards: Path) -> None:
    if (shards / "shards.json").is_file() and not list(shards.glob("*.packing.json")):
        names = json.loads((shards / "shards.json").read_text())["shards"]
        if all(any(n.startswith(f"{s}-") for n in names) for s in manifests):
            return
    for manifest in manifests.values():
        command = [sys.executable, "-m", "mmkd.cli", "pack", str(manifest), str(shards)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def holdout_classes(shards: Path) -> list[dict[str, int]]:
    """Digits of each shard data.webdataset.val=null would hold out of the train shards."""
    train = expand_shards(str(shards / "train-*.tar"), "train")
    n_val = min(len(train) - 1, max(1, round(len(train) * 0.1)))
    held = np.random.default_rng(HOLDOUT_SEED).choice(len(train), n_val, replace=False)
    import webdataset as wds

    out = []
    for i in sorted(held):
        counts = Counter(
            s["cls"].decode() for s in wds.tariterators.tarfile_samples([{"url": train[i]}])
        )
        out.append(dict(sorted(counts.items())))
    return out


def run(name: str, overrides: list[str], out: Path) -> dict[str, float]:
    run_dir = out / "runs" / name
    metrics = run_dir / "metrics.json"
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"run.dir={run_dir}", *QUIET]
    print("$", " ".join(command), flush=True)
    if not metrics.is_file():
        subprocess.run(command, check=True)
    return json.loads(metrics.read_text())


def accuracy(metrics: dict[str, float]) -> float:
    keys = [k for k in metrics if k.startswith("student") and k.endswith("accuracy")]
    return metrics[sorted(keys, key=len)[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "fsdd_shards")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--results", type=Path, help="also write the report here")
    parser.add_argument(
        "--only", nargs="*", default=["files", "shards", "ddp", "ddp_files", "ddp_global64"]
    )
    args = parser.parse_args()
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    data_root = args.data_root.absolute()
    manifests = write_manifests(data_root, out)
    shards = out / "shards"
    pack_all(manifests, shards)
    base = ["experiment=fsdd_supervised", f"data.root={data_root}"]
    webdataset = [
        "data.name=webdataset",
        f"data.webdataset.train={shards}/train-*.tar",
        f"data.webdataset.val={shards}/val-*.tar",
        f"data.webdataset.test={shards}/test-*.tar",
    ]
    runs = {
        "files": [*base, f"trainer.max_epochs={args.epochs}"],
        "shards": [*base, *webdataset, f"trainer.max_epochs={args.epochs}"],
        "ddp": [*base, *webdataset, "trainer=ddp_cpu", f"trainer.max_epochs={args.epochs}"],
        # controls for the DDP row: 2 processes x batch 64 take half the optimizer steps of
        # 1 process x 64; the same from the files, and the shards at the same global batch
        "ddp_files": [*base, "trainer=ddp_cpu", f"trainer.max_epochs={args.epochs}"],
        "ddp_global64": [
            *base,
            *webdataset,
            "trainer=ddp_cpu",
            "data.batch_size=32",
            f"trainer.max_epochs={args.epochs}",
        ],
    }
    results = {name: accuracy(run(name, runs[name], out)) for name in args.only}

    def shown(overrides: list[str]) -> str:
        return " ".join(
            o.replace(str(data_root), "DATA").replace(str(out), "OUT") for o in overrides
        )

    held = holdout_classes(shards)
    holdout = {}  # val=null on 100-sample shards of the sorted train manifest: shuffled or not
    for mode, extra in (
        ("seeded shuffle (default)", []),
        ("source order (--keep-order)", ["--keep-order"]),
    ):
        folder = out / "holdout" / ("sorted" if extra else "mixed")
        if not (folder / "shards.json").is_file():
            command = [
                sys.executable,
                "-m",
                "mmkd.cli",
                "pack",
                str(manifests["train"]),
                str(folder),
            ]
            subprocess.run([*command, "--shard-size", "100", *extra], check=True)
        holdout[mode] = holdout_classes(folder)
    lines = [
        "# FSDD supervised: files vs shards packed from a class-sorted manifest",
        "",
        f"experiment=fsdd_supervised, {args.epochs} epochs, seed 0; test = official FSDD test "
        "(250 clips). Command: `python benchmarks/fsdd_shards.py`",
        "",
        "| run | test accuracy | − files (points) | overrides (plus run.dir) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {acc:.3f} | {(acc - results.get('files', acc)) * 100:+.1f} | "
            f"`{shown(runs[name])}` |"
            for name, acc in results.items()
        ),
        "",
        "ddp = trainer=ddp_cpu (2 CPU processes, gloo) at its per-process batch of 64: half the "
        "optimizer steps of the 1-process runs. ddp_files is the same from the files; "
        "ddp_global64 the shards at 2 x 32 = the 1-process global batch. One seed each: the "
        "run-to-run noise is not estimated.",
        "",
        f"Shards held out by data.webdataset.val=null (digit: samples): {held}",
        "",
        "data.webdataset.val=null on the same train manifest packed with --shard-size 100 "
        "(21 shards, 2 held out), digit: samples of each held-out shard:",
        *(f"- {mode}: {classes}" for mode, classes in holdout.items()),
    ]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    if args.results:
        args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
