"""One typed tree of dataclasses for every run; YAML with `_base_` inheritance; dotted CLI overrides.

`schema.py` holds the tree (each section with its own checks), `load.py` the YAML chain and overrides,
`docs.py` the generated default.yaml and reference. Unknown keys, wrong types and impossible values raise
`UserError` naming the dotted key. A leaf: it imports nothing of ours but `pretrain.errors`, and no torch.
Derived values (effective batch, scaled lr, step counts) are computed by the engine, never written here.
"""
from pretrain.config.docs import field_docs, render_default_yaml, render_reference_md
from pretrain.config.load import deep_merge, from_dict, load_config, split_config_args, to_dict, to_yaml
from pretrain.config.schema import (
    CheckpointConfig, Config, DataConfig, DeepSpeedConfig, EvalConfig, FinetuneConfig, LoggingConfig, MaeConfig,
    ModelConfig, OptimConfig, RunConfig, TaskConfig, require, validate,
)

__all__ = [
    "Config", "RunConfig", "ModelConfig", "TaskConfig", "MaeConfig", "FinetuneConfig", "EvalConfig", "DataConfig",
    "OptimConfig", "DeepSpeedConfig", "CheckpointConfig", "LoggingConfig",
    "load_config", "split_config_args", "from_dict", "to_dict", "to_yaml", "deep_merge", "validate", "require",
    "field_docs", "render_default_yaml", "render_reference_md",
]
