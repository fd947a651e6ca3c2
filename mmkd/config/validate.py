"""Start-up checks the type system cannot express: choices, ranges and cross-field rules.

Each failure raises `ConfigError` naming the key, before any model or data is built.
"""

from __future__ import annotations

from omegaconf import Container, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationToMissingValueError

from mmkd.adapters import adapter_sections
from mmkd.errors import ConfigError
from mmkd.roles import adapter_specs, loss_sections

CHOICES = {
    "optim.name": ("adamw", "sgd"),
    "optim.scheduler": ("cosine", "constant"),
    "distill.nonfinite_loss": ("stop", "skip"),
    "distill.store.view_order": ("cycle", "random"),
    "distill.store.dtype": ("float32", "float16", "bfloat16"),
}
POSITIVE = (
    "optim.lr",
    "run.latency_seconds",
    "run.checkpoint_every_n_steps",
    "distill.store.views",
    "distill.store.logits_topk",
    "distill.store.chunk_size",
    "distill.store.max_gb",
    "trainer.num_nodes",
)
NON_NEGATIVE = (
    "optim.weight_decay",
    "optim.min_lr_ratio",
)


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _check_choice(cfg: DictConfig, key: str, allowed: tuple[str, ...], prefix: str = "") -> None:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{prefix}{key}: {value!r} is not one of {', '.join(allowed)}")


