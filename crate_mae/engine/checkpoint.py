"""Checkpoints: atomic saves, the last K kept, exact resume, architecture checks, encoder export.

A run folder holds `ckpt-<step>.pth` every run.ckpt_every steps (the last run.keep_last kept),
`final.pth` at the end, and `encoder.pth` (the pretrained encoder alone, for probing and fine-tuning).
A checkpoint holds the model, optimiser, schedule, scaler, the position (step, epoch, micro-batch in
the epoch), every rank's RNG states and the resolved config; everything loads with weights_only=True.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from crate_mae.atomic import atomic_path
from crate_mae.config import FUNCTION_FIELDS, ConfigError, ModelConfig

# Fields a resume must match: those that change the function, and the image size the data is cut to.
RESUME_FIELDS = (*FUNCTION_FIELDS, "img_size")
_PERIODIC = re.compile(r"ckpt-(\d+)\.pth$")


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save through a temp file and a rename: a crash mid-write leaves the old file intact."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint dict, read with weights_only=True; a clear error naming the file otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as err:
        raise ValueError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})".split("\n")[0]) from None


def periodic(run_dir: str | Path) -> list[Path]:
    """The run's periodic checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("ckpt-*.pth") if (m := _PERIODIC.search(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    """What `--resume auto` continues from: final.pth if the run finished, else the newest periodic one."""
    final = Path(run_dir) / "final.pth"
    if final.exists():
        return final
    found = periodic(run_dir)
    return found[-1] if found else None


def prune(run_dir: str | Path, keep_last: int) -> None:
    for path in periodic(run_dir)[: max(0, len(periodic(run_dir)) - keep_last)]:
        path.unlink(missing_ok=True)


def saved_model_config(path: str | Path) -> dict[str, Any]:
    """The `model` section saved in one of our run checkpoints; read memory-mapped, so the tensors stay on disk."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file (mmap needs one): read it whole, with the usual errors
        state = load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    saved = (state.get("config") or {}).get("model") if isinstance(state, dict) else None
    if saved is None:
        raise ValueError(f"{path}: holds no config, so the run it belongs to cannot be checked")
    return {"family": "mae", **saved}  # files from before the supervised family are CRATE-MAEs


def resolve_for_resume(cfg: ModelConfig, path: str | Path | None) -> ModelConfig:
    """The model config of a run: resolved against the checkpoint it resumes from (unset fields take the run's
    values; a set one that differs is an error naming it), or from the defaults for a fresh run."""
    if path is None:
        return cfg.resolve()
    saved = saved_model_config(path)
    try:
        return cfg.resolve(saved, check=RESUME_FIELDS)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def check_arch(ckpt: dict[str, Any], cfg: ModelConfig, path: str | Path) -> None:
    """A checkpoint must be of the configured (resolved) architecture; the first field that differs is named."""
    saved = (ckpt.get("config") or {}).get("model")
    if saved is None:
        raise ValueError(f"{path}: holds no config, so its architecture cannot be checked")
    try:
        cfg.resolve({"family": "mae", **saved}, check=RESUME_FIELDS)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder side of a CrateMAE state dict: what a CrateClassifier loads."""
    from crate_mae.model.convert import MAE_ONLY_PREFIXES

    return {k: v for k, v in model_state.items() if not k.startswith(MAE_ONLY_PREFIXES)}


def export_encoder(ckpt: dict[str, Any], path: str | Path, *, whole: bool = False) -> None:
    """Write `{"model": encoder tensors, "config": the run's config}` (loadable with weights_only=True), or with
    `whole` every model tensor; a `.safetensors` path writes that format, the config in its metadata."""
    state = ckpt["model"] if whole else encoder_state(ckpt["model"])
    if str(path).endswith(".safetensors"):
        from crate_mae.model.hub import save_safetensors

        save_safetensors(state, ckpt.get("config"), path)
    else:
        save(path, {"model": state, "config": ckpt.get("config")})


def resume_path(run_dir: Path, resume: str | None) -> Path | None:
    """What to continue from: None for a fresh run. A fresh run never overwrites one that has checkpoints."""
    if resume == "auto":
        return latest(run_dir)
    if resume:
        return Path(resume)
    if latest(run_dir) is not None:
        raise FileExistsError(f"{run_dir} holds checkpoints already: --resume auto continues that run, "
                              f"--set run.name=NAME starts another")
    return None


def restore(trainer: Any, path: Path, cfg: Any, d: Any, batches_per_epoch: int) -> dict[str, Any]:
    """Load a run checkpoint into `trainer` (model, optimiser, schedule, scaler, position) and this rank's RNG.

    Returns the checkpoint, for what a stage keeps besides (an EMA, the best accuracy).
    """
    from crate_mae.engine.dist import set_rng_state

    state = load(path)
    check_arch(state, cfg.model, path)
    trainer.load_state_dict(state)
    if len(state.get("rng", [])) == d.world_size:  # the same ranks: every generator continues exactly
        set_rng_state(state["rng"][d.rank])
    if trainer.state.batch_in_epoch >= batches_per_epoch:  # saved at an epoch's last batch
        trainer.state.epoch, trainer.state.batch_in_epoch = trainer.state.epoch + 1, 0
    return state


def save_training(path: Path, trainer: Any, cfg: Any, d: Any, *, keep_last: int | None = None,
                  extra: dict[str, Any] | None = None) -> None:
    """Collective: every rank's RNG state is gathered, rank 0 writes the checkpoint (and prunes old ones).

    Never after a non-finite loss: `trainer.check_finite()` raises first.
    """
    from crate_mae.config import config_to_dict
    from crate_mae.engine.dist import all_gather_object, barrier, rng_state

    trainer.check_finite()
    rngs = all_gather_object(d, rng_state())
    if d.is_main:
        save(path, {**trainer.state_dict(), "rng": rngs, "config": config_to_dict(cfg), **(extra or {})})
        if keep_last is not None:
            prune(path.parent, keep_last)
    barrier(d)


def main(argv: list[str] | None = None) -> int:
    """`python -m crate_mae.engine.checkpoint export CKPT OUT [--whole]`: the encoder (or, with --whole, every
    tensor) of any run checkpoint, as .pth or, for an OUT ending in .safetensors, as safetensors."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m crate_mae.engine.checkpoint", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the encoder alone (loads with weights_only=True)")
    export.add_argument("checkpoint")
    export.add_argument("out", help="OUT.pth, or OUT.safetensors (the config goes into its metadata)")
    export.add_argument("--whole", action="store_true", help="every tensor (a CRATE-MAE's decoder too), not the encoder")
    args = parser.parse_args(argv)
    try:
        export_encoder(load(args.checkpoint), args.out, whole=args.whole)
    except (OSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{args.out}: {'all tensors' if args.whole else 'encoder'} of {args.checkpoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
