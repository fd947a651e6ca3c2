"""Fault injection: randomised kills and corruptions of a store build, training, export and pack;
every run must recover with no sample lost and no silent wrong read.

    python benchmarks/faults.py [--rounds 2] [--seed 0] [--out DIR] [--results FILE]

Each round draws, with `--seed`, one fault per scenario:
- store/kill:      SIGKILL a store build (a fresh process) at a random time, then build again.
- store/corrupt:   flip bytes (same size), truncate, zero or swap two index rows of a random
                   file of a finished store; open it (must refuse), then build (must repair).
- train/kill:      SIGKILL a training run at a random time, then `run.resume=true`.
- train/corrupt:   flip bytes / truncate / zero last.ckpt of a finished run, then resume for
                   one more epoch (must fall back to the previous checkpoint, saying so).
- export/kill:     SIGKILL an export while it writes, then load the folder (the old export,
                   whole) and export again (no temporary folder left).
- export/corrupt:  flip bytes / truncate / zero a file of an export, then load it (must refuse).
- pack/kill:       SIGKILL `mmkd pack` at a random time, then run it again into the same folder.
Everything is tiny (24-96 generated samples, models of a few thousand parameters).

Counted: faults injected; runs recovered (the rerun succeeded and its result equals the
uninterrupted reference: store arrays, final weights, export weights, pack sample count);
samples lost (reference samples missing after recovery); silent wrong reads (a damaged file
read without an error or warning, or a recovered result that differs from the reference);
recovery time (seconds of the recovering run). Writes a Markdown table to `--results`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

TRAIN = [
    "teacher=none",
    "losses=supervised",
    "data.train_labels=true",
    "student.adapter=audio_cnn",
    "student.audio={sample_rate: 8000, clip_seconds: 0.5, n_fft: 256, hop_length: 80, n_mels: 16}",
    "student.cnn={channels: [8, 16], dropout: 0.2}",  # dropout: resume must restore the RNG
    "student.head.embed_dim=16",
    "student.head.classifier=true",
    "data.demo.num_train=96",
    "data.demo.num_val=16",
    "data.demo.num_test=16",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "run.checkpoint_every_n_steps=1",
    "run.latency_seconds=0.02",
    "run.seed=0",
]

STORE_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from omegaconf import OmegaConf
    from mmkd.adapters import build_adapter
    from mmkd.config.compose import register_resolvers
    from mmkd.config.schema import DemoCfg, adapter_schema
    from mmkd.data.demo import DemoDataset
    from mmkd.store import StoreBuilder, StoreSpec, open_or_build, teacher_collate
    torch.set_num_threads(1)
    register_resolvers()
    spec = OmegaConf.merge(OmegaConf.structured(adapter_schema("image")), {
        "timm": {"model": "resnet10t", "kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}},
        "image": {"img_size": 32, "augment": True, "crop_padding": 2},
        "head": {"embed_dim": 16, "num_classes": 9}})
    torch.manual_seed(0)
    model = build_adapter(spec, key="teacher").eval()
    forward = type(model).forward
    def slowed(self, batch, layers=()):
        time.sleep(float(sys.argv[2]))
        return forward(self, batch, layers)
    type(model).forward = slowed
    data = DemoDataset(OmegaConf.structured(DemoCfg), "train", 96, 0)
    store = StoreSpec(views=2, seed=0, chunk_size=16)
    collate = teacher_collate(model.make_preprocessor(), augmented=True, seed=0)
    b = StoreBuilder(model, data, collate, {"demo": 96}, store, augmented=True, batch_size=16,
                     device=torch.device("cpu"))
    print(open_or_build(Path(sys.argv[1]), b)[0])
""")

EXPORT_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import mmkd.export as export
    from mmkd.export import load_exported
    model = load_exported(sys.argv[1]).model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a new version of the model
    real = export.save_state
    def slowed(path, state):
        time.sleep(float(sys.argv[3]))
        real(path, state)
        time.sleep(float(sys.argv[3]))
    export.save_state = slowed
    export.export_model(model, sys.argv[2])
