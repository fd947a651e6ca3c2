"""Manifest datasets: JSONL, CSV or TSV files (picked by suffix), one row per sample.

Columns: `image` / `audio` (file path, relative to the manifest's folder or absolute), `text` (the
text itself), optional `label` and `id` (default "MANIFEST_NAME:LINE"). `data.manifest.columns`
maps these roles to other column names, or to 0-based indices (CSV/TSV, with or without a header
row: `data.manifest.header`, `delimiter`). The modalities are the modality columns the train
manifest's rows carry; every row of every split must have them (an empty CSV cell counts as
missing). Rows are numbered by their 1-based line in the file.

A row with an empty or missing label, in a manifest whose other rows have labels, is an error
unless `data.manifest.unlabelled` is true (then it loads with label None: a transfer set the
teacher labels). A manifest with no labels at all is unlabelled.

Labels are class names. When `data.manifest.class_names` is set, a label that is not a name may
also be an integer index into it (CSV cells are text, so "3" counts); otherwise the classes are
the distinct train labels as strings, sorted with numbers in numeric order.

`data.manifest.transfer` names a manifest whose rows join the training split after the
validation holdout, their labels dropped unread (mmkd.data.transfer): a transfer set.

Row problems (bad JSON, missing column, unknown label, repeated id) raise `DataError` naming the
file and row when the dataset is built, or under on_error=skip become `Skipped` samples; files a
row names are read, and checked, when the sample is loaded. A loaded sample also carries
"where" ("MANIFEST row LINE"), which errors about its content (found in preprocessing) name.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmkd.data.base import (
    HOLDOUT_SEED,
    MODALITIES,
    DatasetSplits,
    DataSettings,
    RawSample,
    SafeDataset,
    holdout_split,
    register_dataset,
)
from mmkd.data.decode import read_audio, read_image
from mmkd.data.transfer import TransferMix, drop_labels
from mmkd.errors import DataError, SettingError
from mmkd.settings import Settings

FILE_COLUMNS: dict[str, Callable[[Path], Any]] = {"image": read_image, "audio": read_audio}
Record = dict[str, Any] | str  # a parsed row, or why the line could not be parsed


def _jsonl_records(lines: Iterator[str]) -> Iterator[tuple[int, Record]]:
    for line_no, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            yield line_no, f"invalid JSON: {err.msg} (column {err.colno})"
            continue
        except (ValueError, RecursionError) as err:  # an over-long integer, too deep nesting
            yield line_no, f"invalid JSON: {err}"
            continue
        yield (
            line_no,
            record
            if isinstance(record, dict)
            else (f"is a JSON {type(record).__name__}, not an object"),
        )


@dataclass(frozen=True)
class Layout:
    """How a manifest's rows map to columns: delimiter, header row, role -> column name/index."""

    delimiter: str | None = None  # None: "," for .csv, tab for .tsv
    header: bool = True
    columns: tuple[tuple[str, str | int], ...] = ()  # (role, column name or 0-based index)

    @classmethod
    def from_config(cls, m: ManifestCfg) -> Layout:
        columns = dict(m.columns or {})
        for role, column in columns.items():
            if role not in ROLES:
                raise SettingError(
                    f"manifest.columns.{role}", f"not a role; roles: {', '.join(ROLES)}"
                )
            if isinstance(column, bool) or not isinstance(column, str | int):
                raise SettingError(
                    f"manifest.columns.{role}", f"{column!r} must be a column name or index"
                )
            if isinstance(column, int) and column < 0:
                raise SettingError(f"manifest.columns.{role}", f"index {column} must be >= 0")
        if not m.header and any(isinstance(c, str) for c in columns.values()):
            raise SettingError(
                "manifest.columns",
                f"data.manifest.header=false, so columns are 0-based indices, got {columns}",
            )
        if m.delimiter is not None and len(m.delimiter) != 1:
            raise SettingError("manifest.delimiter", f"{m.delimiter!r} must be one character")
        return cls(m.delimiter, bool(m.header), tuple(columns.items()))

    def rename(self, names: list[str]) -> dict[str, str]:
        """Column name -> role name for the columns `columns` maps (others keep their name)."""
        out = {}
        for role, column in self.columns:
            if isinstance(column, int):
                out[str(column) if not self.header else (names + [""] * column)[column]] = role
            else:
                out[column] = role
        return out


