"""Checkpoints: the Checkpointer (when, what, pruning, atomic and collective saves, exact resume), the resume
path, the architecture check, and the encoder export.

A run folder holds `ckpt-<step>.pth` every run.ckpt_every steps (the last run.keep_last kept),
`final.pth` at the end, and `encoder.pth` (the pretrained encoder alone, for probing and fine-tuning).
A checkpoint holds the model, optimiser, schedule, scaler, the position (step, epoch, micro-batch in
the epoch), every rank's RNG states and the resolved config; everything loads with weights_only=True.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from crate_mae.atomic import atomic_path
from crate_mae.config import FUNCTION_FIELDS, Config, ConfigError, ModelConfig

if TYPE_CHECKING:
    from crate_mae.engine.dist import Dist
    from crate_mae.engine.trainer import Trainer

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
    if (Path(run_dir) / "results.json").exists():  # a finished probe: its figures are never overwritten silently
        raise FileExistsError(f"{run_dir}/results.json exists already: --set run.name=NAME writes another run")
    return None


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """The hidden temp files (`.<name>.<random>.tmp`, crate_mae/atomic.py) that a kill during a write left behind:
    a whole checkpoint's size each at scale. Called by rank 0 when a run starts in its folder."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def schedule_changes(saved_optim: Mapping[str, Any], cfg: Config) -> list[str]:
    """'optim.lr 0.0001 → 0.0002' for every optimiser or schedule key of `cfg` that differs from a checkpoint's."""
    from crate_mae.config import config_to_dict

    now = config_to_dict(cfg)["optim"]
    return [f"optim.{k} {saved_optim[k]!r} → {v!r}" for k, v in now.items() if k in saved_optim and saved_optim[k] != v]


class CheckpointPayload(TypedDict, total=False):
    """What a run checkpoint holds (every value loads with weights_only=True)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    state: dict[str, int]  # TrainState: step, epoch, batch_in_epoch
    rng: list[dict[str, Any]]  # every rank's generators, by rank
    config: dict[str, Any]  # the run's resolved config
    best: dict[str, float]  # fine-tuning: the best accuracy so far
    ema: dict[str, torch.Tensor]  # fine-tuning: the weight EMA


class Checkpointer:
    """When a run saves, what it saves, and what it keeps (as torchtitan's checkpointer owns them).

    After every optimiser step `after_step` writes `ckpt-<step>.pth` every `every` steps (not at the last step:
    `final.pth` follows it) and prunes all but the newest `keep_last` of them. Every save is collective (every
    rank's RNG state is gathered, rank 0 writes atomically) and never holds weights whose loss is not finite
    (`trainer.check_state_finite()` raises first). `extra()` adds a stage's own entries (an EMA, the best accuracy).
    """

    def __init__(self, run_dir: str | Path, *, every: int, keep_last: int, config: Mapping[str, Any], dist: Dist,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.run_dir, self.every, self.keep_last = Path(run_dir), every, keep_last
        self.config, self.dist, self.extra = dict(config), dist, extra
        self.changes: list[str] = []  # schedule keys a resume changed (see restore)

    def after_step(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if step % self.every == 0 and step < trainer.total_steps:
            self.save(trainer, f"ckpt-{step:08d}.pth")

    def save(self, trainer: Trainer, name: str) -> Path:
        """Write `run_dir/name` from every rank's state (collective); periodic files beyond keep_last are pruned."""
        from crate_mae.engine.dist import all_gather_object, barrier, rng_state

        trainer.check_state_finite()  # never a checkpoint of weights whose loss is not finite
        rngs = all_gather_object(self.dist, rng_state())
        path = self.run_dir / name
        if self.dist.is_main:
            payload: CheckpointPayload = {**trainer.state_dict(), "rng": rngs, "config": self.config,
                                          **(self.extra() if self.extra else {})}
            save(path, dict(payload))
            prune(self.run_dir, self.keep_last)
        barrier(self.dist)
        return path

    def restore(self, trainer: Trainer, path: Path, cfg: Config) -> CheckpointPayload:
        """Load a run checkpoint into `trainer` (model, optimiser state, scaler, position) and this rank's RNG;
        returns the payload, for what a stage keeps besides (an EMA, the best accuracy).

        The schedule and the optimiser's hyperparameters are the current config's (`Trainer.load_state_dict`);
        changed ones are named in the log (`schedule_changes`). A changed optimiser or layer decay (other
        parameter groups, other moments) cannot continue and is an error naming the key."""
        from crate_mae.engine.dist import set_rng_state

        state: CheckpointPayload = load(path)  # type: ignore[assignment]
        check_arch(state, cfg.model, path)
        saved = (state.get("config") or {}).get("optim") or {}
        for key in ("optimizer", "layer_decay"):
            if key in saved and saved[key] != getattr(cfg.optim, key):
                raise ConfigError(f"{path}: optim.{key} is {saved[key]!r} in the checkpoint but "
                                  f"{getattr(cfg.optim, key)!r} in the config; its optimiser state cannot continue")
        self.changes = schedule_changes(saved, cfg)
        trainer.load_state_dict(state)
        if len(state.get("rng", [])) == self.dist.world_size:  # the same ranks: every generator continues exactly
            set_rng_state(state["rng"][self.dist.rank])
        if trainer.state.batch_in_epoch >= trainer.updates_per_epoch * trainer.accum_steps:  # saved at an epoch's end
            trainer.state.epoch, trainer.state.batch_in_epoch = trainer.state.epoch + 1, 0
        return state


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
