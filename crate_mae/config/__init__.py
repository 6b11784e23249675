"""Typed configuration for every stage: dataclasses, YAML files, and `--set key=value` overrides.

    cfg = load_config("configs/pretrain/demo.yaml", ["optim.lr=1e-4", "model.variant=small"])   # pretraining's
    cfg = load_config("configs/linprobe/demo.yaml", stage="linprobe")                          # model ... + probe
    save_config(cfg, "runs/x/config.yaml")   # the resolved config; loads back to an equal one

Each stage's config holds only its own sections (`STAGES`). A YAML file holds only what differs from the defaults
(or from the `base: FILE` it names). An unknown key, a value of the wrong
type or an impossible value is a `ConfigError` whose message names the key (and the file or the
override it came from).
"""
from __future__ import annotations

from crate_mae.config.loading import (add_config_args, config_from_args, config_help, config_to_dict, load_config,
                                      save_config)
from crate_mae.config.sections import (FUNCTION_FIELDS, SIZE_FIELDS, STAGES, ClassifierConfig, Config, ConfigError,
                                       DataConfig, FinetuneConfig, MAEConfig, MonitorConfig, PretrainConfig,
                                       PretrainDataConfig,
                                       FinetuneStage, LinearProbeStage, ModelConfig, OptimConfig, PretrainStage,
                                       ProbeConfig, RunConfig)

__all__ = ["FUNCTION_FIELDS", "SIZE_FIELDS", "STAGES", "Config", "PretrainStage", "LinearProbeStage", "FinetuneStage",
           "ConfigError", "DataConfig", "PretrainDataConfig", "FinetuneConfig", "ModelConfig", "MAEConfig",
           "ClassifierConfig", "MonitorConfig", "PretrainConfig", "OptimConfig", "ProbeConfig", "RunConfig", "add_config_args", "config_from_args",
           "config_help", "config_to_dict", "load_config", "save_config"]
