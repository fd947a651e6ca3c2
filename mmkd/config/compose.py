"""Compose a run's config from config groups, an experiment file and `key=value` overrides.

`configs/config.yaml` names the default file of each group under `defaults:`. An experiment
(`experiment=NAME`, from `configs/experiment/NAME.yaml`) may replace group choices in its own
`defaults:` and override any key in its body. Command-line `group=name` picks a group file and
`a.b.c=value` sets one key. Everything is merged onto the typed schema, so a typo fails here.

A `defaults:` entry is `group: name` (load configs/group/name.yaml into that key) or
`key: group/name` (load another group's file into `key`, e.g. `extra_students.image: student/x`).
`name` may be `none` to set the key to null (e.g. `teacher=none`).

Each model's spec (`teacher`, `student`, `teachers.NAME`, `extra_students.NAME`) holds only the
sections of the adapter finally chosen for it: a section of another adapter set in an
experiment or on the command line is refused, naming the key. A config group file's sections
belong with the adapter that file names: when a later layer picks another adapter for that key
(`student=tiny_image student.adapter=audio_cnn`), the file's sections the new adapter does not
read are dropped, and its common fields (`head`, `features`, ...) are kept.

Files are looked up first in the user's config folder (`run.config_path=DIR`, laid out like
`configs/`), then in mmkd's own config groups, so a project keeps its experiments beside
mmkd's and may replace any of its files.
"""

from __future__ import annotations

import importlib.util
import weakref
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
from mmkd.errors import ConfigError
from mmkd.plugins import import_plugins

CONFIG_GROUPS = ("data", "teacher", "student", "losses", "trainer", "experiment")

# id(config) -> (the config, the keys its command line set): see `command_line_keys`
_COMMAND_LINE: dict[int, tuple[weakref.ref, tuple[str, ...]]] = {}


def command_line_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The dotted keys set by `key=value` items on the command line of a config `compose`
    returned (empty for any other config)."""
    entry = _COMMAND_LINE.get(id(cfg))
    return entry[1] if entry is not None and entry[0]() is cfg else ()


def _remember_command_line(cfg: DictConfig, dotlist: Sequence[str]) -> None:
    key = id(cfg)
    keys = tuple(item.partition("=")[0].lstrip("+~") for item in dotlist)
    _COMMAND_LINE[key] = (weakref.ref(cfg, lambda _: _COMMAND_LINE.pop(key, None)), keys)


def default_config_dir() -> Path:
    """mmkd's own config groups: `mmkd/configs` in an installed wheel (package data), or the
    repository's top-level `configs/` in a clone or an editable install."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(f"mmkd's config groups are missing: no configs/config.yaml in {package}")


def package_dir(package: str, *parts: str) -> str:
    """Folder of an installed package (found without importing it), joined with `parts`."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package_dir: package {package!r} is not installed")
    return str(Path(next(iter(spec.submodule_search_locations)), *parts))


def register_resolvers() -> None:
    """Register mmkd's only config resolver. Resolvers look things up; none runs user code."""
    if not OmegaConf.has_resolver("package_dir"):
        OmegaConf.register_resolver("package_dir", package_dir)


def describe_config_error(err: OmegaConfBaseException) -> str:
    """One line naming the key, from omegaconf's multi-line message."""
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", None) or err).splitlines()[0].strip()
    return f"{key}: {msg}" if key else msg


@dataclass(frozen=True)
class Choices:
    """What a run's schema was built for: the dataset and each model key's adapter."""

    dataset: str
    adapters: dict[str, str]  # model key (teacher, student, teachers.NAME, ...) -> adapter
    exports: dict[str, str] = field(default_factory=dict)  # model key -> its exported weights


def _merge(
    cfg: DictConfig, other: DictConfig | dict, source: str, choices: Choices | None = None
) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as err:
        message = _unknown_section(choices, err, other) or describe_config_error(err)
        raise ConfigError(f"{source}: {message}") from None


