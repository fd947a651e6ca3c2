"""Start-up checks the type system cannot express: choices, ranges and cross-field rules.

Each failure raises `ConfigError` naming the key, before any model or data is built.
"""

from __future__ import annotations

from collections.abc import Iterator

from omegaconf import DictConfig, OmegaConf

from mmkd.config.compose import group_defaults
from mmkd.errors import ConfigError

TEACHER_TERMS = ("kd", "embed", "contrastive", "relational")

CHOICES = {
    "data.on_error": ("raise", "skip"),
    "data.fsdd.split": ("train", "test", "all"),
    "data.mnist.split": ("train", "test"),
    "losses.embed.kind": ("cosine", "mse"),
    "optim.name": ("adamw", "sgd"),
    "optim.scheduler": ("cosine", "constant"),
    "distill.nonfinite_loss": ("stop", "skip"),
    "distill.store.view_order": ("cycle", "random"),
    "distill.store.dtype": ("float32", "float16", "bfloat16"),
}
POSITIVE = (
    "data.batch_size",
    "losses.kd.temperature",
    "losses.contrastive.temperature",
    "losses.contrastive.max_logit_scale",
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
    "data.num_workers",
    "data.webdataset.shuffle_buffer",
    "optim.weight_decay",
    "optim.min_lr_ratio",
    "losses.relational.distance_weight",
    "losses.relational.angle_weight",
    "losses.ce.label_smoothing",
    "data.max_train_samples",
    "data.max_eval_samples",
)


def adapter_specs(cfg: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """(key, spec) for every model in the run: teacher, student and extra students."""
    if cfg.teacher is not None:
        yield "teacher", cfg.teacher
    yield "student", cfg.student
    for name, spec in cfg.extra_students.items():
        yield f"extra_students.{name}", spec


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


def _check_adapter(key: str, spec: DictConfig, composed: DictConfig | None) -> None:
    """The common fields here; each section by its own `check`, for the sections the adapter
    reads. A section it does not read must keep its defaults (a change there would be lost);
    `composed` is the spec as the config group files gave it, whose values count as defaults."""
    from mmkd.adapters import ADAPTERS  # heavy import (timm, transformers): only when validating
    from mmkd.config.schema import ADAPTER_SECTIONS

    prefix = f"{key}."
    adapter_cls = ADAPTERS.get(spec.adapter, key=f"{prefix}adapter")
    for sub in ("head.embed_dim", "head.hidden_dim", "head.num_classes"):
        _check_range(spec, sub, positive=True, prefix=prefix)
    if not 0 <= spec.head.dropout < 1:
        raise ConfigError(f"{prefix}head.dropout: must be in [0, 1), got {spec.head.dropout}")
    read = adapter_cls.read_sections()
    unknown = [name for name in read if name not in ADAPTER_SECTIONS]
    if unknown:
        raise ConfigError(
            f"{prefix}adapter: {spec.adapter} reads unknown sections {', '.join(unknown)} "
            f"(valid: {', '.join(ADAPTER_SECTIONS)}; free-form settings go in {prefix}options)"
        )
    for name, section in ADAPTER_SECTIONS.items():
        if name in read:
            section.check(spec[name], f"{prefix}{name}")
            continue
        base = OmegaConf.select(composed, name) if composed is not None else None
        changed = section.changed(spec[name], base)
        if changed:
            reads = ", ".join(read) or "none of them"
            raise ConfigError(
                f"{prefix}{name}: the {spec.adapter} adapter does not read {name} settings "
                f"(it reads {reads}); changed from the defaults: "
                + ", ".join(f"{name}.{field}" for field in changed)
            )


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value that is out of range or contradicts another.

    The modules of `run.plugins` are imported first, so the names they register validate."""
    from mmkd.data import DATASETS
    from mmkd.loggers import check_loggers
    from mmkd.plugins import import_plugins

    import_plugins(cfg.run.plugins)
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
    composed = group_defaults(cfg)
    for key, spec in adapter_specs(cfg):
        base = OmegaConf.select(composed, key) if composed is not None else None
        _check_adapter(key, spec, base)
    DATASETS.get(cfg.data.name, key="data.name")
    check_loggers(cfg.run.loggers)
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    val_size = cfg.data.folder.val_size
    if isinstance(val_size, bool) or not isinstance(val_size, int | float) or val_size < 0:
        raise ConfigError(
            f"data.folder.val_size: must be a count or a fraction below 1, got {val_size!r}"
        )
    if isinstance(val_size, float) and val_size >= 1 and not val_size.is_integer():
        raise ConfigError(f"data.folder.val_size: {val_size} is neither a count nor a fraction")
    if not 0 <= cfg.optim.warmup_fraction < 1:
        raise ConfigError(
            f"optim.warmup_fraction: must be in [0, 1), got {cfg.optim.warmup_fraction}"
        )

    if cfg.trainer.num_nodes > 1 and not cfg.run.dir:
        raise ConfigError(
            "run.dir: required when trainer.num_nodes > 1 (a generated name would differ per "
            "node); give a folder every node sees"
        )

    weights = {name: cfg.losses[name].weight for name in (*TEACHER_TERMS, "ce")}
    for name, weight in weights.items():
        if weight < 0:
            raise ConfigError(f"losses.{name}.weight: must be >= 0, got {weight}")
    if not any(w > 0 for w in weights.values()):
        raise ConfigError("losses: every weight is 0; set e.g. losses.kd.weight=1")
    if cfg.teacher is None:
        for name in TEACHER_TERMS:
            if weights[name] > 0:
                raise ConfigError(
                    f"losses.{name}.weight: is {weights[name]} but there is no teacher "
                    "(set teacher=NAME or the weight to 0)"
                )
    if weights["ce"] > 0 and not cfg.data.train_labels:
        raise ConfigError(
            "losses.ce.weight: is > 0 but data.train_labels=false keeps labels from the loss"
        )
