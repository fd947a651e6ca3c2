"""WebDataset tar shards as a streaming data source (`data.name=webdataset`).

A shard holds each sample as files sharing a key: KEY.jpg / .jpeg / .png / .webp (image),
KEY.wav / .flac (audio), KEY.txt (text), KEY.cls (label: a class name, or an integer index into
the class names). The key (`__key__`) is the sample id. Shards are opened, expanded and grouped
into samples by the `webdataset` library; decoding errors name the shard and key.

How an epoch is split (every process computes the same plan; nothing is exchanged):
- the shard order is shuffled by (run.seed, epoch) when `data.webdataset.shuffle_shards`;
- the samples of the shards in that order form one stream of N samples, cut into P = world size x
  workers contiguous parts of ceil(N / P) samples; part `rank * workers + worker` goes to that
  worker of that rank. When N is not a multiple of P the last parts wrap around to the start of
  the stream (as DistributedSampler pads), so every rank runs the same number of batches however
  uneven the shards are. Each sample is seen once per epoch, plus at most P - 1 repeats. A part
  may begin inside a shard: that shard's earlier samples are read and passed over, not decoded.
- each worker reorders its part with a shuffle buffer (webdataset's `shuffle`, seeded by
  (run.seed, epoch, part)), applied to sample positions first; the shards are then read in order
  and each sample is handed out when its turn comes (at most about a buffer's worth held).

Resume: a checkpoint records the batches done in the epoch. Batches leave the workers in turn, so
that count gives each worker's samples consumed; on restart a worker replays its shuffle on
positions, knows exactly which samples remain, and opens only the shards that still hold one.
The resumed epoch yields exactly the samples, in the order, of the uninterrupted run, provided
the world size, `data.num_workers`, `data.batch_size`, `data.webdataset.*`, `run.seed` and the
shards are unchanged.

Shard sizes come from `shards.json` beside the shards (written by `mmkd pack`), or, for a shard it
does not list, from counting the members of the shard at start-up. A recorded count is what the
shard must deliver: a shard whose byte size differs from the record is refused at start-up (or,
under data.on_error=skip, read, its missing samples counted as skipped), and a shard that ends
early while being read raises or counts its missing samples the same way. Shards of a folder
holding an unfinished `mmkd pack` (PREFIX.packing.json) are refused unless
data.webdataset.allow_incomplete.
"""

from __future__ import annotations

import copy
import glob
import io
import json
import logging
import math
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import webdataset as wds
from omegaconf import ListConfig
from torch.utils.data import IterableDataset, get_worker_info

from mmkd.data.base import DatasetSplits, DataSettings, RawSample, Skipped, register_dataset
from mmkd.data.decode import decode_audio, decode_image
from mmkd.data.resume import ResumableLoader
from mmkd.errors import ConfigError, DataError
from mmkd.settings import Settings

log = logging.getLogger(__name__)

PACKING_SUFFIX = ".packing.json"  # PREFIX.packing.json: an unfinished `mmkd pack` of PREFIX
INDEX_NAME = "shards.json"  # {"shards": {NAME.tar: {"samples": n, "bytes": size}}, "class_names"}
EXTENSIONS = {  # modality -> the file extensions that carry it, in order of preference
    "image": ("jpg", "jpeg", "png", "webp"),
    "audio": ("wav", "flac"),
    "text": ("txt",),
}
LABEL_EXT = "cls"
META_FILE = re.compile(r"__[^/]*__($|/)")  # webdataset's default: such members are not sample files
HOLDOUT_SEED = 0  # the validation shards held out of train do not move with run.seed


def is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def local_matches(pattern: str, key: str) -> list[str]:
    """The files a glob pattern (`*`, `?`, `[...]`) names, sorted; the pattern itself if none."""
    if not glob.has_magic(pattern):
        return [pattern]
    found = sorted(p for p in glob.glob(str(Path(pattern).expanduser())) if Path(p).is_file())
    if not found:
        raise ConfigError(f"{key}: no shard matches {pattern}")
    return found


