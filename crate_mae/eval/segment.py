"""The runner behind `python -m crate_mae.eval {voc-seg,maskcut}`: a model loaded from a name or a file, a data set
walked in batches with a progress bar, a partial file saved every K images for a rerun to go on from, results as
JSON and a figure. The measures themselves are the core's: `heads.layer_view`, `voc.head_masks` / `voc.VOCScore`,
`maskcut.maskcut` / `maskcut.to_pixels`, `coco.results` / `coco.evaluate`.

Legend: B images, H heads, (h, w) the token grid, S the square side the images are resized to, ℓ a layer.

Choices made here (each said again where it is made):

- images are resized to S × S whatever their aspect (DINO's and MaskCut's square resize): VOC images bicubic and
  their labels nearest, so the score is at S × S pixels; COCO images LANCZOS (CutLER's), and the masks come back to
  each image's own size (`to_pixels`), where COCO's annotations are;
- `--layers`: the last by default; the headline is the deepest layer scored (the paper's figures are the last
  layer's);
- `--save-masks` writes the masks of **one** head for every image: the paper's best head is chosen per image and
  class with the ground truth, which a prediction must not use, so the head written is the one with the best mIoU
  over the whole set when used alone (a per-head VOCScore of the headline layer), labelled 1 on a 0 background;
- resuming: the partial file `<out>.partial.json` holds the settings, the images done (a prefix of the split / of
  the ascending ids) and the state (VOCScore.to_dict per layer; MaskCut's predictions per layer). A rerun with the
  same settings goes on after them; with other settings it stops with one line naming the first setting that
  differs (`--restart` discards the file). It is removed once the whole set is scored and written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import textwrap
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError

from crate_mae.atomic import atomic_path
from crate_mae.engine.dist import resolve_device
from crate_mae.errors import (CheckpointError, ConfigError, DataError, InputError, MissingFileError, RunFolderError,
                              StopNow, INTERRUPTED_EXIT)
from crate_mae.eval.heads import layer_view, layer_views, num_layers
from crate_mae.eval.voc import (DIGIT_CLASSES, PAPER_FIGURES, VOC_CLASSES, VOCScore, head_masks, read_pair,
                                read_split, save_label_png, upsample, write_demo_voc)

T = TypeVar("T")
PARTIAL_VERSION = 1
# The emergence paper's Table 1 (arXiv 2308.16271 v1), MaskCut on COCO val2017, class-agnostic, × 100: detection
# (box) and segmentation (mask). Our reading of its columns is AP50, AP75, AP (AP ≤ AP50 only holds that way round).
MASKCUT_PAPER_FIGURES: dict[str, dict[str, dict[str, float]]] = {
    "crate_small_21k_patch8": {"bbox": {"AP50": 2.9, "AP75": 1.0, "AP": 1.1},
                               "segm": {"AP50": 1.8, "AP75": 0.7, "AP": 0.8}},
    "crate_base_21k_patch8": {"bbox": {"AP50": 2.9, "AP75": 1.0, "AP": 1.3},
                              "segm": {"AP50": 2.2, "AP75": 0.7, "AP": 1.0}},
    "vit_base_patch8_224.dino": {"bbox": {"AP50": 5.1, "AP75": 2.3, "AP": 2.5},
                                 "segm": {"AP50": 4.1, "AP75": 1.3, "AP": 1.8}},
}


# --- the model -----------------------------------------------------------------------------------------------------

class Loaded(NamedTuple):
    """A model ready to be read (eval mode, on its device) and what the results say about it."""

    model: nn.Module
    what: str  # for people: "crate_small_21k_patch8 (small_21k.pth)", "runs/demo/encoder.pth"
    name: str | None  # the --model name, for the paper's figures; None for a --checkpoint
    identity: dict[str, Any]  # for the partial file: the name, the file's path, size and modification time
    slug: str  # the default output folder's name


def _file_identity(path: str) -> dict[str, Any]:
    """A weight file as a partial run remembers it: a rewritten file (a longer training) is another model."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _need_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        raise MissingFileError(f"{path}: no such {what}")


def _timm_model(name: str, weights: str | None) -> nn.Module:
    """A timm model of `name` for `layer_view`: a VisionTransformer with `dynamic_img_size=True` (any S the patch
    divides); its weights only from `weights` (timm's own loading: its checkpoint filter resamples the position
    table), never downloaded. A model without the attention layer_view reads is refused before any weight is read."""
    import timm

    # num_classes=0: no head is read, so a backbone file (DINO's) and a classifier's both load (timm drops the
    # file's head when the class counts differ)
    try:
        fresh = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # no dynamic_img_size keyword: not a ViT, so nothing layer_view can read
        fresh = timm.create_model(name, pretrained=False, num_classes=0)
    try:
        num_layers(fresh)
    except InputError as err:
        raise InputError(f"--model {name}: {err}") from None
    if weights is None:
        return fresh.eval()
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights}, num_classes=0,
                                  dynamic_img_size=True)
    except Exception as err:  # a pickle error, a key or shape that does not fit: timm's messages span lines
        text = " ".join(str(err).split())
        text = text if len(text) <= 240 else text[:237] + "..."
        raise CheckpointError(f"{weights}: does not load into {name} ({type(err).__name__}: {text})") from None
    return model.eval()


