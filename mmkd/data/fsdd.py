"""Free Spoken Digit Dataset: `{digit}_{speaker}_{index}.wav` recordings with a digit prompt.

Splits follow the official rule (index 0-4 test, 5+ train): train = official train minus a fixed
holdout of files (`data.val_fraction`, seed 0), val = that holdout, test = `data.fsdd.split`
(test | train | all).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from mmkd.data.base import (
    HOLDOUT_SEED,
    DatasetSplits,
    DataSettings,
    RawSample,
    SafeDataset,
    holdout_split,
    register_dataset,
)
from mmkd.data.decode import data_folder, read_audio
from mmkd.data.mnist import DIGIT_NAMES, digit_prompts
from mmkd.errors import ConfigError, SettingError
from mmkd.settings import Settings

CLIP_NAME = re.compile(r"(?P<digit>\d)_(?P<speaker>[^_]+)_(?P<index>\d+)\.wav")
SPLITS = ("train", "test", "all")
TEST_INDICES = 5  # official rule: recordings 0-4 of every (speaker, digit) are test


@dataclass(frozen=True)
class Clip:
    """One FSDD recording, parsed from its file name."""

    path: Path
    digit: int
    speaker: str
    index: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def official_split(self) -> str:
        return official_split(self.index)


def official_split(index: int) -> str:
    """The FSDD split of recording number `index`: "test" for 0-4, "train" otherwise."""
    return "test" if index < TEST_INDICES else "train"


def parse_clip(path: Path) -> Clip | None:
    """The clip named by `path`, or None when the name is not `{digit}_{speaker}_{index}.wav`."""
    match = CLIP_NAME.fullmatch(path.name)
    if match is None:
        return None
    return Clip(path, int(match["digit"]), match["speaker"], int(match["index"]))


def select_split(clips: Sequence[Clip], split: str) -> list[Clip]:
    """The clips of an official split: "train" (index 5+), "test" (index 0-4) or "all"."""
    if split not in SPLITS:
        raise ConfigError(f"data.fsdd.split: must be one of {', '.join(SPLITS)}, got {split!r}")
    return [c for c in clips if split == "all" or c.official_split == split]


def scan_clips(folder: Path, speakers: Sequence[str] = ()) -> list[Clip]:
    """The recordings in `folder`, sorted by name, of `speakers` only (all when empty)."""
    clips = sorted((c for p in folder.iterdir() if (c := parse_clip(p))), key=lambda c: c.name)
    if not clips:
        raise SettingError(
            "fsdd.root", f"{folder} has no {{digit}}_{{speaker}}_{{index}}.wav recordings"
        )
    present = sorted({c.speaker for c in clips})
    unknown = sorted(set(speakers) - set(present))
    if unknown:
        raise SettingError(
            "fsdd.speakers",
            f"unknown speaker(s) {', '.join(unknown)}; {folder} has {', '.join(present)}",
        )
    return [c for c in clips if not speakers or c.speaker in speakers]


class FsddDataset(SafeDataset):
    """Items: id = file name, label = digit, audio = (waveform, rate), text = digit prompt."""

    def __init__(self, clips: Sequence[Clip], prompts: list[str], on_error: str = "raise") -> None:
        super().__init__(on_error)
        self.clips = list(clips)
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.clips)

    def sample_id(self, index: int) -> str:
        return self.clips[index].name

    def load(self, index: int) -> RawSample:
        clip = self.clips[index]
        return {
            "id": clip.name,
            "label": clip.digit,
            "audio": read_audio(clip.path),
            "text": self.prompts[clip.digit],
        }

    def sample_files(self, index: int) -> list[str]:
        """The files sample `index` is read from (the teacher store keys their identity)."""
        return [str(self.clips[index].path)]


@dataclass(frozen=True)
class FsddSplits:
    """The clips of each split."""

    train: list[Clip]
    val: list[Clip]
    test: list[Clip]


def fsdd_clips(cfg: DataSettings) -> FsddSplits:
    """Scan the FSDD folder of the `data` config `cfg` and split it (fixed holdout by file)."""
    clips = scan_clips(data_folder(cfg, "fsdd", "fsdd/recordings"), list(cfg.fsdd.speakers))
    test = select_split(clips, cfg.fsdd.split)
    official_train = select_split(clips, "train")
    # holdout_split only needs len(); it picks files, so val stays fixed as run.seed changes
    keep, held = holdout_split(official_train, cfg.val_fraction, HOLDOUT_SEED)  # type: ignore[arg-type]
    return FsddSplits(
        [official_train[i] for i in keep.indices], [official_train[i] for i in held.indices], test
    )


@dataclass
class FsddCfg(Settings):
    """Free Spoken Digit Dataset recordings: {digit}_{speaker}_{index}.wav."""

    paths: ClassVar = ("root",)
    choices: ClassVar = {"split": ("train", "test", "all")}

    root: str | None = None  # folder holding the wav files
    split: str = "test"  # evaluation split: train (index 5-49) | test (index 0-4) | all
    speakers: list[str] = field(default_factory=list)  # empty: every speaker


@register_dataset("fsdd", FsddCfg)
def build_fsdd(cfg: DataSettings) -> DatasetSplits:
    """FSDD clips: official train minus a fixed holdout, that holdout, `data.fsdd.split`."""
    clips, prompts = fsdd_clips(cfg), digit_prompts(cfg)
    train, val, test = (
        FsddDataset(c, prompts, cfg.on_error) for c in (clips.train, clips.val, clips.test)
    )
    return DatasetSplits(
        train, val, test, modalities=("audio", "text"), class_names=list(DIGIT_NAMES)
    )