def expand_shards(spec: Any, key: str) -> list[str]:
    """The shard URLs / absolute paths of a brace or glob pattern, a list, or a folder of .tar
    files."""
    items = list(spec) if isinstance(spec, list | tuple | ListConfig) else [spec]
    urls: list[str] = []
    for item in map(str, items):
        folder = Path(item).expanduser()
        if not is_url(item) and folder.is_dir():
            found = sorted(folder.glob("*.tar"))
            if not found:
                raise ConfigError(f"{key}: folder {folder} holds no .tar files")
            urls.extend(str(path.absolute()) for path in found)
            continue
        for url in wds.shardlists.expand_urls(item):
            if is_url(url):
                urls.append(url)
                continue
            for match in local_matches(url, key):
                path = Path(match).expanduser()
                if not path.is_file():
                    raise ConfigError(f"{key}: shard {path} not found")
                urls.append(str(path.absolute()))
    if not urls:
        raise ConfigError(f"{key}: names no shards")
    repeated = sorted({url for url in urls if urls.count(url) > 1})
    if repeated:
        raise ConfigError(f"{key}: shard(s) named twice: {', '.join(repeated[:3])}")
    return urls


def read_index(folder: Path) -> dict[str, Any]:
    """The `shards.json` of `folder` (empty when there is none or it cannot be read)."""
    path = folder / INDEX_NAME
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable (%s); counting the shards instead", path, err)
        return {}
    return index if isinstance(index, dict) else {}


def shard_keys(url: str) -> Iterator[str]:
    """The sample keys of one shard, grouped as webdataset groups them (consecutive members
    sharing a key). Local shards are scanned header by header, without reading the files."""
    if is_url(url):
        yield from (s["__key__"] for s in wds.tariterators.tarfile_samples([{"url": url}]))
        return
    last = None
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                if not member.isreg() or META_FILE.match(member.name):
                    continue
                prefix, _ = wds.tariterators.base_plus_ext(member.name)
                if prefix is not None and prefix != last:
                    last = prefix
                    yield prefix
                tar.members = []  # keep memory flat on large shards
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"shard {url}: cannot be read ({err})") from None


def count_samples(url: str) -> int:
    """Samples in one shard (see `shard_keys`)."""
    return sum(1 for _ in shard_keys(url))


def check_disjoint(splits: dict[str, list[str]]) -> None:
    """Refuse a sample id (shard key) found in two of the splits' shards (train / val / test).
    Costs one pass over the tar headers of the shards (no file is read)."""
    seen: dict[str, str] = {}
    for split, urls in splits.items():
        mine: set[str] = set()
        for url in urls:
            for key in shard_keys(url):
                other = seen.get(key)
                if other is not None:
                    raise ConfigError(
                        f"data.webdataset.{split}: sample {key!r} ({url}) is also in the "
                        f"{other} shards; the splits must not share samples"
                    )
                mine.add(key)
        seen.update(dict.fromkeys(mine, split))


def shard_sizes(urls: Sequence[str], on_error: str = "raise") -> list[int]:
    """Samples per shard: as recorded in each folder's shards.json, else counted. A shard whose
    byte size differs from the record is damaged or changed: DataError, or under
    on_error=skip the recorded count stands and the reader counts what is missing."""
    indexes: dict[Path, dict[str, Any]] = {}
    sizes, counted = [], 0
    for url in urls:
        entry = None
        if not is_url(url):
            path = Path(url)
            index = indexes.setdefault(path.parent, read_index(path.parent))
            entry = index.get("shards", {}).get(path.name)
            if entry is not None and entry.get("bytes") != path.stat().st_size:
                problem = (
                    f"shard {url}: {path.stat().st_size} bytes, but {INDEX_NAME} recorded "
                    f"{entry.get('bytes')} ({entry['samples']} samples): damaged or changed "
                    "since it was packed"
                )
                if on_error != "skip":
                    raise DataError(f"{problem}; pack it again (or data.on_error=skip)")
                log.warning("%s; its missing samples will be counted as skipped", problem)
        if entry is None:
            counted += 1
            sizes.append(count_samples(url))
        else:
            sizes.append(int(entry["samples"]))
    if counted:
        log.info("webdataset: counted the samples of %d shard(s) without an index", counted)
    return sizes


