"""Compose a run's config from config groups, an experiment file and `key=value` overrides.

`configs/config.yaml` names the default file of each group under `defaults:`. An experiment
(`experiment=NAME`, from `configs/experiment/NAME.yaml`) may replace group choices in its own
`defaults:` and override any key in its body. Command-line `group=name` picks a group file and
`a.b.c=value` sets one key. Everything is merged onto the typed schema, so a typo fails here.

A `defaults:` entry is `group: name` (load configs/group/name.yaml into that key) or
`key: group/name` (load another group's file into `key`, e.g. `extra_students.image: student/x`).
`name` may be `none` to set the key to null (e.g. `teacher=none`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmkd.config.schema import Config
from mmkd.errors import ConfigError

CONFIG_GROUPS = ("data", "teacher", "student", "losses", "trainer", "experiment")


def default_config_dir() -> Path:
    """The repository's `configs/` folder (next to `mmkd/`), or `./configs`."""
    beside_package = Path(__file__).resolve().parents[2] / "configs"
    if beside_package.is_dir():
        return beside_package
    return Path.cwd() / "configs"


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


def _merge(cfg: DictConfig, other: DictConfig | dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {describe_config_error(err)}") from None


def _load_yaml(path: Path, what: str) -> DictConfig:
    if not path.is_file():
        group_dir = path.parent
        choices = sorted(p.stem for p in group_dir.glob("*.yaml")) if group_dir.is_dir() else []
        raise ConfigError(f"{what}: no file {path}. Available: {', '.join(choices) or 'none'}")
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


def _group_node(config_dir: Path, key: str, choice: str) -> DictConfig | None:
    group, _, name = choice.rpartition("/")
    group = group or key
    if name in ("none", "null"):
        return None
    return _load_yaml(config_dir / group / f"{name}.yaml", f"{key}={choice}")


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """Build the typed config for `overrides` (`group=name` and `key.path=value` items)."""
    register_resolvers()
    config_dir = Path(config_dir) if config_dir else default_config_dir()
    cli_choices, dotlist = _parse_overrides(overrides)

    base = _load_yaml(config_dir / "config.yaml", "config.yaml")
    choices: dict[str, str] = dict(base.pop("defaults", None) or {})
    experiment = cli_choices.pop("experiment", None) or choices.pop("experiment", None)
    choices.pop("experiment", None)
    body: list[tuple[DictConfig, str]] = [(base, "config.yaml")]
    if experiment:
        exp = _load_yaml(
            config_dir / "experiment" / f"{experiment}.yaml", f"experiment={experiment}"
        )
        choices.update(exp.pop("defaults", None) or {})
        body.append((exp, f"experiment/{experiment}.yaml"))
    choices.update(cli_choices)

    cfg = OmegaConf.structured(Config)
    for key, choice in choices.items():
        node = _group_node(config_dir, key, str(choice))
        cfg = _merge(
            cfg,
            OmegaConf.from_dotlist([f"{key}=null"]) if node is None else _nest(key, node),
            f"{key}={choice}",
        )
    required: set[str] = set()
    for node, source in body:
        required |= OmegaConf.missing_keys(node)  # "???" values: the user must set them
        cfg = _merge(cfg, node, source)
    for key in required:  # merging "???" keeps the old value; mark the key missing again
        OmegaConf.update(cfg, key, "???")
    if experiment:
        cfg.run.name = experiment
    try:
        cli = OmegaConf.from_dotlist(dotlist)
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {describe_config_error(err)}") from None
    cfg = _merge(cfg, cli, "command line")
    _replace_free_mappings(cfg, dotlist)
    return cfg


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
