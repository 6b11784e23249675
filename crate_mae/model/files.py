"""Weight files in and out: `read_checkpoint`, the one reader of every weight or run file, and the exports.

    ckpt = read_checkpoint("runs/demo/final.pth")   # Checkpoint: our key names, layout, saved config, shapes, payload
    latest("runs/demo")                             # what --resume auto continues from: final.pth, else ckpt-*.pth
    export_encoder(ckpt.state, ckpt.config, "runs/demo/encoder.safetensors")   # the encoder, the config in its metadata

Files: ours (`final.pth`, `ckpt-*.pth`, `best.pth`, `encoder.pth`, a `.safetensors` export with the config in its
metadata), the released CRATE-MAE, the released supervised CRATE (`{"state_dict": ...}`, `module.` prefixes) and
the emergence notebooks' files (`{"model": ...}`), all read with `weights_only=True`. The family comes from the
keys, the sizes from the shapes; our files also carry the config they were written with. A run checkpoint's other
entries (optimiser, scaler, position, RNG states, a stage's own) stay in `Checkpoint.payload`, for a resume.

    python -m crate_mae.model.files export CKPT OUT [--whole]

writes the encoder (or every tensor) of any run checkpoint as `.pth` or `.safetensors`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from crate_mae.atomic import atomic_path, atomic_write
from crate_mae.errors import CheckpointError, CrateError, MissingFileError
from crate_mae.model.convert import MAE_ONLY_PREFIXES, Layout, layout_of, to_ours, unwrap

SAFETENSORS_CONFIG_KEY = "crate_mae_config"  # the metadata entry of our .safetensors exports
_PERIODIC = re.compile(r"ckpt-(\d+)\.pth$")  # a run's periodic checkpoints (engine/checkpoint.py writes them)


@dataclass(frozen=True)
class Checkpoint:
    """A weight file, read: its tensors under our key names, and what it says about the model and the run."""

    path: str
    state: dict[str, torch.Tensor]  # the model's tensors, our key names
    layout: Layout
    config: dict[str, Any] | None  # our files' whole saved config (sections model, data, optim, run, ...); else None
    shapes: dict[str, Any]  # what the tensors tell: family, dim, depths, patch_size (img_size for learned tables)
    num_classes: int | None  # classes of the head it holds (0: its norm without a Linear); None: no head (a CRATE-MAE
    # or an encoder)
    payload: Mapping[str, Any] = field(default_factory=dict)  # a run checkpoint's entries (optimizer, state, rng, ...)

    @property
    def saved_model(self) -> dict[str, Any] | None:
        """The `model` section our files were written with (None for released files). Files written before the
        supervised family existed name no family: they are CRATE-MAEs."""
        if self.config is None or not isinstance(self.config.get("model"), Mapping):
            return None
        return {"family": "mae", **self.config["model"]}

    @property
    def has_decoder(self) -> bool:
        return any(k.startswith("decoder.") for k in self.state)

    def describe(self) -> str:
        """'our CRATE-MAE encoder', 'a released supervised CRATE', ..."""
        if self.layout.family == "supervised":
            what = "supervised CRATE"
        else:
            name = "CRATE-MAE" if self.layout.family == "mae" else "CRATE-α"
            what = ("CRATE-α MAE" if self.layout.family == "alpha" else name) if self.has_decoder else \
                f"{name} " + ("classifier" if self.num_classes else "encoder")
        return f"our {what}" if self.layout.source == "ours" else f"a released {what}"


def _load(path: str) -> tuple[Any, dict[str, Any] | None]:
    """(the stored object, the config a .safetensors export carries). A `.pth` in torch's zip format is memory-mapped:
    its tensors are read from disk when used, so a resume or a config check costs no second copy in memory."""
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such checkpoint file")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            config = json.loads(meta[SAFETENSORS_CONFIG_KEY]) if SAFETENSORS_CONFIG_KEY in meta else None
            return tensors, config
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), None
        except RuntimeError as err:  # torch's legacy (non-zip) format cannot be mapped: read it whole
            if "zip" not in str(err).lower() and "mmap" not in str(err).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as err:  # pickle errors, a zip that is not a checkpoint, a truncated file, bad JSON
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})".splitlines()[0]) from None


def _count_layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def shapes_of(state: Mapping[str, torch.Tensor], family: str) -> dict[str, Any]:
    """The model fields a state dict (our names) tells by its shapes alone; heads, λ and η it cannot tell."""
    out: dict[str, Any] = {"family": family}
    if "cls_token" in state:
        out["dim"] = int(state["cls_token"].shape[-1])
    if (depth := _count_layers(state, "encoder.layers.")):
        out["encoder_depth"] = depth
    if (depth := _count_layers(state, "decoder.layers.")):
        out["decoder_depth"] = depth
    if family in ("mae", "alpha") and "patch_embed.proj.weight" in state:
        out["patch_size"] = int(state["patch_embed.proj.weight"].shape[-1])
    elif family == "supervised" and "patch_embed.pre_norm.weight" in state:
        out["patch_size"] = int(round((state["patch_embed.pre_norm.weight"].shape[0] / 3) ** 0.5))
    if "pos.table" in state and "patch_size" in out:
        side = int(round((state["pos.table"].shape[1] - 1) ** 0.5))
        out["img_size"] = side * out["patch_size"]
    return out


def periodic(run_dir: str | Path) -> list[Path]:
    """A run folder's periodic checkpoints (`ckpt-<step>.pth`), oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("ckpt-*.pth") if (m := _PERIODIC.search(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    """What `--resume auto` continues from: final.pth if the run finished, else the newest periodic checkpoint."""
    final = Path(run_dir) / "final.pth"
    if final.exists():
        return final
    found = periodic(run_dir)
    return found[-1] if found else None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A weight or run file of any supported layout, read once, its tensors renamed to ours; errors name the file."""
    stored, config = _load(str(path))
    return checkpoint_of(stored, str(path), config)


def checkpoint_of(stored: Any, path: str, config: dict[str, Any] | None = None) -> Checkpoint:
    """What `read_checkpoint` makes of a loaded object (a state dict, bare or wrapped, or a run file's dict), under the
    name `path`: its tensors renamed to ours (the one conversion, `convert.to_ours`), its layout, config and shapes.
    `config`: a .safetensors export's (a run file carries its own under "config")."""
    if isinstance(stored, Mapping) and isinstance(stored.get("config"), Mapping):
        config = dict(stored["config"])
    try:
        raw = unwrap(stored)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    try:
        layout, state = layout_of(raw), to_ours(raw)
    except ValueError as err:
        if config is None or not isinstance(stored.get("model"), Mapping):
            raise CheckpointError(f"{path}: {err}") from None
        # a run checkpoint of a model around a CRATE (the linear probe's): its tensors as saved, for a resume
        family = (config.get("model") or {}).get("family") or "mae"
        layout, state = Layout("ours", family, "config"), raw
    head = state.get("head.weight")
    # a head's classes; 0 for a classifier saved without its Linear (num_classes=0: the head's norm alone)
    classes = int(head.shape[0]) if head is not None else 0 if "fc_norm.weight" in state else None
    payload = {k: v for k, v in stored.items() if k not in ("model", "config")} if "model" in stored else {}
    return Checkpoint(path, state, layout, config, shapes_of(state, layout.family), classes, payload)


def saved_size(obj: Any) -> int:
    """About the bytes `torch.save(obj)` writes: each tensor's storage once (a view saves its whole storage), with
    its zip record (header, 64-byte alignment), and a margin for the pickled rest; for a full disk's message."""
    seen: set[tuple[str, int]] = set()
    total = 64 << 10

    def walk(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            try:
                storage = value.untyped_storage()
                key = (str(storage.device), storage.data_ptr())
            except (RuntimeError, NotImplementedError):  # a layout without one storage (sparse): its own bytes
                total += value.element_size() * value.nelement() + 192
                return
            if key not in seen:
                seen.add(key)
                total += storage.nbytes() + 192
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            total += 8 * len(value)  # an RNG state is a list of thousands of ints
            for item in value:
                walk(item)

    walk(obj)
    return total


def save(path: str | Path, payload: Mapping[str, Any]) -> None:
    """torch.save through a temp file and a rename: a crash mid-write leaves the old file intact. torch writes into
    our file object, so that a full disk, a quota or a read-only folder is told by the system's own error, as a
    one-line `WriteError` naming the file (torch writing to a path would say `RuntimeError: ... unexpected pos`)."""
    with atomic_write(path, needed=saved_size(payload)) as f:
        torch.save(dict(payload), f)


def save_safetensors(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, path: str | os.PathLike) -> None:
    """A `.safetensors` export of a state dict (our key names), with the run's config (JSON) in its metadata, so
    that `read_checkpoint` checks it as it checks our `.pth` files. Written atomically; a failed write is a one-line
    `WriteError` (safetensors writes by path and tells the system's error only in its text: `(os error 28)`)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in unwrap(state).items()}
    metadata = {SAFETENSORS_CONFIG_KEY: json.dumps(dict(config))} if config else None
    needed = sum(t.nbytes for t in tensors.values()) + 256 * len(tensors) + len(json.dumps(metadata or {})) + 8
    with atomic_path(path, needed=needed) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as err:
            if (code := re.search(r"\(os error (\d+)\)", str(err))) is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from err


def encoder_state(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder side of a CrateMAE state dict: what a CrateClassifier loads."""
    return {k: v for k, v in model_state.items() if not k.startswith(MAE_ONLY_PREFIXES)}


def export_encoder(model_state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, path: str | Path, *,
                   whole: bool = False) -> None:
    """Write `{"model": encoder tensors, "config": the run's config}` (loadable with weights_only=True), or with
    `whole` every model tensor; a `.safetensors` path writes that format, the config in its metadata."""
    state = dict(model_state) if whole else encoder_state(model_state)
    config = dict(config) if config is not None else None
    if str(path).endswith(".safetensors"):
        save_safetensors(state, config, path)
    else:
        save(path, {"model": state, "config": config})


def main(argv: list[str] | None = None) -> int:
    """`python -m crate_mae.model.files export CKPT OUT [--whole]`: the encoder (or, with --whole, every tensor) of
    any run checkpoint, as .pth or, for an OUT ending in .safetensors, as safetensors."""
    import argparse

    from crate_mae.errors import report

    parser = argparse.ArgumentParser(prog="python -m crate_mae.model.files", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the encoder alone (loads with weights_only=True)")
    export.add_argument("checkpoint")
    export.add_argument("out", help="OUT.pth, or OUT.safetensors (the config goes into its metadata)")
    export.add_argument("--whole", action="store_true", help="every tensor (a CRATE-MAE's decoder too), not the encoder")
    args = parser.parse_args(argv)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        export_encoder(ckpt.state, ckpt.config, args.out, whole=args.whole)
    except CrateError as err:
        return report(err)
    print(f"{args.out}: {'all tensors' if args.whole else 'encoder'} of {args.checkpoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
