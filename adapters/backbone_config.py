"""The `timm` section: a timm backbone (read by the image and audio_timm adapters).

Named for what it configures rather than for timm, which it does not import."""

# OmegaConf reads these annotations at run time: keep typing.Optional/List/Dict here.
# ruff: noqa: UP006, UP035, UP045

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from .sections import Section


@dataclass
class TimmCfg(Section):
    """A timm backbone (image adapter, and the audio adapter that reads log-mels as an image)."""

    model: str = "resnet18"  # any name timm.list_models() knows
    pretrained: bool = False  # load pretrained weights (from the hub, or from pretrained_file)
    pretrained_file: Optional[str] = None  # local backbone weights file, loaded by timm
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model as is

    # the model name is checked against timm's registry when the backbone is built

    @classmethod
    def exported(cls, cfg: DictConfig) -> None:
        cfg.pretrained = False
        cfg.pretrained_file = None
