"""Audio adapters: a torchaudio front end and three kinds of encoder.

- `audio_cnn`: a small conv net on the log-mel spectrogram (the compact-student default);
- `audio_timm`: any timm model reading the log-mel spectrogram as a 1-channel image;
- `audio_wav2vec2` / `audio_hubert`: torchaudio's wav2vec2 / HuBERT builders on raw waveforms.

Raw audio is `(waveform, sample_rate)`: a float array shaped (samples,) or (samples, channels),
as `soundfile.read` returns it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchaudio
from torch import Tensor, nn

from mmkd.errors import CheckpointError, DataError, SettingError
from mmkd.io import load_state_file

from .audio_config import AudioCfg
from .base import ADAPTERS, Adapter, Batch, Preprocessor
from .timm_backbone import create_backbone, timm_feature_names, timm_forward_layers


def clip_samples(cfg: AudioCfg) -> int:
    """Samples in one clip: audio.clip_seconds at audio.sample_rate."""
    return round(cfg.clip_seconds * cfg.sample_rate)


class AudioPreprocessor(Preprocessor):
    """Mono, resample, centre crop / zero pad, then (for `logmel`) log-mel + SpecAugment."""

    modality = "audio"

    def __init__(self, cfg: AudioCfg, output: str) -> None:
        settings = dataclasses.asdict(cfg)
        settings["output"] = output
        randomized = bool(
            cfg.time_shift or cfg.gain_db or (output == "logmel" and cfg.spec_augment)
        )
        super().__init__(settings, randomized_in_training=randomized)
        self.cfg = settings
        self.output = output  # "logmel" | "waveform"
        self.num_samples = clip_samples(cfg)
        self._resamplers: dict[int, torchaudio.transforms.Resample] = {}
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(top_db=80.0)
        self.masking = nn.Sequential(
            torchaudio.transforms.FrequencyMasking(cfg.freq_mask),
            torchaudio.transforms.TimeMasking(cfg.time_mask),
        )

    def waveform(self, raw: Any) -> Tensor:
        """Checked, mono, resampled, fixed-length waveform (samples,)."""
        try:
            samples, rate = raw
        except (TypeError, ValueError):
            raise DataError("audio must be a (waveform, sample_rate) pair") from None
        rate = sample_rate(rate)
        try:
            array = np.asarray(samples)
        except ValueError:  # ragged nested sequences
            raise DataError("audio samples do not form an array") from None
        if array.dtype.kind not in "buif":
            raise DataError(f"audio samples have dtype {array.dtype}; expected real numbers")
        if array.ndim not in (1, 2) or array.size == 0:
            raise DataError(
                f"audio has shape {array.shape}; expected (samples,) "
                "or (samples, channels) with at least one sample"
            )
        with np.errstate(over="ignore"):  # too large for float32: inf, reported below
            wave = torch.as_tensor(array.astype(np.float32))
        if wave.ndim == 2:
            if wave.shape[1] > 1 and not self.cfg["downmix"]:
                raise DataError(
                    f"audio has {wave.shape[1]} channels; the model reads mono "
                    "(set audio.downmix=true to average them)"
                )
            wave = wave.mean(dim=1)
        if not torch.isfinite(wave).all():
            raise DataError("audio contains NaN or Inf (or values too large for float32)")
        target = self.cfg["sample_rate"]
        if rate != target:
            if not self.cfg["resample"]:
                raise DataError(
                    f"audio is at {rate} Hz; the model expects {target} Hz "
                    "(set audio.resample=true to resample)"
                )
            if rate not in self._resamplers:
                self._resamplers[rate] = make_resampler(rate, target)
            wave = self._resamplers[rate](wave)
        return fit_length(wave, self.num_samples)

    def augment_waveform(self, wave: Tensor) -> Tensor:
        """Random time shift (zero fill) and gain, drawn from torch's generator."""
        shift_max = round(self.cfg["time_shift"] * self.cfg["sample_rate"])
        return shift_and_gain(wave, shift_max, self.cfg["gain_db"])

    def __call__(self, raw: Any, *, train: bool) -> Tensor:
        wave = self.waveform(raw)
        if train:
            wave = self.augment_waveform(wave)
        if self.output == "waveform":
            return wave
        with torch.no_grad():
            logmel = self.to_db(self.melspec(wave)).unsqueeze(0)  # (1, n_mels, frames)
            logmel = (logmel - logmel.mean()) / (logmel.std() + 1e-5)
            if not torch.isfinite(logmel).all():  # power overflows float32 (|x| above ~1e16)
                raise DataError("audio samples are too large: the spectrogram overflows")
            if train and self.cfg["spec_augment"]:
                logmel = self.masking(logmel)
        return logmel

    def collate(self, items: list[Tensor]) -> Batch:
        key = "waveform" if self.output == "waveform" else "logmel"
        return {key: torch.stack(items)}


