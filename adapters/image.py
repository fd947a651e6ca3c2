"""Image adapter: any timm model, preprocessed with timm's data config and transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn
from torchvision import transforms as T

from mmkd.errors import ConfigError, DataError

from .base import ADAPTERS, Adapter, Batch, Preprocessor
from .timm_backbone import create_backbone, timm_feature_names, timm_forward_layers

PIL_MODES = {1: "L", 3: "RGB"}


def to_pil(raw: Any) -> Image.Image:
    """Accept a PIL image, or a uint8 array shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
    if isinstance(raw, Image.Image):
        image = raw
        if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
            raise DataError("image contains NaN or Inf")
    else:
        try:
            array = np.asarray(raw)
        except ValueError:  # ragged nested sequences
            raise DataError("image pixels do not form an array") from None
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise DataError(f"image array has shape {array.shape}; expected (H, W) or (H, W, 3)")
        if array.dtype != np.uint8:
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                raise DataError("image array contains NaN or Inf")
            raise DataError(f"image array has dtype {array.dtype}; expected uint8 (0-255)")
        image = Image.fromarray(array)
    if image.width == 0 or image.height == 0:
        raise DataError(f"image has no pixels (size {image.width}x{image.height})")
    return image


def train_transform(
    data_config: dict[str, Any],
    *,
    scale: tuple[float, float],
    hflip: float,
    color_jitter: float,
    crop_padding: int,
) -> Callable[[Image.Image], Tensor]:
    """timm's training transform (random-resized crop, flip, jitter), or with `crop_padding`
    the CIFAR recipe: resize to the input size, pad, random crop back, flip, jitter."""
    if not crop_padding:
        return create_transform(
            **data_config, is_training=True, scale=scale, hflip=hflip, color_jitter=color_jitter
        )
    size = data_config["input_size"][1:]
    steps: list[Any] = [
        T.Resize(size),  # no-op for images already at the input size
        T.RandomCrop(size, padding=crop_padding, padding_mode="reflect"),
    ]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])]
    return T.Compose(steps)


class ImagePreprocessor(Preprocessor):
    """PIL image or uint8 array -> normalised tensor (C, H, W) through timm's transforms."""

    modality = "image"

    def __init__(
        self,
        data_config: dict[str, Any],
        train_options: dict[str, Any] | None,
        channel_mismatch: str,
    ) -> None:
        super().__init__(
            {"data_config": data_config, "train": train_options, "channels": channel_mismatch},
            randomized_in_training=train_options is not None,
        )
        self.mode = PIL_MODES[data_config["input_size"][0]]
        self.channel_mismatch = channel_mismatch
        self.eval_transform = create_transform(**data_config, is_training=False)
        self.train_transform = (
            train_transform(data_config, **train_options)
            if train_options is not None
            else self.eval_transform
        )

    def __call__(self, raw: Any, *, train: bool) -> Tensor:
        image = to_pil(raw)
        if image.mode != self.mode:
            if self.channel_mismatch == "error":
                raise DataError(
                    f"image mode {image.mode} does not match the model's {self.mode} input "
                    "(set image.channel_mismatch=convert to convert it)"
                )
            try:
                image = image.convert(self.mode)
            except ValueError as err:  # e.g. LAB or La images
                raise DataError(f"image mode {image.mode} cannot be converted: {err}") from None
        return (self.train_transform if train else self.eval_transform)(image)

    def collate(self, items: list[Tensor]) -> Batch:
        return {"pixels": torch.stack(items)}


@ADAPTERS.register("image")
class ImageAdapter(Adapter):
    """A timm backbone on images. Set `timm.model`, `image.in_chans` and `image.img_size`."""

    modality = "image"
    sections = ("timm", "image")

    def build_encoder(self) -> tuple[nn.Module, int]:
        if self.spec.image.in_chans not in PIL_MODES:
            raise ConfigError(f"{self.key}.image.in_chans: must be 1 or 3")
        return create_backbone(self.spec.timm, in_chans=self.spec.image.in_chans, key=self.key)

    def data_config(self) -> dict[str, Any]:
        image = self.spec.image
        args = {
            "in_chans": image.in_chans,
            "input_size": (image.in_chans, image.img_size, image.img_size),
            "interpolation": image.interpolation,
            "crop_pct": image.crop_pct,
            "crop_mode": "center",
        }
        resolved = resolve_data_config(args, model=self.encoder)
        for name in ("mean", "std"):
            given = image[name]
            if given is not None:
                values = [float(v) for v in given]
                resolved[name] = tuple(values * image.in_chans if len(values) == 1 else values)
            elif len(resolved[name]) != image.in_chans:  # e.g. ImageNet RGB stats, 1-channel input
                resolved[name] = (float(np.mean(resolved[name])),) * image.in_chans
        return resolved

    def make_preprocessor(self) -> ImagePreprocessor:
        image = self.spec.image
        train_options = (
            {
                "scale": tuple(image.scale),
                "hflip": image.hflip,
                "color_jitter": image.color_jitter,
                "crop_padding": image.crop_padding,
            }
            if image.augment
            else None
        )
        return ImagePreprocessor(self.data_config(), train_options, image.channel_mismatch)

    def encode(self, batch: Batch) -> Tensor:
        return self.encoder(batch["pixels"])

    def feature_names(self) -> list[str]:
        return timm_feature_names(self.encoder)

    def encode_layers(self, batch: Batch, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        return timm_forward_layers(self.encoder, batch["pixels"], names)

    def example_batch(self, batch_size: int = 1) -> Batch:
        size = self.spec.image.img_size
        return {"pixels": torch.zeros(batch_size, self.spec.image.in_chans, size, size)}