def check_complete(urls: Sequence[str], key: str) -> None:
    """Refuse shards of an unfinished `mmkd pack` (its PREFIX.packing.json is beside them)."""
    for url in urls:
        if is_url(url):
            continue
        path = Path(url)
        prefix = path.name.rsplit("-", 1)[0]
        marker = path.parent / f"{prefix}{PACKING_SUFFIX}"
        if marker.is_file():
            raise ConfigError(
                f"{key}: {path} belongs to an unfinished `mmkd pack` ({marker} is there): rerun "
                "that pack to finish it, or set data.webdataset.allow_incomplete=true"
            )


class SampleDecoder:
    """Turns a webdataset sample (key -> bytes per extension) into a raw sample dict."""

    def __init__(self, class_names: Sequence[str] | None, on_error: str = "raise") -> None:
        self.class_names = list(class_names) if class_names is not None else None
        self.class_index = {name: i for i, name in enumerate(self.class_names or [])}
        self.on_error = on_error

    def label(self, data: bytes) -> int:
        text = data.decode("utf-8").strip()
        if self.class_names is None:
            raise DataError(
                f"has a .{LABEL_EXT} label ({text!r}) but no class names are known: set "
                f"data.webdataset.class_names (mmkd pack records them in {INDEX_NAME})"
            )
        if text in self.class_index:
            return self.class_index[text]
        if text.removeprefix("-").isdecimal() and 0 <= int(text) < len(self.class_names):
            return int(text)
        raise DataError(
            f"label {text!r} is neither a class name nor an index into the "
            f"{len(self.class_names)} classes (data.webdataset.class_names)"
        )

    def decode(self, sample: dict[str, Any]) -> RawSample:
        where = f"{sample['__url__']} sample {sample['__key__']}"
        raw: RawSample = {"id": sample["__key__"], "label": None, "where": where}
        for modality, exts in EXTENSIONS.items():
            ext = next((e for e in exts if e in sample), None)
            if ext is None:
                continue
            data, name = sample[ext], f"{where} (.{ext})"
            if modality == "image":
                raw["image"] = decode_image(io.BytesIO(data), name)
            elif modality == "audio":
                raw["audio"] = decode_audio(io.BytesIO(data), name)
            else:
                try:
                    raw["text"] = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{name} is not UTF-8 text ({err})") from None
        if LABEL_EXT in sample:
            try:
                raw["label"] = self.label(sample[LABEL_EXT])
            except (DataError, UnicodeDecodeError) as err:
                raise DataError(f"{where}: {err}") from None
        return raw

    def __call__(self, sample: dict[str, Any] | Skipped) -> RawSample | Skipped:
        if isinstance(sample, Skipped):
            return sample
        try:
            return self.decode(sample)
        except DataError as err:
            if self.on_error == "skip":
                return Skipped(str(sample.get("__key__")), str(err))
            raise


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, at position `offset` of a worker's part."""

    shard: int
    start: int
    stop: int
    offset: int