def sample_rate(rate: Any) -> int:
    """`rate` as a positive integer number of Hz (DataError otherwise)."""
    value = rate.item() if isinstance(rate, np.integer | np.floating) else rate
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"audio sample rate {rate!r} is not a positive whole number of Hz")
    return value


def mono_float32(raw: Any) -> tuple[np.ndarray, int]:
    """A raw (waveform, rate) pair as a float32 array (channels averaged) and its rate in Hz."""
    try:
        samples, rate = raw
    except (TypeError, ValueError):
        raise DataError("audio must be a (waveform, sample_rate) pair") from None
    rate = sample_rate(rate)
    array = np.asarray(samples, dtype=np.float32)
    if array.ndim == 2:
        array = array.mean(axis=1)
    return array, rate


# torchaudio's Resample builds a (target/g, rate/g + filter width) kernel, g = gcd(rate, target),
# peaking at ~32 bytes per element: 0.5 GB at this limit, 2 GB for 8001 -> 8000 Hz, far more for
# a corrupt header's rate. Common rates, NTSC-adjusted ones included, stay well below it.
MAX_RESAMPLE_KERNEL = 2**24


def shift_and_gain(wave: Tensor, shift_max: int, gain_db: float) -> Tensor:
    """A random time shift of up to `shift_max` samples (zero fill), then a random gain within
    ±`gain_db` dB, drawn in that order from torch's generator (so a `replay_scope` replays them).
    """
    if shift_max:
        shift = int(torch.randint(-shift_max, shift_max + 1, ()))
        wave = torch.roll(wave, shift)
        if shift > 0:
            wave[:shift] = 0
        elif shift < 0:
            wave[shift:] = 0
    if gain_db:
        gain = (torch.rand(()) * 2 - 1) * gain_db
        wave = torchaudio.functional.gain(wave, float(gain))
    return wave


