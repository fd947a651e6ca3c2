"""Issue 14, models and metrics (findings 20, 28): a plugin adapter whose encoder disagrees with
its declared width or rank fails at build time in one line naming it; named teachers
(`teachers.NAME`) get teacher_agreement / teacher_cosine metrics."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mmkd import evaluate
from mmkd.adapters import ADAPTERS, build_adapter
from mmkd.adapters.image import ImageAdapter
from mmkd.adapters.sections import ADAPTER_CONFIGS, AdapterConfig, adapter_sections
from mmkd.config.schema import adapter_schema
from mmkd.errors import ConfigError
from mmkd.metrics import Collected


class Features(nn.Module):
    """(B, 3, H, W) -> (B, width), or (B, width, 2, 2) when `pooled` is false."""

    def __init__(self, width: int, pooled: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1 if pooled else 2)
        self.pooled = pooled

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv(pixels))
        return x.flatten(1) if self.pooled else x


def plugin(width: int, declared: int, pooled: bool = True) -> type[ImageAdapter]:
    class Plugin(ImageAdapter):
        def build_encoder(self) -> tuple[nn.Module, int]:
            return Features(width, pooled), declared

    Plugin.__module__ = "my_company.adapters"  # defined outside mmkd, as a plugin is
    return Plugin


def spec(name: str):
    plain = {"adapter": name, "image": {"img_size": 16}, "head": {"embed_dim": 8}}
    return OmegaConf.merge(OmegaConf.structured(adapter_schema(name)), plain)


def register(monkeypatch, name: str, adapter: type[ImageAdapter]) -> None:
    """`adapter` as plugin adapter `name`, reading the image adapter's sections."""
    monkeypatch.setitem(ADAPTERS._items, name, adapter)
    config = AdapterConfig(name, adapter_sections("image"))
    monkeypatch.setitem(ADAPTER_CONFIGS._items, name, config)


@pytest.mark.parametrize(
    ("width", "pooled", "message"),
    [
        (32, True, r"shape \(2, 32\), but build_encoder declared a feature size of 64"),
        (64, False, r"shape \(2, 64, 2, 2\) \(rank 4; pooled features are \(B, F\)\)"),
    ],
)
def test_plugin_encoder_of_wrong_width_or_rank_fails_at_build_naming_it(
    monkeypatch, width, pooled, message
):
    register(monkeypatch, "wrong_net", plugin(width, 64, pooled))
    with pytest.raises(ConfigError, match=r"^teacher\.adapter: wrong_net \(Plugin\): ") as err:
        build_adapter(spec("wrong_net"), key="teacher")
    assert "\n" not in str(err.value)
    assert err.match(message)
    register(monkeypatch, "right_net", plugin(64, 64))
    assert build_adapter(spec("right_net"), key="teacher").feature_dim == 64


def test_named_teachers_get_agreement_and_cosine(monkeypatch):
    """evaluate_models with teachers.image / teachers.audio (roles teacher_image, ...)."""
    labels = torch.tensor([0, 1, 2, 1])
    student = torch.eye(3)[labels] + 0.1
    scores = {
        "student": torch.eye(3)[labels],
        "teacher_image": torch.eye(3)[torch.tensor([0, 1, 2, 2])],  # agrees on 3 of 4
        "teacher_audio": torch.eye(3)[labels],
    }
    collected = Collected(
        labels=labels,
        embeddings={"student": student, "teacher_image": student, "teacher_audio": -student},
        scores=scores,
        modalities={"student": "audio", "teacher_image": "image", "teacher_audio": "audio"},
    )
    monkeypatch.setattr(evaluate, "collect", lambda *args, **kwargs: collected)
    models = {role: nn.Linear(2, 2) for role in collected.embeddings}
    metrics = evaluate.evaluate_models(
        models,
        loader=None,
        class_names=["a", "b", "c"],
        class_embeddings=None,
        out_dir=None,
        latency_seconds=0.0,
    )
    assert metrics["student/teacher_image_agreement"] == pytest.approx(0.75)
    assert metrics["student/teacher_audio_agreement"] == pytest.approx(1.0)
    assert metrics["student/teacher_image_cosine"] == pytest.approx(1.0)
    assert metrics["student/teacher_audio_cosine"] == pytest.approx(-1.0)
    assert not any(k.startswith("teacher_image/teacher_") for k in metrics)
    assert not any(k.startswith("retrieval/") and "teacher" in k for k in metrics)
