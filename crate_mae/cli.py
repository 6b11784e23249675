"""The command line shared by pretrain.py, linprobe.py and finetune.py: parse → config → run the stage.

Each stage takes `--config FILE` and `--set KEY=VALUE ...` (every key listed in `--help`), plus a few
shortcut flags for the keys users set most. Expected failures, the project's own error types
(`crate_mae.errors.CrateError`: bad data, a missing or mismatched checkpoint, a non-finite loss, a run folder in use)
end with one line `error: ...` and exit status 1; a bad config exits with status 2. Anything else (an error raised
inside torch, timm or scikit-learn, or a bug of ours) keeps its traceback, so that it shows where it came from.
A run stopped by a preemption signal (`run.preempt_signals`) or Ctrl-C saves a checkpoint at a step boundary and
ends with one line `stopped: ...` and exit status 75 ("resumable": EX_TEMPFAIL), or 130 after Ctrl-C
(crate_mae/engine/preempt.py).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from crate_mae.config import ConfigError, add_config_args, config_from_args
from crate_mae.engine.preempt import Preempted, StopNow, StopSignals
from crate_mae.errors import CrateError


def stage_main(argv: list[str] | None, *, doc: str, default_config: str, stage: str, config: str,
               shortcuts: dict[str, tuple[str, str]]) -> int:
    """Run `stage` ("module:function", imported after parsing so `--help` is fast) on the parsed config of kind
    `config` ("pretrain", "linprobe", "finetune": the sections that stage reads).

    `shortcuts` maps a flag ("--resume") to (config key, help): `--resume auto` = `--set run.resume=auto`.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog="examples:\n" + doc.split("\n\n")[1])
    add_config_args(parser, default_config=default_config, stage=config)
    for flag, (key, help_text) in shortcuts.items():
        parser.add_argument(flag, dest=key, metavar=key.rsplit(".", 1)[1].upper(), help=f"{help_text} (= --set {key}=...)")
    args = parser.parse_args(argv)
    for key in shortcuts.values():
        if getattr(args, key[0]) is not None:
            args.overrides.append([f"{key[0]}={getattr(args, key[0])}"])
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("timm").setLevel(logging.WARNING)  # timm's "Loading pretrained weights from state dict" notes

    module, function = stage.split(":")
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    try:
        with StopSignals(cfg.run.preempt_signals, grace=cfg.run.preempt_grace, run_dir=run_dir):
            getattr(importlib.import_module(module), function)(cfg)
    except Preempted as err:  # stopped at a step boundary on request, a checkpoint saved there
        print(f"stopped: {err}", file=sys.stderr)
        return err.exit_status
    except StopNow as err:  # a signal outside the training loop
        print(f"stopped: {err}", file=sys.stderr)
        return err.exit_status
    except CrateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
