"""Where a text model's tokenizer and weights come from, and cutting layers out of it.

`init_from` names either a Hugging Face model folder (or hub id) or a run's exported text model
(RUN_DIR/student: adapter.yaml, model.safetensors, text/ with the tokenizer and model config),
so a fine-tuned teacher can seed a student: its layers (`text.keep_layers`, DistilBERT's
initialisation) or its vocabulary and token embeddings (`text_rnn.init_from`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mmkd.errors import ConfigError, SettingError
from mmkd.export import WEIGHTS, is_export
from mmkd.io import load_state_file

TEXT_ASSETS = "text"  # folder of an export holding the tokenizer and model config
ENCODER_PREFIX = "encoder."  # an adapter's state names its transformers model `encoder`


def resolve_source(source: str) -> tuple[str, dict[str, Tensor] | None]:
    """(folder or hub id holding the tokenizer and model config, the encoder's weights when
    `source` is an mmkd export; None: the weights are the folder's pretrained ones)."""
    folder = Path(source).expanduser()
    if not is_export(folder):
        return source, None
    state = load_state_file(folder / WEIGHTS)
    encoder = {
        name[len(ENCODER_PREFIX) :]: value
        for name, value in state.items()
        if name.startswith(ENCODER_PREFIX)
    }
    return str(folder / TEXT_ASSETS), encoder


def load_source_tokenizer(source: str, field: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder / hub id / mmkd export; a failure is a SettingError of
    `field`, the setting that named `source` (e.g. text.init_from)."""
    folder, _ = resolve_source(source)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise SettingError(
            field, f"cannot load a tokenizer from {source!r}: {str(err).splitlines()[0]}"
        ) from None


def load_source_model(source: str, field: str, trust_remote_code: bool = False) -> nn.Module:
    """The transformers model of a model folder / hub id (pretrained weights) or of an mmkd
    export (its trained weights); a failure is a SettingError of `field`."""
    folder, state = resolve_source(source)
    try:
        if state is None:
            return AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise SettingError(field, f"cannot load {source!r}: {str(err).splitlines()[0]}") from None
    model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith("pooler.")]  # the adapter drops it
    if missing or unexpected:
        raise SettingError(
            field,
            f"{source} does not hold a {type(model).__name__} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})",
        )
    return model


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers: the ModuleList as long as num_hidden_layers
    (BERT's encoder.layer, DistilBERT's transformer.layer, ...)."""
    count = model.config.num_hidden_layers
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if len(found) != 1:
        raise ConfigError(
            f"cannot tell which module list of {type(model).__name__} holds its {count} layers "
            f"(found {[name for name, _ in found]})"
        )
    return found[0][1]


def keep_layers(model: nn.Module, keep: Sequence[int], field: str) -> nn.Module:
    """Cut `model` to the layers `keep` (0-based, in that order), in place: embeddings and the
    kept layers keep their weights; config.num_hidden_layers becomes len(keep). Wrong indices
    are a SettingError of `field`, the setting that gave them."""
    layers = layer_list(model)
    count = len(layers)
    bad = [i for i in keep if not 0 <= i < count]
    if not keep or bad or len(set(keep)) != len(keep):
        raise SettingError(
            field,
            f"{list(keep)} must be distinct layer indices in 0..{count - 1} "
            f"({type(model).__name__} has {count} layers)",
        )
    kept = [layers[i] for i in keep]
    for position, layer in enumerate(kept):
        for module in layer.modules():  # attention caches index layers by position
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    del layers[:]
    layers.extend(kept)
    model.config.num_hidden_layers = len(kept)
    return model
