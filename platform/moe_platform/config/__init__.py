"""Configuration: one dataclass tree, TOML files mirroring it, `--section.key=value` overrides."""

from moe_platform.config.loader import (
    config_from_dict,
    config_to_dict,
    config_to_toml,
    load_config,
    parse_overrides,
    rank_cpu_sets,
    resource_amounts,
    reward_specs,
    validate_config,
)
from moe_platform.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DPOConfig,
    ElasticConfig,
    FailureConfig,
    GRPOConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "Config", "DataConfig", "DPOConfig", "ElasticConfig", "FailureConfig", "GRPOConfig",
    "ParallelConfig", "RunConfig", "TrainConfig", "config_from_dict", "config_to_dict", "config_to_toml",
    "load_config", "parse_overrides", "rank_cpu_sets", "resource_amounts", "reward_specs", "validate_config",
]
