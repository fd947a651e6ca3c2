"""Config schema (typed dataclasses), composition of config groups, and start-up validation."""

from mmkd.config.compose import CONFIG_GROUPS, compose, compose_saved, default_config_dir
from mmkd.config.schema import (
    AdapterSpec,
    Config,
    DataCfg,
    LossesCfg,
    TrainerCfg,
    run_schema,
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
    "compose_saved",
    "default_config_dir",
    "run_schema",
    "validate",
]
