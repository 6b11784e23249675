"""`python -m crate_mae.viz {recon,attention,layers}`: pictures and numbers from a checkpoint and some images.

Checkpoints: ours (final.pth / ckpt-*.pth hold the whole CRATE-MAE and its config; encoder.pth the encoder;
a fine-tuned classifier; a .safetensors export) or a released file (the CRATE-MAE, the supervised CRATE and the
emergence notebooks' models; sizes from its shapes, heads from --variant). Images: a file, a
folder of images, or a shard spec (manifest, pattern); the first --n are used, centre-cropped to the model's size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from crate_mae.config import ModelConfig
from crate_mae.data.transforms import EvalTransform
from crate_mae.model import hub
from crate_mae.viz.attention import cls_attention, overlay_figure
from crate_mae.viz.measures import layer_measures
from crate_mae.viz.recon import reconstruction_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def load_model(path: str, *, variant: str | None, whole_mae: bool, img_size: int | None) -> torch.nn.Module:
    """A CrateMAE (whole_mae) or a classifier of the checkpoint's family, from any file `hub` reads, strictly.

    Sizes come from the checkpoint (its saved config, or its shapes and `variant` for a released file).
    """
    model, _ = hub.create_model(ModelConfig(variant=variant, img_size=img_size), kind="mae" if whole_mae else "classifier",
                                checkpoint=path)
    return model.eval()


def load_images(source: str, *, img_size: int, n: int, crop_pct: float) -> torch.Tensor:
    """The first n images of a file, a folder or a shard spec, as uint8 pixels (n, 3, S, S): model input."""
    transform = EvalTransform(img_size, crop_pct=crop_pct)
    path = Path(source)
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n] if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) there")
        return torch.stack([transform(f.read_bytes()) for f in files])
    from crate_mae.data import eval_loader

    return next(iter(eval_loader(source, transform, batch_size=n, max_bad_fraction=1.0))).images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crate_mae.viz", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("recon", "original | masked | reconstruction | + visible patches, with each loss"),
                            ("attention", "each head's CLS attention over the patch grid, laid over the image"),
                            ("layers", "per layer: coding rate before / after MSSA, sparsity of ISTA's output")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--images", required=True, help="an image, a folder of images, or a shard spec")
        p.add_argument("--n", type=int, default=8 if name != "attention" else 1, help="how many images")
        p.add_argument("--variant", help="size row of a checkpoint without a config (default: the row its shapes match)")
        p.add_argument("--img-size", type=int, help="image side (default: the checkpoint's; any the patch divides)")
        p.add_argument("--crop-pct", type=float, default=1.0, help="centre crop of the shorter side (default: 1)")
        p.add_argument("--out", help="output file (default: <command>.png next to the checkpoint)")
    sub.choices["recon"].add_argument("--mask-ratio", type=float, default=None, help="default: the model's")
    sub.choices["recon"].add_argument("--seed", type=int, default=0, help="fixes the mask")
    sub.choices["attention"].add_argument("--layer", type=int, default=-1, help="encoder layer (default: the last)")
    sub.choices["layers"].add_argument("--eps2", type=float, default=0.5, help="ε² of the coding rate")
    args = parser.parse_args(argv)
    out = Path(args.out or Path(args.checkpoint).with_name(f"{args.command}.png"))
    try:
        model = load_model(args.checkpoint, variant=args.variant, whole_mae=args.command == "recon",
                           img_size=args.img_size)
        size = args.img_size or model.pos.grid[0] * model.patch_embed.patch_size
        images = load_images(args.images, img_size=size, n=args.n, crop_pct=args.crop_pct)
    except (OSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.command == "recon":
        noise = torch.rand(images.shape[0], model.patch_embed.num_patches(size), generator=torch.Generator().manual_seed(args.seed))
        fig = reconstruction_figure(model, images, mask_ratio=args.mask_ratio, noise=noise)
    elif args.command == "attention":
        maps = cls_attention(model, images, layer=args.layer)
        for i in range(images.shape[0]):
            target = out if images.shape[0] == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
            overlay_figure(images[i].float() / 255, maps[i], title=f"layer {args.layer % len(model.encoder.layers)}, "
                           f"CLS attention per head").savefig(target, dpi=120)
            print(target)
        return 0
    else:
        rows = layer_measures(model, images, eps2=args.eps2)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        fig = _layers_figure(rows)
        print(out.with_suffix(".json"))
    fig.savefig(out, dpi=120)
    print(out)
    return 0


def _layers_figure(rows: list[dict]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(layers, [r["rate_before_mssa"] for r in rows], "o-", label="before MSSA")
    left.plot(layers, [r["rate_after_mssa"] for r in rows], "s-", label="after MSSA")
    left.set(xlabel="layer", ylabel="R^c (nats)", title="compression: coding rate against the heads' subspaces")
    left.legend(fontsize=8)
    zeros = right.plot(layers, [r["zero_fraction"] for r in rows], "o-", color="C2", label="fraction of zeros")
    right.set(xlabel="layer", ylabel="fraction of zeros", title="sparsity of ISTA's output")
    twin = right.twinx()
    ratio = twin.plot(layers, [r["l1_over_l2"] for r in rows], "s--", color="C3", label="ℓ1/ℓ2 per token")
    twin.set_ylabel("ℓ1/ℓ2 per token (lower: sparser)")
    right.legend(handles=zeros + ratio, fontsize=8, loc="best")
    for ax in (left, right):
        ax.set_xticks(layers)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
