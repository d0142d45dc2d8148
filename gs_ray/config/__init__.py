"""Typed configuration: one dataclass section per concern (`sections`), presets and YAML + `key=value` overrides
(`loader`). Import from here: `from gs_ray.config import Config, load_config`."""

from gs_ray.config.loader import (
    SECTIONS,
    Config,
    config_from_dict,
    describe,
    field_docs,
    load_config,
    parse_override,
    preset_names,
)
from gs_ray.config.sections import (
    ClusterConfig,
    DataConfig,
    ExpertsConfig,
    GradsConfig,
    LoraConfig,
    ModelConfig,
    RouterConfig,
    RunConfig,
    TrainConfig,
    WarmupConfig,
)
from gs_ray.config.serving_sections import BaselinesConfig, EvaluateConfig, ServeConfig

__all__ = [
    "SECTIONS", "BaselinesConfig", "ClusterConfig", "Config", "DataConfig", "EvaluateConfig", "ExpertsConfig",
    "GradsConfig", "LoraConfig", "ModelConfig", "RouterConfig", "RunConfig", "ServeConfig", "TrainConfig",
    "WarmupConfig", "config_from_dict", "describe", "field_docs", "load_config", "parse_override", "preset_names",
]
