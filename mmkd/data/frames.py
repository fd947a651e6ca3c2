"""Audio read as frames: every clip of a split cut into fixed windows with a hop.

`data.frames.window` (samples, None: off), `hop` and `sample_rate` turn each map-style split of
any audio dataset (folder, manifest, fsdd, hf, ...) into a dataset of frames: sample
`CLIP_ID@OFFSET` (OFFSET in samples at `sample_rate`) is `window` samples of that clip, mono,
resampled to `sample_rate`, zero-padded past the clip's end (a clip shorter than one window
gives one frame). Labels are dropped: a frame has none.

Memory stays flat as the clip count grows: the index holds one length per clip, and clips are
decoded when a frame of theirs is read, keeping at most `cache_clips` decoded clips (least
recently used first out) per process. Augmentation of a frame (gain, noise, time shift) belongs
to the model reading it (the crepe adapter's `crepe` section) and is replayed from
(augmentation seed, frame id, view) like every other view (mmkd.replay).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from mmkd.data.base import DatasetSplits, DataSettings, RawSample, SafeDataset, Skipped
from mmkd.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def mono_at(audio: Any, target: int, resamplers: dict[int, Any]) -> np.ndarray:
    """A raw (waveform, rate) pair as a mono float32 array at `target` Hz."""
    from mmkd.adapters.audio import make_resampler, mono_float32

    wave, rate = mono_float32(audio)
    if wave.ndim != 1 or wave.size == 0:
        raise DataError(f"audio has shape {wave.shape}; expected (samples,) or (samples, channels)")
    if rate != target:
        if rate not in resamplers:
            resamplers[rate] = make_resampler(rate, target)
        with torch.no_grad():
            wave = resamplers[rate](torch.from_numpy(wave)).numpy()
    return wave


class FramesDataset(SafeDataset):
    """The frames of every clip of `clips` (a map-style dataset of raw audio samples)."""

    def __init__(
        self,
        clips: Dataset,
        window: int,
        hop: int,
        sample_rate: int,
        cache_clips: int = 16,
        on_error: str = "raise",
    ) -> None:
        super().__init__(on_error)
        self.clips = clips
        self.window = window
        self.hop = hop
        self.sample_rate = sample_rate
        self.cache_clips = cache_clips
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._resamplers: dict[int, Any] = {}
        ids: list[str] = []
        counts: list[int] = []
        for index in range(len(clips)):  # type: ignore[arg-type]
            clip = clips[index]
            if isinstance(clip, Skipped):  # on_error=skip: no frames, counted in the log
                log.warning("frames: skipped clip %s: %s", clip.id, clip.reason)
                ids.append(clip.id)
                counts.append(0)
                continue
            ids.append(str(clip["id"]))
            counts.append(max(1, 1 + (self._length(clip) - window) // hop))
        self.clip_ids = ids
        self.ends = np.cumsum(counts, dtype=np.int64)  # frame index just past each clip

    def _decode(self, clip: RawSample) -> np.ndarray:
        if "audio" not in clip:
            raise ConfigError(f"data.frames: sample {clip.get('id')} has no audio to cut")
        try:
            return mono_at(clip["audio"], self.sample_rate, self._resamplers)
        except DataError as err:
            raise DataError(f"clip {clip.get('id')}: {err}") from None

    def _length(self, clip: RawSample) -> int:
        """Samples of `clip` at `sample_rate`, without resampling it: torchaudio's resampler
        returns ceil(samples x target / rate) samples."""
        from mmkd.adapters.audio import sample_rate

        if "audio" not in clip:
            raise ConfigError(f"data.frames: sample {clip.get('id')} has no audio to cut")
        try:
            samples, rate = clip["audio"]
            length = len(samples)
            rate = sample_rate(rate)
        except (TypeError, ValueError, DataError) as err:
            raise DataError(
                f"clip {clip.get('id')}: not a (waveform, sample_rate) pair ({err})"
            ) from None
        return -(-length * self.sample_rate // rate)

    def _remember(self, index: int, wave: np.ndarray) -> None:
        self._cache[index] = wave
        self._cache.move_to_end(index)
        while len(self._cache) > self.cache_clips:
            self._cache.popitem(last=False)

    def clip_wave(self, index: int) -> np.ndarray:
        """Clip `index` decoded (from the cache, or decoded and cached)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        clip = self.clips[index]
        if isinstance(clip, Skipped):
            raise DataError(clip.reason)
        wave = self._decode(clip)
        self._remember(index, wave)
        return wave

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, index: int) -> tuple[int, int]:
        """(clip index, offset in samples) of frame `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} of {len(self)}")
        clip = int(np.searchsorted(self.ends, index, side="right"))
        first = int(self.ends[clip - 1]) if clip else 0
        return clip, (index - first) * self.hop

    def sample_id(self, index: int) -> str:
        clip, offset = self.locate(index)
        return f"{self.clip_ids[clip]}@{offset}"

    def load(self, index: int) -> RawSample:
        clip, offset = self.locate(index)
        wave = self.clip_wave(clip)[offset : offset + self.window]
        if len(wave) < self.window:
            wave = np.pad(wave, (0, self.window - len(wave)))
        frame_id = f"{self.clip_ids[clip]}@{offset}"
        return {
            "id": frame_id,
            "label": None,
            "audio": (np.array(wave), self.sample_rate),
            "where": f"clip {self.clip_ids[clip]}, samples {offset}-{offset + self.window}",
        }


def frame_splits(splits: DatasetSplits, cfg: DataSettings) -> DatasetSplits:
    """`splits` read as frames (`cfg` is the `data` node); labels dropped."""
    frames = cfg.frames
    if "audio" not in splits.modalities:
        raise ConfigError(
            f"data.frames.window: data {cfg.name!r} carries {', '.join(splits.modalities)}, "
            "not audio"
        )
    built: dict[int, FramesDataset] = {}

    def cut(split: Dataset, name: str) -> FramesDataset:
        if isinstance(split, IterableDataset):
            raise ConfigError(
                f"data.frames: the {name} split of data {cfg.name!r} is streamed; frames are "
                "cut from map-style data (folder, manifest, fsdd, hf)"
            )
        if id(split) not in built:  # val is often also the test split: cut it once
            built[id(split)] = FramesDataset(
                split,
                frames.window,
                frames.hop,
                frames.sample_rate,
                frames.cache_clips,
                cfg.on_error,
            )
        return built[id(split)]

    return DatasetSplits(
        cut(splits.train, "train"),
        cut(splits.val, "val"),
        cut(splits.test, "test"),
        ("audio",),
        class_names=[],
    )