def _unknown_section(
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
    import_plugins([str(m) for m in _select(plain, "run.plugins") or []])
    adapters = model_adapters(plain)
    exports = {
        key: str(weights)
        for key in adapters
        for weights in [_select(plain, f"{key}.weights")]
        if _exported_adapter(weights)
    }
    choices = Choices(str(_select(plain, "data.name") or DataCfg.name), adapters, exports)
    return run_schema(choices.dataset, choices.adapters), choices


def model_adapters(cfg: DictConfig) -> dict[str, str]:
    """Model key -> adapter name of every model `cfg` sets: `teacher` unless null, `student`,
    `teachers.NAME`, `extra_students.NAME`. A model whose `weights` is an exported model folder
    has that export's adapter (it brings its architecture); an unset `adapter` is the schema's
    default."""
    specs = {"teacher": _select(cfg, "teacher"), "student": _select(cfg, "student")}
    specs["student"] = specs["student"] or OmegaConf.create()
    for group in ("teachers", "extra_students"):
        named = _select(cfg, group)
        if isinstance(named, DictConfig):
            specs.update({f"{group}.{name}": _select(named, str(name)) for name in named})
    return {
        key: _exported_adapter(_select(spec, "weights"))
        or str(_select(spec, "adapter") or AdapterSpec.adapter)
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


def _select(cfg: Any, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=None)
    except OmegaConfBaseException:  # an interpolation that cannot resolve yet
        return None


def _load_yaml(search: Sequence[Path], relative: str, what: str) -> DictConfig:
    """Load `relative` from the first folder of `search` that has it."""
    path = next((d / relative for d in search if (d / relative).is_file()), None)
    if path is None:
        group = Path(relative).parent
        choices = sorted({p.stem for d in search for p in (d / group).glob("*.yaml")})
        where = " or ".join(str(d / relative) for d in search)
        raise ConfigError(f"{what}: no file {where}. Available: {', '.join(choices) or 'none'}")
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    choices: dict[str, str] = {}
    dotlist: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. trainer.max_epochs=3)")
        if key in CONFIG_GROUPS:
            choices[key] = value
        else:
            dotlist.append(item)
    return choices, dotlist


def _group_node(search: Sequence[Path], key: str, choice: str) -> DictConfig | None:
    group, _, name = choice.rpartition("/")
    group = group or key
    if name in ("none", "null"):
        return None
    return _load_yaml(search, f"{group}/{name}.yaml", f"{key}={choice}")


def _search_path(dotlist: Sequence[str], config_dir: Path) -> list[Path]:
    """The user's config folder (`run.config_path=DIR` on the command line) before mmkd's."""
    user = [item.partition("=")[2] for item in dotlist if item.startswith("run.config_path=")]
    if not user or user[-1] in ("", "null"):
        return [config_dir]
    folder = Path(user[-1]).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"run.config_path: {folder} is not a folder")
    return [folder, config_dir]


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """Build the typed config for `overrides` (`group=name` and `key.path=value` items)."""
    register_resolvers()
    cli_choices, dotlist = _parse_overrides(overrides)
    search = _search_path(dotlist, Path(config_dir) if config_dir else default_config_dir())

    base = _load_yaml(search, "config.yaml", "config.yaml")
    choices: dict[str, str] = dict(base.pop("defaults", None) or {})
    experiment = cli_choices.pop("experiment", None) or choices.pop("experiment", None)
    choices.pop("experiment", None)
    body: list[tuple[DictConfig, str]] = [(base, "config.yaml")]
    if experiment:
        exp = _load_yaml(search, f"experiment/{experiment}.yaml", f"experiment={experiment}")
        choices.update(exp.pop("defaults", None) or {})
        body.append((exp, f"experiment/{experiment}.yaml"))
    choices.update(cli_choices)

    files = {key: _group_node(search, key, str(choice)) for key, choice in choices.items()}
    try:
        cli = OmegaConf.from_dotlist(dotlist)
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {describe_config_error(err)}") from None
    nested = [_group_layer(key, node) for key, node in files.items()]
    schema, chosen = chosen_schema([*nested, *(node for node, _ in body), cli])
    for key, node in files.items():  # a group file's sections for an adapter not chosen
        adapter = chosen.adapters.get(key)
        if node is not None and adapter and str(node.get("adapter") or adapter) != adapter:
            drop_unread_sections(node, adapter)
    cfg = OmegaConf.structured(schema)
    for key, node in files.items():
        cfg = _merge(cfg, _group_layer(key, node), f"{key}={choices[key]}", chosen)
    required: set[str] = set()
    for node, source in body:
        required |= OmegaConf.missing_keys(node)  # "???" values: the user must set them
        cfg = _merge(cfg, node, source, chosen)
    for key in required:  # merging "???" keeps the old value; mark the key missing again
        OmegaConf.update(cfg, key, "???")
    if experiment:
        cfg.run.name = experiment
    cfg = _merge(cfg, cli, "command line", chosen)
    _replace_free_mappings(cfg, dotlist)
    _set_exported_adapters(cfg, chosen)
    if len(search) > 1:  # saved absolute, so the run's config.yaml works from any folder
        cfg.run.config_path = str(search[0])
    _remember_command_line(cfg, dotlist)
    return cfg