class ShardStream(IterableDataset):
    """The samples of a list of shards, split by rank and worker (see the module docstring).

    Unconfigured (as built), it streams every sample once, in shard order, split across the
    workers of one process without padding (for the test split and the teacher cache).
    `configured(...)` returns the copy a training or validation loader uses."""

    def __init__(
        self,
        urls: Sequence[str],
        sizes: Sequence[int],
        decoder: SampleDecoder,
        *,
        seed: int = 0,  # run.seed: the data module sets it (DistillDataModule)
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
    ) -> None:
        self.urls = list(urls)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.decoder = decoder
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world, self.workers = 0, 1, 1
        self.batch_size = 1
        self.shuffle = False  # shard order and shuffle buffer on (training)
        self.pad = False  # equal parts (training and validation under DDP)
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already trained on (resume)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def configured(
        self, *, rank: int, world: int, workers: int, batch_size: int, shuffle: bool, pad: bool
    ) -> ShardStream:
        stream = copy.copy(self)
        stream.rank, stream.world, stream.workers = rank, world, max(1, workers)
        stream.batch_size, stream.shuffle, stream.pad = batch_size, shuffle, pad
        return stream

    def part_size(self) -> int:
        return math.ceil(len(self) / (self.world * self.workers))

    def batches_per_rank(self) -> int:
        """The same on every rank: each of its workers yields ceil(part / batch) batches."""
        return self.workers * math.ceil(self.part_size() / self.batch_size)

    def shard_order(self, epoch: int) -> np.ndarray:
        if not (self.shuffle and self.shuffle_shards):
            return np.arange(len(self.urls))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))

    def plan(self, epoch: int, part: int, parts: int) -> list[Piece]:
        """The pieces of shards that make up `part` of `parts` in this epoch."""
        order = self.shard_order(epoch)
        starts = np.concatenate([[0], np.cumsum(self.sizes[order])])
        total = int(starts[-1])
        if self.pad:
            size = math.ceil(total / parts)
            begin, end = part * size, (part + 1) * size
        else:
            begin, end = part * total // parts, (part + 1) * total // parts
        pieces, offset = [], 0
        while begin < end:  # positions past the end wrap around to the start of the stream
            at = begin % total
            i = int(np.searchsorted(starts, at, side="right")) - 1
            take = min(int(starts[i + 1]) - at, end - begin)
            first = at - int(starts[i])
            pieces.append(Piece(int(order[i]), first, first + take, offset))
            begin, offset = begin + take, offset + take
        return pieces

    def sample_order(self, length: int, epoch: int, part: int) -> np.ndarray:
        """Positions 0..length-1 of a part in the order the shuffle buffer hands them out."""
        if not self.shuffle or self.shuffle_buffer <= 1:
            return np.arange(length)
        rng = random.Random(f"{self.seed}-{epoch}-{part}")
        shuffle = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)
        return np.fromiter(shuffle(iter(range(length))), dtype=np.int64, count=length)

    def consumed(self, worker: int, workers: int, length: int) -> int:
        """Samples this worker already delivered, from the batches the rank has done (batches
        leave the workers in turn: batch k comes from worker k % workers)."""
        batches = max(0, (self.skip_batches - worker + workers - 1) // workers)
        return min(length, batches * self.batch_size)

    def __iter__(self) -> Iterator[RawSample | Skipped]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the loader asks its workers in turn starting from the first; a resumed epoch must go
        # on with the worker whose turn was next, so worker ids are rotated by the batches done
        worker = (worker + self.skip_batches) % workers
        parts, part = self.world * workers, self.rank * workers + worker
        pieces = self.plan(self.epoch, part, parts)
        length = sum(piece.stop - piece.start for piece in pieces)
        order = self.sample_order(length, self.epoch, part)
        remaining = order[self.consumed(worker, workers, length) :]
        return self._deliver(pieces, length, remaining)

    def _deliver(
        self, pieces: list[Piece], length: int, remaining: np.ndarray
    ) -> Iterator[RawSample | Skipped]:
        wanted = np.zeros(length, dtype=bool)
        wanted[remaining] = True
        held: dict[int, dict[str, Any] | Skipped] = {}
        turn = map(int, remaining)  # not a list: a Python int per sample would grow with N
        due = next(turn, None)
        for position, sample in self._read(pieces, wanted):
            held[position] = sample
            while due is not None and due in held:
                decoded = self.decoder(held.pop(due))
                # each epoch is a new augmented view (mmkd.replay): view = epoch
                yield decoded if isinstance(decoded, Skipped) else {**decoded, "view": self.epoch}
                due = next(turn, None)

    def _read(
        self, pieces: list[Piece], wanted: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any] | Skipped]]:
        """(position, sample) for the wanted positions; shards holding none are not opened."""
        for piece in pieces:
            count = piece.stop - piece.start
            span = wanted[piece.offset : piece.offset + count]
            if not span.any():
                continue
            url, got, problem = self.urls[piece.shard], 0, None
            try:
                samples = wds.tariterators.tarfile_samples([{"url": url}])
                for j, sample in enumerate(islice(samples, piece.start, piece.stop)):
                    got = j + 1
                    if span[j]:
                        yield piece.offset + j, sample
            except Exception as err:  # tar / gzip / I/O errors surface in many types
                problem = f"shard {url}: cannot be read after {piece.start + got} samples ({err})"
            if problem is None and got < count:
                problem = (
                    f"shard {url}: ended after {piece.start + got} samples, but "
                    f"{self.sizes[piece.shard]} were expected (damaged or changed since?)"
                )
            if problem is not None:
                if self.decoder.on_error != "skip":
                    raise DataError(problem)
                for j in range(got, count):
                    if span[j]:
                        yield piece.offset + j, Skipped(f"{url}#{piece.start + j}", problem)