def load_model(*, model_name: str | None, weights: str | None, checkpoint: str | None,
               variant: str | None) -> Loaded:
    """The model of the command line: `--checkpoint FILE` (the viz commands' loader, `crate_mae.viz.inputs`), or
    `--model NAME` with `--weights FILE` (ours through timm's registry and the one loader; a timm ViT through
    timm), fresh weights without a file. Every failure is one line."""
    from crate_mae.model.timm_models import MODELS  # importing it registers our names with timm
    from crate_mae.viz import inputs

    if (model_name is None) == (checkpoint is None):
        raise ConfigError("give --model NAME (with --weights FILE) or --checkpoint FILE, one of the two")
    if checkpoint is not None:
        if weights is not None:
            raise ConfigError("--weights goes with --model; a --checkpoint is the weights already")
        _need_file(checkpoint, "checkpoint file")
        model = inputs.load_model(checkpoint=checkpoint, variant=variant)
        path = Path(checkpoint)
        return Loaded(model, str(checkpoint), None, {"checkpoint": _file_identity(checkpoint)},
                      f"{path.resolve().parent.name}-{path.stem}")
    if variant is not None:
        raise ConfigError("--variant goes with --checkpoint; a --model name fixes its size")
    if weights is not None:
        _need_file(weights, "weights file")
    if model_name in MODELS:
        model = inputs.load_model(model_name=model_name, pretrained_file=weights,
                                  whole_mae=MODELS[model_name].kind == "mae")
    else:
        import timm

        if not timm.is_model(model_name):
            raise InputError(f"--model {model_name}: neither one of ours (crate_*: {', '.join(list(MODELS)[:4])}, "
                             f"...) nor a timm model")
        model = _timm_model(model_name, weights)
    num_layers(model)  # ours always have attention; said here rather than at the first batch
    what = f"{model_name} ({Path(weights).name})" if weights else f"{model_name} (fresh weights)"
    identity = {"model": model_name, "weights": _file_identity(weights) if weights else None}
    return Loaded(model.eval(), what, model_name, identity, model_name.replace("/", "_"))


def patch_size(model: nn.Module) -> tuple[int, int]:
    """(ph, pw) of one of our models or a timm ViT."""
    if hasattr(model, "patch_embed") and hasattr(model.patch_embed, "patch_size") and not isinstance(
            model.patch_embed.patch_size, int):
        return tuple(model.patch_embed.patch_size)  # timm: a pair
    p = int(model.patch_size)
    return p, p


def check_size(model: nn.Module, size: int) -> None:
    ph, pw = patch_size(model)
    if size < max(ph, pw) or size % ph or size % pw:
        raise ConfigError(f"--img-size {size}: the patch ({ph}x{pw}) must divide it")


def parse_layers(spec: str, depth: int) -> list[int]:
    """`--layers`: "last", "all", or "0,5,-1" → absolute indices in 0..depth-1, each once, in the order given."""
    spec = spec.strip().lower()
    if spec == "last":
        return [depth - 1]
    if spec == "all":
        return list(range(depth))
    out: list[int] = []
    for part in spec.split(","):
        try:
            layer = int(part)
        except ValueError:
            raise ConfigError(f"--layers {spec}: 'last', 'all' or a comma list of integers") from None
        if not -depth <= layer < depth:
            raise ConfigError(f"--layers {spec}: layer {layer} is out of range; the model has {depth} layers "
                              f"(0..{depth - 1}, or negative from the end)")
        if layer % depth not in out:
            out.append(layer % depth)
    return out


def check_common(args: argparse.Namespace) -> None:
    """The checks every command shares, before anything is read."""
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: at least one image")
    if args.save_every < 1:
        raise ConfigError(f"--save-every {args.save_every}: at least one image")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: at least one image")
    if args.img_size < 1:
        raise ConfigError(f"--img-size {args.img_size}: a positive side")


# --- walking a data set --------------------------------------------------------------------------------------------