ROLES = (*MODALITIES, "label", "id")
DELIMITERS = {".csv": ",", ".tsv": "\t"}


def _csv_records(
    lines: Iterator[str], path: Path, layout: Layout, delimiter: str
) -> Iterator[tuple[int, Record]]:
    # TSV files (AG News, GLUE) quote nothing: a quote character is text there
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    header = [name.strip() for name in next(reader, [])] if layout.header else None
    if header is not None:
        repeated = {name for name in header if header.count(name) > 1}
        if repeated:
            raise DataError(f"{path}: the header repeats column(s) {', '.join(sorted(repeated))}")
        for role, column in layout.columns:
            if isinstance(column, str) and column not in header:
                raise DataError(
                    f"{path}: data.manifest.columns.{role}: no column {column!r} in the header "
                    f"({', '.join(header)})"
                )
            if isinstance(column, int) and column >= len(header):
                raise DataError(
                    f"{path}: data.manifest.columns.{role}: index {column}, but the header has "
                    f"{len(header)} columns"
                )
    rename = layout.rename(header or [])
    wanted = max((c for _, c in layout.columns if isinstance(c, int)), default=-1)
    start = reader.line_num + 1
    for fields in reader:
        line_no, start = start, reader.line_num + 1
        if not any(field.strip() for field in fields):
            continue
        if header is not None and len(fields) != len(header):
            yield line_no, f"has {len(fields)} fields but the header has {len(header)}"
            continue
        if header is None and len(fields) <= wanted:
            missing = [f"{c} ({r})" for r, c in layout.columns if isinstance(c, int)]
            yield line_no, f"has {len(fields)} fields, missing column(s) {', '.join(missing)}"
            continue
        names = header if header is not None else [str(i) for i in range(len(fields))]
        # an empty cell is a missing value
        yield line_no, {rename.get(n, n): v for n, v in zip(names, fields, strict=True) if v != ""}