class StreamLoader(ResumableLoader):
    """A DataLoader over a configured ShardStream. Its length is the stream's batches per rank;
    each pass fixes the epoch (from `epoch_of`, or from the resume point on the first pass after
    a restart) before the workers start. Workers are not persistent, so every epoch's workers
    see that epoch's plan."""

    def __init__(
        self,
        stream: ShardStream,
        *,
        epoch_of: Callable[[], int],
        resume: tuple[int, int] | None = None,
        pending: Callable[[], tuple[int, int] | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(stream, batch_size=stream.batch_size, persistent_workers=False, **kwargs)
        self.epoch_of = epoch_of
        self.resume = resume  # (epoch, batches done) from a checkpoint
        self.pending = pending  # asked for one at the start of a pass without `resume`
        self.started = (0, 0)  # (epoch, batches skipped) of the current pass

    def __len__(self) -> int:
        return self.dataset.batches_per_rank()  # type: ignore[attr-defined]

    def pass_start(self) -> tuple[int, int]:
        return self.started

    def __iter__(self) -> Any:
        stream: ShardStream = self.dataset  # type: ignore[assignment]
        resume = self.take_resume()
        if resume is None:
            stream.epoch, stream.skip_batches = self.epoch_of(), 0
        else:  # Lightning starts this first pass before it restores its epoch counter
            epoch, done = resume
            stream.epoch, stream.skip_batches = (epoch + 1, 0) if done >= len(self) else resume
        self.started = (stream.epoch, stream.skip_batches)
        try:  # the workers (or the in-process iterator) take their copy of the plan here
            return super().__iter__()
        finally:
            stream.skip_batches = 0


def first_sample(urls: Sequence[str]) -> dict[str, Any]:
    for url in urls:
        try:
            for sample in wds.tariterators.tarfile_samples([{"url": url}]):
                return sample
        except Exception as err:
            raise DataError(f"shard {url}: cannot be read ({err})") from None
    raise ConfigError(f"data.webdataset.train: the shards ({urls[0]}, ...) hold no samples")


def class_names_of(cfg: DataSettings, urls: Sequence[str]) -> list[str] | None:
    """data.webdataset.class_names, else those recorded in the first train shard's shards.json."""
    if cfg.webdataset.class_names is not None:
        names = [str(name) for name in cfg.webdataset.class_names]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.webdataset.class_names: has repeated names: {names}")
        return names
    if is_url(urls[0]):
        return None
    names = read_index(Path(urls[0]).parent).get("class_names")
    return [str(name) for name in names] if names else None


@dataclass
class WebDatasetCfg(Settings):
    """WebDataset tar shards. Each split is a brace pattern ("DIR/train-{000000..000127}.tar"),
    a list of shards, or a folder holding .tar files; URLs (http://, pipe:) go to webdataset."""

    non_negative: ClassVar = ("shuffle_buffer",)

    train: Any = None
    val: Any = None  # None: whole shards held out of train by data.val_fraction (at least one)
    test: Any = None  # None: the validation split is also the test split
    shuffle_buffer: int = 1000  # samples held for shuffling inside each worker's stream; 0: none
    shuffle_shards: bool = True  # reshuffle the shard order every epoch (by run.seed and epoch)
    # class names, in index order; None: those `mmkd pack` recorded in the shards' shards.json.
    # A sample's .cls holds a class name, or an integer index into these names
    class_names: list[str] | None = None
    # read shards of a folder holding an unfinished `mmkd pack` (PREFIX.packing.json) anyway
    allow_incomplete: bool = False
    # refuse a sample id found in train and in given val / test shards (reads every tar header
    # once at start-up: about 0.5 ms per sample on a loaded 2-core machine; see the README)
    check_overlap: bool = True


@register_dataset("webdataset", WebDatasetCfg)
def build_webdataset(cfg: DataSettings) -> DatasetSplits:
    w = cfg.webdataset
    if w.train is None:
        raise ConfigError("data.webdataset.train: required when data.name=webdataset")
    for key in ("max_train_samples", "max_eval_samples"):
        if getattr(cfg, key) is not None:
            raise ConfigError(
                f"data.{key}: not supported with data.name=webdataset (streams are read whole); "
                "name fewer shards instead"
            )
    train = expand_shards(w.train, "data.webdataset.train")
    if w.val is not None:
        val = expand_shards(w.val, "data.webdataset.val")
    else:
        if len(train) < 2:
            raise ConfigError(
                "data.webdataset.val: not set, and data.webdataset.train has a single shard to "
                "hold out whole shards from; set data.webdataset.val"
            )
        n_val = min(len(train) - 1, max(1, round(len(train) * cfg.val_fraction)))
        held = set(np.random.default_rng(HOLDOUT_SEED).choice(len(train), n_val, replace=False))
        val = [url for i, url in enumerate(train) if i in held]
        train = [url for i, url in enumerate(train) if i not in held]
    test = expand_shards(w.test, "data.webdataset.test") if w.test is not None else val
    if not w.allow_incomplete:
        for split, urls in (("train", train), ("val", val), ("test", test)):
            check_complete(urls, f"data.webdataset.{split}")
    separate = {"train": train}
    for split, given in (("val", w.val is not None), ("test", w.test is not None)):
        urls = val if split == "val" else test
        if not given:  # held out of train (whole shards), or the validation split again
            continue
        if set(urls) == set(train):  # the train shards named on purpose (a fit check)
            log.warning("data.webdataset.%s: names the train shards themselves", split)
            continue
        separate[split] = urls
    if len(separate) > 1 and w.check_overlap:
        check_disjoint(separate)
    class_names = class_names_of(cfg, train)
    decoder = SampleDecoder(class_names, cfg.on_error)
    sample = first_sample(train)
    if class_names is None and LABEL_EXT in sample:
        raise ConfigError(
            f"data.webdataset.class_names: the shards' samples have .{LABEL_EXT} labels but no "
            f"{INDEX_NAME} beside them records the class names; set data.webdataset.class_names "
            "to the names in class-index order"
        )
    modalities = tuple(m for m, exts in EXTENSIONS.items() if any(e in sample for e in exts))
    if not modalities:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise ConfigError(
            f"data.webdataset.train: sample {sample['__key__']} of {sample['__url__']} has no "
            f"image / audio / text file (it has: {', '.join(found) or 'nothing'})"
        )

    def stream(urls: list[str], train_split: bool = False) -> ShardStream:
        return ShardStream(
            urls,
            shard_sizes(urls, cfg.on_error),
            decoder,
            shuffle_shards=w.shuffle_shards and train_split,
            shuffle_buffer=w.shuffle_buffer if train_split else 0,
        )

    val_stream = stream(val)
    return DatasetSplits(
        train=stream(train, train_split=True),
        val=val_stream,
        test=val_stream if test is val else stream(test),
        modalities=modalities,
        class_names=class_names or [],
    )
