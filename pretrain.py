"""Masked pretraining of CRATE-MAE.

    python pretrain.py                                               # the bundled digits demo, on the CPU
    python pretrain.py --config configs/pretrain/cifar10_small.yaml --set optim.epochs=400
    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain/imagenet_base.yaml
    python pretrain.py --config runs/NAME/config.yaml --resume auto   # continue a run where it stopped
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from crate_mae.config import ConfigError, add_config_args, config_from_args


# Found from wherever the command runs (the demo writes shards/ and runs/ in the current folder).
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "pretrain" / "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="examples:\n" + __doc__.split("\n\n")[1])
    add_config_args(parser, default_config=DEFAULT_CONFIG)
    parser.add_argument("--resume", metavar="auto|PATH", help="continue from the run's latest checkpoint, or this one "
                        "(the same as --set run.resume=...)")
    args = parser.parse_args(argv)
    if args.resume:
        args.overrides.append([f"run.resume={args.resume}"])
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from crate_mae.data import DataError, ShardError  # after parsing: `--help` stays fast
    from crate_mae.engine.loop import NonFiniteLoss
    from crate_mae.pretraining import run_pretrain

    try:
        run_pretrain(cfg)
    except (ShardError, DataError, NonFiniteLoss, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
