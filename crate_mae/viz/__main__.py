"""`python -m crate_mae.viz {recon,attention,pca,ncut,layers}`: figures and numbers from a model and some images.

Models: --checkpoint FILE (ours: final.pth / ckpt-*.pth, encoder.pth, a fine-tuned classifier, a .safetensors
export; released: the CRATE-MAE, the supervised CRATE, the emergence notebooks' files, sizes from their shapes), or
--model TIMM_NAME with --pretrained-file FILE (any of those; without it, fresh weights). Images: files, folders,
glob patterns, or one shard spec; the first --n, resized and centre-cropped to --size. Output: --out names the
main figure (a .png) or a folder; per-image files go beside it; --tensorboard DIR writes the same figures there.
An expected failure ends in one line `error: ...` and exit status 2 for an argument out of its range, 1 for the rest
(crate_mae/errors.py: `report`).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from crate_mae.engine.dist import resolve_device
from crate_mae.errors import ConfigError, CrateError, InputError, report
from crate_mae.viz import inputs
from crate_mae.viz.attention import MSSAView, heads_figure, masks_grid_figure, mass_masks, most_attended, mssa_view
from crate_mae.viz.measures import layer_measures, layers_figure
from crate_mae.viz.ncut import ncut_figure, normalized_cut
from crate_mae.viz.pca import pca_figure, pca_segments
from crate_mae.viz.plot import FigureSink, to_pixels
from crate_mae.viz.recon import reconstruction_figure

COMMANDS = {
    "recon": "original | masked | reconstruction | + visible patches, with each loss (a CRATE-MAE)",
    "attention": "each head's CLS attention of one layer and its thresholded mask, over the image",
    "pca": "one PCA of a layer's patch features over all images: foreground and parts",
    "ncut": "the object from the normalised cut of a layer's patch-feature affinity (MaskCut)",
    "layers": "per layer: coding rate before / after MSSA, sparsity of the code (ISTA's output; CRATE-α: ODL's z2)",
}


MAX_NCUT_BYTES = 8 * 2**30  # ncut's dense N × N matrices: about 18,900 tokens per image at most


class Run:
    """One command's inputs, loaded: the model and images on the device, where the figures go."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, images: torch.Tensor, names: list[str]) -> None:
        self.args, self.model, self.images, self.names = args, model, images, names
        self.out = inputs.output_path(args.out, command=args.command, checkpoint=args.checkpoint)
        self.sink = FigureSink(args.tensorboard)
        self.what = Path(args.checkpoint).name if args.checkpoint else args.model + (
            f" ({Path(args.pretrained_file).name})" if args.pretrained_file else " (fresh weights)")

    def view(self) -> MSSAView:
        """The layer's MSSA features and CLS attention, at the chosen stride."""
        return mssa_view(self.model, self.images, self.args.layer, self.args.stride)

    def pixels(self, maps: torch.Tensor, mode: str) -> torch.Tensor:
        """Token maps (B, K, h, w) → (B, K, H, W) at image resolution (`to_pixels`)."""
        return to_pixels(maps.float(), tuple(self.images.shape[-2:]), patch_size=self.model.patch_size,
                         stride=self.args.stride, mode=mode).cpu()

    def title(self, what: str) -> str:
        layer = self.args.layer % len(self.model.encoder.layers)
        return f"{self.what}: layer {layer}, {what}, stride {self.args.stride or self.model.patch_size}"


def recon(run: Run) -> None:
    size, model = run.images.shape[-1], run.model
    noise = torch.rand(run.images.shape[0], model.patch_embed.num_patches(size),
                       generator=torch.Generator().manual_seed(run.args.seed)).to(run.images.device)
    run.sink.save(reconstruction_figure(model, run.images, mask_ratio=run.args.mask_ratio, noise=noise), run.out, "recon")


def attention(run: Run) -> None:
    view, images = run.view(), run.images.cpu()
    heat = run.pixels(view.cls_attention, "bilinear")
    masks = run.pixels(mass_masks(view.cls_attention, run.args.mass), "nearest") > 0.5  # (B, H, H', W')
    for i, name in enumerate(run.names):
        fig = heads_figure(images[i], heat[i], masks[i], mass=run.args.mass, title=f"{name} — " + run.title("CLS attention"))
        run.sink.save(fig, run.out if len(run.names) == 1 else inputs.beside(run.out, name), f"attention/{name}")
    if len(run.names) > 1:
        fig = masks_grid_figure(images, masks, run.names, title=run.title(f"heads' masks, {run.args.mass:.0%} of the mass"))
        run.sink.save(fig, run.out, "attention/grid")


def pca(run: Run) -> None:
    view = run.view()
    seg = pca_segments(view.features, view.grid, most_attended(view.cls_attention), threshold=run.args.threshold)
    first = run.pixels(seg.first[:, None], "bilinear")[:, 0]
    foreground = run.pixels(seg.foreground[:, None], "nearest")[:, 0] > 0.5
    shares = ", ".join(f"{r:.0%}" for r in seg.variance_ratio.tolist())
    fig = pca_figure(run.images.cpu(), first, foreground, run.pixels(seg.parts, "nearest"), run.names,
                     title=run.title(f"PCA of W = U z over {len(run.names)} images (variance {shares})"))
    run.sink.save(fig, run.out, "pca")


