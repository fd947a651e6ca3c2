"""Compose a run's config from config groups, an experiment file and `key=value` overrides.

`configs/config.yaml` names the default file of each group under `defaults:`. An experiment
(`experiment=NAME`, from `configs/experiment/NAME.yaml`) may replace group choices in its own
`defaults:` and override any key in its body. Command-line `group=name` picks a group file and
`a.b.c=value` sets one key. Everything is merged onto the typed schema, so a typo fails here.

A `defaults:` entry is `group: name` (load configs/group/name.yaml into that key) or
`key: group/name` (load another group's file into `key`, e.g. `extra_students.image: student/x`).
`name` may be `none` to set the key to null (e.g. `teacher=none`).

Files are looked up first in the user's config folder (`run.config_path=DIR`, laid out like
`configs/`), then in mmkd's own config groups, so a project keeps its experiments beside
mmkd's and may replace any of its files.
"""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mmkd.config.schema import DataCfg, run_schema
from mmkd.data import DATASETS, dataset_sections
from mmkd.errors import ConfigError
from mmkd.plugins import import_plugins

CONFIG_GROUPS = ("data", "teacher", "student", "losses", "trainer", "experiment")

# id(config) -> (the config, what its config group files alone gave): see `group_defaults`
_GROUP_DEFAULTS: dict[int, tuple[weakref.ref, DictConfig]] = {}


def group_defaults(cfg: DictConfig) -> DictConfig | None:
    """The schema's defaults with the group files of `cfg`'s defaults list merged in (e.g.
    `student: tiny_image`), before its experiment body and command line: for a config
    `compose` returned, else None. Validation treats these values as defaults, so a section
    that a group file set for another adapter (`student=tiny_image student.adapter=audio_cnn`
    leaves tiny_image's timm settings) is not taken for a change the user made."""
    entry = _GROUP_DEFAULTS.get(id(cfg))
    return entry[1] if entry is not None and entry[0]() is cfg else None


def _remember_group_defaults(cfg: DictConfig, defaults: DictConfig) -> None:
    key = id(cfg)
    _GROUP_DEFAULTS[key] = (weakref.ref(cfg, lambda _: _GROUP_DEFAULTS.pop(key, None)), defaults)


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
    cfg: DictConfig, other: DictConfig | dict, source: str, dataset: str | None = None
) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as err:
        message = _unknown_section(dataset, err, other) or describe_config_error(err)
        raise ConfigError(f"{source}: {message}") from None


def _unknown_section(
    dataset: str | None, err: OmegaConfBaseException, given: DictConfig | dict
) -> str | None:
    """The error for a `data.<section>` of a dataset other than the chosen `dataset` (the
    schema holds only the sections it reads), naming the first key `given` sets there; None
    for any other error."""
    parts = str(getattr(err, "full_key", None) or "").split(".")
    if not isinstance(err, ConfigKeyError) or dataset is None or parts[0] != "data":
        return None
    if len(parts) != 2 or parts[1] not in DATASETS or parts[1] == dataset:
        return None
    key = f"data.{parts[1]}"
    section = OmegaConf.select(OmegaConf.create(given), key)
    while isinstance(section, DictConfig) and len(section):
        field = next(iter(section))
        key, section = f"{key}.{field}", section[field]
    reads = ", ".join(f"data.{name}" for name in dataset_sections(dataset)) or "no section"
    return f"{key}: a setting of dataset {parts[1]}, but data.name={dataset} (which reads {reads})"


def chosen_schema(layers: Sequence[DictConfig]) -> tuple[type, str]:
    """The run's schema for the config `layers` (merged in order): import the modules their
    `run.plugins` name (so the datasets and loss terms they register have sections), then
    join the chosen dataset's section(s) (`data.name`) and every loss term's to `Config`.
    Returns the schema and the chosen dataset's name."""
    plain: DictConfig = OmegaConf.create()
    for layer in layers:  # untyped: only to read two keys; the typed merge reports errors
        try:
            plain = OmegaConf.merge(plain, layer)
        except OmegaConfBaseException:
            continue
    import_plugins([str(m) for m in _select(plain, "run.plugins") or []])
    dataset = str(_select(plain, "data.name") or DataCfg.name)
    return run_schema(dataset), dataset


def _select(cfg: DictConfig, key: str) -> Any:
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

    groups = [
        (
            OmegaConf.from_dotlist([f"{key}=null"]) if node is None else _nest(key, node),
            f"{key}={choice}",
        )
        for key, choice in choices.items()
        for node in [_group_node(search, key, str(choice))]
    ]
    try:
        cli = OmegaConf.from_dotlist(dotlist)
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {describe_config_error(err)}") from None
    schema, dataset = chosen_schema([node for node, _ in (*groups, *body, (cli, ""))])
    cfg = OmegaConf.structured(schema)
    for node, source in groups:
        cfg = _merge(cfg, node, source, dataset)
    defaults = cfg.copy()
    required: set[str] = set()
    for node, source in body:
        required |= OmegaConf.missing_keys(node)  # "???" values: the user must set them
        cfg = _merge(cfg, node, source, dataset)
    for key in required:  # merging "???" keeps the old value; mark the key missing again
        OmegaConf.update(cfg, key, "???")
    if experiment:
        cfg.run.name = experiment
    cfg = _merge(cfg, cli, "command line", dataset)
    _replace_free_mappings(cfg, dotlist)
    if len(search) > 1:  # saved absolute, so the run's config.yaml works from any folder
        cfg.run.config_path = str(search[0])
    _remember_group_defaults(cfg, defaults)
    _remember_command_line(cfg, dotlist)
    return cfg


def compose_saved(saved: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """A run's saved config.yaml with `key=value` `overrides`, on the run's typed schema (its
    plugins imported). Compatibility: configs saved before datasets owned their sections hold
    every built-in dataset's section (and `data.options`); the sections the chosen dataset does
    not read were never read, and are dropped on load."""
    register_resolvers()
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {describe_config_error(err)}") from None
    schema, dataset = chosen_schema([saved, cli])
    saved = saved.copy()
    data = saved.get("data")
    if isinstance(data, DictConfig):
        read = dataset_sections(dataset)
        for name in [k for k in data if (k in DATASETS or k == "options") and k not in read]:
            data.pop(name)
    cfg = _merge(OmegaConf.structured(schema), saved, "config.yaml", dataset)
    return _merge(cfg, cli, "command line", dataset)


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
