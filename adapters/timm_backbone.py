"""A pooled-feature timm backbone from a `TimmCfg` (image and audio_timm adapters)."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence

import timm
from torch import Tensor, nn

from mmkd.errors import SettingError

from . import cifar_models  # noqa: F401  (registers the CIFAR ResNets with timm)
from .backbone_config import TimmCfg


def create_backbone(cfg: TimmCfg, *, in_chans: int) -> tuple[nn.Module, int]:
    """timm.create_model with the classifier removed (num_classes=0): returns (model, features).
    A wrong setting is a SettingError of `timm.FIELD` (build_adapter names the model's key)."""
    kwargs = copy.deepcopy(dict(cfg.kwargs))
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise SettingError("timm.model", f"timm has no model {cfg.model!r}.{hint}")
    overlay = {"file": cfg.pretrained_file} if cfg.pretrained_file else None
    try:
        model = timm.create_model(
            cfg.model,
            pretrained=bool(cfg.pretrained or cfg.pretrained_file),
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            in_chans=in_chans,
            **kwargs,
        )
    except TypeError as err:
        raise SettingError("timm.kwargs", f"{cfg.model} does not accept them: {err}") from None
    # with num_classes=0 a timm model returns pooled pre-logits features: `head_hidden_size`
    # wide where a model has a hidden head layer (MobileNetV3's conv_head), else num_features
    return model, getattr(model, "head_hidden_size", None) or model.num_features


def timm_feature_names(model: nn.Module) -> list[str]:
    """The model's intermediate features by timm's own names (`feature_info` modules, e.g.
    layer1..layer4 of a ResNet), in forward order; none if it has no `forward_intermediates`."""
    if not hasattr(model, "forward_intermediates"):
        return []
    return [str(info["module"]) for info in getattr(model, "feature_info", [])]


def timm_forward_layers(
    model: nn.Module, x: Tensor, names: Sequence[str]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pooled features (as `model(x)` returns them with num_classes=0) and the named
    intermediate features, through timm's `forward_intermediates` (NCHW)."""
    order = timm_feature_names(model)
    indices = sorted({order.index(name) for name in names})
    final, intermediates = model.forward_intermediates(x, indices=indices)
    by_index = dict(zip(indices, intermediates, strict=True))
    pooled = model.forward_head(final)  # classifier is Identity (num_classes=0)
    return pooled, {name: by_index[order.index(name)] for name in names}