def ncut(run: Run) -> None:
    view = run.view()
    seeds = most_attended(view.cls_attention)
    cuts = [normalized_cut(f, int(s), tau=run.args.tau) for f, s in zip(view.features, seeds)]
    masks = torch.stack([m for m, _ in cuts]).view(-1, 1, *view.grid)
    values = torch.stack([x for _, x in cuts]).view(-1, 1, *view.grid)  # the cut x, object side positive
    masks = run.pixels(masks, "nearest")[:, 0] > 0.5  # (B, H, W)
    fig = ncut_figure(run.images.cpu(), run.pixels(values, "bilinear")[:, 0], masks, run.names,
                      title=run.title(f"normalised cut, τ {run.args.tau}"))
    run.sink.save(fig, run.out, "ncut")
    if run.args.save_masks:
        from PIL import Image

        for name, mask in zip(run.names, masks):
            path = inputs.beside(run.out, f"{name}-mask")
            Image.fromarray(mask.numpy().astype("uint8") * 255).save(path)  # 2-D uint8: mode L
            print(path)


def layers(run: Run) -> None:
    from crate_mae.atomic import atomic_path

    rows = layer_measures(run.model, run.images, eps2=run.args.eps2)
    numbers = run.out.with_suffix(".json")
    with atomic_path(numbers) as tmp:
        tmp.write_text(json.dumps(rows, indent=1))
    print(numbers)
    run.sink.save(layers_figure(rows), run.out, "layers")


RUNNERS: dict[str, Callable[[Run], None]] = {"recon": recon, "attention": attention, "pca": pca, "ncut": ncut,
                                            "layers": layers}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crate_mae.viz", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--checkpoint", help="a checkpoint: ours or released, any layout the one loader reads")
        source.add_argument("--model", help="a registered timm name, e.g. crate_small_21k_patch8")
        p.add_argument("--pretrained-file", help="with --model: its weights (without: fresh weights)")
        p.add_argument("--images", required=True, nargs="+", help="image files, folders, globs, or one shard spec")
        p.add_argument("--n", type=int, default=8, help="how many images at most (default: 8)")
        p.add_argument("--variant", help="size row of a checkpoint without a config (default: the row its shapes match)")
        p.add_argument("--size", "--img-size", dest="size", type=int,
                       help="image side (default: the model's; any the patch divides)")
        p.add_argument("--crop-pct", type=float, default=1.0, help="centre crop of the shorter side (default: 1)")
        p.add_argument("--out", help="the figure (.png) or a folder (default: <command>.png next to the checkpoint)")
        p.add_argument("--tensorboard", metavar="DIR", help="also write the figures to this TensorBoard log folder")
        p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
        if name in ("attention", "pca", "ncut"):
            p.add_argument("--layer", type=int, default=-1, help="encoder layer (default: -1, the last)")
            p.add_argument("--stride", type=int, help="patches every s pixels, s < patch for finer maps (default: the patch)")
    sub.choices["recon"].add_argument("--mask-ratio", type=float, default=None, help="default: the model's")
    sub.choices["recon"].add_argument("--seed", type=int, default=0, help="fixes the mask")
    sub.choices["attention"].add_argument("--mass", type=float, default=0.6,
                                          help="masks keep the fewest patches holding this share of a head's attention")
    sub.choices["pca"].add_argument("--threshold", type=float, default=0.0,
                                    help="foreground: 1st component above this, in units of its std (default: 0)")
    sub.choices["ncut"].add_argument("--tau", type=float, default=0.15, help="affinity threshold on the cosine")
    sub.choices["ncut"].add_argument("--save-masks", action="store_true", help="also each mask as a PNG (0/255)")
    sub.choices["layers"].add_argument("--eps2", type=float, default=0.5, help="ε² of the coding rate")
    return parser


def _unique(names: list[str]) -> list[str]:
    """Image names made unique (two folders may hold a.jpg): the second a gets a-1, and so on."""
    seen: Counter[str] = Counter()
    out = []
    for name in names:
        out.append(name if not seen[name] else f"{name}-{seen[name]}")
        seen[name] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.layer, args.stride = getattr(args, "layer", -1), getattr(args, "stride", None)
    if args.pretrained_file and not args.model:
        parser.error("--pretrained-file goes with --model")
    try:
        device = resolve_device(args.device)
        if args.n < 1:
            raise ConfigError(f"--n {args.n}: at least one image")
        if args.command == "attention" and not 0 < args.mass <= 1:
            raise ConfigError(f"--mass {args.mass}: the share of attention a mask keeps must be in (0, 1]")
        if args.command == "ncut" and not -1 <= args.tau < 1:
            raise ConfigError(f"--tau {args.tau}: a threshold on the cosine must be in [-1, 1)")
        model = inputs.load_model(checkpoint=args.checkpoint, model_name=args.model, pretrained_file=args.pretrained_file,
                                  variant=args.variant, img_size=args.size, whole_mae=args.command == "recon")
        size = args.size or model.pos.grid[0] * model.patch_size
        h, w = model.token_grid((size, size), args.stride)  # a stride that does not fit the size: one line, now
        if args.command == "ncut" and 3 * 8 * (h * w) ** 2 > MAX_NCUT_BYTES:  # A, the Laplacian, eigh's work
            raise InputError(f"ncut: {h * w} tokens per image (size {size}, stride {args.stride or model.patch_size}) make a "
                             f"{h * w} × {h * w} affinity of {8 * (h * w) ** 2 / 2**30:.1f} GiB in float64; "
                             f"take a larger --stride or a smaller --size")
        if not -len(model.encoder.layers) <= args.layer < len(model.encoder.layers):
            raise ConfigError(f"--layer {args.layer}: the model has {len(model.encoder.layers)} encoder layers")
        images, names = inputs.load_images(args.images, img_size=size, n=args.n, crop_pct=args.crop_pct)
        run = Run(args, model.to(device), images.to(device), _unique(names))
        try:
            RUNNERS[args.command](run)
        finally:
            run.sink.close()
    except CrateError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
