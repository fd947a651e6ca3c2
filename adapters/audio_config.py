"""The audio sections: `audio` (the front end every audio adapter reads), `cnn` (audio_cnn) and
`wav2vec2` (audio_wav2vec2 / audio_hubert); audio_timm reads `audio` and `timm`."""

# OmegaConf reads these annotations at run time: keep typing.Optional/List/Dict here.
# ruff: noqa: UP006, UP035, UP045

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from mmkd.errors import ConfigError

from .backbone_config import TimmCfg
from .sections import Section, check_non_negative, check_positive, register_adapter_config


@dataclass
class AudioCfg(Section):
    """Audio front end: mono, resample, fixed-length clip, log-mel, optional SpecAugment."""

    sample_rate: int = 16000  # every clip is resampled to this rate
    resample: bool = True  # false: a clip at another rate is a data error
    downmix: bool = True  # stereo -> mono by averaging; false: multi-channel audio is a data error
    clip_seconds: float = 1.0  # clips are centre-cropped or zero-padded to this length
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    # training-time augmentation (replayable, see mmkd.replay)
    time_shift: float = 0.0  # shift the clip by up to this many seconds either way (zero fill)
    gain_db: float = 0.0  # scale the clip by a random gain within +- this many dB
    spec_augment: bool = False  # frequency and time masking of the log-mel (torchaudio)
    freq_mask: int = 8  # max masked mel bins (torchaudio FrequencyMasking)
    time_mask: int = 20  # max masked frames (torchaudio TimeMasking)

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_positive(cfg, key, "sample_rate", "clip_seconds", "n_fft", "hop_length", "n_mels")
        check_non_negative(cfg, key, "time_shift", "gain_db")


@dataclass
class AudioCnnCfg(Section):
    """The compact audio student: a small conv net over the log-mel spectrogram."""

    channels: List[int] = field(default_factory=lambda: [16, 32, 64])  # one conv block per entry
    dropout: float = 0.1

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        if not cfg.channels or any(c <= 0 for c in cfg.channels):
            raise ConfigError(f"{key}.channels: needs one or more positive sizes")


@dataclass
class Wav2Vec2Cfg(Section):
    """torchaudio's wav2vec2 / HuBERT on raw waveforms."""

    # passed over the base preset to torchaudio.models.wav2vec2_model, e.g. encoder_num_layers: 2
    overrides: Dict[str, Any] = field(default_factory=dict)
    weights_file: Optional[str] = (
        None  # local state dict of the torchaudio model (.safetensors/.pt)
    )

    # override names are checked against the preset when the model is built

    @classmethod
    def exported(cls, cfg: DictConfig) -> None:
        cfg.weights_file = None


register_adapter_config("audio_cnn", audio=AudioCfg, cnn=AudioCnnCfg)
register_adapter_config("audio_timm", audio=AudioCfg, timm=TimmCfg)
register_adapter_config("audio_wav2vec2", audio=AudioCfg, wav2vec2=Wav2Vec2Cfg)
register_adapter_config("audio_hubert", audio=AudioCfg, wav2vec2=Wav2Vec2Cfg)
