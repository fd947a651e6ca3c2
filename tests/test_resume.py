"""Killed runs resume from their last checkpoint and end where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import resumable_run, tiny_overrides

from mmkd.export import load_exported
from mmkd.loggers import read_csv_log

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    *resumable_run(num_train=96, num_val=16, batch_size=16),
    "data.demo.num_test=32",
    "run.latency_seconds=0.02",
]  # 6 steps per epoch; the interruptions below land in epoch 1, mid-epoch

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import pytorch_lightning as pl
    from mmkd.config import compose
    from mmkd.train import main, train

    class Stop(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == {step}:
                os.kill(os.getpid(), signal.{signal})

    # a job started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: restore it, as a terminal would have it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = sys.argv[1:]
    if "run.resume=true" in args:
        sys.exit(main(args))
    import mmkd.train as t
    original = t.train
    t.train = lambda cfg: original(cfg, callbacks=[Stop()])
    sys.exit(main(args))
""")


def run_script(
    run_dir: Path, *extra: str, step: int = -1, sig: str = "SIGKILL"
) -> subprocess.CompletedProcess:
    code = SCRIPT.format(step=step, signal=sig)
    return subprocess.run(
        [sys.executable, "-c", code, *OVERRIDES, f"run.dir={run_dir}", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-exact: the same final weights (every tensor equal) and the same test accuracy."""
    metrics_a = json.loads((a / "metrics.json").read_text())
    metrics_b = json.loads((b / "metrics.json").read_text())
    assert metrics_a["student/accuracy"] == metrics_b["student/accuracy"]
    weights_a = load_exported(a / "student").model.state_dict()
    weights_b = load_exported(b / "student").model.state_dict()
    assert weights_a.keys() == weights_b.keys()
    worst = max(float((v.float() - weights_b[k].float()).abs().max()) for k, v in weights_a.items())
    print(f"resumed vs uninterrupted: largest weight difference {worst:.2e}")
    assert all(torch.equal(v, weights_b[k]) for k, v in weights_a.items()), worst


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_script(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
    killed = run_script(tmp_path, step=8, sig="SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "metrics.json").exists()  # only a finished run writes it
    # a second start without run.resume=true refuses to overwrite the interrupted run
    refused = run_script(tmp_path)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    resumed = run_script(tmp_path, "run.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, tmp_path)
    # epoch 1 was resumed mid-way: its part-epoch is no epoch time; its throughput still counts
    timed = {r["epoch"] for r in read_csv_log(tmp_path) if "time/train_epoch_s" in r}
    throughput = {r["epoch"] for r in read_csv_log(tmp_path) if "time/train_samples_per_s" in r}
    assert timed == {0} and throughput == {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_saves_a_checkpoint_and_exits_cleanly(uninterrupted, tmp_path, sig, code):
    stopped = run_script(tmp_path, step=9, sig=sig)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert "checkpoint saved" in stopped.stderr and "Traceback" not in stopped.stderr
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] >= 9
    resumed = run_script(tmp_path, "run.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, tmp_path)


def test_corrupt_checkpoint_is_reported_by_name(tmp_path):
    from mmkd.checkpoint import SafeCheckpointIO
    from mmkd.errors import CheckpointError

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])  # truncated
    with pytest.raises(CheckpointError, match=r"last\.ckpt: unreadable checkpoint"):
        SafeCheckpointIO().load_checkpoint(path)


STORE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import mmkd.store.build as build
    from mmkd.train import main

    calls = 0
    original = build.encode

    def encode(*args, **kwargs):  # called once per stored array (embedding, logits) per batch
        global calls
        calls += 1
        if calls == {call}:
            os.kill(os.getpid(), signal.{signal})
        return original(*args, **kwargs)

    build.encode = encode
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in SCRIPT above
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_the_store_build_stops_it_keeping_finished_chunks(tmp_path, sig, code):
    """Lightning installs its SIGTERM handler only after the store builds (when fitting starts):
    the build must act on SIGTERM itself, as on Ctrl-C. Chunks of 16 in batches of 8: the signal
    arrives in the third batch, so chunk 0 is done and chunk 16 is not."""
    store = tmp_path / "store"
    args = [
        *OVERRIDES,
        *tiny_overrides("teacher", "audio_cnn"),
        "teacher.head.classifier=true",
        "losses=kd",
        "distill.cache=true",
        f"distill.cache_dir={store}",
        "distill.store.chunk_size=16",
        "data.eval_batch_size=8",
        f"run.dir={tmp_path / 'run'}",
    ]
    script = STORE_SCRIPT.format(call=5, signal=sig)
    stopped = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert "checkpoint saved" in stopped.stderr and "Traceback" not in stopped.stderr
    (partial,) = store.glob("*.partial")  # the train split's entry, unfinished
    assert sorted(p.name for p in (partial / "chunks").iterdir()) == ["0.done"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = subprocess.run(
        [sys.executable, "-c", STORE_SCRIPT.format(call=-1, signal=sig), *args, "run.resume=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not list(store.glob("*.partial")) and len(list(store.glob("*/meta.json"))) == 2