def _set_exported_adapters(cfg: DictConfig, chosen: Choices) -> None:
    """A model whose weights are an exported folder of another adapter than the one configured
    was given that adapter's schema: name it in its `adapter` too."""
    for key, adapter in chosen.adapters.items():
        spec = _select(cfg, key)
        if isinstance(spec, DictConfig) and spec.adapter != adapter:
            spec.adapter = adapter


def _group_layer(key: str, node: DictConfig | None) -> DictConfig:
    """A group file's content placed at `key` (null for `key=none`)."""
    return OmegaConf.from_dotlist([f"{key}=null"]) if node is None else _nest(key, node)


def compose_saved(saved: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """A run's saved config.yaml with `key=value` `overrides`, on the run's typed schema (its
    plugins imported). Compatibility: configs saved before datasets and adapters owned their
    sections hold every built-in dataset's section (and `data.options`) and, in each model's
    spec, every built-in adapter's section (and `options`); the sections the chosen dataset or
    adapter does not read were never read, and are dropped on load (a non-empty `options` is
    refused: its plugin adapter now declares a section)."""
    register_resolvers()
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {describe_config_error(err)}") from None
    schema, chosen = chosen_schema([saved, cli])
    saved = saved.copy()
    data = saved.get("data")
    if isinstance(data, DictConfig):
        read = dataset_sections(chosen.dataset)
        for name in [k for k in data if (k in DATASETS or k == "options") and k not in read]:
            data.pop(name)
    for key, adapter in chosen.adapters.items():
        spec = _select(saved, key)
        if isinstance(spec, DictConfig):
            drop_unread_sections(spec, adapter, old_layout=True)
    cfg = _merge(OmegaConf.structured(schema), saved, "config.yaml", chosen)
    return _merge(cfg, cli, "command line", chosen)


def _replace_free_mappings(cfg: DictConfig, dotlist: list[str]) -> None:
    """`key={...}` on the command line *sets* a free-form mapping (timm.kwargs, trainer.extra,
    ...) instead of merging into it, so `student.timm.kwargs={}` clears inherited arguments.
    Typed sections (dataclasses) still merge."""
    for item in dotlist:
        key = item.partition("=")[0]
        value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
        node = OmegaConf.select(cfg, key)
        free = isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict
        if free and isinstance(value, DictConfig):
            OmegaConf.update(cfg, key, value, merge=False)


def _nest(key: str, node: DictConfig) -> DictConfig:
    """Place `node` at the dotted `key` (e.g. extra_students.image)."""
    out: DictConfig = OmegaConf.create()
    OmegaConf.update(out, key, node, force_add=True)
    return out
