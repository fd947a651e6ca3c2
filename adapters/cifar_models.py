"""The standard CIFAR ResNets and wide ResNets, registered in timm's model registry.

ImageNet ResNets downsample 32x32 inputs to 1x1 (7x7 stride-2 stem + max-pool); the CIFAR
networks keep full resolution in their first stage: a 3x3 stride-1 stem, three stages of
16/32/64 (x width) channels at strides 1, 2, 2, global average pooling.

- `resnet{8,14,20,32,44,56,110}_cifar`: He et al. 2016 ("Deep Residual Learning", Sec. 4.2),
  6n+2 layers, post-activation basic blocks, 1x1-conv projection shortcuts where the shape
  changes (option B). ResNet-20 has 0.27M parameters, ResNet-56 0.86M.
- `wrn_{depth}_{width}`: Zagoruyko & Komodakis 2016, pre-activation blocks, (depth-4)/6
  blocks per stage. WRN-16-1 has 0.18M parameters, WRN-40-2 2.2M.

Importing `mmkd.adapters` registers them, after which `timm.create_model("resnet20_cifar")`
builds one like any timm model (`num_classes=0` for pooled features, `features_only=True` for
the stage outputs).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, then ReLU (the original CIFAR ResNet block)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-(dropout)-conv + shortcut (the wide ResNet block)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act(self.bn2(out))))
        return out + shortcut


class CifarResNet(nn.Module):
    """A 3-stage CIFAR network exposing timm's model API (num_features, forward_features,
    forward_head, reset_classifier, feature_info)."""

    def __init__(
        self,
        blocks_per_stage: int,
        widths: tuple[int, int, int],
        preact: bool = False,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        stem = 16
        self.conv_stem = nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False)
        self.bn_stem: nn.Module = nn.Identity() if preact else nn.BatchNorm2d(stem)
        self.act = nn.ReLU(inplace=True)
        block = partial(PreActBlock, drop_rate=block_drop_rate) if preact else BasicBlock
        stages = []
        self.feature_info: list[dict[str, Any]] = []
        in_chs = stem
        for index, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
            layers = [block(in_chs, width, stride)]
            layers += [block(width, width, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*layers))
            in_chs = width
            self.feature_info.append(
                {"num_chs": width, "reduction": 2**index, "module": f"stages.{index}"}
            )
        self.stages = nn.Sequential(*stages)
        # pre-activation networks end with BN-ReLU before pooling
        self.final_norm: nn.Module = nn.BatchNorm2d(in_chs) if preact else nn.Identity()
        self.num_features = self.head_hidden_size = in_chs
        self.fc: nn.Module = nn.Linear(in_chs, num_classes) if num_classes else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act(self.bn_stem(self.conv_stem(x)))
        x = self.stages(x)
        if isinstance(self.final_norm, nn.BatchNorm2d):
            x = self.act(self.final_norm(x))
        return x

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's intermediate-feature API: the outputs of the stages in `indices` (as
        `feature_info` numbers them), and the final features `forward_features` returns."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be NCHW, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.act(self.bn_stem(self.conv_stem(x)))
        stages = list(self.stages)[: max_index + 1] if stop_early else list(self.stages)
        for index, stage in enumerate(stages):
            x = stage(x)
            if index in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if isinstance(self.final_norm, nn.BatchNorm2d):
            x = self.act(self.final_norm(x))
        return x, intermediates

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**overrides: Any) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "conv_stem",
        "classifier": "fc",
        **overrides,
    }


RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
WRN_SHAPES = ((16, 1), (16, 2), (16, 4), (16, 8), (28, 10), (40, 1), (40, 2), (40, 4))

default_cfgs = generate_default_cfgs(
    {f"resnet{d}_cifar": _cfg() for d in RESNET_DEPTHS}
    | {f"wrn_{d}_{w}": _cfg() for d, w in WRN_SHAPES}
)


def _build(variant: str, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        feature_cfg={"flatten_sequential": True, "out_indices": (0, 1, 2)},
        **kwargs,
    )


def _resnet_entry(depth: int) -> Any:
    def entry(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
        args = {"blocks_per_stage": (depth - 2) // 6, "widths": (16, 32, 64)}
        return _build(f"resnet{depth}_cifar", pretrained, **{**args, **kwargs})

    entry.__name__ = f"resnet{depth}_cifar"
    entry.__qualname__ = entry.__name__
    entry.__doc__ = f"ResNet-{depth} for 32x32 inputs (He et al. 2016, CIFAR variant)."
    return entry


def _wrn_entry(depth: int, width: int) -> Any:
    def entry(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
        args = {
            "blocks_per_stage": (depth - 4) // 6,
            "widths": (16 * width, 32 * width, 64 * width),
            "preact": True,
        }
        return _build(f"wrn_{depth}_{width}", pretrained, **{**args, **kwargs})

    entry.__name__ = f"wrn_{depth}_{width}"
    entry.__qualname__ = entry.__name__
    entry.__doc__ = f"WRN-{depth}-{width} (Zagoruyko & Komodakis 2016)."
    return entry


def register() -> list[str]:
    """Register every CIFAR model with timm (once; importing this module does it)."""
    entries = [_resnet_entry(d) for d in RESNET_DEPTHS] + [_wrn_entry(*s) for s in WRN_SHAPES]
    names = []
    for entry in entries:
        entry.__module__ = __name__
        if not timm.is_model(entry.__name__):
            register_model(entry)
        names.append(entry.__name__)
    return names


CIFAR_MODELS = register()
