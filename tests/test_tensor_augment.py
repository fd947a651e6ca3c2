"""Augmentation on uint8 tensors: a view is the same tensor per sample or batched, with any
worker count, and the same as torchvision's PIL transforms give; normalised once per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from mmkd.adapters.image import ImagePreprocessor
from mmkd.data.datamodule import RoleCollate, ViewedDataset
from mmkd.replay import replay_scope

SIZE = 8
DATA_CONFIG = {
    "input_size": (3, SIZE, SIZE),
    "interpolation": "bilinear",
    "mean": (0.49, 0.48, 0.45),
    "std": (0.25, 0.24, 0.26),
    "crop_pct": 1.0,
    "crop_mode": "center",
}
CIFAR = {"scale": (0.08, 1.0), "hflip": 0.5, "color_jitter": 0.0, "crop_padding": 2}


def cifar_pre() -> ImagePreprocessor:
    return ImagePreprocessor(DATA_CONFIG, dict(CIFAR), "convert")


def images(n: int = 24) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


def samples(n: int = 24) -> list[dict]:
    return [
        {"id": f"s{i}", "label": i % 3, "image": a, "view": i % 4} for i, a in enumerate(images(n))
    ]


def collate(batched: bool, train: bool = True) -> RoleCollate:
    return RoleCollate(
        {"student": cifar_pre()},
        train=train,
        keep_labels=True,
        num_classes=3,
        replay_seed=11,
        batched=batched,
    )


def test_views_are_the_same_per_sample_and_batched():
    batch = samples()
    one_by_one = collate(batched=False)(batch)["inputs"]["student"]["pixels"]
    at_once = collate(batched=True)(batch)["inputs"]["student"]["pixels"]
    assert at_once.dtype == torch.float32 and at_once.shape == (24, 3, SIZE, SIZE)
    assert torch.equal(one_by_one, at_once)
    for pixels in (one_by_one, at_once):  # the layout CPU convolutions run fastest on
        assert pixels.is_contiguous(memory_format=torch.channels_last)
    # the views differ from each other (the augmentation really ran) ...
    plain = collate(batched=True, train=False)(batch)["inputs"]["student"]["pixels"]
    assert not torch.equal(at_once, plain)
    # ... and a sample's view depends on the view index, not on its batch mates
    alone = collate(batched=True)([batch[5]])["inputs"]["student"]["pixels"]
    assert torch.equal(alone[0], at_once[5])
    other_view = collate(batched=True)([{**batch[5], "view": 9}])["inputs"]["student"]["pixels"]
    assert not torch.equal(other_view[0], at_once[5])


def test_views_match_torchvisions_pil_transforms():
    """The CIFAR table's stream: same crops and flips as RandomCrop + RandomHorizontalFlip on
    PIL images, and ToTensor + Normalize values to the bit."""
    reference = T.Compose(
        [
            T.Resize((SIZE, SIZE)),
            T.RandomCrop((SIZE, SIZE), padding=2, padding_mode="reflect"),
            T.RandomHorizontalFlip(0.5),
            T.ToTensor(),
            T.Normalize(DATA_CONFIG["mean"], DATA_CONFIG["std"]),
        ]
    )
    batch = samples()
    at_once = collate(batched=True)(batch)["inputs"]["student"]["pixels"]
    for i, sample in enumerate(batch):
        with replay_scope(11, sample["id"], sample["view"]):
            expected = reference(Image.fromarray(sample["image"]))
        assert torch.equal(at_once[i], expected), i


def test_views_are_the_same_with_any_worker_count():
    data = ViewedDataset(samples(16))
    order = [[(i, i % 3) for i in range(j, j + 4)] for j in range(0, 16, 4)]

    def run(workers: int) -> torch.Tensor:
        loader = DataLoader(
            data, batch_sampler=order, num_workers=workers, collate_fn=collate(batched=True)
        )
        return torch.cat([b["inputs"]["student"]["pixels"] for b in loader])

    assert torch.equal(run(0), run(2))


def test_images_the_tensor_path_cannot_take_use_the_pil_path():
    """Another size or channel count falls back to the PIL transforms for the whole role; the
    batch is the same as preprocessing each sample alone."""
    batch = samples(6)
    batch[2] = {**batch[2], "image": np.zeros((SIZE + 2, SIZE, 3), dtype=np.uint8)}
    batch[4] = {**batch[4], "image": np.zeros((SIZE, SIZE), dtype=np.uint8)}
    pre = cifar_pre()
    assert pre.prepare_batch([s["image"] for s in batch], train=True, seeds=[0] * 6) is None
    one_by_one = collate(batched=False)(batch)["inputs"]["student"]["pixels"]
    at_once = collate(batched=True)(batch)["inputs"]["student"]["pixels"]
    assert torch.equal(one_by_one, at_once) and at_once.shape == (6, 3, SIZE, SIZE)


@pytest.mark.parametrize("train", [False, True])
def test_normalising_the_batch_equals_normalising_each_image(train):
    pre = ImagePreprocessor(DATA_CONFIG, None, "convert")  # no augmentation: eval transform
    raws = images(5)
    batch = pre.prepare_batch(raws, train=train, seeds=None)
    reference = T.Compose([T.ToTensor(), T.Normalize(DATA_CONFIG["mean"], DATA_CONFIG["std"])])
    expected = torch.stack([reference(Image.fromarray(a)) for a in raws])
    assert batch is not None and torch.equal(batch["pixels"], expected)
