"""Build an adapter from its spec: registry lookup, weights, freezing."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from mmkd.errors import CheckpointError, ConfigError
from mmkd.export import verify_export, weights_file
from mmkd.io import load_state_file

from . import register_builtins
from .base import ADAPTERS, Adapter


def build_adapter(spec: DictConfig, *, key: str = "student") -> Adapter:
    """Instantiate `spec.adapter`, load `spec.weights` if set, freeze the encoder if asked."""
    register_builtins()
    adapter_cls = ADAPTERS.get(spec.adapter, key=f"{key}.adapter")
    adapter = adapter_cls(spec, key=key)
    if not adapter_cls.__module__.startswith("mmkd."):  # a plugin: its encoder is unchecked
        probe_encoder(adapter, key)
    if spec.weights:
        if Path(spec.weights).is_dir():
            verify_export(spec.weights)
        path = weights_file(spec.weights)
        state = load_state_file(path)
        try:
            missing, unexpected = adapter.load_state_dict(state, strict=False)
        except RuntimeError as err:  # same names, other shapes (e.g. another num_classes)
            detail = str(err).splitlines()[1:2] or [str(err)]
            raise CheckpointError(
                f"{key}.weights: {path} does not match the {spec.adapter} "
                f"adapter ({detail[0].strip()})"
            ) from None
        if missing or unexpected:
            raise CheckpointError(
                f"{key}.weights: {path} does not match the {spec.adapter} adapter "
                f"(missing {len(missing)} keys, e.g. {missing[:3]}; "
                f"unexpected {len(unexpected)}, e.g. {unexpected[:3]})"
            )
    if spec.freeze_encoder:
        adapter.freeze_encoder()
    return adapter


@torch.no_grad()
def probe_encoder(adapter: Adapter, key: str) -> None:
    """Run the encoder once on `example_batch(2)` (eval mode, restored after) and check it gives
    pooled features (2, feature_dim), as `build_encoder` declared: a plugin whose encoder does
    not fails here, in one line naming it, not deep inside the first training step."""
    name = f"{key}.adapter: {adapter.spec.adapter} ({type(adapter).__name__})"
    was_training = adapter.training
    adapter.eval()
    try:
        features = adapter.encode(adapter.example_batch(2))
    except Exception as err:  # the plugin's own code: report it in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(
            f"{name}: its encoder fails on example_batch(2) ({type(err).__name__}: {first})"
        ) from None
    finally:
        adapter.train(was_training)
    expected = (2, adapter.feature_dim)
    if not isinstance(features, torch.Tensor):
        raise ConfigError(f"{name}: encode() returned {type(features).__name__}, not a Tensor")
    if tuple(features.shape) != expected:
        rank = "" if features.ndim == 2 else f" (rank {features.ndim}; pooled features are (B, F))"
        raise ConfigError(
            f"{name}: encode() gives features of shape {tuple(features.shape)}{rank}, but "
            f"build_encoder declared a feature size of {adapter.feature_dim}: expected {expected}"
        )
