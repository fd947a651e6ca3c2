"""What a run's schema is built for, read from its config layers before they are merged onto
it: the chosen dataset and each model's adapter (`Choices`), and the rules that follow from
building the schema for them and only them.

A model's adapter is its `adapter`, or the adapter of an exported model folder named in its
`weights` (the export brings its architecture). A section set for a dataset or an adapter that
was not chosen is refused in one line naming the key and what the chosen one reads
(`unknown_section`); a section an older layout wrote for every entry, or a config group file
wrote for an adapter that was swapped away, is dropped (`drop_unread_sections`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mmkd.adapters import adapter_sections
from mmkd.adapters.sections import section_names
from mmkd.config.schema import AdapterSpec, DataCfg, run_schema
from mmkd.data import DATASETS, dataset_sections
from mmkd.plugins import import_plugins


@dataclass(frozen=True)
class Choices:
    """What a run's schema was built for: the dataset and each model key's adapter."""

    dataset: str
    adapters: dict[str, str]  # model key (teacher, student, teachers.NAME, ...) -> adapter
    exports: dict[str, str] = field(default_factory=dict)  # model key -> its exported weights


def chosen_schema(layers: Sequence[DictConfig]) -> tuple[type, Choices]:
    """The run's schema for the config `layers` (merged in order): import the modules their
    `run.plugins` name (so the datasets, adapters and loss terms they register have sections),
    then join the chosen dataset's section(s) (`data.name`), each model's adapter sections and
    every loss term's to `Config`. Returns the schema and what it was built for."""
    plain: DictConfig = OmegaConf.create()
    for layer in layers:  # untyped: only to read a few keys; the typed merge reports errors
        try:
            plain = OmegaConf.merge(plain, layer)
        except OmegaConfBaseException:
            continue
    import_plugins([str(m) for m in select(plain, "run.plugins") or []])
    adapters = model_adapters(plain)
    exports = {
        key: str(weights)
        for key in adapters
        for weights in [select(plain, f"{key}.weights")]
        if _exported_adapter(weights)
    }
    choices = Choices(str(select(plain, "data.name") or DataCfg.name), adapters, exports)
    return run_schema(choices.dataset, choices.adapters), choices


def model_adapters(cfg: DictConfig) -> dict[str, str]:
    """Model key -> adapter name of every model `cfg` sets: `teacher` unless null, `student`,
    `teachers.NAME`, `extra_students.NAME`. A model whose `weights` is an exported model folder
    has that export's adapter (it brings its architecture); an unset `adapter` is the schema's
    default."""
    specs = {"teacher": select(cfg, "teacher"), "student": select(cfg, "student")}
    specs["student"] = specs["student"] or OmegaConf.create()
    for group in ("teachers", "extra_students"):
        named = select(cfg, group)
        if isinstance(named, DictConfig):
            specs.update({f"{group}.{name}": select(named, str(name)) for name in named})
    return {
        key: _exported_adapter(select(spec, "weights"))
        or str(select(spec, "adapter") or AdapterSpec.adapter)
        for key, spec in specs.items()
        if isinstance(spec, DictConfig)
    }


def _exported_adapter(weights: Any) -> str | None:
    """The adapter named in an exported model folder's spec, or None (no folder, a file)."""
    if not isinstance(weights, str) or not weights:
        return None
    from mmkd.export import SPEC, is_export

    if not is_export(weights):
        return None
    try:
        return str(OmegaConf.load(Path(weights) / SPEC).get("adapter") or AdapterSpec.adapter)
    except Exception:  # a damaged export: loading it later says what is wrong
        return None


def unknown_section(
    choices: Choices | None, err: OmegaConfBaseException, given: DictConfig | dict
) -> str | None:
    """The error for a section of an entry that was not chosen (a `data.<section>` of another
    dataset, a `student.<section>` of another adapter: the schema holds only the chosen one's
    sections), naming the first key `given` sets there; None for any other error."""
    parts = str(getattr(err, "full_key", None) or "").split(".")
    if not isinstance(err, ConfigKeyError) or choices is None:
        return None
    if parts[0] == "data":
        if len(parts) != 2 or parts[1] not in DATASETS or parts[1] == choices.dataset:
            return None
        reads = ", ".join(f"data.{name}" for name in dataset_sections(choices.dataset))
        return (
            f"{_first_key(given, f'data.{parts[1]}')}: a setting of dataset {parts[1]}, but "
            f"data.name={choices.dataset} (which reads {reads or 'no section'})"
        )
    split = 2 if parts[0] in ("teachers", "extra_students") else 1
    model, rest = ".".join(parts[:split]), parts[split:]
    if model not in choices.adapters or len(rest) != 1:
        return None
    if rest[0] == "options":
        return (
            f"{model}.options: no longer exists; a plugin adapter declares its own typed "
            "section (mmkd.adapters.register_adapter_config) and reads "
            f"{model}.SECTION.FIELD (README: 'Bring your own model')"
        )
    readers = section_names().get(rest[0])
    if not readers:
        return None  # a typo: omegaconf's message names the key
    adapter = choices.adapters[model]
    reads = ", ".join(f"{model}.{name}" for name in adapter_sections(adapter)) or "no section"
    export = choices.exports.get(model)
    source = f", the adapter of its exported weights {export}," if export else ""
    return (
        f"{_first_key(given, f'{model}.{rest[0]}')}: a setting of the {', '.join(readers)} "
        f"adapter{'s' if len(readers) > 1 else ''}, but {model}.adapter={adapter}{source} "
        f"(which reads {reads})"
    )


def _first_key(given: DictConfig | dict, key: str) -> str:
    """`key` extended by the first field `given` sets below it (data.fsdd -> data.fsdd.split)."""
    section = OmegaConf.select(OmegaConf.create(given), key)
    while isinstance(section, DictConfig) and len(section):
        name = next(iter(section))
        key, section = f"{key}.{name}", section[name]
    return key


def drop_unread_sections(spec: DictConfig, adapter: str, *, old_layout: bool = False) -> None:
    """Remove from `spec` (in place) the adapter sections that adapter `adapter` does not read:
    a group file's sections for the adapter it named, when another one was chosen. With
    `old_layout` (a config or export saved before specs held only their adapter's sections:
    every built-in section and an `options` mapping), also an empty `options`."""
    reads = adapter_sections(adapter)
    known = section_names()
    for name in [str(k) for k in spec]:
        if (name in known and name not in reads) or (
            old_layout and name == "options" and not spec[name]
        ):
            spec.pop(name)


def select(cfg: Any, key: str) -> Any:
    """`cfg`'s value at `key`, or None where it is missing or cannot resolve yet."""
    try:
        return OmegaConf.select(cfg, key, default=None)
    except OmegaConfBaseException:  # an interpolation that cannot resolve yet
        return None