""")


@dataclass
class Outcome:
    scenario: str
    fault: str
    recovered: bool
    samples_lost: int = 0
    silent_wrong: int = 0
    recovery_s: float = 0.0
    note: str = ""


@dataclass
class Bench:
    scratch: Path
    rng: random.Random
    outcomes: list[Outcome] = field(default_factory=list)
    refs: dict[str, Path] = field(default_factory=dict)

    # ------------------------------------------------------------------ helpers
    def run(self, args: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
        started = time.perf_counter()
        done = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, **kwargs)
        return done, time.perf_counter() - started

    def kill_after(self, args: list[str], seconds: float, ready: Callable[[], bool]) -> str:
        """Start `args`, wait until `ready()` (the process got going), then `seconds` more,
        and SIGKILL it; returns what happened ("killed" or "finished first")."""
        proc = subprocess.Popen(
            args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 300
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(seconds)
        if proc.poll() is not None:
            return "finished first"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "killed"

    def corrupt(self, path: Path, how: str) -> None:
        data = bytearray(path.read_bytes())
        if how == "flip":
            at = self.rng.randrange(max(1, len(data) - 16))
            data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
        elif how == "truncate":
            data = data[: self.rng.randrange(max(1, len(data) // 2))]
        elif how == "zero":
            data = bytearray()
        path.write_bytes(bytes(data))

    # ------------------------------------------------------------------ store
    def store_reference(self) -> Path:
        if "store" not in self.refs:
            root = self.scratch / "store_ref"
            done, _ = self.run([PY, "-c", STORE_SCRIPT, str(root), "0"])
            assert done.returncode == 0, done.stderr[-3000:]
            self.refs["store"] = Path(done.stdout.strip().splitlines()[-1])
        return self.refs["store"]

    def store_compare(self, folder: Path) -> tuple[int, int]:
        """(samples lost, silent wrong reads) of `folder` against the reference entry."""
        from mmkd.store import TeacherStore

        ref = TeacherStore.open(self.store_reference())
        got = TeacherStore.open(folder)
        lost = int((ref.arrays["present"].any(1) & ~got.arrays["present"].any(1)).sum())
        wrong = sum(not np.array_equal(ref.arrays[k], got.arrays[k]) for k in ref.arrays)
        return lost, int(wrong)

    def store_kill(self, index: int) -> None:
        ref = self.store_reference()
        root = self.scratch / f"store_kill_{index}"
        delay = self.rng.uniform(0.0, 3.0)
        what = self.kill_after(
            [PY, "-c", STORE_SCRIPT, str(root), "0.15"],
            delay,
            lambda: any(root.glob("*.partial/layout.json")),
        )
        chunks = len(list(root.glob("*.partial/chunks/*.done")))
        done, seconds = self.run([PY, "-c", STORE_SCRIPT, str(root), "0"])
        ok = done.returncode == 0
        lost, wrong = self.store_compare(root / ref.name) if ok else (96, 0)
        note = f"{what} {delay:.1f} s after start; {chunks}/6 chunks were done"
        self.outcomes.append(
            Outcome("store", "SIGKILL", ok and not wrong, lost, wrong, seconds, note)
        )

    def store_corrupt(self, index: int) -> None:
        from mmkd.errors import CheckpointError
        from mmkd.store import TeacherStore

        ref = self.store_reference()
        root = self.scratch / f"store_corrupt_{index}"
        shutil.copytree(ref.parent, root)
        folder = root / ref.name
        how = self.rng.choice(["flip", "truncate", "zero", "swap rows"])
        if how == "swap rows":
            row = np.load(folder / "row.npy")
            i, j = self.rng.sample(range(len(row)), 2)
            row[[i, j]] = row[[j, i]]
            np.save(folder / "row.npy", row)
            target = "row.npy"
        else:
            files = [*sorted(p.name for p in folder.glob("*.npy")), "meta.json"]
            target = self.rng.choice(files)
            self.corrupt(folder / target, how)
        silent = 0
        try:
            TeacherStore.open(folder)
            silent = 1  # opened a damaged entry without a word
        except CheckpointError:
            pass
        done, seconds = self.run([PY, "-c", STORE_SCRIPT, str(root), "0"])
        ok = done.returncode == 0
        lost, wrong = self.store_compare(folder) if ok else (96, 0)
        repaired = "rebuilt" if "rebuilding it" in done.stderr else "repaired in place"
        self.outcomes.append(
            Outcome(
                "store",
                f"{how} {target}",
                ok and not wrong,
                lost,
                silent + wrong,
                seconds,
                repaired if ok else done.stderr.strip().splitlines()[-1][:120],
            )
        )

    # ------------------------------------------------------------------ training
    def train(self, run_dir: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
        return self.run([PY, "-m", "mmkd.cli", "train", *TRAIN, f"run.dir={run_dir}", *extra])

    def train_reference(self) -> Path:
        if "train" not in self.refs:
            run_dir = self.scratch / "train_ref"
            done, _ = self.train(run_dir)
            assert done.returncode == 0, done.stderr[-3000:]
            self.refs["train"] = run_dir
        return self.refs["train"]

    def same_weights(self, a: Path, b: Path) -> bool:
        from mmkd.export import load_exported

        wa = load_exported(a / "student").model.state_dict()
        wb = load_exported(b / "student").model.state_dict()
        return all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)

    def train_kill(self, index: int) -> None:
        ref = self.train_reference()
        run_dir = self.scratch / f"train_kill_{index}"
        delay = self.rng.uniform(0.0, 6.0)
        what = self.kill_after(
            [PY, "-m", "mmkd.cli", "train", *TRAIN, f"run.dir={run_dir}"],
            delay,
            lambda: (run_dir / "checkpoints" / "last.ckpt").exists(),
        )
        if what != "killed":
            self.outcomes.append(Outcome("train", "SIGKILL", True, note=f"{what}; no fault"))
            return
        done, seconds = self.train(run_dir, "run.resume=true")
        ok = done.returncode == 0
        same = ok and self.same_weights(ref, run_dir)
        note = f"killed {delay:.1f} s after the first checkpoint; final weights " + (
            "bit-identical to the uninterrupted run" if same else "DIFFER"
        )
        self.outcomes.append(
            Outcome("train", "SIGKILL", ok and same, 0, int(ok and not same), seconds, note)
        )

    def train_corrupt(self, index: int) -> None:
        ref = self.train_reference()
        run_dir = self.scratch / f"train_corrupt_{index}"
        shutil.copytree(ref, run_dir)
        (run_dir / "metrics.json").unlink()
        how = self.rng.choice(["flip", "truncate", "zero"])
        self.corrupt(run_dir / "checkpoints" / "last.ckpt", how)
        done, seconds = self.train(run_dir, "run.resume=true", "trainer.max_epochs=3")
        ok = done.returncode == 0
        said = "resuming from the previous checkpoint" in done.stderr
        self.outcomes.append(
            Outcome(
                "train",
                f"{how} last.ckpt",
                ok and said,
                0,
                int(ok and not said),
                seconds,
                "fell back to last.ckpt.prev, saying so" if said else done.stderr[-200:],
            )
        )

    # ------------------------------------------------------------------ export
    def export_kill(self, index: int) -> None:
        from mmkd.errors import CheckpointError
        from mmkd.export import load_exported

        ref = self.train_reference()
        folder = self.scratch / f"export_kill_{index}" / "student"
        shutil.copytree(ref / "student", folder)
        before = {k: v.clone() for k, v in load_exported(folder).model.state_dict().items()}
        delay = self.rng.uniform(0.0, 1.0)
        what = self.kill_after(
            [PY, "-c", EXPORT_SCRIPT, str(folder), str(folder), "0.5"],
            delay,
            lambda: any(folder.parent.glob(".student.*")),
        )
        started = time.perf_counter()
        wrong = 0
        try:
            state = load_exported(folder).model.state_dict()
            new = all(
                np.array_equal(state[k].numpy(), (before[k] + 1).numpy())
                for k in state
                if before[k].is_floating_point()
            )
            old = all(np.array_equal(state[k].numpy(), before[k].numpy()) for k in state)
            wrong = int(not (old or new))
        except CheckpointError:
            wrong = 0  # refused, not read
        done, _ = self.run([PY, "-c", EXPORT_SCRIPT, str(folder), str(folder), "0"])
        seconds = time.perf_counter() - started
        left = [p.name for p in folder.parent.glob(".student.*")]
        ok = done.returncode == 0 and not left and not wrong
        self.outcomes.append(
            Outcome(
                "export",
                "SIGKILL",
                ok,
                0,
                wrong,
                seconds,
                f"{what} {delay:.1f} s in; {len(left)} temporary folders left after re-export",
            )
        )

    def export_corrupt(self, index: int) -> None:
        from mmkd.errors import CheckpointError
        from mmkd.export import load_exported

        ref = self.train_reference()
        folder = self.scratch / f"export_corrupt_{index}" / "student"
        shutil.copytree(ref / "student", folder)
        target = self.rng.choice(["model.safetensors", "adapter.yaml"])
        how = self.rng.choice(["flip", "truncate", "zero"])
        self.corrupt(folder / target, how)
        started = time.perf_counter()
        try:
            load_exported(folder)
            silent, note = 1, "loaded without an error"
        except CheckpointError as err:
            silent, note = 0, f"refused: {str(err)[-70:]}"
        except Exception as err:  # any other error is at least not silent
            silent, note = 0, f"refused with a traceback ({type(err).__name__})"
        self.outcomes.append(
            Outcome(
                "export",
                f"{how} {target}",
                not silent,
                0,
                silent,
                time.perf_counter() - started,
                note,
            )
        )

    # ------------------------------------------------------------------ pack
    def pack_source(self) -> tuple[Path, int]:
        if "pack" not in self.refs:
            from PIL import Image

            source = self.scratch / "pack_source" / "train"
            rng = np.random.default_rng(0)
            for c in range(3):
                (source / f"class{c}").mkdir(parents=True)
                for i in range(40):
                    pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(source / f"class{c}" / f"{i:03d}.png")
            self.refs["pack"] = source
        return self.refs["pack"], 120

    def pack_kill(self, index: int) -> None:
        source, total = self.pack_source()
        out = self.scratch / f"pack_kill_{index}"
        command = [PY, "-m", "mmkd.cli", "pack", str(source), str(out), "--shard-size", "10"]
        delay = self.rng.uniform(0.0, 2.0)
        what = self.kill_after(command, delay, lambda: out.exists())
        partial = len(list(out.glob("*.tar")))
        done, seconds = self.run(command)
        counted = 0
        if (out / "shards.json").is_file():
            info = json.loads((out / "shards.json").read_text())
            shards = info.get("shards", {})
            entries = shards.values() if isinstance(shards, dict) else shards
            counted = sum(int(s.get("samples", s.get("count", 0))) for s in entries)
        ok = done.returncode == 0 and counted == total
        note = f"{what} {delay:.1f} s in ({partial} shards written); rerun " + (
            "complete" if ok else (done.stderr.strip().splitlines() or ["?"])[-1][:100]
        )
        self.outcomes.append(
            Outcome(
                "pack",
                "SIGKILL",
                ok,
                total - counted if done.returncode == 0 else 0,
                0,
                seconds,
                note,
            )
        )


SCENARIOS = {
    "store/kill": Bench.store_kill,
    "store/corrupt": Bench.store_corrupt,
    "train/kill": Bench.train_kill,
    "train/corrupt": Bench.train_corrupt,
    "export/kill": Bench.export_kill,
    "export/corrupt": Bench.export_corrupt,
    "pack/kill": Bench.pack_kill,
}


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| scenario | fault | recovered | samples lost | silent wrong reads | recovery s "
        "| what happened |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.scenario} | {o.fault} | {'yes' if o.recovered else 'NO'} | {o.samples_lost} | "
            f"{o.silent_wrong} | {o.recovery_s:.1f} | {o.note} |"
        )
    return "\n".join(lines)


def summary(outcomes: list[Outcome]) -> dict[str, object]:
    by: dict[str, dict[str, float]] = {}
    for o in outcomes:
        row = by.setdefault(o.scenario, {"faults": 0, "recovered": 0, "lost": 0, "silent": 0})
        row["faults"] += 1
        row["recovered"] += o.recovered
        row["lost"] += o.samples_lost
        row["silent"] += o.silent_wrong
    times = [o.recovery_s for o in outcomes]
    return {
        "faults_injected": len(outcomes),
        "runs_recovered": sum(o.recovered for o in outcomes),
        "samples_lost": sum(o.samples_lost for o in outcomes),
        "silent_wrong_reads": sum(o.silent_wrong for o in outcomes),
        "recovery_s_median": float(np.median(times)) if times else 0.0,
        "recovery_s_max": max(times, default=0.0),
        "by_scenario": by,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run")
    parser.add_argument("--out", help="scratch folder (default: a temporary one)")
    parser.add_argument("--results", help="write the Markdown results here")
    args = parser.parse_args()
    scratch = Path(args.out or tempfile.mkdtemp(prefix="mmkd-faults-"))
    bench = Bench(scratch, random.Random(args.seed))
    started = time.perf_counter()
    for index in range(args.rounds):
        for name in args.only or list(SCENARIOS):
            SCENARIOS[name](bench, index)
            print(table(bench.outcomes[-1:]).splitlines()[-1], flush=True)
    result = summary(bench.outcomes)
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
    if args.results:
        command = "python benchmarks/faults.py " + " ".join(sys.argv[1:])
        text = (
            f"# Fault injection (`{command}`)\n\n"
            f"{time.strftime('%Y-%m-%d', time.gmtime())}, 2 shared CPU cores, "
            f"{result['wall_s']:.0f} s.\n\n"
            f"Faults injected: {result['faults_injected']}; runs recovered: "
            f"{result['runs_recovered']}; samples lost: {result['samples_lost']}; silent wrong "
            f"reads: {result['silent_wrong_reads']}; recovery time median "
            f"{result['recovery_s_median']:.1f} s, max {result['recovery_s_max']:.1f} s.\n\n"
            f"{table(bench.outcomes)}\n\n```json\n{json.dumps(result, indent=2)}\n```\n"
        )
        Path(args.results).write_text(text)
    return 0 if result["samples_lost"] == 0 and result["silent_wrong_reads"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
