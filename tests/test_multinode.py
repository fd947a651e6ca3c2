"""trainer.num_nodes: 2 "nodes" of 1 process each on localhost, launched by torchrun, end where
a 1-process run with the same global batch ends."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from test_ddp_run import COMMON, ROOT, train_py
from tiny import assert_runs_match

from mmkd.config import compose, validate
from mmkd.errors import ConfigError


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
    assert_runs_match(one, two, 1e-4, "2 nodes vs 1 process")


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