def make_resampler(rate: int, target: int) -> torchaudio.transforms.Resample:
    """A torchaudio resampler from `rate` to `target` Hz (DataError if its kernel is too big)."""
    common = math.gcd(rate, target)
    if (rate // common) * (target // common) > MAX_RESAMPLE_KERNEL:
        raise DataError(
            f"audio is at {rate} Hz, which cannot be resampled to {target} Hz at a reasonable "
            "cost (convert the file to a common sample rate)"
        )
    return torchaudio.transforms.Resample(rate, target)


def fit_length(wave: Tensor, num_samples: int) -> Tensor:
    """Centre crop or symmetric zero pad to exactly `num_samples`."""
    excess = wave.numel() - num_samples
    if excess > 0:
        start = excess // 2
        return wave[start : start + num_samples]
    if excess < 0:
        left = -excess // 2
        return torch.nn.functional.pad(wave, (left, -excess - left))
    return wave


class LogMelAdapter(Adapter):
    """Shared parts of the adapters that read a log-mel spectrogram."""

    modality = "audio"

    def make_preprocessor(self) -> AudioPreprocessor:
        return AudioPreprocessor(self.spec.audio, "logmel")

    def encode(self, batch: Batch) -> Tensor:
        return self.encoder(batch["logmel"])

    def example_batch(self, batch_size: int = 1) -> Batch:
        cfg = self.spec.audio
        frames = clip_samples(cfg) // cfg.hop_length + 1
        return {"logmel": torch.zeros(batch_size, 1, cfg.n_mels, frames)}


class ConvNet(nn.Sequential):
    """Conv(3x3)-BN-ReLU-MaxPool blocks, then global average pooling. The output of block i
    (1-based) is the feature `block{i}`."""

    LAYERS_PER_BLOCK = 4

    def __init__(self, channels: list[int], dropout: float) -> None:
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch in channels:
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)]
        super().__init__(*layers)
        self.num_blocks = len(channels)

    def forward_blocks(self, x: Tensor, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The pooled output and the named block outputs (B, C, mels, frames)."""
        found = {}
        for index, layer in enumerate(self):
            x = layer(x)
            name = f"block{(index + 1) // self.LAYERS_PER_BLOCK}"
            if (index + 1) % self.LAYERS_PER_BLOCK == 0 and name in names:
                found[name] = x
        return x, found


@ADAPTERS.register("audio_cnn")
class AudioCnnAdapter(LogMelAdapter):
    """A small conv net over the log-mel spectrogram (`cnn.channels`)."""

    def build_encoder(self) -> tuple[nn.Module, int]:
        channels = list(self.spec.cnn.channels)
        return ConvNet(channels, self.spec.cnn.dropout), channels[-1]

    def feature_names(self) -> list[str]:
        return [f"block{i + 1}" for i in range(self.encoder.num_blocks)]

    def encode_layers(self, batch: Batch, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.encoder.forward_blocks(batch["logmel"], names)


@ADAPTERS.register("audio_timm")
class AudioTimmAdapter(LogMelAdapter):
    """Any timm model (`timm.model`) reading the log-mel spectrogram as a 1-channel image."""

    def build_encoder(self) -> tuple[nn.Module, int]:
        return create_backbone(self.spec.timm, in_chans=1)

    def feature_names(self) -> list[str]:
        return timm_feature_names(self.encoder)

    def encode_layers(self, batch: Batch, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        return timm_forward_layers(self.encoder, batch["logmel"], names)


# torchaudio.models.wav2vec2_base / hubert_base architectures; `wav2vec2.overrides` edit them
WAV2VEC2_BASE: dict[str, Any] = {
    "extractor_mode": "group_norm",
    "extractor_conv_layer_config": None,
    "extractor_conv_bias": False,
    "encoder_embed_dim": 768,
    "encoder_projection_dropout": 0.1,
    "encoder_pos_conv_kernel": 128,
    "encoder_pos_conv_groups": 16,
    "encoder_num_layers": 12,
    "encoder_num_heads": 12,
    "encoder_attention_dropout": 0.1,
    "encoder_ff_interm_features": 3072,
    "encoder_ff_interm_dropout": 0.0,
    "encoder_dropout": 0.1,
    "encoder_layer_norm_first": False,
    "encoder_layer_drop": 0.1,
    "aux_num_out": None,
}
HUBERT_BASE = {**WAV2VEC2_BASE, "encoder_layer_drop": 0.05}


class WaveformAdapter(Adapter):
    """torchaudio's wav2vec2-family encoder on raw waveforms, mean-pooled over frames."""

    modality = "audio"
    preset: dict[str, Any] = WAV2VEC2_BASE

    def build_encoder(self) -> tuple[nn.Module, int]:
        overrides = copy.deepcopy(dict(self.spec.wav2vec2.overrides))
        assert isinstance(overrides, dict)
        unknown = sorted(set(overrides) - set(self.preset))
        if unknown:
            raise SettingError(
                "wav2vec2.overrides",
                f"unknown {', '.join(unknown)}; valid: {', '.join(sorted(self.preset))}",
            )
        params = {**self.preset, **overrides}
        if params["extractor_conv_layer_config"] is not None:
            params["extractor_conv_layer_config"] = [
                tuple(layer) for layer in params["extractor_conv_layer_config"]
            ]
        model = torchaudio.models.wav2vec2_model(**params)
        if self.spec.wav2vec2.weights_file:
            state = load_state_file(self.spec.wav2vec2.weights_file)
            try:
                model.load_state_dict(state)
            except RuntimeError as err:  # missing / unexpected keys or other shapes
                detail = str(err).splitlines()[1:2] or [str(err)]
                raise CheckpointError(
                    f"{self.key}.wav2vec2.weights_file: {self.spec.wav2vec2.weights_file} "
                    f"does not match the model ({detail[0].strip()[:300]})"
                ) from None
        return model, params["encoder_embed_dim"]

    def make_preprocessor(self) -> AudioPreprocessor:
        return AudioPreprocessor(self.spec.audio, "waveform")

    @staticmethod
    def normalised(batch: Batch) -> Tensor:
        wave = batch["waveform"]
        return (wave - wave.mean(dim=1, keepdim=True)) / (wave.std(dim=1, keepdim=True) + 1e-5)

    def encode(self, batch: Batch) -> Tensor:
        frames, _ = self.encoder(self.normalised(batch))  # (B, frames, encoder_embed_dim)
        return frames.mean(dim=1)

    def feature_names(self) -> list[str]:
        """torchaudio's per-layer outputs (`extract_features`): layers.0 is the first
        transformer layer."""
        return [f"layers.{i}" for i in range(len(self.encoder.encoder.transformer.layers))]

    def encode_layers(self, batch: Batch, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Named layer outputs as (B, D, frames), and the pooled output. torchaudio's
        extract_features skips layer drop and the final layer norm of pre-norm models
        (encoder_layer_norm_first=true), so in training, or for those, the pooled output comes
        from a second, ordinary forward pass."""
        wave = self.normalised(batch)
        wanted = [int(name.split(".")[1]) for name in names]
        # torchaudio's Transformer.layer_norm_first is True for post-norm models (norm first,
        # before the layers): then the last layer's output is the encoder's output
        exact = not self.training and self.encoder.encoder.transformer.layer_norm_first
        outputs, _ = self.encoder.extract_features(wave)
        layers = {name: outputs[i].transpose(1, 2) for name, i in zip(names, wanted, strict=True)}
        if exact and self.encoder.aux is None:
            return outputs[-1].mean(dim=1), layers
        return self.encode(batch), layers

    def example_batch(self, batch_size: int = 1) -> Batch:
        return {"waveform": torch.zeros(batch_size, clip_samples(self.spec.audio))}


@ADAPTERS.register("audio_wav2vec2")
class Wav2Vec2Adapter(WaveformAdapter):
    """torchaudio wav2vec2 (base architecture unless `wav2vec2.overrides` say otherwise)."""

    preset = WAV2VEC2_BASE


@ADAPTERS.register("audio_hubert")
class HubertAdapter(WaveformAdapter):
    """torchaudio HuBERT (base architecture unless `wav2vec2.overrides` say otherwise)."""

    preset = HUBERT_BASE
