"""Peak memory of one training epoch streamed from WebDataset shards, at two dataset sizes.

    python benchmarks/stream_memory.py [--sizes 100000 1000000] [--out runs/stream_memory]

For each size N: writes N tiny samples (an 8x8 PNG and a class label out of 10; 1,000 distinct
images reused) as shards of 10,000 with a shards.json index, then trains the tiny image student
(`student=tiny_image` shrunk to 4-8 channels, 8x8 input) on them for one epoch through
`train.py` in a fresh process with data.num_workers=2, reading the resident memory (RSS) of
that process and all its descendants (the loader workers) from /proc every 0.2 s. Prints and
writes (results.json) the peak of that sum per size and the ratio largest / smallest: memory
that grew with the number of samples would show there. Shards are kept in OUT/data-N for reruns.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmkd.pack import write_index  # noqa: E402

CLASSES = [f"c{i}" for i in range(10)]
SHARD = 10_000
VAL = 2_000


def tiny_pngs(count: int = 1000) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def write_dataset(folder: Path, prefix: str, samples: int, pngs: list[bytes]) -> None:
    """`samples` samples as PREFIX-NNNNNN.tar shards of SHARD, plus shards.json (kept if done)."""
    if (folder / "shards.json").is_file():
        index = json.loads((folder / "shards.json").read_text())
        done = sum(v["samples"] for k, v in index["shards"].items() if k.startswith(prefix))
        if done == samples:
            return
    folder.mkdir(parents=True, exist_ok=True)
    shards: dict[str, int] = {}
    for start in range(0, samples, SHARD):
        name = f"{prefix}-{start // SHARD:06d}.tar"
        count = min(SHARD, samples - start)
        with wds.TarWriter(str(folder / name), mtime=0) as sink:
            for i in range(start, start + count):
                label = CLASSES[i % len(CLASSES)]
                sink.write(
                    {"__key__": f"{prefix}{i:08d}", "png": pngs[i % len(pngs)], "cls": label}
                )
        shards[name] = count
    write_index(folder, shards, CLASSES)


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        proc, parent = int(entry), int(fields[1])
        children.setdefault(parent, []).append(proc)
        rss[proc] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        proc = stack.pop()
        total += rss.get(proc, 0)
        stack.extend(children.get(proc, []))
    return total


def train_epoch(data: Path, run_dir: Path) -> dict[str, float]:
    overrides = [
        "teacher=none",
        "losses=supervised",
        "data.train_labels=true",
        "student=tiny_image",
        "student.head.classifier=true",
        "student.image.img_size=8",
        "student.timm.kwargs={channels: [4, 4, 8, 8], stem_width: 4}",
        "data.name=webdataset",
        f"data.webdataset.train={data}/train-{{000000..{_last(data, 'train')}}}.tar",
        f"data.webdataset.val={data}/val-000000.tar",
        "data.webdataset.check_overlap=false",  # a header pass over 1M samples: not measured here
        "data.batch_size=256",
        "data.num_workers=2",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=50",
        "trainer.enable_progress_bar=false",
        "run.test=false",
        "run.export=false",
        f"run.dir={run_dir}",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"train.py failed:\n{err[-3000:]}")
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": peak / 2**20, "seconds": seconds}


def _last(data: Path, prefix: str) -> str:
    return max(p.stem for p in data.glob(f"{prefix}-*.tar")).split("-")[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "stream_memory")
    args = parser.parse_args()
    pngs = tiny_pngs()
    results = {}
    for size in args.sizes:
        data = args.out / f"data-{size}"
        began = time.perf_counter()
        write_dataset(data, "train", size, pngs)
        write_dataset(data, "val", VAL, pngs)
        written = time.perf_counter() - began
        run_dir = args.out / f"run-{size}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train_epoch(data, run_dir)
        result["write_seconds"] = written
        results[size] = result
        print(
            f"{size:>9,} samples: peak RSS {result['peak_rss_mb']:.0f} MB, epoch run "
            f"{result['seconds']:.0f} s (shards written in {written:.0f} s)",
            flush=True,
        )
    small, large = min(results), max(results)
    ratio = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
    print(f"peak RSS {large:,} / {small:,} samples: {ratio:.3f} (target <= 1.2)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"results": results, "ratio": ratio}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
