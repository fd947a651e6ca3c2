"""Start-up cost of the train / val / test overlap check on shards (`check_disjoint`).

    python benchmarks/shard_scan_cost.py [--dir /tmp/shard_scan_cost] [--shards 20]

Writes --shards train shards of 10,000 samples (200-byte files; kept for reruns) and one val
shard of 5,000, then times the overlap check (one pass over every tar header) and, beside it,
the counting pass used for shards without shards.json."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import webdataset as wds

from mmkd.data.webdataset import check_disjoint, count_samples


def write(path: Path, prefix: str, samples: int) -> str:
    if not path.exists():
        with wds.TarWriter(str(path)) as sink:
            for i in range(samples):
                sink.write({"__key__": f"{prefix}{i}", "png": b"x" * 200, "cls": b"3"})
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/shard_scan_cost"))
    parser.add_argument("--shards", type=int, default=20)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    train = [write(args.dir / f"train-{s:06d}.tar", f"k{s}_", 10_000) for s in range(args.shards)]
    val = [write(args.dir / "val-000000.tar", "v", 5_000)]
    start = time.perf_counter()
    counted = sum(count_samples(url) for url in train)
    count_s = time.perf_counter() - start
    start = time.perf_counter()
    check_disjoint({"train": train, "val": val})
    check_s = time.perf_counter() - start
    print(
        f"{counted} train + 5000 val samples: overlap check {check_s:.1f} s "
        f"({check_s / (counted + 5000) * 1e3:.2f} ms a sample); "
        f"counting pass (train) {count_s:.1f} s"
    )


if __name__ == "__main__":
    main()