def prefetched(chunks: Sequence[Sequence[T]], load: Callable[[T], Any]) -> Iterator[list[Any]]:
    """`[load(x) for x in chunk]` for each chunk in order, the next chunk loaded in a thread while the caller works on
    this one (PIL decodes and resizes without the GIL). An error of `load` comes out where its chunk would."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(lambda c: [load(x) for x in c], chunks[0]) if chunks else None
        for i in range(len(chunks)):
            current = ahead.result()
            ahead = pool.submit(lambda c: [load(x) for x in c], chunks[i + 1]) if i + 1 < len(chunks) else None
            yield current


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def progress(total: int, initial: int, desc: str) -> Any:
    """tqdm's bar on stderr, shown on a terminal only (a log file gets no carriage-return updates, and an error's
    one line stays the only line)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", file=sys.stderr, disable=None,
                dynamic_ncols=True, leave=False)


def to_uint8(image: Image.Image, size: int, resample: Image.Resampling) -> torch.Tensor:
    """A PIL image → uint8 (3, S, S) RGB, resized to the square whatever its aspect."""
    array = np.asarray(image.convert("RGB").resize((size, size), resample))
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


# --- the partial file ----------------------------------------------------------------------------------------------

def partial_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.partial.json")


def write_json(path: Path, data: Any, *, compact: bool = False) -> None:
    """`data` as JSON, atomically (whole or absent, as every file we write); NaN written as null (COCO's -1).
    `compact`: one line (predictions and partial states, which can be megabytes), else indented for reading."""
    text = json.dumps(_no_nan(data), indent=None if compact else 1, allow_nan=False,
                      separators=(",", ":") if compact else None)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def _no_nan(data: Any) -> Any:
    if isinstance(data, float) and math.isnan(data):
        return None
    if isinstance(data, dict):
        return {k: _no_nan(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_no_nan(v) for v in data]
    return data


def read_partial(path: Path, settings: dict[str, Any], restart: bool) -> dict[str, Any] | None:
    """The partial state saved by an earlier run with the same `settings`, or None (no file, or `restart`). Other
    settings are one line naming the first that differs: the file is the earlier run's work, never dropped silently."""
    if restart or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        old = saved["settings"]
        done = int(saved["done"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: not a readable partial results file ({type(err).__name__}); "
                        f"--restart replaces it") from None
    if saved.get("version") != PARTIAL_VERSION or old != settings:
        key = next((k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)), "version")
        raise RunFolderError(f"{path}: a partial run with other settings ({key}: {_short(old.get(key))} there, "
                             f"{_short(settings.get(key))} now); --restart replaces it, or give another --out")
    print(f"resuming: {done} image{'s' if done != 1 else ''} done already ({path})")
    return saved


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def default_out(out: str | None, slug: str, name: str) -> Path:
    return Path(out) if out else Path("runs") / "eval" / slug / name


# --- voc-seg -------------------------------------------------------------------------------------------------------

@dataclass
class VOCState:
    """What a VOC run has scored: a prefix `done` of the image names, per layer a VOCScore, and for the headline
    layer one VOCScore per head (each head's masks alone), to find the head best over the whole set."""

    scores: dict[int, VOCScore]
    heads: list[VOCScore] = field(default_factory=list)
    done: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON, every accumulator cut to the `done` images (an interrupt may land inside a batch)."""
        def cut(score: VOCScore) -> dict[str, Any]:
            state = score.to_dict()
            state["records"] = state["records"][:self.done]
            return state

        return {"done": self.done, "scores": {str(k): cut(s) for k, s in self.scores.items()},
                "heads": [cut(s) for s in self.heads]}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> VOCState:
        try:
            scores = {int(k): VOCScore.from_dict(v) for k, v in saved["scores"].items()}
            heads = [VOCScore.from_dict(v) for v in saved["heads"]]
            return cls(scores, heads, int(saved["done"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"not a voc-seg partial state ({type(err).__name__}: {err}); --restart replaces it") \
                from None


class VOCItem(NamedTuple):
    image: torch.Tensor  # uint8 (3, S, S)
    label: torch.Tensor  # int64 (S, S) class indices, 255 void
    size: tuple[int, int]  # (H, W) of the original


def voc_item(root: Path, name: str, size: int, num_classes: int) -> VOCItem:
    """One VOC pair at S × S: the image bicubic, the label nearest (class indices must stay indices)."""
    rgb, label = read_pair(root, name, num_classes)
    image = to_uint8(Image.fromarray(rgb.permute(1, 2, 0).numpy()), size, Image.Resampling.BICUBIC)
    small = Image.fromarray(label.numpy().astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    return VOCItem(image, torch.from_numpy(np.asarray(small).astype(np.int64)), tuple(label.shape))


@dataclass
class VOCProtocol:
    """The settings of one VOC scoring, what the results and the partial file record."""

    img_size: int
    layers: list[int]
    rule: str = "mass"
    keep: float = 0.6
    background: bool = False
    class_names: tuple[str, ...] = VOC_CLASSES

    @property
    def headline(self) -> int:
        return max(self.layers)

    def record(self) -> dict[str, Any]:
        return {"img_size": self.img_size, "resize": "square; images bicubic, labels nearest",
                "layers": self.layers, "headline_layer": self.headline, "rule": self.rule, "keep": self.keep,
                "background": self.background, "classes": list(self.class_names),
                "score": "per image and class the best head's IoU (void left out); mIoU = 100 · mean over images "
                         "of the mean over their classes"}

    def new_score(self) -> VOCScore:
        return VOCScore(background=self.background, class_names=self.class_names)


def score_voc(model: nn.Module, root: Path, names: Sequence[str], protocol: VOCProtocol, *, batch: int,
              device: torch.device, state: VOCState | None = None, limit: int | None = None,
              save: Callable[[VOCState], None] | None = None, save_every: int = 50, desc: str = "voc-seg") -> VOCState:
    """Score `names` from `state.done` on (up to `limit` images in all): per batch, each layer's CLS attention
    (B, H, h, w) → `head_masks` → VOCScore.add at S × S. `save(state)` every `save_every` images and on Ctrl-C,
    which then ends in StopNow (exit 130)."""
    state = state or VOCState({layer: protocol.new_score() for layer in protocol.layers})
    end = min(len(names), limit or len(names))
    chunks = chunked(list(names[state.done:end]), batch)
    size, num_classes = protocol.img_size, len(protocol.class_names)
    last_saved = state.done
    with progress(end, state.done, desc) as bar:
        try:
            for items in prefetched(chunks, lambda name: voc_item(root, name, size, num_classes)):
                images = torch.stack([it.image for it in items]).to(device)
                labels = torch.stack([it.label for it in items]).to(device)
                views = layer_views(model, images, list(protocol.layers))  # every layer from one pass
                for layer in protocol.layers:
                    masks = head_masks(views[layer].cls_attention, protocol.keep, protocol.rule)
                    state.scores[layer].add(masks, labels)  # nearest-upsampled to S × S inside
                    if layer == protocol.headline:
                        if not state.heads:
                            state.heads = [protocol.new_score() for _ in range(masks.shape[1])]
                        for k, score in enumerate(state.heads):
                            score.add(masks[:, k:k + 1], labels)
                state.done += len(items)
                bar.update(len(items))
                miou = state.scores[protocol.headline].result()["miou"]
                bar.set_postfix_str(f"mIoU {miou:.1f}" if miou is not None else "")
                if save is not None and state.done - last_saved >= save_every:
                    save(state)
                    last_saved = state.done
        except KeyboardInterrupt:
            if save is None:
                raise StopNow(f"interrupted after {state.done} of {len(names)} images", exit_status=INTERRUPTED_EXIT) \
                    from None
            save(state)
            raise StopNow(f"interrupted after {state.done} of {len(names)} images, which the partial file holds: "
                          f"the same command goes on from there", exit_status=INTERRUPTED_EXIT) from None
    if save is not None and state.done > last_saved:
        save(state)
    return state


def best_single_head(state: VOCState) -> tuple[int, float] | None:
    """(head, mIoU) of the head whose masks alone score best over the images done; None before any class."""
    scored = [(s.result()["miou"], k) for k, s in enumerate(state.heads)]
    scored = [(m, k) for m, k in scored if m is not None]
    if not scored:
        return None
    miou, head = max(scored, key=lambda t: (t[0], -t[1]))  # the first head of equal scores
    return head, miou


def voc_results(state: VOCState, protocol: VOCProtocol) -> dict[str, Any]:
    """Per layer VOCScore.result(); the headline layer also with its best single head."""
    layers = {str(layer): state.scores[layer].result() for layer in protocol.layers}
    best = best_single_head(state)
    layers[str(protocol.headline)]["best_single_head"] = (
        {"head": best[0], "miou": best[1], "per_head": [s.result()["miou"] for s in state.heads]} if best else None)
    return layers


def head_mask_images(model: nn.Module, images: torch.Tensor, layer: int, head: int,
                     protocol: VOCProtocol) -> torch.Tensor:
    """Head `head`'s thresholded mask at `layer` for images (B, 3, S, S): bool (B, h, w)."""
    return head_masks(layer_view(model, images, layer).cls_attention, protocol.keep, protocol.rule)[:, head]


def save_masks(model: nn.Module, root: Path, names: Sequence[str], protocol: VOCProtocol,
               records: Sequence[Sequence[tuple[int, float, int]]], folder: Path, *, batch: int,
               device: torch.device) -> None:
    """One palette PNG per image, `folder/<name>.png` at the image's own size, in VOC's label indices: the masks the
    headline layer's score was taken from, each ground-truth class's best head (`records`, VOCScore's (class, IoU,
    head) per image) nearest-upsampled and painted with that class; 0 elsewhere (a later class over an earlier one
    where two overlap). The heads are chosen with the ground truth, as the protocol chooses them: these are the
    scored masks, for re-scoring with another tool, not a prediction."""
    size, num_classes = protocol.img_size, len(protocol.class_names)
    done = 0
    with progress(len(names), 0, "masks") as bar:
        for items, chunk in zip(prefetched(chunked(list(names), batch),
                                           lambda name: voc_item(root, name, size, num_classes)),
                                chunked(list(names), batch)):
            images = torch.stack([it.image for it in items]).to(device)
            masks = head_masks(layer_view(model, images, protocol.headline).cls_attention, protocol.keep,
                               protocol.rule)  # (B, H, h, w)
            for name, item, heads, record in zip(chunk, items, masks, records[done:done + len(items)]):
                label = torch.zeros(item.size, dtype=torch.uint8)
                for cls, _, head in record:
                    label[upsample(heads[head][None, None], item.size)[0, 0].cpu()] = cls
                save_label_png(folder / f"{name}.png", label)
            done += len(items)
            bar.update(len(items))
    print(f"{len(names)} masks of layer {protocol.headline} in VOC's label indices (each class's best head): "
          f"{folder}/")


def layers_figure(curves: dict[str, dict[int, float | None]], path: Path, *, title: str,
                  paper: float | None = None) -> None:
    """mIoU against the layer, one line per model (`curves`: label → {layer: mIoU}), the paper's figure dashed."""
    from crate_mae.viz.plot import FigureSink, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, curve in curves.items():
        points = sorted((k, v) for k, v in curve.items() if v is not None)
        ax.plot([k for k, _ in points], [v for _, v in points], "o-", label=label)
    if paper is not None:
        ax.axhline(paper, color="grey", linestyle="--", linewidth=1, label=f"paper: {paper}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mIoU (best head per image and class)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    FigureSink().save(fig, path, "voc-seg")


def print_voc(results: dict[str, Any], protocol: VOCProtocol, paper: float | None) -> None:
    for layer in protocol.layers:
        r = results[str(layer)]
        miou = "-" if r["miou"] is None else f"{r['miou']:.1f}"
        line = f"  layer {layer:2d}: mIoU {miou:>5s}  ({r['images']} images, {r['skipped']} without a class)"
        if layer == protocol.headline:
            line += "   <- headline" + (f" (paper: {paper})" if paper is not None else "")
            best = r["best_single_head"]
            if best:
                line += f"; best single head over the set: {best['head']}, {best['miou']:.1f}"
        print(line)
    per_class = results[str(protocol.headline)]["per_class"]
    text = ", ".join(f"{name} {'-' if v is None else f'{v:.1f}'}" for name, v in per_class.items())
    print(textwrap.fill(f"per class IoU, layer {protocol.headline}: {text}", width=118, subsequent_indent="    "))


def run_voc(args: argparse.Namespace) -> int:
    """`voc-seg --root ...`: the module docstring's protocol on a VOC-layout folder."""
    check_common(args)
    if args.root is None:
        raise ConfigError("voc-seg needs --root VOCdevkit/VOC2012 (or --demo)")
    if not 0 < args.keep <= 1:
        raise ConfigError(f"--keep {args.keep}: a share in (0, 1]")
    root = Path(args.root)
    names = read_split(root, args.split)  # a missing split file: one line, before the model is loaded
    device = resolve_device(args.device)
    loaded = load_model(model_name=args.model, weights=args.weights, checkpoint=args.checkpoint, variant=args.variant)
    check_size(loaded.model, args.img_size)
    model = loaded.model.to(device)
    protocol = VOCProtocol(args.img_size, parse_layers(args.layers, num_layers(model)), args.rule, args.keep,
                           args.background, DIGIT_CLASSES if args.classes == "digits" else VOC_CLASSES)
    out = default_out(args.out, loaded.slug, f"voc-{args.split}-{args.img_size}px.json")
    partial = partial_path(out)
    settings = {"command": "voc-seg", **loaded.identity, "root": str(root.resolve()), "split": args.split,
                "images": len(names), "names_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest(),
                **{k: v for k, v in protocol.record().items() if k not in ("resize", "score")}}
    saved = read_partial(partial, settings, args.restart)
    state = VOCState.from_dict(saved) if saved else None

    def save(s: VOCState) -> None:
        write_json(partial, {"version": PARTIAL_VERSION, "settings": settings, **s.to_dict()}, compact=True)

    start = time.perf_counter()
    print(f"voc-seg {loaded.what}: {root} {args.split}, {len(names)} images at {args.img_size} px, layers "
          f"{','.join(map(str, protocol.layers))}, {args.rule} {args.keep:g}")
    state = score_voc(model, root, names, protocol, batch=args.batch, device=device, state=state, limit=args.limit,
                      save=save, save_every=args.save_every)
    complete = state.done == len(names)
    paper = PAPER_FIGURES.get(loaded.name) if loaded.name else None
    results = voc_results(state, protocol)
    headline = results[str(protocol.headline)]
    record = {"command": "voc-seg", "model": loaded.what, "source": loaded.identity,
              "data": {"root": str(root), "split": args.split, "images": len(names), "scored": state.done,
                       "complete": complete},
              "protocol": protocol.record(), "layers": results,
              "headline": {"layer": protocol.headline, "miou": headline["miou"], "paper": paper},
              "seconds": round(time.perf_counter() - start, 1)}
    write_json(out, record)
    print_voc(results, protocol, paper)
    if len(protocol.layers) > 1:
        layers_figure({loaded.what: {k: results[str(k)]["miou"] for k in protocol.layers}}, out.with_suffix(".png"),
                      title=f"{loaded.what}: VOC {args.split} ({state.done} images), {args.img_size} px", paper=paper)
    print(out)
    if not complete:
        print(f"scored {state.done} of {len(names)} images ({partial}); the same command without --limit goes on")
        if args.save_masks:
            print("no mask written yet: they are written once the whole set is scored")
        return 0
    if args.save_masks:
        save_masks(model, root, names, protocol, state.scores[protocol.headline].records, Path(args.save_masks),
                   batch=args.batch, device=device)
    partial.unlink(missing_ok=True)
    return 0


# --- voc-seg --demo ------------------------------------------------------------------------------------------------

DEMO_CHECKPOINT = "runs/demo/encoder.pth"


def run_demo(args: argparse.Namespace) -> int:
    """`voc-seg --demo`: the digits written in VOC's layout (a temporary folder), the demo run's encoder against a
    randomly initialised model of the same config (seeded), at the model's own image size, every layer."""
    from crate_mae.config import ClassifierConfig
    from crate_mae.model.hub import create_model

    check_common(args)
    if args.model is not None or args.weights is not None or args.root is not None:
        raise ConfigError("--demo takes --checkpoint (default runs/demo/encoder.pth), not --model, --weights or --root")
    if args.demo_images < 1:
        raise ConfigError(f"--demo-images {args.demo_images}: at least one image")
    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    if not Path(checkpoint).is_file():
        raise MissingFileError(f"{checkpoint}: no such file; run `python pretrain.py` first (the demo run writes it)"
                               if args.checkpoint is None else f"{checkpoint}: no such checkpoint file")
    device = resolve_device(args.device)
    trained, cfg = create_model(ClassifierConfig(variant=args.variant), checkpoint)
    torch.manual_seed(args.seed)
    random, _ = create_model(cfg)  # the same config, fresh weights
    size = cfg.img_size
    protocol = VOCProtocol(size, list(range(num_layers(trained))), args.rule, args.keep, args.background,
                           DIGIT_CLASSES)
    path = Path(checkpoint)
    out = default_out(args.out, f"{path.resolve().parent.name}-{path.stem}", "voc-demo.json")
    print(f"voc-seg --demo: {args.demo_images} digits at {size} px (the model's size), every layer, {args.rule} "
          f"{args.keep:g}; {checkpoint} against a random model of its shape (seed {args.seed})")
    with tempfile.TemporaryDirectory(prefix="voc-demo-") as tmp:
        root = Path(tmp)
        names = write_demo_voc(root, args.demo_images, size=size)
        states = {}
        for label, model in (("trained", trained), ("random", random)):
            states[label] = score_voc(model.eval().to(device), root, names, protocol, batch=args.batch,
                                      device=device, limit=args.limit, desc=f"demo, {label}")
        results = {label: voc_results(state, protocol) for label, state in states.items()}
        heads = {label: best_single_head(state) for label, state in states.items()}
        for layer in protocol.layers:
            t, r = (results[k][str(layer)]["miou"] for k in ("trained", "random"))
            print(f"  layer {layer}: trained {_num(t)} | random init {_num(r)}")
        h = str(protocol.headline)
        trained_miou, random_miou = results["trained"][h]["miou"], results["random"][h]["miou"]
        print(f"trained ({checkpoint}), layer {h}: mIoU {_num(trained_miou)}")
        print(f"random init (same shape, seed {args.seed}), layer {h}: mIoU {_num(random_miou)}")
        demo_masks_figure(root, names[:6], protocol, {"trained": trained, "random init": random},
                          {"trained": heads["trained"], "random init": heads["random"]}, device,
                          out.with_name(f"{out.stem}-masks.png"))
    write_json(out, {"command": "voc-seg --demo", "checkpoint": _file_identity(checkpoint), "seed": args.seed,
                     "data": {"set": "scikit-learn's digits in VOC's layout (write_demo_voc)",
                              "images": len(names)},
                     "protocol": protocol.record(), "trained": results["trained"], "random": results["random"],
                     "headline": {"layer": protocol.headline, "trained": trained_miou, "random": random_miou}})
    layers_figure({f"trained ({path.name})": {k: results["trained"][str(k)]["miou"] for k in protocol.layers},
                   f"random init (seed {args.seed})": {k: results["random"][str(k)]["miou"] for k in protocol.layers}},
                  out.with_suffix(".png"), title=f"digits in VOC's layout, {len(names)} images, {size} px")
    print(out)
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def demo_masks_figure(root: Path, names: Sequence[str], protocol: VOCProtocol, models: dict[str, nn.Module],
                      heads: dict[str, tuple[int, float] | None], device: torch.device, path: Path) -> None:
    """A few images: image | ground truth (every class, void out) | each model's mask of its best single head at
    the headline layer."""
    from crate_mae.viz.plot import FigureSink, image_rows_figure, show_mask

    items = [voc_item(root, name, protocol.img_size, len(protocol.class_names)) for name in names]
    images = torch.stack([it.image for it in items])
    truth = [(it.label > 0) & (it.label != 255) for it in items]
    masks = {}
    for label, model in models.items():
        head = heads[label][0] if heads[label] else 0
        grid = head_mask_images(model, images.to(device), protocol.headline, head, protocol).cpu()
        masks[label] = (upsample(grid[:, None], images.shape[-2:])[:, 0], head)

    def gt(ax: Any, i: int) -> None:
        show_mask(ax, images[i], truth[i], title="ground truth")

    def column(label: str) -> Callable[[Any, int], None]:
        def draw(ax: Any, i: int) -> None:
            show_mask(ax, images[i], masks[label][0][i], title=f"{label}, head {masks[label][1]}")
        return draw

    fig = image_rows_figure(images, list(names), [gt, *(column(label) for label in models)],
                            title=f"layer {protocol.headline}: the head best over the set", size=1.6)
    FigureSink().save(fig, path, "voc-seg/demo")


# --- maskcut -------------------------------------------------------------------------------------------------------

def coco_item(folder: Path, entry: Any, size: int) -> torch.Tensor:
    """One COCO image at S × S (LANCZOS, CutLER's), RGB whatever its mode (val2017 has grey ones); a missing file,
    an unreadable one or one of another size than its annotations say is one line."""
    path = folder / entry.file_name
    if not path.is_file():
        raise MissingFileError(f"{path}: image {entry.id} of the annotations is missing")
    try:
        with Image.open(path) as img:
            if img.size != (entry.width, entry.height):
                raise DataError(f"{path}: {img.size[0]}x{img.size[1]} (WxH) but the annotations say "
                                f"{entry.width}x{entry.height}")
            return to_uint8(img, size, Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image ({err})".splitlines()[0]) from None


def maskcut_batch(model: nn.Module, images: torch.Tensor, entries: Sequence[Any], layers: Sequence[int], *,
                  objects: int, tau: float) -> dict[int, list[dict]]:
    """Per layer, the COCO results of a batch: features (B, N, d) → maskcut (B, K, h, w) → each image's masks at
    its own size (H, W) → entries in cut order."""
    from crate_mae.eval.coco import results
    from crate_mae.eval.maskcut import maskcut, to_pixels

    out: dict[int, list[dict]] = {}
    views = layer_views(model, images, list(layers))  # every layer from one pass
    for layer in layers:
        view = views[layer]
        masks = maskcut(view.features, view.grid, objects=objects, tau=tau)
        out[layer] = [r for entry, m in zip(entries, masks)
                      for r in results(entry.id, to_pixels(m, (entry.height, entry.width)))]
    return out


def run_maskcut(args: argparse.Namespace) -> int:
    """`maskcut`: MaskCut of each image (ascending id) at each layer; class-agnostic COCO AP of box and mask."""
    from crate_mae.eval.coco import coco_from, evaluate, images as coco_images, load_coco

    check_common(args)
    if args.images is None or args.annotations is None:
        raise ConfigError("maskcut needs --images FOLDER and --annotations FILE.json")
    if args.objects < 1:
        raise ConfigError(f"--objects {args.objects}: at least one cut")
    if not -1 <= args.tau < 1:
        raise ConfigError(f"--tau {args.tau}: a threshold on the cosine must be in [-1, 1)")
    coco = load_coco(args.annotations)  # pycocotools, then the file: one line each, before the model is loaded
    folder = Path(args.images)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such image folder")
    entries = coco_images(coco)
    if not entries:
        raise DataError(f"{args.annotations}: lists no images")
    device = resolve_device(args.device)
    loaded = load_model(model_name=args.model, weights=args.weights, checkpoint=args.checkpoint, variant=args.variant)
    check_size(loaded.model, args.img_size)
    model = loaded.model.to(device)
    layers = parse_layers(args.layers, num_layers(model))
    headline = max(layers)
    out = default_out(args.out, loaded.slug, f"maskcut-{Path(args.annotations).stem}-{args.img_size}px.json")
    partial = partial_path(out)
    protocol = {"img_size": args.img_size, "resize": "square, LANCZOS", "objects": args.objects, "tau": args.tau,
                "affinity": "cosine", "crf": False, "layers": layers, "headline_layer": headline,
                "score": "1.0 per mask; class-agnostic COCOeval"}
    ids = [e.id for e in entries]
    settings = {"command": "maskcut", **loaded.identity, "images": str(folder.resolve()),
                "annotations": str(Path(args.annotations).resolve()), "count": len(ids),
                "ids_sha1": hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest(),
                **{k: v for k, v in protocol.items() if k not in ("resize", "score")}}
    saved = read_partial(partial, settings, args.restart)
    done = int(saved["done"]) if saved else 0
    predictions: dict[int, list[dict]] = {layer: [] for layer in layers}
    if saved:
        try:
            predictions = {int(k): list(v) for k, v in saved["predictions"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{partial}: not a maskcut partial state ({type(err).__name__}); --restart replaces it") \
                from None

    def save() -> None:
        write_json(partial, {"version": PARTIAL_VERSION, "settings": settings, "done": done,
                             "predictions": {str(k): v for k, v in predictions.items()}}, compact=True)

    start = time.perf_counter()
    print(f"maskcut {loaded.what}: {len(entries)} images at {args.img_size} px, layers "
          f"{','.join(map(str, layers))}, {args.objects} objects, tau {args.tau:g}, no CRF")
    end = min(len(entries), args.limit or len(entries))
    last_saved = done
    with progress(end, done, "maskcut") as bar:
        try:
            for items, chunk in zip(prefetched(chunked(entries[done:end], args.batch),
                                               lambda e: coco_item(folder, e, args.img_size)),
                                    chunked(entries[done:end], args.batch)):
                found = maskcut_batch(model, torch.stack(items).to(device), chunk, layers, objects=args.objects,
                                      tau=args.tau)
                for layer in layers:  # a batch counts whole or not at all: the state changes only here
                    predictions[layer].extend(found[layer])
                done += len(chunk)
                bar.update(len(chunk))
                if done - last_saved >= args.save_every:
                    save()
                    last_saved = done
        except KeyboardInterrupt:
            save()
            raise StopNow(f"interrupted after {done} of {len(entries)} images, which {partial} holds: the same "
                          f"command goes on from there", exit_status=INTERRUPTED_EXIT) from None
    if done > last_saved:
        save()
    complete = done == len(entries)
    gt = coco
    if not complete:  # score the images done only: the others' objects are not missed, they are not looked at yet
        kept = set(ids[:done])
        gt = coco_from({**coco.dataset, "images": [i for i in coco.dataset["images"] if i["id"] in kept],
                        "annotations": [a for a in coco.dataset["annotations"] if a["image_id"] in kept]})
    per_layer = {}
    for layer in layers:
        per_layer[str(layer)] = {"bbox": evaluate(gt, predictions[layer], "bbox"),
                                 "segm": evaluate(gt, predictions[layer], "segm"),
                                 "predictions": len(predictions[layer])}
    paper = MASKCUT_PAPER_FIGURES.get(loaded.name) if loaded.name else None
    pick = ("AP", "AP50", "AP75")
    record = {"command": "maskcut", "model": loaded.what, "source": loaded.identity,
              "data": {"images": str(folder), "annotations": str(args.annotations), "count": len(entries),
                       "scored": done, "complete": complete},
              "protocol": protocol, "layers": per_layer,
              "headline": {"layer": headline, **{t: {k: per_layer[str(headline)][t][k] for k in pick}
                                                for t in ("bbox", "segm")}, "paper": paper},
              "seconds": round(time.perf_counter() - start, 1)}
    if args.save_predictions:
        target = Path(args.save_predictions)
        for layer in layers:
            path = target if len(layers) == 1 else target.with_name(f"{target.stem}-layer{layer}{target.suffix}")
            write_json(path, predictions[layer], compact=True)
            print(path)
    write_json(out, record)
    for layer in layers:
        r = per_layer[str(layer)]
        text = " | ".join(f"{'box' if t == 'bbox' else 'mask'} " + " ".join(f"{k} {_num(_nan(r[t][k]))}" for k in pick)
                          for t in ("bbox", "segm"))
        mark = "   <- headline" if layer == headline else ""
        print(f"  layer {layer:2d}: {text}  ({r['predictions']} masks){mark}")
    if paper:
        print("  paper (Table 1): " + " | ".join(
            f"{'box' if t == 'bbox' else 'mask'} " + " ".join(f"{k} {paper[t][k]}" for k in pick) for t in paper))
    print(out)
    if not complete:
        print(f"scored {done} of {len(entries)} images ({partial}); the same command without --limit goes on")
        return 0
    partial.unlink(missing_ok=True)
    return 0


def _nan(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value
