"""Config schema (typed dataclasses), composition of config groups, and start-up validation."""

from mmkd.config.compose import CONFIG_GROUPS, compose, compose_saved, default_config_dir
from mmkd.config.schema import (
    AdapterSpec,
    Config,
    DataCfg,
    LossesCfg,
    TrainerCfg,
    adapter_schema,
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
    "adapter_schema",
    "compose",
    "compose_saved",
    "default_config_dir",
    "run_schema",
    "validate",
]
