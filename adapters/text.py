"""Text adapter: a transformers encoder (AutoModel) and its tokenizer, mean or CLS pooling.

Intermediate features, by name (`mmkd layers` lists them with their shapes):
    hidden_states.N  (H,)             transformers' hidden_states[N] (0: the embedding output, N:
                                      the output of layer N), pooled like the output
    tokens.N         (L, H)           hidden_states[N] token by token, L = text.max_length
    attentions.N     (heads, L, L)    transformers' attentions[N]: the self-attention
                                      probabilities inside layer N+1 (N = 0..layers-1)
    attention_mask   (L,)             1 on real tokens
Token-level features are zero past each text's attention mask and padded to text.max_length,
so their shape is fixed (they fit the teacher store) and padding never depends on the batch.
Attentions need transformers' eager attention; the model switches to it when first asked.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mmkd.errors import ConfigError, DataError, SettingError

from .base import ADAPTERS, Adapter, Batch, Preprocessor, masked_mean
from .text_augment import TextAugment
from .text_config import TextCfg
from .text_init import TEXT_ASSETS, keep_layers, load_source_model, load_source_tokenizer
from .text_rnn_config import TextRnnCfg

log = logging.getLogger(__name__)


def load_tokenizer(cfg: TextCfg) -> Any:
    """The tokenizer of `text.tokenizer` (or of `text.model`); a load failure is a
    SettingError of text.tokenizer."""
    source = cfg.tokenizer or cfg.model
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise SettingError(
            "text.tokenizer",
            f"cannot load a tokenizer from {source!r}: {str(err).splitlines()[0]}",
        ) from None


def load_text_model(cfg: TextCfg) -> nn.Module:
    """Pretrained weights from a hub id / local folder, or a random init from its config."""
    overrides = copy.deepcopy(dict(cfg.config_overrides))
    remote = cfg.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=remote)
    except (OSError, ValueError) as err:
        raise SettingError(
            "text.model", f"cannot load {cfg.model!r}: {str(err).splitlines()[0]}"
        ) from None
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise SettingError(
            "text.config_overrides", f"{type(config).__name__} has no {', '.join(unknown)}"
        )
    config.update(overrides)
    if cfg.pretrained:
        return AutoModel.from_pretrained(cfg.model, config=config, trust_remote_code=remote)
    return AutoModel.from_config(config, trust_remote_code=remote)


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything that decides how a tokenizer splits text into ids (its fast
    backend's normalizer, pre-tokenizer, vocabulary, special tokens), without the per-call
    truncation and padding state; two tokenizers with the same digest give the same ids.
    Computed once per tokenizer object."""
    with contextlib.suppress(KeyError, TypeError):
        return _FINGERPRINTS[tokenizer]
    digest = _fingerprint(tokenizer)
    with contextlib.suppress(TypeError):  # not weak-referenceable: computed again next time
        _FINGERPRINTS[tokenizer] = digest
    return digest


