"""The `image` section: image preprocessing, resolved through timm's data config; the image
adapter reads it and `timm`."""

# OmegaConf reads these annotations at run time: keep typing.Optional/List here.
# ruff: noqa: UP006, UP035, UP045

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig

from mmkd.errors import ConfigError

from .backbone_config import TimmCfg
from .sections import (
    Section,
    check_choice,
    check_non_negative,
    check_positive,
    register_adapter_config,
)


@dataclass
class ImageCfg(Section):
    """Image preprocessing, resolved through timm's data config."""

    in_chans: int = 3  # channels the backbone reads (1 for MNIST-like data)
    img_size: int = 224  # square input size after resize / crop
    mean: Optional[List[float]] = (
        None  # None: timm's default for the model (averaged if in_chans=1)
    )
    std: Optional[List[float]] = None
    interpolation: str = "bilinear"
    crop_pct: float = 1.0  # eval centre crop fraction (1.0: resize only)
    # "convert": grayscale <-> RGB are converted to in_chans; "error": a mismatch is a data error
    channel_mismatch: str = "convert"
    augment: bool = False  # training-time augmentation (timm's create_transform, is_training=True)
    scale: List[float] = field(
        default_factory=lambda: [0.08, 1.0]
    )  # random-resized-crop area range
    # >0: CIFAR-style training crop instead of timm's random-resized crop: pad each side by this
    # many pixels (reflection), then crop img_size at random (torchvision RandomCrop)
    crop_padding: int = 0
    hflip: float = 0.0  # horizontal flip probability (0 for digits and text in images)
    color_jitter: float = 0.0

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_choice(cfg, key, "channel_mismatch", ("convert", "error"))
        check_positive(cfg, key, "in_chans", "img_size")
        check_non_negative(cfg, key, "crop_padding")
        for name in ("mean", "std"):
            values = cfg[name]
            if values is not None and len(values) not in (1, cfg.in_chans):
                raise ConfigError(
                    f"{key}.{name}: has {len(values)} values; "
                    f"{key}.in_chans is {cfg.in_chans} (give 1 or {cfg.in_chans})"
                )
        if cfg.std is not None and any(s <= 0 for s in cfg.std):
            raise ConfigError(f"{key}.std: every value must be > 0")


register_adapter_config("image", timm=TimmCfg, image=ImageCfg)
