"""Build an adapter from its spec: registry lookup, weights, freezing.

The adapter is given typed values: the spec as its schema's dataclass (`AdapterSpec` with its
adapter's sections, interpolations resolved), not a config node."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from mmkd.errors import CheckpointError, ConfigError, settings_at
from mmkd.export import verify_export, weights_file
from mmkd.io import load_state_file

from . import register_builtins
from .base import ADAPTERS, Adapter

if TYPE_CHECKING:
    from mmkd.config.schema import AdapterSpec


def build_adapter(spec: DictConfig | AdapterSpec, *, key: str = "student") -> Adapter:
    """Instantiate `spec.adapter`, load `spec.weights` if set, freeze the encoder if asked.
    `spec`: a typed spec config node (composed, or `load_export_spec`'s), or its dataclass;
    the adapter holds the dataclass, a copy (changing it leaves the config alone)."""
    register_builtins()
    if isinstance(spec, DictConfig) and OmegaConf.get_type(spec) is dict:
        raise TypeError(
            f"{key}: build_adapter needs a typed spec (merged onto "
            "OmegaConf.structured(mmkd.config.schema.adapter_schema(name))), not a plain mapping"
        )
    spec = OmegaConf.to_object(spec) if isinstance(spec, DictConfig) else copy.deepcopy(spec)
    adapter_cls = ADAPTERS.get(spec.adapter, key=f"{key}.adapter")
    with settings_at(key):  # a wrong setting, as the adapter reports it, named at its key
        adapter = adapter_cls(spec, key=key)
    # a new model trains, like any new nn.Module: transformers' from_pretrained returns its model
    # in eval mode, which would fine-tune a pretrained text encoder with its dropout off
    adapter.train()
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
