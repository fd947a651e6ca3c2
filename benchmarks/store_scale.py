"""Teacher-store scaling: lookups in a 1,000,000-row store, and a build split over 2 processes.

    python benchmarks/store_scale.py [--rows 1000000] [--samples 4000] [--verify-gb 1.6]
                                     [--out DIR]

1. Writes a store of `--rows` rows (one view, 64-d float16 embeddings, 10 logits) straight to
   disk through the store's own index writer, then, in a fresh process, times opening it
   without checksum verification (`open_s`), verifying every chunk's checksum (`verify_s`),
   10,000 random lookups (79 batches of 128 ids, as training reads it) and the resident memory
   they add.
   With `--verify-gb G`, the same for a synthetic store of about G GB (10 views of 10 classes
   and a float16 feature), to give the verification cost of a large store (`big_*` figures).
2. Builds a store of the generated demo images (`--samples` x 2 views, a random ResNet-20
   teacher) with 1 process and with 2 processes (gloo), each process using one torch thread,
   and prints the time ratio. Both builds must give identical arrays.
Prints one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_big_store(folder: Path, rows: int, views: int = 1, feature: int = 0) -> None:
    from mmkd.store import finalize

    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True)
    rng = np.random.default_rng(0)
    specs = {
        "present": ((rows, views), np.uint8),
        "embedding": ((rows, views, 64), np.float16),
        "logits": ((rows, views, 10), np.float16),
    }
    if feature:
        specs["feature.0"] = ((rows, views, feature), np.float16)
    for name, (shape, dtype) in specs.items():
        array = np.lib.format.open_memmap(partial / f"{name}.npy", "w+", dtype, shape)
        step = max(1, 100_000 // views // max(1, feature // 64))
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            if name == "present":
                array[start:stop] = 1
            else:
                array[start:stop] = rng.standard_normal((stop - start, *shape[1:]))
        array.flush()
        del array
    ids = [f"shard-{i // 10_000:05d}/sample-{i:08d}" for i in range(rows)]
    meta = {
        "identity": {"synthetic": rows},
        "views": views,
        "chunk_size": 4096,  # StoreSpec's default
        "dtype": "float16",
        "num_classes": 10,
    }
    finalize(partial, folder, ids, meta, specs)


def measure_lookups(folder: str, rows: int) -> None:
    """Run in a fresh process: open the store, do 10,000 random lookups, print the figures."""
    from mmkd.store import TeacherStore

    before = rss_mb()
    started = time.perf_counter()
    store = TeacherStore.open(Path(folder), verify=False)
    opened = time.perf_counter() - started
    started = time.perf_counter()
    TeacherStore.open(Path(folder), verify=True)  # every chunk's checksum
    verified = time.perf_counter() - started
    rng = np.random.default_rng(1)
    picks = rng.integers(rows, size=10_000)
    ids = [f"shard-{i // 10_000:05d}/sample-{i:08d}" for i in picks]
    started = time.perf_counter()
    for first in range(0, len(ids), 128):
        store.lookup(ids[first : first + 128])
    looked = time.perf_counter() - started
    print(
        json.dumps(
            {
                "open_s": opened,
                "verify_s": verified,
                "lookups_10k_s": looked,
                "rss_increase_mb": rss_mb() - before,
            }
        )
    )


def build_demo(samples: int, world: int, root: str) -> float:
    command = [sys.executable, __file__, "--build-part", str(samples), str(world), root]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def build_part(samples: int, world: int, root: str) -> None:
    """Build the demo store with `world` processes (gloo), one torch thread each."""
    import torch
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    if world == 1:
        build_rank(0, 1, samples, root, 0)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(build_rank, args=(world, samples, root, port), nprocs=world)


def build_rank(rank: int, world: int, samples: int, root: str, port: int) -> None:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from mmkd.adapters import build_adapter
    from mmkd.config.compose import register_resolvers
    from mmkd.config.schema import DemoCfg, adapter_schema
    from mmkd.data.demo import DemoDataset
    from mmkd.store import Collective, StoreBuilder, StoreSpec, open_or_build, teacher_collate

    torch.set_num_threads(1)
    group = Collective()
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)

        def any_rank(flag: bool) -> bool:
            value = torch.tensor([int(flag)])
            dist.all_reduce(value)
            return bool(value.item())

        group = Collective(rank, world, lambda name: dist.barrier(), any_rank)
    register_resolvers()
    spec = OmegaConf.merge(
        OmegaConf.structured(adapter_schema("image")),
        {
            "timm": {"model": "resnet20_cifar"},
            "image": {"img_size": 32, "augment": True, "crop_padding": 4, "hflip": 0.5},
            "head": {"num_classes": 9},
        },
    )
    torch.manual_seed(0)
    teacher = build_adapter(spec, key="teacher").eval()
    dataset = DemoDataset(OmegaConf.structured(DemoCfg), "train", samples, 0)
    collate = teacher_collate(teacher.make_preprocessor(), augmented=True, seed=0)
    store = StoreSpec(views=2, seed=0, chunk_size=256)
    builder = StoreBuilder(
        teacher,
        dataset,
        collate,
        {"demo": samples},
        store,
        augmented=True,
        batch_size=128,
        device=torch.device("cpu"),
    )
    open_or_build(Path(root), builder, group)
    if world > 1:
        dist.destroy_process_group()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--lookups":
        measure_lookups(sys.argv[2], int(sys.argv[3]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--build-part":
        build_part(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--verify-gb", type=float, default=0.0)
    parser.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    scratch = Path(args.out or tempfile.mkdtemp(prefix="mmkd-store-scale-"))
    results: dict[str, float | int] = {"rows": args.rows, "samples": args.samples}
    if args.verify_gb:
        per_row = 10 * (64 + 10 + 4096) * 2 + 10  # 10 views: embedding, logits, feature
        big_rows = int(args.verify_gb * 1e9 / per_row)
        write_big_store(scratch / "large", big_rows, views=10, feature=4096)
        size = sum(p.stat().st_size for p in (scratch / "large").iterdir())
        out = subprocess.run(
            [sys.executable, __file__, "--lookups", str(scratch / "large"), str(big_rows)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        large = json.loads(out.strip().splitlines()[-1])
        results.update({"big_rows": big_rows, "big_gb": size / 1e9})
        results.update({f"big_{k}": v for k, v in large.items()})
        shutil.rmtree(scratch / "large")
    started = time.perf_counter()
    write_big_store(scratch / "big", args.rows)
    results["write_big_s"] = time.perf_counter() - started
    out = subprocess.run(
        [sys.executable, __file__, "--lookups", str(scratch / "big"), str(args.rows)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    results.update(json.loads(out.strip().splitlines()[-1]))
    one = build_demo(args.samples, 1, str(scratch / "one"))
    two = build_demo(args.samples, 2, str(scratch / "two"))
    from mmkd.store import TeacherStore

    stores = [TeacherStore.open(next((scratch / n).iterdir())) for n in ("one", "two")]
    same = all(np.array_equal(stores[0].arrays[k], stores[1].arrays[k]) for k in stores[0].arrays)
    results.update(
        {
            "build_1_process_s": one,
            "build_2_processes_s": two,
            "build_ratio_2_over_1": two / one,
            "builds_identical": same,
        }
    )
    print(json.dumps(results, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
