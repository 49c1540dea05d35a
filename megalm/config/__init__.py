"""The run configuration: ``schema`` (typed sections), ``load`` (YAML + overrides), ``rules`` (the rule book)
and ``resolve`` (checkpoint, tokenizer, DeepSpeed JSON -> one validated, frozen config)."""
from megalm.config.load import deepspeed_json_path, describe_fields, load_config, preset_folder, resolve_config_file
from megalm.config.resolve import resolve
from megalm.config.schema import (
    SECTIONS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    FrozenConfigError,
    KernelConfig,
    LoggingConfig,
    LoRAConfig,
    LRConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
)

__all__ = [
    "SECTIONS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "FrozenConfigError", "KernelConfig",
    "LRConfig", "LoggingConfig", "LoRAConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "TrainConfig",
    "deepspeed_json_path", "describe_fields", "load_config", "preset_folder", "resolve", "resolve_config_file",
]
