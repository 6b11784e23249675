"""`python -m crate_mae.eval {voc-seg,maskcut}`: the emergence paper's two segmentation measures of any model.

voc-seg: coarse segmentation on PASCAL VOC12 from each head's thresholded CLS attention, the best head per image and
class (arXiv 2308.16271 Fig. 4b, after DINO); `--demo` runs it offline on the bundled digits, the demo run's encoder
against a random one of its shape. maskcut: MaskCut (n objects, τ, no CRF) on COCO with the patch affinity,
class-agnostic box and mask AP (Table 1). Models: --model NAME (ours, crate_*, or a timm ViT) with --weights FILE
(without: fresh weights), or --checkpoint FILE (any file the one loader reads). Results: a JSON file (--out, default
runs/eval/<model>/...), a figure of the score against the layer when several layers are scored; a partial file
beside it is saved every --save-every images, and the same command run again goes on from it. An expected failure
ends in one line `error: ...`, exit status 2 for an argument out of its range, 1 for the rest.
"""
from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "voc-seg": "VOC12 mIoU of the best head's thresholded CLS attention, per layer (or --demo on the digits)",
    "maskcut": "MaskCut's objects from the patch affinity on COCO, class-agnostic box and mask AP per layer",
}


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a name: ours (crate_small_21k_patch8, crate_mae_encoder_base, "
                                   "crate_alpha_base_patch16, ...) or a timm ViT (vit_small_patch8_224.dino, ...)")
    p.add_argument("--weights", metavar="FILE", help="with --model: its weights, any layout (without: fresh weights; "
                                                     "nothing is downloaded)")
    p.add_argument("--checkpoint", metavar="FILE", help="instead of --model: a file the one loader reads "
                                                        "(encoder.pth, final.pth, a released file, ...)")
    p.add_argument("--variant", help="with --checkpoint: the size row of a file without a config")
    p.add_argument("--layers", default="last",
                   help="last (default), all, or a comma list of encoder layers (negative: from the end)")
    p.add_argument("--img-size", type=int, default=480, help="the square side images are resized to (default 480, "
                                                             "as DINO and MaskCut; the patch must divide it)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", metavar="FILE.json", help="the results (default runs/eval/<model>/<command>-...json)")
    p.add_argument("--save-every", type=int, default=50, metavar="K",
                   help="save the partial results every K images, for a rerun to go on from (default 50)")
    p.add_argument("--restart", action="store_true", help="ignore (and replace) a partial results file")
    p.add_argument("--limit", type=int, metavar="N",
                   help="stop after the first N images (the partial file keeps them; rerun without it to go on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crate_mae.eval", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    voc = sub.add_parser("voc-seg", help=COMMANDS["voc-seg"], description=COMMANDS["voc-seg"] + (
        ". Images resized to a square (bicubic), labels likewise (nearest); each head's map keeps the fewest "
        "patches holding --keep of its attention (DINO's rule) or the top --keep of them (--rule entries), "
        "nearest-upsampled to the pixels; per image and class the best head's IoU, void pixels left out; mIoU = "
        "mean over images of the mean over their classes."))
    voc.add_argument("--root", help="VOCdevkit/VOC2012 (ImageSets/Segmentation, JPEGImages, SegmentationClass)")
    voc.add_argument("--split", default="val", help="ImageSets/Segmentation/<split>.txt (default val: 1,449 images)")
    _model_options(voc)
    voc.add_argument("--batch", type=int, default=8, help="images per forward pass (default 8)")
    voc.add_argument("--rule", choices=("mass", "entries"), default="mass",
                     help="mass: DINO's (default); entries: the paper's literal top share of the patches")
    voc.add_argument("--keep", type=float, default=0.6, help="the share a mask keeps (default 0.6)")
    voc.add_argument("--background", action="store_true", help="score class 0 (background) as a class too")
    voc.add_argument("--classes", choices=("voc", "digits"), default="voc",
                     help="class names: VOC's 21 (default) or the digits demo set's 11")
    voc.add_argument("--save-masks", metavar="DIR",
                     help="write, for the deepest scored layer, one palette PNG per image at its size in VOC's label "
                          "indices: each ground-truth class's best head's mask painted with that class (the masks "
                          "the score was taken from, for re-scoring), 0 elsewhere")
    voc.add_argument("--demo", action="store_true",
                     help="offline: the digits in VOC's layout, runs/demo/encoder.pth (or --checkpoint) against a "
                          "random model of its shape, at its image size, every layer")
    voc.add_argument("--demo-images", type=int, default=50, help="with --demo: how many digits (default 50)")
    voc.add_argument("--seed", type=int, default=0, help="with --demo: the random model's seed (default 0)")
    mc = sub.add_parser("maskcut", help=COMMANDS["maskcut"], description=COMMANDS["maskcut"] + (
        ". Images in ascending id, resized to a square (LANCZOS, as MaskCut); cosine affinity of the layer's "
        "patch features (CRATE: W = U·LN(z); ViT: the keys) binarised at --tau; --objects normalised cuts; masks "
        "nearest-upsampled to each image's own size; score 1 each; no CRF."))
    mc.add_argument("--images", help="the folder of the annotations' file_name entries (val2017/)")
    mc.add_argument("--annotations", help="COCO instances JSON (instances_val2017.json); scored class-agnostic")
    _model_options(mc)
    mc.add_argument("--batch", type=int, default=1,
                    help="images per pass (default 1: each cut holds a few N × N float64 matrices per image)")
    mc.add_argument("--objects", type=int, default=3, help="cuts per image (default 3)")
    mc.add_argument("--tau", type=float, default=0.15, help="affinity threshold on the cosine (default 0.15)")
    mc.add_argument("--save-predictions", metavar="FILE.json",
                    help="the COCO results (one layer: this file; several: <name>-layer<ℓ>.json each)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from crate_mae.errors import CrateError, StopNow, report  # after parsing: --help imports no torch

    try:
        from crate_mae.eval import segment

        if args.command == "voc-seg":
            return segment.run_demo(args) if args.demo else segment.run_voc(args)
        return segment.run_maskcut(args)
    except (CrateError, StopNow) as err:
        return report(err)


if __name__ == "__main__":
    sys.exit(main())
