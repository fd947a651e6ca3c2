"""A transfer set mixed into the training split: rows the teacher labels and the student reads
without their labels (Tang et al. 2019 distil on such rows; SST-2's phrases are one).

The transfer rows follow the training rows; each loads with label None, so a training batch
marks it IGNORE_LABEL: label terms (ce) skip it, KD terms use it. Its file's own labels are
dropped before they are parsed: they are never read, and need not even be valid classes.
"""

from __future__ import annotations

from torch.utils.data import Dataset, Subset

from mmkd.data.base import RawSample, Skipped, sample_ids
from mmkd.errors import DataError

LABEL = "label"  # the role of a manifest record's label column


def drop_labels(records: list[tuple[int, object]]) -> list[tuple[int, object]]:
    """Manifest records (line, record or parse problem) without their label column."""
    return [
        (line, {k: v for k, v in record.items() if k != LABEL})
        if isinstance(record, dict)
        else (line, record)
        for line, record in records
    ]


def _innermost(dataset: Dataset, index: int | None = None) -> tuple[Dataset, int | None]:
    """The dataset under any Subsets, and `index` (if given) as an index into it."""
    while isinstance(dataset, Subset):
        if index is not None:
            index = dataset.indices[index]
        dataset = dataset.dataset
    return dataset, index


class TransferMix(Dataset):
    """The training rows, then the transfer rows with their labels removed."""

    def __init__(self, train: Dataset, transfer: Dataset) -> None:
        self.train = train
        self.transfer = transfer
        self.ids = sample_ids(train) + sample_ids(transfer)
        self.size = len(train)  # type: ignore[arg-type]
        clash = set(self.ids[: self.size]).intersection(self.ids[self.size :])
        if clash:
            raise DataError(
                f"data.manifest.transfer: sample id {min(clash)!r} is also a training row's "
                f"({len(clash)} shared); give the transfer rows ids of their own"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def sample_id(self, index: int) -> str:
        return self.ids[index]

    def sample_files(self, index: int) -> list[str]:
        """The files row `index` is read from, by the part that holds it (the teacher store
        keys their identity); [] where that part cannot name its files."""
        part, local = _innermost(
            *((self.train, index) if index < self.size else (self.transfer, index - self.size))
        )
        files = getattr(part, "sample_files", None)
        return files(local) if files is not None and local is not None else []

    def file_identity(self, path: str) -> str | None:
        """A file's identity as the part reading it gives it (a manifest: its rows)."""
        for part, _ in (_innermost(self.train), _innermost(self.transfer)):
            known = getattr(part, "file_identity", None)
            identity = known(path) if known is not None else None
            if identity is not None:
                return identity
        return None

    def __getitem__(self, index: int) -> RawSample | Skipped:
        if index < self.size:
            return self.train[index]
        sample = self.transfer[index - self.size]
        return sample if isinstance(sample, Skipped) else {**sample, LABEL: None}