def _check_range(cfg: DictConfig, key: str, positive: bool, prefix: str = "") -> None:
    value = _get(cfg, key)
    if value is None:
        return
    if (positive and not value > 0) or (not positive and not value >= 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{prefix}{key}: must be {bound}, got {value}")


def _check_adapter(key: str, spec: DictConfig) -> None:
    """The common fields here; each section by its own `check`. The spec holds the sections of
    its adapter (the schema is built for it at compose time): a missing one means the adapter
    was changed on a config composed for another."""
    from mmkd.adapters import ADAPTERS  # heavy import (timm, transformers): only when validating

    prefix = f"{key}."
    ADAPTERS.get(spec.adapter, key=f"{prefix}adapter")
    for sub in ("head.embed_dim", "head.hidden_dim", "head.num_classes"):
        _check_range(spec, sub, positive=True, prefix=prefix)
    if not 0 <= spec.head.dropout < 1:
        raise ConfigError(f"{prefix}head.dropout: must be in [0, 1), got {spec.head.dropout}")
    for name, section in adapter_sections(spec.adapter, f"{prefix}adapter").items():
        if name not in spec:
            raise ConfigError(
                f"{prefix}{name}: missing; this config was not composed for "
                f"{prefix}adapter={spec.adapter} (mmkd.config.compose builds each spec's schema "
                "for its adapter)"
            )
        section.check(spec[name], f"{prefix}{name}")


def _check_interpolations(node: Container, prefix: str = "") -> None:
    """A `${key}` that names no key fails here, naming where it is set, not when first read."""
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    for key in keys:
        path = f"{prefix}{key}"
        if OmegaConf.is_interpolation(node, key):
            try:
                node[key]
            except (InterpolationKeyError, InterpolationToMissingValueError) as err:
                raw = node._get_node(key)._value()  # the text as written
                why = (
                    "names a key this config does not have"
                    if isinstance(err, InterpolationKeyError)
                    else "refers to a required value that is not set"
                )
                raise ConfigError(f"{path}: {raw} {why}") from None
            continue
        child = node._get_node(key)  # the node, not its resolved value
        if isinstance(child, DictConfig | ListConfig) and not child._is_none():
            _check_interpolations(child, f"{path}.")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value that is out of range or contradicts another.

    The modules of `run.plugins` are imported first, so the names they register validate."""
    from mmkd.loggers import check_loggers
    from mmkd.plugins import import_plugins

    import_plugins(cfg.run.plugins)
    _check_interpolations(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{missing[0]}: required, set it on the command line (e.g. {missing[0]}=...)"
            + (f"; also missing: {', '.join(missing[1:])}" if missing[1:] else "")
        )
    for key, allowed in CHOICES.items():
        _check_choice(cfg, key, allowed)
    for key in POSITIVE:
        _check_range(cfg, key, positive=True)
    for key in NON_NEGATIVE:
        _check_range(cfg, key, positive=False)
    for key, spec in adapter_specs(cfg):
        _check_adapter(key, spec)
    check_data(cfg.data)
    check_loggers(cfg.run.loggers)
    if not 0 <= cfg.optim.warmup_fraction < 1:
        raise ConfigError(
            f"optim.warmup_fraction: must be in [0, 1), got {cfg.optim.warmup_fraction}"
        )

    if cfg.trainer.num_nodes > 1 and not cfg.run.dir:
        raise ConfigError(
            "run.dir: required when trainer.num_nodes > 1 (a generated name would differ per "
            "node); give a folder every node sees"
        )

    check_losses(cfg)


def check_data(data: DictConfig) -> None:
    """The common `data` settings, and each section of the chosen dataset by its own checks."""
    from mmkd.config.schema import DataCfg, FramesCfg
    from mmkd.data import dataset_sections
    from mmkd.data.decode_cache import cache_mode

    DataCfg.check(data, "data")
    FramesCfg.check(data.frames, "data.frames")
    cache_mode(data)  # data.decode_cache: auto | true | false
    if not 0 <= data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {data.val_fraction}")
    for name, section in dataset_sections(data.name).items():
        if name not in data:
            raise ConfigError(
                f"data.{name}: missing; this config was not composed for data.name={data.name} "
                "(mmkd.config.compose builds the schema of the chosen dataset)"
            )
        section.check(data[name], f"data.{name}")


def check_losses(cfg: DictConfig) -> None:
    """Each term's settings (through the registry), and who may use which term."""
    from mmkd.losses import term_classes

    if cfg.teacher is not None and cfg.teachers:
        raise ConfigError(
            "teachers: give one teacher (teacher=NAME with losses) or several (teachers.NAME "
            "with teachers.NAME.losses), not both (set teacher=none)"
        )
    for name in cfg.teachers:
        if not str(name).isidentifier():
            raise ConfigError(f"teachers.{name}: a teacher's name must be an identifier")
    store_used = cfg.distill.store.views is not None or cfg.distill.cache
    any_weight = False
    for key, section, scope, teacher in loss_sections(cfg):
        for cls in term_classes():
            if cls.name not in section:  # registered after this config was composed
                continue
            term_key = f"{key}.{cls.name}"
            weight = section[cls.name].weight
            if weight < 0:
                raise ConfigError(f"{term_key}.weight: must be >= 0, got {weight}")
            cls.check(section[cls.name], term_key)
            if weight == 0:
                continue
            any_weight = True
            if cls.uses_teacher and teacher is None:
                raise ConfigError(
                    f"{term_key}.weight: is {weight} but there is no teacher "
                    "(set teacher=NAME or the weight to 0)"
                    if not cfg.teachers
                    else f"{term_key}.weight: with several teachers, a teacher's terms go in "
                    f"teachers.NAME.losses.{cls.name}"
                )
            if not cls.uses_teacher and scope == "teacher":
                raise ConfigError(
                    f"{term_key}.weight: {cls.name} does not use a teacher; set it in "
                    f"losses.{cls.name} (label terms apply once, whatever the teachers)"
                )
            if cls.needs_labels and not cfg.data.train_labels:
                raise ConfigError(
                    f"{term_key}.weight: is > 0 but data.train_labels=false keeps labels "
                    "from the loss"
                )
            if cls.needs_full_logits and store_used and cfg.distill.store.logits_topk:
                raise ConfigError(
                    f"{term_key}: needs every teacher logit, but distill.store.logits_topk="
                    f"{cfg.distill.store.logits_topk} keeps only the top ones (set it to null)"
                )
    if not any_weight:
        raise ConfigError("losses: every weight is 0; set e.g. losses.kd.weight=1")
