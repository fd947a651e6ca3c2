"""`mmkd layers [overrides]`: the intermediate features every model of a run exposes, by the
names loss-term `pairs` and `features` take, with their per-sample shapes.

    mmkd layers experiment=cifar10_kd teacher.weights=RUN_DIR/student

Builds the run's models from the config as `mmkd train` would (an exported `weights` folder
brings its architecture), without data: classifier heads get one class, which changes no layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from mmkd.adapters import build_adapter
from mmkd.cli import command_parser
from mmkd.config import compose, validate
from mmkd.models import adopt_exported_specs
from mmkd.roles import adapter_specs


def describe_layers(cfg: DictConfig) -> list[str]:
    """One block per model: its config key, adapter, then `name  (C, *spatial)` per feature."""
    adopt_exported_specs(cfg)
    lines: list[str] = []
    for key, spec in adapter_specs(cfg):
        spec = spec.copy()  # typed, as composed
        spec.weights = None  # the architecture is what matters; weights change no shape
        if spec.head.classifier and spec.head.num_classes is None:
            spec.head.num_classes = 1
        model = build_adapter(spec, key=key)
        model.check_features(list(spec.features), f"{key}.features")
        names = model.feature_names()
        lines.append(f"{key} ({spec.adapter}): {len(names)} layers")
        for name, shape in model.feature_shapes(names).items():
            lines.append(f"  {name:<24} {tuple(shape)}")
        if not names:
            lines.append("  (none: this model exposes no intermediate features)")
    return lines


def command(argv: Sequence[str]) -> int:
    args = command_parser("layers", __doc__, overrides=True).parse_args(argv)
    cfg = compose(args.overrides)
    validate(cfg)
    print("\n".join(describe_layers(cfg)))
    return 0
