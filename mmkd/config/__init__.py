"""Config schema (typed dataclasses), composition of config groups, and start-up validation."""

from mmkd.config.compose import CONFIG_GROUPS, compose, default_config_dir
from mmkd.config.schema import (
    AdapterSpec,
    Config,
    DataCfg,
    LossesCfg,
    TrainerCfg,
)
from mmkd.config.validate import validate

__all__ = [
    "CONFIG_GROUPS",
    "AdapterSpec",
    "Config",
    "DataCfg",
    "LossesCfg",
    "TrainerCfg",
    "compose",
    "default_config_dir",
    "validate",
]
