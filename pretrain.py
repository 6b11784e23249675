"""Masked pretraining of CRATE-MAE.

    python pretrain.py                                               # the bundled digits demo, on the CPU
    python pretrain.py --config configs/pretrain/cifar10_small.yaml --set optim.epochs=400
    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain/imagenet_base.yaml
    python pretrain.py --config runs/NAME/config.yaml --resume auto   # continue a run where it stopped
"""
import sys
from pathlib import Path

from crate_mae.cli import stage_main

# Found from wherever the command runs (the stage writes shards/ and runs/ in the current folder).
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "pretrain" / "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, doc=__doc__, default_config=DEFAULT_CONFIG, config="pretrain",
                      stage="crate_mae.stages.pretrain:run_pretrain",
                      shortcuts={"--resume": ("run.resume", "'auto' (the run's latest checkpoint) or a checkpoint")})


if __name__ == "__main__":
    sys.exit(main())
