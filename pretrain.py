"""Masked pretraining of CRATE-MAE.

    python pretrain.py                                   # the bundled demo (once the training loop lands)
    python pretrain.py --config configs/pretrain/imagenet_base.yaml --set optim.lr=1e-4

The training engine (data, loop, checkpoints) is the next milestone; today this entry point resolves
the config and builds the model it would train, then says so and stops.
"""
from __future__ import annotations

import argparse
import sys

from crate_mae.config import ConfigError, add_config_args, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser, default_config="configs/pretrain/demo.yaml")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")

    from crate_mae.model import build_mae  # after argument parsing: `--help` stays fast

    model = build_mae(cfg.model)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    m = cfg.model
    print(f"config {args.config}: CRATE-MAE '{m.variant}' d={m.dim} heads={m.heads} "
          f"layers={m.encoder_depth}+{m.decoder_depth} {m.img_size}px/patch {m.patch_size}, {params:,} parameters")
    print("pretraining is not available yet: the data pipeline and training engine are the next milestones "
          "(see the README's roadmap). The model, configs and checkpoint conversion work today.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
