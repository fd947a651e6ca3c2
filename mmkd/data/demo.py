"""The offline demo dataset: coloured shapes, class tones and captions, generated on the fly.

Nine classes (3 colours x 3 shapes). Each sample carries a 32x32 RGB image of the shape on a
noisy background, a short tone whose pitch encodes the class, and a caption naming it
("a picture of a red circle"). Deterministic in (seed, split, index); nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch.utils.data import Dataset

from mmkd.data.base import SPLIT_CODES, DatasetSplits, DataSettings, RawSample, register_dataset
from mmkd.settings import Settings

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
SHAPES = ("circle", "square", "triangle")
CLASS_NAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
CAPTIONS = (
    "a {name}",
    "a picture of a {name}",
    "there is a {name} here",
    "a small {name}",
    "a drawing of a {name} on a dark background",
)


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (size, size) of a randomly placed and sized shape."""
    radius = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    if shape == "square":
        return (np.abs(x - cx) <= radius * 0.85) & (np.abs(y - cy) <= radius * 0.85)
    top = cy - radius  # upward triangle: widens linearly from the apex
    return (y >= top) & (y <= cy + radius) & (np.abs(x - cx) <= (y - top) * 0.6)


class DemoDataset(Dataset):
    """One split of the generated data: `size` samples, deterministic in (seed, split, index)."""

    def __init__(self, cfg: DemoCfg, split: str, size: int, seed: int) -> None:
        self.cfg = cfg
        self.split = split
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> RawSample:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index])
        label = index % len(CLASS_NAMES)
        colour, shape = CLASS_NAMES[label].split()
        return {
            "id": f"demo-{self.split}-{index}",
            "label": label,
            "image": self.image(colour, shape, rng),
            "audio": (self.tone(label, rng), self.cfg.sample_rate),
            "text": rng.choice(CAPTIONS).format(name=CLASS_NAMES[label]),
        }

    def image(self, colour: str, shape: str, rng: np.random.Generator) -> np.ndarray:
        size = self.cfg.image_size
        image = rng.normal(30, 255 * self.cfg.noise, size=(size, size, 3))
        mask = draw_shape(shape, size, rng)
        shade = np.array(COLOURS[colour]) * rng.uniform(0.7, 1.0)
        image[mask] = shade + rng.normal(0, 255 * self.cfg.noise, size=(int(mask.sum()), 3))
        return np.clip(image, 0, 255).astype(np.uint8)

    def tone(self, label: int, rng: np.random.Generator) -> np.ndarray:
        rate, seconds = self.cfg.sample_rate, self.cfg.clip_seconds
        t = np.arange(round(rate * seconds)) / rate
        freq = 300.0 * 2 ** (label / 4) * rng.uniform(0.98, 1.02)  # 4 classes per octave
        wave = rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
        wave *= np.hanning(len(t))
        return (wave + rng.normal(0, self.cfg.noise, size=len(t))).astype(np.float32)


@dataclass
class DemoCfg(Settings):
    """Generated shapes / tones / captions: the offline demo dataset."""

    positive: ClassVar = (
        "num_train",
        "num_val",
        "num_test",
        "image_size",
        "sample_rate",
        "clip_seconds",
    )
    non_negative: ClassVar = ("noise",)

    num_train: int = 1800
    num_val: int = 200
    num_test: int = 500
    image_size: int = 32
    sample_rate: int = 8000
    clip_seconds: float = 0.5
    noise: float = 0.1  # pixel / waveform noise level
    seed: int = 0  # generator seed; the data stays fixed when run.seed changes


@register_dataset("demo", DemoCfg)
def build_demo(cfg: DataSettings) -> DatasetSplits:
    """Train / val / test splits of the generated demo data (sizes from data.demo)."""
    demo = cfg.demo
    return DatasetSplits(
        train=DemoDataset(demo, "train", demo.num_train, demo.seed),
        val=DemoDataset(demo, "val", demo.num_val, demo.seed),
        test=DemoDataset(demo, "test", demo.num_test, demo.seed),
        modalities=("image", "audio", "text"),
        class_names=list(CLASS_NAMES),
    )
