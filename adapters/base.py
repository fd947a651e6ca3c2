"""The adapter interface every modality implements, its registry, and the shared projection head.

An adapter is preprocessing + encoder + head. The preprocessing lives in a separate, light
`Preprocessor` object so that DataLoader workers can be handed it without the weights.

    preprocessor = adapter.make_preprocessor()
    batch = preprocessor.collate([preprocessor(raw, train=False) for raw in samples])
    out = adapter(batch)          # AdapterOutput: embedding (B, D) L2-normed, logits, features
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mmkd.errors import ConfigError
from mmkd.registry import Registry

from .sections import adapter_sections

if TYPE_CHECKING:
    from mmkd.config.schema import AdapterSpec

ADAPTERS: Registry[type[Adapter]] = Registry("adapter", entry_point_group="mmkd.adapters")

Batch = dict[str, Tensor]


@dataclass
class AdapterOutput:
    """What every adapter returns for a batch."""

    embedding: Tensor  # (B, D), L2-normalised: the shared space
    features: Tensor  # (B, F), pooled encoder output before the head
    logits: Tensor | None  # (B, C) when the head has a classifier
    # intermediate features asked for by name: (B, C, *spatial); spatial is () for pooled ones
    layers: dict[str, Tensor] = field(default_factory=dict)


class Preprocessor(ABC):
    """Turns one raw sample of a modality into model input; `collate` batches them.

    Must be picklable and hold no model weights: DataLoader workers receive a copy.
    """

    modality: ClassVar[str]

    def __init__(self, settings: dict[str, Any], *, randomized_in_training: bool) -> None:
        #: plain values that fully determine the output for a given input
        self.settings = settings
        #: True when `__call__(raw, train=True)` draws random augmentations
        self.randomized_in_training = randomized_in_training

    @abstractmethod
    def __call__(self, raw: Any, *, train: bool) -> Any: ...

    @abstractmethod
    def collate(self, items: list[Any]) -> Batch: ...

    def prepare_batch(
        self, raws: list[Any], *, train: bool, seeds: list[int] | None
    ) -> Batch | None:
        """`collate` of every raw sample preprocessed, computed for the whole batch at once, or
        None (the default) to have each sample preprocessed in turn. `seeds`: the view seed of
        each sample (`mmkd.replay.view_seed`) when training augments replayably; the result
        must equal what `self(raw, train=True)` gives inside `replay_scope` for that seed."""
        return None

    def identity(self) -> dict[str, Any]:
        """Everything that changes the output for a given input (keys the teacher cache)."""
        return {"class": type(self).__name__, "settings": self.settings}

    def augmentation(self) -> dict[str, Any] | None:
        """The settings that fix a training view of a raw sample ({} when there is no
        augmentation); None when this preprocessor does not say (then no check compares it)."""
        return None


class ProjectionHead(nn.Module):
    """Features -> shared space (linear or 2-layer MLP, then L2 norm) and an optional classifier."""

    def __init__(
        self,
        in_dim: int,
        embed_dim: int | None,
        num_classes: int | None,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        if embed_dim is None:
            self.proj: nn.Module = nn.Identity()
            self.embed_dim = in_dim
        elif hidden_dim:
            self.proj = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, embed_dim)
            )
            self.embed_dim = embed_dim
        else:
            self.proj = nn.Linear(in_dim, embed_dim)
            self.embed_dim = embed_dim
        self.classifier = nn.Linear(in_dim, num_classes) if num_classes else None

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        features = self.dropout(features)
        embedding = F.normalize(self.proj(features), dim=-1)
        logits = self.classifier(features) if self.classifier is not None else None
        return embedding, logits


class Adapter(nn.Module, ABC):
    """Base class: subclasses build the encoder and the preprocessor for their modality."""

    modality: ClassVar[str]
    # the config sections an adapter reads are registered with its name, in a light module
    # (mmkd.adapters.register_adapter_config): its spec holds those and the common fields

    def __init__(self, spec: AdapterSpec, *, key: str = "model") -> None:
        """`spec`: the typed spec (an `AdapterSpec` dataclass holding this adapter's sections,
        see `mmkd.config.schema.adapter_schema`), as `build_adapter` gives it."""
        super().__init__()
        self.spec = spec
        self.key = key  # the config key of this model, for error messages
        self.encoder, feature_dim = self.build_encoder()
        self.feature_dim = feature_dim
        head = spec.head
        self.head = ProjectionHead(
            feature_dim,
            head.embed_dim,
            head.num_classes if head.classifier else None,
            head.hidden_dim,
            head.dropout,
        )
        self.encoder_frozen = False

    # ---- what each modality provides
    @abstractmethod
    def build_encoder(self) -> tuple[nn.Module, int]:
        """Return (encoder, pooled feature dimension)."""

    @abstractmethod
    def make_preprocessor(self) -> Preprocessor: ...

    @abstractmethod
    def encode(self, batch: Batch) -> Tensor:
        """Pooled features (B, F) for a collated batch."""

    @abstractmethod
    def example_batch(self, batch_size: int = 1) -> Batch:
        """A batch of the right shape and dtype (for latency timing and export)."""

    # ---- intermediate features, by the names the underlying library gives them
    def feature_names(self) -> list[str]:
        """The intermediate features this model can return (none unless a subclass says)."""
        return []

    def encode_layers(self, batch: Batch, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Pooled features and the named intermediate features (B, C, *spatial)."""
        raise NotImplementedError(f"{type(self).__name__} returns no intermediate features")

    def token_layout(self) -> dict[str, Any] | None:
        """What fixes the token positions of this model's input (tokenizer, max length, text
        views), for terms that compare features token by token; None: no token positions."""
        return None

    def check_features(self, names: Sequence[str], key: str) -> None:
        """ConfigError naming the valid features when one of `names` is not one of them."""
        valid = self.feature_names()
        for name in names:
            if name not in valid:
                choices = ", ".join(valid) if valid else "none (this model exposes no layers)"
                raise ConfigError(
                    f"{key}: {self.spec.adapter} model has no feature {name!r}; valid: {choices}"
                )

    @torch.no_grad()
    def feature_shapes(self, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Per-sample shape (C, *spatial) of each named feature, from a forward pass of
        `example_batch` in eval mode (the model's mode is restored)."""
        if not names:
            return {}
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            batch = {k: v.to(device) for k, v in self.example_batch(2).items()}
            _, layers = self.encode_layers(batch, names)
        finally:
            self.train(was_training)
        return {name: tuple(layers[name].shape[1:]) for name in names}

    # ---- shared behaviour
    @property
    def embed_dim(self) -> int:
        return self.head.embed_dim

    @property
    def num_classes(self) -> int | None:
        return self.head.classifier.out_features if self.head.classifier is not None else None

    def forward(self, batch: Batch, layers: Sequence[str] = ()) -> AdapterOutput:
        """Embedding, logits and pooled features; with `layers`, also those intermediate
        features (names from `feature_names`, checked at start-up)."""
        names = list(dict.fromkeys([*self.spec.features, *layers]))
        found: dict[str, Tensor] = {}
        if names:
            features, found = self.encode_layers(batch, names)
        else:
            features = self.encode(batch)
        embedding, logits = self.head(features)
        return AdapterOutput(embedding=embedding, features=features, logits=logits, layers=found)

    def freeze_encoder(self) -> None:
        """Lock the encoder (no grad, eval mode kept); only the head trains."""
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.encoder_frozen = True

    def export_spec(self, folder: Path) -> DictConfig:
        """The spec saved beside exported weights: the common fields and the sections this
        adapter reads (all its spec holds), each with its pretrained sources switched off by
        the section's `exported` rule (the weights file holds the weights). Subclasses save
        extra assets (tokenizer) to `folder`."""
        spec = OmegaConf.create(dataclasses.asdict(self.spec))
        spec.weights = None
        for name, section in adapter_sections(spec.adapter).items():
            section.exported(spec[name])  # the section's own rule
        return spec

    def train(self, mode: bool = True) -> Adapter:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the sequence axis of (B, T, F) where mask (B, T) is 1."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def class_scores(out: AdapterOutput, class_embeddings: Tensor | None) -> Tensor | None:
    """Class scores: the classifier head, else zero-shot (cosine to each class prompt's
    embedding in the shared space), else None."""
    if out.logits is not None:
        return out.logits
    if class_embeddings is not None and out.embedding.shape[-1] == class_embeddings.shape[-1]:
        return out.embedding @ class_embeddings.to(out.embedding.dtype).T
    return None
