"""AV-digits: each FSDD clip paired with MNIST image(s) of the same digit, plus a digit prompt.

Clips are split as in `fsdd` (test follows `data.fsdd.split`); images come from the MNIST part
matching the clip's side of the split, so no test image is ever paired into training:

    train clips -> MNIST train minus its val holdout   val clips -> the MNIST val holdout
    test clips  -> MNIST t10k for official-test clips (index 0-4), the MNIST train pool for
                   official-train clips (data.fsdd.split=train|all)

Pairing is deterministic in `data.av_digits.pair_seed`; within a split an image is reused only
when its digit has fewer images than needed. `data.mnist.split` is not used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mmkd.data.base import (
    SPLIT_CODES,
    DatasetSplits,
    DataSettings,
    RawSample,
    SafeDataset,
    register_dataset,
)
from mmkd.data.fsdd import Clip, FsddDataset, fsdd_clips
from mmkd.data.mnist import DIGIT_NAMES, MnistDataset, digit_prompts, mnist_pools
from mmkd.errors import DataError, SettingError
from mmkd.settings import Settings

Pool = tuple[MnistDataset, np.ndarray]  # an MNIST file and the indices of it the pool holds
Pair = tuple[int, MnistDataset, int]  # (clip position, MNIST file, image index)


def pair_clips(
    clips: Sequence[Clip],
    pool_of: Sequence[str],
    pools: Mapping[str, Pool],
    per_clip: int,
    seed: Sequence[int],
) -> list[Pair]:
    """Pair clip c with `per_clip` images of its digit from `pools[pool_of[c]]`, in clip order.

    Each (pool, digit) draws from one random permutation of its images, cycled only when the
    clips need more images than it has; a clip's own images stay distinct while supply allows.
    """
    table = np.zeros((len(clips), per_clip), dtype=np.int64)
    for pool_code, name in enumerate(sorted(pools)):
        images, indices = pools[name]
        labels = images.part.labels[indices]
        for digit in range(len(DIGIT_NAMES)):
            rows = [c for c, clip in enumerate(clips) if clip.digit == digit and pool_of[c] == name]
            if not rows:
                continue
            candidates = indices[labels == digit]
            if not len(candidates):
                raise DataError(
                    f"no MNIST images of digit {digit} in the {name} pool to pair "
                    f"with {len(rows)} clips"
                )
            order = np.random.default_rng([*seed, pool_code, digit]).permutation(candidates)
            slots = np.arange(len(rows) * per_clip) % len(order)
            table[rows] = order[slots].reshape(len(rows), per_clip)
    return [
        (c, pools[pool_of[c]][0], int(table[c, j]))
        for c in range(len(clips))
        for j in range(per_clip)
    ]


class AvDigitsDataset(SafeDataset):
    """Items: id "CLIP+mnist-PART-INDEX", label = digit, image, audio and text."""

    def __init__(self, audio: FsddDataset, pairs: list[Pair], on_error: str = "raise") -> None:
        super().__init__(on_error)
        self.audio = audio
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_id(self, index: int) -> str:
        clip, images, image = self.pairs[index]
        return f"{self.audio.sample_id(clip)}+{images.sample_id(image)}"

    def sample_files(self, index: int) -> list[str]:
        """The audio file of the pair (MNIST images are read from memory)."""
        return self.audio.sample_files(self.pairs[index][0])

    def load(self, index: int) -> RawSample:
        clip, images, image = self.pairs[index]
        return {**images[image], **self.audio.load(clip), "id": self.sample_id(index)}


@dataclass
class AvDigitsCfg(Settings):
    """MNIST images paired with FSDD clips of the same digit, plus a text prompt."""

    positive: ClassVar = ("images_per_clip",)

    pair_seed: int = 0  # which image goes with which clip (deterministic)
    images_per_clip: int = 1  # >1 pairs each clip with several images (more pairs per epoch)


@register_dataset("av_digits", AvDigitsCfg, reads=("fsdd", "mnist"))
def build_av_digits(cfg: DataSettings) -> DatasetSplits:
    """Train / val / test pairs of FSDD clips and MNIST images (see the module docstring)."""
    per_clip = cfg.av_digits.images_per_clip
    if per_clip < 1:
        raise SettingError("av_digits.images_per_clip", f"must be >= 1, got {per_clip}")
    clips, mnist, prompts = fsdd_clips(cfg), mnist_pools(cfg), digit_prompts(cfg)
    pools: dict[str, Pool] = {
        "train": (mnist.whole_train, np.asarray(mnist.train.indices, dtype=np.int64)),
        "val": (mnist.whole_train, np.asarray(mnist.val.indices, dtype=np.int64)),
        "test": (mnist.test, np.arange(len(mnist.test))),
    }

    def split(name: str, split_clips: list[Clip]) -> AvDigitsDataset:
        # test clips take images from the side of the official split they come from
        pool_of = [c.official_split if name == "test" else name for c in split_clips]
        pairs = pair_clips(
            split_clips, pool_of, pools, per_clip, (cfg.av_digits.pair_seed, SPLIT_CODES[name])
        )
        return AvDigitsDataset(FsddDataset(split_clips, prompts, cfg.on_error), pairs, cfg.on_error)

    return DatasetSplits(
        split("train", clips.train),
        split("val", clips.val),
        split("test", clips.test),
        modalities=("image", "audio", "text"),
        class_names=list(DIGIT_NAMES),
    )
