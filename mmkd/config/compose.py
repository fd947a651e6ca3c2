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
read are dropped, and its common fields (`head`, `features`, ...) are kept (the choices and
these rules: `mmkd.config.choices`).

Files are looked up first in the user's config folder (`run.config_path=DIR`, laid out like
`configs/`), then in mmkd's own config groups, so a project keeps its experiments beside
mmkd's and may replace any of its files.
"""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmkd.config.choices import (
    Choices,
    chosen_schema,
    drop_unread_sections,
    select,
    unknown_section,
)
from mmkd.config.schema import adapter_schema
from mmkd.data import DATASETS, dataset_sections
from mmkd.errors import ConfigError

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


def _merge(
    cfg: DictConfig, other: DictConfig | dict, source: str, choices: Choices | None = None
) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as err:
        message = unknown_section(choices, err, other) or describe_config_error(err)
        raise ConfigError(f"{source}: {message}") from None


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
        if key.startswith(("+", "~")):  # Hydra's add / force-add / delete prefixes
            plain = key.lstrip("+~")
            raise ConfigError(
                f"override {item!r}: mmkd takes no Hydra-style {key[: len(key) - len(plain)]!r} "
                f"prefix; every key is declared already: write {plain}={value}"
            )
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
        _type_null_teacher(cfg, node, chosen)
        cfg = _merge(cfg, node, source, chosen)
    for key in required:  # merging "???" keeps the old value; mark the key missing again
        OmegaConf.update(cfg, key, "???")
    if experiment:
        cfg.run.name = experiment
    _type_null_teacher(cfg, cli, chosen)
    cfg = _merge(cfg, cli, "command line", chosen)
    _replace_free_mappings(cfg, dotlist)
    _set_exported_adapters(cfg, chosen)
    if len(search) > 1:  # saved absolute, so the run's config.yaml works from any folder
        cfg.run.config_path = str(search[0])
    _remember_command_line(cfg, dotlist)
    return cfg


def _type_null_teacher(cfg: DictConfig, layer: DictConfig, chosen: Choices) -> None:
    """A teacher that is null so far (`teacher=none`) and that `layer` sets key by key starts
    as its adapter's spec: merged onto null, the keys would be checked against the bare
    `AdapterSpec`, which has no sections, and every section refused."""
    adapter = chosen.adapters.get("teacher")
    if adapter and cfg.teacher is None and isinstance(select(layer, "teacher"), DictConfig):
        cfg.teacher = OmegaConf.structured(adapter_schema(adapter, "teacher.adapter"))


def _set_exported_adapters(cfg: DictConfig, chosen: Choices) -> None:
    """A model whose weights are an exported folder of another adapter than the one configured
    was given that adapter's schema: name it in its `adapter` too."""
    for key, adapter in chosen.adapters.items():
        spec = select(cfg, key)
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
        spec = select(saved, key)
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
        # an interpolation (`key=${other.key}`) cannot resolve in the one-item config: it is
        # not a mapping either way, so the unresolved value is enough
        value = OmegaConf.select(
            OmegaConf.from_dotlist([item]), key, throw_on_resolution_failure=False
        )
        node = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        free = isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict
        if free and isinstance(value, DictConfig):
            OmegaConf.update(cfg, key, value, merge=False)


def _nest(key: str, node: DictConfig) -> DictConfig:
    """Place `node` at the dotted `key` (e.g. extra_students.image)."""
    out: DictConfig = OmegaConf.create()
    OmegaConf.update(out, key, node, force_add=True)
    return out
