"""Typed configuration for every stage: dataclasses, YAML files, and `--set key=value` overrides.

    cfg = load_config("configs/pretrain/demo.yaml", ["optim.lr=1e-4", "model.variant=small"])
    save_config(cfg, "runs/x/config.yaml")   # the resolved config; loads back to an equal one

A YAML file holds only what differs from the defaults below. An unknown key, a value of the wrong
type or an impossible value is a `ConfigError` whose message names the key (and the file or the
override it came from).
"""
from __future__ import annotations

from crate_mae.config.loading import (add_config_args, config_from_args, config_help, config_to_dict, load_config,
                                      save_config)
from crate_mae.config.sections import (FUNCTION_FIELDS, Config, ConfigError, DataConfig, FinetuneConfig, ModelConfig,
                                       OptimConfig, ProbeConfig, RunConfig)

__all__ = ["FUNCTION_FIELDS", "Config", "ConfigError", "DataConfig", "FinetuneConfig", "ModelConfig", "OptimConfig", "ProbeConfig",
           "RunConfig", "add_config_args", "config_from_args", "config_help", "config_to_dict", "load_config",
           "save_config"]
