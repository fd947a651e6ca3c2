"""trainer.num_nodes: 2 "nodes" of 1 process each on localhost, launched by torchrun, end where
a 1-process run with the same global batch ends."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from test_ddp_run import COMMON, ROOT, train_py

from mmkd.config import compose, validate
from mmkd.errors import ConfigError
from mmkd.export import load_exported


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_py(one, "trainer.devices=1", "data.batch_size=16")
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "train.py",
                *COMMON,
                "trainer.num_nodes=2",
                "trainer.devices=1",
                "trainer.strategy=ddp",
                "data.batch_size=8",  # 2 nodes x 8: the same global batch
                f"run.dir={two}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]  # the second node joined as rank 1
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    for key in ("student/accuracy", "teacher/accuracy", "student/teacher_agreement"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-4), key
    w1 = load_exported(one / "student").model.state_dict()
    w2 = load_exported(two / "student").model.state_dict()
    worst = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    print(f"2 nodes vs 1 process: largest weight difference {worst:.2e}")
    assert worst < 1e-4, worst


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.num_nodes=2"], r"run\.dir: required when trainer\.num_nodes > 1"),
        (["trainer.num_nodes=0"], r"trainer\.num_nodes: must be > 0"),
    ],
)
def test_node_settings_are_checked_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))
