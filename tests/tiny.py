"""Tiny, randomly initialised model specs for tests (no download, a few thousand parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from mmkd.config.compose import register_resolvers
from mmkd.config.schema import LossesCfg, adapter_schema

TINY_TEXT = {
    "pretrained": False,  # the MiniLM folder only gives the tokenizer and config
    "config_overrides": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "max_length": 16,
}
TINY_AUDIO = {
    "sample_rate": 8000,
    "clip_seconds": 0.5,
    "n_fft": 256,
    "hop_length": 80,
    "n_mels": 16,
}
TINY_WAV2VEC2 = {
    "extractor_conv_layer_config": [[16, 10, 5], [16, 3, 2], [16, 2, 2]],
    "encoder_embed_dim": 32,
    "encoder_num_layers": 2,
    "encoder_num_heads": 2,
    "encoder_ff_interm_features": 64,
    "encoder_pos_conv_kernel": 16,
    "encoder_pos_conv_groups": 4,
}
TINY_SPECS: dict[str, dict[str, Any]] = {
    "image": {
        "adapter": "image",
        "timm": {"model": "resnet10t", "kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}},
        "image": {"in_chans": 3, "img_size": 32},
    },
    "text": {"adapter": "text", "text": TINY_TEXT},
    "text_rnn": {
        "adapter": "text_rnn",
        "text_rnn": {"embedding_dim": 16, "hidden_size": 16, "max_length": 16},
    },
    "audio_cnn": {"adapter": "audio_cnn", "audio": TINY_AUDIO, "cnn": {"channels": [8, 16]}},
    "audio_timm": {
        "adapter": "audio_timm",
        "audio": TINY_AUDIO,
        "timm": {"model": "resnet10t", "kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}},
    },
    "audio_wav2vec2": {
        "adapter": "audio_wav2vec2",
        "audio": TINY_AUDIO,
        "wav2vec2": {"overrides": TINY_WAV2VEC2},
    },
    "audio_hubert": {
        "adapter": "audio_hubert",
        "audio": TINY_AUDIO,
        "wav2vec2": {"overrides": TINY_WAV2VEC2},
    },
}


def typed_spec(plain: Any, *, teacher: bool = False) -> DictConfig:
    """The spec mapping `plain` on its adapter's schema (with the built-in loss terms'
    `losses` for a teacher of several: `teacher=True`)."""
    register_resolvers()
    adapter = str(plain.get("adapter") or "image")
    schema = adapter_schema(adapter, losses=LossesCfg if teacher else None)
    return OmegaConf.merge(OmegaConf.structured(schema), plain)


def tiny_spec(name: str, **overrides: Any) -> DictConfig:
    """A typed AdapterSpec for adapter `name`; `overrides` are dotted keys, e.g. head__embed_dim."""
    spec = typed_spec(TINY_SPECS[name])
    spec.head.embed_dim = spec.head.embed_dim or 16
    spec.head.num_classes = spec.head.num_classes or 3
    for key, value in overrides.items():
        OmegaConf.update(spec, key.replace("__", "."), value)
    return spec


def tiny_overrides(role: str, name: str) -> list[str]:
    """Command-line overrides that make `role` (e.g. student) the tiny `name` adapter."""
    return [
        f"{role}.{key}={yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()}"
        if isinstance(value, dict)
        else f"{role}.{key}={value}"
        for key, value in TINY_SPECS[name].items()
    ]


def small_run(train: int = 48, test: int = 16, epochs: int = 1, demo: bool = True) -> list[str]:
    """Overrides for a quick run on the generated demo data (a few seconds on 2 cores);
    `demo=False` leaves out the demo sizes, for a run on another dataset (data.demo is then
    not a key of the run's schema)."""
    sizes = [f"data.demo.num_train={train}", "data.demo.num_val=16", f"data.demo.num_test={test}"]
    return [
        *(sizes if demo else []),
        "data.batch_size=16",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "run.latency_seconds=0.02",
    ]


def assert_runs_match(one: Path, two: Path, metric_tol: float, what: str) -> float:
    """Two finished runs report the same metrics (to `metric_tol`) and export the same weights
    (to 1e-4); returns the largest weight difference (printed, for the notes)."""
    import json

    import pytest

    from mmkd.export import load_exported

    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    for key in ("student/accuracy", "teacher/accuracy", "student/teacher_agreement"):
        assert m1[key] == pytest.approx(m2[key], abs=metric_tol), key
    w1 = load_exported(one / "student").model.state_dict()
    w2 = load_exported(two / "student").model.state_dict()
    worst = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    print(f"{what}: largest weight difference {worst:.2e}")
    assert worst < 1e-4, worst
    return worst


def resumable_run(num_train: int, num_val: int, batch_size: int) -> list[str]:
    """A supervised tiny audio run checkpointed every step, whose dropout draws from the RNG
    (a resume must restore it): the base of the resume tests."""
    return [
        "teacher=none",
        "losses=supervised",
        "data.train_labels=true",
        *tiny_overrides("student", "audio_cnn"),
        "student.head.classifier=true",
        "student.cnn.dropout=0.3",
        f"data.demo.num_train={num_train}",
        f"data.demo.num_val={num_val}",
        f"data.batch_size={batch_size}",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "run.checkpoint_every_n_steps=1",
    ]


def term_loss(term: str, pairs: list, student: Any, teacher: Any, **settings: Any) -> Any:
    """A DistillLoss of the one term `term` (weight 1) comparing `pairs` of layers of `student`
    and `teacher`, with the term's other `settings`."""
    from mmkd.config.schema import LossesCfg
    from mmkd.losses import DistillLoss

    cfg = OmegaConf.structured(LossesCfg)
    cfg[term].weight = 1.0
    cfg[term].pairs = pairs
    for key, value in settings.items():
        cfg[term][key] = value
    return DistillLoss(cfg, student.embed_dim, teacher.embed_dim, student=student, teacher=teacher)
