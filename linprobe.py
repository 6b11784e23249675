"""Linear probing of a pretrained CRATE-MAE encoder: logistic regression on frozen features (or MAE's protocol).

    python linprobe.py                                               # the demo run's encoder on the digits
    python linprobe.py --set probe.checkpoint=null                   # the same with a random encoder: the baseline
    python linprobe.py --checkpoint crate_mae_base.pth --config configs/linprobe/cifar10.yaml
    torchrun --nproc_per_node=8 linprobe.py --config configs/linprobe/imagenet_mae.yaml --checkpoint ENC.pth
"""
import sys
from pathlib import Path

from crate_mae.cli import stage_main

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "linprobe" / "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, doc=__doc__, default_config=DEFAULT_CONFIG, config="linprobe",
                      stage="crate_mae.stages.linear_probe:run_linprobe",
                      shortcuts={"--checkpoint": ("probe.checkpoint", "pretrained weights to probe")})


if __name__ == "__main__":
    sys.exit(main())