def read_manifest(path: Path, field: str, layout: Layout | None = None) -> list[tuple[int, Record]]:
    """(line number, record or parse problem) for every non-blank row of a JSONL/CSV/TSV
    manifest; records name their columns by role where `layout.columns` maps them. A missing
    or empty manifest is a SettingError of `field`, the setting that named `path`."""
    layout = layout or Layout()
    suffix = path.suffix.lower()
    delimiter = layout.delimiter or DELIMITERS.get(suffix)
    if suffix != ".jsonl" and delimiter is None:
        raise SettingError(
            field, f"{path} must end in .jsonl, .csv or .tsv (or set data.manifest.delimiter)"
        )
    if not path.is_file():
        raise SettingError(field, f"manifest {path} not found")
    try:
        with path.open(encoding="utf-8-sig", newline="") as lines:
            if suffix == ".jsonl":
                rename = {str(c): r for r, c in layout.columns}
                rows = [
                    (n, {rename.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r)
                    for n, r in _jsonl_records(lines)
                ]
            else:
                assert delimiter is not None
                rows = list(_csv_records(lines, path, layout, delimiter))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    except (OSError, csv.Error) as err:
        raise DataError(f"{path}: cannot be read: {err}") from None
    if not rows:
        raise SettingError(field, f"manifest {path} has no rows")
    return rows


def _present(record: Record, column: str) -> bool:
    return isinstance(record, dict) and record.get(column) not in (None, "")


def _label_text(value: Any) -> str | None:
    """The label as text, or None when it is neither a string nor an integer."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value).strip()


def _integer(text: str) -> int | None:
    """`text` as an integer when it is one (optional minus sign, decimal digits)."""
    if not text.removeprefix("-").isdecimal():
        return None
    try:
        return int(text)
    except ValueError:  # more digits than int() accepts
        return None


def _natural(name: str) -> tuple[int, int, str]:
    number = _integer(name) if name.isdecimal() else None
    return (1, 0, name) if number is None else (0, number, name)


@dataclass(frozen=True)
class ClassSet:
    """The classes of a manifest dataset and how its rows' labels map to them."""

    names: list[str]
    indices_allowed: bool  # true when the names come from the config: labels may be indices

    def index(self, value: Any) -> int:
        text = _label_text(value)
        if text is None:
            raise DataError(f"label {value!r} must be a class name or an integer index")
        if text in self.names:
            return self.names.index(text)
        number = _integer(text) if self.indices_allowed else None
        if number is not None and 0 <= number < len(self.names):
            return number
        shown = ", ".join(self.names[:10]) + (", ..." if len(self.names) > 10 else "")
        raise DataError(
            f"label {value!r} is not in the class set ({len(self.names)} classes: "
            f"{shown or 'none'}; set data.manifest.class_names)"
        )


@dataclass(frozen=True)
class Row:
    """One parsed manifest row: its line, id, label and modality values, or why it is unusable."""

    line: int
    id: str
    label: int | None = None
    values: dict[str, str] | None = None  # modality -> file path or text
    error: str | None = None  # why this row cannot be used


def parse_row(
    record: Record,
    line: int,
    path: Path,
    modalities: tuple[str, ...],
    classes: ClassSet,
    label_required: bool = False,
) -> Row:
    """The row's id, label and modality values; DataError (without location) if unusable."""
    if isinstance(record, str):
        raise DataError(record)
    values = {}
    for column in modalities:
        if not _present(record, column):
            raise DataError(
                f"missing {column!r} (the train manifest's rows have {', '.join(modalities)})"
            )
        if not isinstance(record[column], str):
            raise DataError(f"{column!r} must be a string, got {record[column]!r}")
        if column == "text" and not record[column].strip():
            raise DataError("empty 'text'")
        values[column] = record[column]
    if label_required and not _present(record, "label"):
        raise DataError(
            "missing 'label' (other rows have one; data.manifest.unlabelled=true allows it)"
        )
    label = classes.index(record["label"]) if _present(record, "label") else None
    sample_id = record.get("id", f"{path.name}:{line}")
    if isinstance(sample_id, bool) or not isinstance(sample_id, str | int):
        raise DataError(f"id {sample_id!r} must be a string or an integer")
    return Row(line, str(sample_id), label, values)


class ManifestDataset(SafeDataset):
    """The rows of one manifest file; image/audio files are decoded on access."""

    def __init__(
        self,
        path: Path,
        records: list[tuple[int, Record]],
        modalities: tuple[str, ...],
        classes: ClassSet,
        on_error: str = "raise",
        unlabelled: bool = False,
    ) -> None:
        super().__init__(on_error)
        self.path = path
        # what was read from the file, keyed by content (file_identity)
        rows_read = json.dumps(records, sort_keys=True, default=str).encode()
        self.rows_sha256 = hashlib.sha256(rows_read).hexdigest()
        self.modalities = modalities
        self.rows: list[Row] = []
        first_line: dict[str, int] = {}
        # a file whose rows carry labels needs one on every row unless unlabelled rows are allowed
        required = not unlabelled and any(_present(r, "label") for _, r in records)
        for line, record in records:
            try:
                row = parse_row(record, line, path, modalities, classes, required)
                if row.id in first_line:
                    raise DataError(f"id {row.id!r} repeats row {first_line[row.id]}")
                first_line[row.id] = line
            except DataError as err:
                if on_error != "skip":
                    raise DataError(f"{self.where(line)}: {err}") from None
                row = Row(line, f"{path.name}:{line}", error=str(err))
            self.rows.append(row)

    def where(self, line: int) -> str:
        return f"{self.path} row {line}"

    def file_identity(self, path: str) -> str | None:
        """The manifest's identity for the teacher store: the rows read from it, not its size and
        mtime, so a pipeline that writes the same rows again keeps its store, and changed rows
        (same ids, new text) never read a stale one. The files it names: None (size + mtime)."""
        return f"rows:{self.rows_sha256}" if path == str(self.path) else None

    def texts(self) -> list[str | None]:
        """Each row's text (None for a row without one), without loading any file."""
        return [row.values.get("text") if row.values else None for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def sample_id(self, index: int) -> str:
        return self.rows[index].id

    def sample_files(self, index: int) -> list[str]:
        """The files sample `index` is read from, the manifest (its text) included (the
        teacher store keys their identity)."""
        values = self.rows[index].values or {}
        files = [os.path.join(self.path.parent, v) for c, v in values.items() if c in FILE_COLUMNS]
        return [str(self.path), *files]

    def load(self, index: int) -> RawSample:
        row = self.rows[index]
        try:
            if row.error is not None or row.values is None:
                raise DataError(row.error)
            sample: RawSample = {"id": row.id, "label": row.label, "where": self.where(row.line)}
            for column, value in row.values.items():
                read = FILE_COLUMNS.get(column)
                sample[column] = read(self.path.parent / value) if read else value
        except DataError as err:
            raise DataError(f"{self.where(row.line)}: {err}") from err
        return sample


def _manifest_path(value: str) -> Path:
    return Path(value).expanduser().absolute()


@dataclass
class ManifestCfg(Settings):
    """JSONL, CSV or TSV manifests: one row per sample, columns image/audio/text (+ label, id)."""

    paths: ClassVar = ("train", "val", "test", "transfer")

    train: str | None = None
    val: str | None = None  # None: held out from train by data.val_fraction
    test: str | None = None  # None: the validation split is also the test split
    class_names: list[str] | None = None  # None: sorted distinct labels of the train manifest
    # role (text | image | audio | label | id) -> column name, or 0-based index; unlisted roles
    # read the column of their own name. E.g. {text: 0, label: 1} with header=false
    columns: dict[str, Any] = field(default_factory=dict)
    delimiter: str | None = None  # None: "," for .csv, tab for .tsv (TSV cells are not quoted)
    header: bool = True  # false: CSV/TSV files have no header row (columns are then indices)
    # true: rows with an empty / missing label load unlabelled (label None) among labelled rows;
    # false: such a row is an error naming it (skipped and counted under data.on_error=skip)
    unlabelled: bool = False
    # a transfer set: a manifest whose rows join the training split (after the val holdout) with
    # their labels dropped unread; KD terms use them, label terms (ce) skip them
    transfer: str | None = None


@register_dataset("manifest", ManifestCfg)
def build_manifest(cfg: DataSettings) -> DatasetSplits:
    """Splits from the JSONL / CSV / TSV manifests of `data.manifest` (val held out when absent)."""
    m = cfg.manifest
    if m.train is None:
        raise SettingError("manifest.train", "required when data.name=manifest")
    layout = Layout.from_config(m)
    train_path = _manifest_path(m.train)
    train_records = read_manifest(train_path, "manifest.train", layout)
    modalities = tuple(c for c in MODALITIES if any(_present(r, c) for _, r in train_records))
    if not modalities:
        raise SettingError(
            "manifest.train", f"{train_path} has no {', '.join(MODALITIES)} column with values"
        )
    if m.class_names:
        names = [str(name) for name in m.class_names]
        if len(set(names)) != len(names):
            raise SettingError("manifest.class_names", f"has repeated names: {names}")
        classes = ClassSet(names, indices_allowed=True)
    else:  # unusable labels are reported per row, by ManifestDataset
        labels = {_label_text(r["label"]) for _, r in train_records if _present(r, "label")}
        labels.discard(None)
        classes = ClassSet(sorted(labels, key=_natural), indices_allowed=False)

    def dataset(path: Path, records: list[tuple[int, Record]]) -> ManifestDataset:
        return ManifestDataset(path, records, modalities, classes, cfg.on_error, m.unlabelled)

    def optional(key: str) -> ManifestDataset | None:
        value = getattr(m, key)
        if value is None:
            return None
        path = _manifest_path(value)
        return dataset(path, read_manifest(path, f"manifest.{key}", layout))

    train = dataset(train_path, train_records)
    val = optional("val")
    if val is None:
        train, val = holdout_split(train, cfg.val_fraction, HOLDOUT_SEED)
    if m.transfer is not None:  # after the holdout: validation keeps labelled rows only
        path = _manifest_path(m.transfer)
        records = drop_labels(read_manifest(path, "manifest.transfer"))
        train = TransferMix(train, dataset(path, records))
    test = optional("test")
    return DatasetSplits(
        train, val, val if test is None else test, modalities=modalities, class_names=classes.names
    )