def _fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())]
    blob = json.dumps(state, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def make_text_augment(cfg: TextCfg | TextRnnCfg, tokenizer: Any, key: str) -> TextAugment | None:
    """The views of section `cfg` (config key `key`, e.g. student.text), or None when they are
    off; the mask token defaults to the tokenizer's."""
    aug = cfg.augment
    if not (aug.mask_prob > 0 or aug.ngram_prob > 0):
        return None
    mask_token = aug.mask_token or getattr(tokenizer, "mask_token", None)
    if aug.mask_prob > 0 and not mask_token:
        raise ConfigError(f"{key}.augment.mask_token: the tokenizer has no mask token; name one")
    return TextAugment(
        mask_token or "", aug.mask_prob, aug.ngram_prob, aug.ngram_max, aug.keep_prob
    )


class TextPreprocessor(Preprocessor):
    """A string -> its token ids (truncated to max_length); `collate` pads them to the batch's
    longest text and adds the attention mask. In training, optionally a random view of the
    string first (`text.augment`), replayed from (seed, sample id, view).

    `warm` tokenises a whole split once (one batched call, kept on disk by mmkd.data.tokens);
    a text the cache does not hold (an augmented view, say) is tokenised when it is loaded."""

    modality = "text"

    def __init__(self, tokenizer: Any, max_length: int, augment: TextAugment | None = None) -> None:
        augment = augment if augment is not None and augment.enabled else None
        # the tokenizer by what it does, not where it was loaded from: a BiLSTM initialised
        # from a teacher's folder and the teacher's export share stored views and caches
        settings: dict[str, Any] = {
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length,
        }
        if augment is not None:  # absent when off: stores of unaugmented text keep their keys
            settings["augment"] = augment.settings()
        super().__init__(settings, randomized_in_training=augment is not None)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id or 0
        self.tokens: dict[str, np.ndarray] = {}  # text -> token ids, filled by `warm`
        self.augment = augment

    def warm(self, texts: Sequence[str], cache_dir: Path | None) -> bool:
        """Tokenise `texts` once (or read them from the disk cache: returns True)."""
        from mmkd.data.tokens import load_or_tokenize

        ids, hit = load_or_tokenize(self.tokenizer, texts, self.max_length, cache_dir)
        self.tokens.update(zip(texts, ids, strict=True))
        return hit

    def __call__(self, raw: Any, *, train: bool) -> np.ndarray:
        if not isinstance(raw, str):
            raise DataError(f"text must be a string, got {type(raw).__name__}")
        if not raw.strip():
            raise DataError("text is empty")
        if train and self.augment is not None:
            raw = self.augment(raw)
        return self.tokenize(raw)

    def tokenize(self, text: str) -> np.ndarray:
        """The token ids of `text` (from the cache when it holds them)."""
        ids = self.tokens.get(text)
        if ids is None:
            encoded = self.tokenizer(text, truncation=True, max_length=self.max_length)
            ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        return ids

    def collate(self, items: Sequence[np.ndarray | str]) -> Batch:
        """Token ids (or texts, tokenised here) padded to the longest one, and the mask."""
        items = [self.tokenize(item) if isinstance(item, str) else item for item in items]
        length = max((len(ids) for ids in items), default=0)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, ids in enumerate(items):
            input_ids[row, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def augmentation(self) -> dict[str, Any]:
        return self.settings.get("augment", {})


@ADAPTERS.register("text")
class TextAdapter(Adapter):
    """A transformers encoder. `text.model` is a hub id or a local folder."""

    modality = "text"

    def build_encoder(self) -> tuple[nn.Module, int]:
        cfg = self.spec.text
        if cfg.init_from:  # a model folder or a run's export (a fine-tuned teacher)
            field = "text.init_from"
            self.tokenizer = load_source_tokenizer(cfg.init_from, field, cfg.trust_remote_code)
            model = load_source_model(cfg.init_from, field, cfg.trust_remote_code)
        else:
            self.tokenizer = load_tokenizer(cfg)
            model = load_text_model(cfg)
        if cfg.keep_layers:
            model = keep_layers(model, list(cfg.keep_layers), "text.keep_layers")
        if getattr(model, "pooler", None) is not None:
            # we pool ourselves; an unused pooler would also break DDP (unused parameters)
            model.pooler = None
        return model, model.config.hidden_size

    def export_spec(self, folder: Path) -> DictConfig:
        """Save the tokenizer and model config beside the weights so the export stands alone."""
        spec = super().export_spec(folder)
        self.tokenizer.save_pretrained(folder / TEXT_ASSETS)
        self.encoder.config.save_pretrained(folder / TEXT_ASSETS)
        spec.text.model = TEXT_ASSETS  # relative to the export folder
        spec.text.tokenizer = None
        spec.text.config_overrides = {}
        return spec

    def make_preprocessor(self) -> TextPreprocessor:
        cfg = self.spec.text
        augment = make_text_augment(cfg, self.tokenizer, f"{self.key}.text")
        return TextPreprocessor(self.tokenizer, cfg.max_length, augment)

    def token_layout(self) -> dict[str, Any]:
        cfg = self.spec.text
        return {
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "max_length": cfg.max_length,
            "augment": self.make_preprocessor().augmentation(),
            "source": str(cfg.tokenizer or cfg.model),  # for messages; not compared
        }

    def pool(self, hidden: Tensor, batch: Batch) -> Tensor:
        if self.spec.text.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, batch["attention_mask"])

    def encode(self, batch: Batch) -> Tensor:
        return self.pool(self.encoder(**batch).last_hidden_state, batch)

    def feature_names(self) -> list[str]:
        """transformers' `hidden_states` (0: the embedding output, i: the output of layer i),
        pooled and token by token, its `attentions` and the attention mask (module docstring)."""
        layers = self.encoder.config.num_hidden_layers
        return [
            *(f"hidden_states.{i}" for i in range(layers + 1)),
            *(f"tokens.{i}" for i in range(layers + 1)),
            *(f"attentions.{i}" for i in range(layers)),
            "attention_mask",
        ]

    def use_eager_attention(self) -> None:
        """transformers returns attention probabilities only from its eager implementation."""
        if getattr(self.encoder.config, "_attn_implementation", "eager") != "eager":
            log.info("%s: attentions asked for; switching to eager attention", self.key)
            self.encoder.set_attn_implementation("eager")

    def encode_layers(self, batch: Batch, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """`hidden_states.N` pooled like the output (mean over real tokens, or CLS): (B, H);
        token-level features (B, L, ...) zero past the mask, padded to L = text.max_length."""
        attentions = any(name.startswith("attentions.") for name in names)
        if attentions:
            self.use_eager_attention()
        out = self.encoder(**batch, output_hidden_states=True, output_attentions=attentions)
        if attentions and not out.attentions:
            raise ConfigError(f"{self.key}.text.model: the model returns no attentions")
        mask = batch["attention_mask"]
        length = self.spec.text.max_length
        pad = length - mask.shape[1]
        if pad < 0:
            raise DataError(
                f"{self.key}: a batch of {mask.shape[1]} tokens exceeds text.max_length={length}"
            )
        real = mask.to(out.last_hidden_state.dtype)
        layers = {}
        for name in names:
            kind, _, index = name.partition(".")
            if kind == "hidden_states":
                layers[name] = self.pool(out.hidden_states[int(index)], batch)
            elif kind == "tokens":
                tokens = out.hidden_states[int(index)] * real[:, :, None]
                layers[name] = F.pad(tokens, (0, 0, 0, pad))
            elif kind == "attentions":
                probs = out.attentions[int(index)] * real[:, None, :, None] * real[:, None, None, :]
                layers[name] = F.pad(probs, (0, pad, 0, pad))
            else:  # attention_mask (names are checked at start-up)
                layers[name] = F.pad(real, (0, pad))
        return self.pool(out.last_hidden_state, batch), layers

    def example_batch(self, batch_size: int = 1) -> Batch:
        length = min(16, self.spec.text.max_length)
        ids = torch.full((batch_size, length), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        ids[:, 0] = self.tokenizer.cls_token_id or 0
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
