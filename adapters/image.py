"""Image adapter: any timm model, preprocessed with timm's data config and transforms.

Preprocessing yields uint8 tensors (C, H, W); `collate` stacks them and normalises the batch
once (`float / 255`, then mean / std: the same operations, in the same order, as torchvision's
ToTensor + Normalize, so the values are bit-identical to normalising each image).

Images that already have the model's channels and input size (decoded-cache arrays, CIFAR)
take a tensor path: the CIFAR pad-crop + flip runs on uint8 tensors, for a whole batch at once
in `prepare_batch`. Its random draws are torchvision's RandomCrop + RandomHorizontalFlip draws,
in their order, from a generator seeded like `replay_scope` seeds torch, so a view is the same
tensor per sample or batched, and the same as the PIL transforms give. Everything else (other
sizes, channel conversion, timm's random-resized crop, colour jitter) runs timm's /
torchvision's PIL transforms per sample, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from mmkd.errors import DataError, SettingError

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


def uint8_steps(transform: Callable[[Image.Image], Tensor]) -> T.Compose:
    """`transform` (a Compose ending in ToTensor + Normalize) ending in PILToTensor instead:
    the batch is normalised once, in `ImagePreprocessor.collate`."""
    steps = list(transform.transforms)  # type: ignore[attr-defined]
    tail = [type(t).__name__ for t in steps[-2:]]
    if tail[0] not in ("ToTensor", "MaybeToTensor") or tail[1] != "Normalize":
        raise TypeError(f"expected a transform ending in ToTensor, Normalize; got {tail}")
    return T.Compose([*steps[:-2], T.PILToTensor()])


@dataclass(frozen=True)
class PadCropFlip:
    """The CIFAR augmentation on uint8 tensors: reflect-pad, random crop, random h-flip."""

    size: tuple[int, int]
    padding: int
    hflip: float

    def params(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, bool]:
        """(top, left, flip): torchvision's RandomCrop(padding) and RandomHorizontalFlip draws,
        in their order (None: the global torch generator, as those transforms use)."""
        th, tw = self.size
        h, w = height + 2 * self.padding, width + 2 * self.padding
        top = left = 0
        if (h, w) != (th, tw):
            top = int(torch.randint(0, h - th + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, w - tw + 1, size=(1,), generator=generator).item())
        flip = self.hflip > 0 and bool(torch.rand(1, generator=generator).item() < self.hflip)
        return top, left, flip

    def apply(self, image: Tensor, params: tuple[int, int, bool]) -> Tensor:
        """One image (C, H, W), with torchvision's v2 functional ops."""
        top, left, flip = params
        padded = TF.pad(image, [self.padding], padding_mode="reflect")
        out = TF.crop(padded, top, left, *self.size)
        return TF.horizontal_flip(out) if flip else out

    def apply_batch(self, images: Tensor, params: list[tuple[int, int, bool]]) -> Tensor:
        """A batch (B, H, W, C) -> (B, C, h, w) in one gather: each output pixel is read from
        its reflected source position (what pad + crop + flip compute image by image)."""
        b, height, width, _ = images.shape
        p = self.padding
        table = torch.tensor(params, dtype=torch.long)  # (B, 3)

        def reflected(start: Tensor, count: int, length: int) -> Tensor:
            pos = start[:, None] + torch.arange(count) - p  # position in the unpadded image
            pos = pos.abs()
            return torch.where(pos >= length, 2 * (length - 1) - pos, pos)

        rows = reflected(table[:, 0], self.size[0], height)
        cols = reflected(table[:, 1], self.size[1], width)
        cols = torch.where(table[:, 2:3].bool(), cols.flip(1), cols)
        picked = images[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return picked.permute(0, 3, 1, 2)  # channels-last strides, as `normalize` wants


class ImagePreprocessor(Preprocessor):
    """PIL image or uint8 array -> uint8 tensor (C, H, W) through timm's transforms (or the
    tensor path, see the module docstring); `collate` normalises the batch."""

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
        self.size: tuple[int, int] = tuple(data_config["input_size"][1:])  # type: ignore[assignment]
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(-1, 1, 1)
        self.eval_transform = uint8_steps(create_transform(**data_config, is_training=False))
        self.train_transform = (
            uint8_steps(train_transform(data_config, **train_options))
            if train_options is not None
            else self.eval_transform
        )
        # the tensor path: eval leaves an image at the input size as it is (resize to the
        # size, centre crop of all of it); training does the CIFAR pad-crop + flip
        self.eval_is_identity = float(data_config.get("crop_pct", 1.0)) == 1.0
        self.pad_crop = None
        if train_options and train_options["crop_padding"] and not train_options["color_jitter"]:
            self.pad_crop = PadCropFlip(
                self.size, int(train_options["crop_padding"]), float(train_options["hflip"])
            )

    def tensor_input(self, raw: Any) -> np.ndarray | None:
        """`raw` as a uint8 array (H, W) / (H, W, C) when it has the model's channels and input
        size (the tensor path applies); None otherwise."""
        if isinstance(raw, Image.Image):
            if raw.mode != self.mode or raw.size[::-1] != self.size:
                return None
            raw = np.asarray(raw)
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
            return None
        channels = 1 if raw.ndim == 2 else raw.shape[-1] if raw.ndim == 3 else 0
        if raw.shape[:2] != self.size or channels != len(self.mode):
            return None
        return raw

    def tensor_path(self, train: bool) -> bool:
        """Whether the tensor path implements this (train or eval) transform."""
        if train and self.randomized_in_training:
            return self.pad_crop is not None
        return self.eval_is_identity

    def __call__(self, raw: Any, *, train: bool) -> Tensor:
        array = self.tensor_input(raw) if self.tensor_path(train) else None
        if array is not None:
            image = torch.from_numpy(np.array(array).reshape(*self.size, -1)).permute(2, 0, 1)
            if train and self.pad_crop is not None:
                return self.pad_crop.apply(image, self.pad_crop.params(*self.size))
            return image.contiguous()
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

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> float, as ToTensor + Normalize compute it per image, laid out
        channels-last: convolutions and batch norm on the CPU run faster on it (measured here
        on ResNet-8: 1.6x per convolution, 3x per batch norm, with oneDNN); the values are
        the same, the model's float sums may round differently."""
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        return pixels.to(torch.get_default_dtype()).div(255).sub_(self.mean).div_(self.std)

    def collate(self, items: list[Tensor]) -> Batch:
        return {"pixels": self.normalize(torch.stack(items))}

    def prepare_batch(
        self, raws: list[Any], *, train: bool, seeds: list[int] | None
    ) -> Batch | None:
        """The whole batch on the tensor path, or None when any image needs the PIL path.
        `seeds`: each sample's view seed (`mmkd.replay.view_seed`); None draws from the
        global generator, in order, as calling `self(raw, train=True)` per image would."""
        if not raws or not self.tensor_path(train):
            return None
        arrays = [self.tensor_input(raw) for raw in raws]
        if any(a is None for a in arrays):
            return None
        images = torch.from_numpy(np.stack(arrays).reshape(len(arrays), *self.size, -1))
        if train and self.pad_crop is not None:
            generator = torch.Generator() if seeds is not None else None
            params = []
            for i in range(len(arrays)):
                if generator is not None:
                    generator.manual_seed(seeds[i])  # type: ignore[index]
                params.append(self.pad_crop.params(*self.size, generator=generator))
            pixels = self.pad_crop.apply_batch(images, params)
        else:
            pixels = images.permute(0, 3, 1, 2)
        return {"pixels": self.normalize(pixels)}


@ADAPTERS.register("image")
class ImageAdapter(Adapter):
    """A timm backbone on images. Set `timm.model`, `image.in_chans` and `image.img_size`."""

    modality = "image"

    def build_encoder(self) -> tuple[nn.Module, int]:
        if self.spec.image.in_chans not in PIL_MODES:
            raise SettingError("image.in_chans", "must be 1 or 3")
        return create_backbone(self.spec.timm, in_chans=self.spec.image.in_chans)

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
            given = getattr(image, name)
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
