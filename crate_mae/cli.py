"""The command line shared by pretrain.py, linprobe.py and finetune.py: parse → config → run the stage.

Each stage takes `--config FILE` and `--set KEY=VALUE ...` (every key listed in `--help`), plus a few
shortcut flags for the keys users set most. An expected failure, one of the project's own error types
(`crate_mae.errors.CrateError`), ends through `errors.report` as every command line's does: one line `error: ...`
and exit status 2 for a bad config or argument (as argparse's own usage errors), 1 for the rest (bad data, a missing
or mismatched checkpoint, a non-finite loss, a run folder in use, a full disk). A run stopped by a preemption signal
(`run.preempt_signals`) or Ctrl-C saves a checkpoint at a step boundary and ends with one line `stopped: ...` and
exit status 75 ("resumable": EX_TEMPFAIL), or 130 after Ctrl-C (crate_mae/engine/preempt.py); a signal outside the
training loop stops at once, with the same line and status. Anything else (an error raised inside torch, timm or
scikit-learn, or a bug of ours) keeps its traceback, so that it shows where it came from.
"""
from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

from crate_mae.config import add_config_args, config_from_args
from crate_mae.engine.preempt import StopSignals
from crate_mae.errors import CrateError, StopNow, report


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
    module, function = stage.split(":")
    try:
        cfg = config_from_args(args)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("timm").setLevel(logging.WARNING)  # timm's "Loading pretrained weights ..." notes
        with StopSignals(cfg.run.preempt_signals, grace=cfg.run.preempt_grace,
                         run_dir=Path(cfg.run.out_dir) / cfg.run.name):
            getattr(importlib.import_module(module), function)(cfg)
    except (CrateError, StopNow) as err:  # Preempted: stopped at a step; StopNow: a signal outside the training loop
        return report(err)
    return 0
