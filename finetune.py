"""Fine-tune a pretrained CRATE-MAE encoder as a CRATE classifier (or train one from scratch).

    python finetune.py                                                # the digits demo, from runs/demo/encoder.pth
    python finetune.py --checkpoint runs/NAME/encoder.pth --config configs/finetune/cifar10_base.yaml
    torchrun --nproc_per_node=8 finetune.py --config configs/finetune/imagenet_base.yaml
    python finetune.py --config configs/finetune/supervised_base.yaml   # supervised CRATE-B with Lion
"""
import sys
from pathlib import Path

from crate_mae.cli import stage_main

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "finetune" / "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, doc=__doc__, default_config=DEFAULT_CONFIG, config="finetune",
                      stage="crate_mae.stages.finetune:run_finetune",
                      shortcuts={"--checkpoint": ("finetune.checkpoint", "pretrained weights to start from"),
                                 "--resume": ("run.resume", "'auto' (the run's latest checkpoint) or a checkpoint")})


if __name__ == "__main__":
    sys.exit(main())
