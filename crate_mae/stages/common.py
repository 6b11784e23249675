"""What every stage shares: the run (folder, resume point, logger closed however the run ends), the data a stage
reads, the classifier two stages build from a checkpoint, results.json from a dataclass, and the closing banner.

No stage imports another; they all import this.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from crate_mae.config import Config, ConfigError, config_to_dict, save_config
from crate_mae.data import resolve_shards
from crate_mae.data.shards import DIGITS_DIR, ensure_digits, ensure_torchvision
from crate_mae.engine import checkpoint as ckpt
from crate_mae.engine import dist
from crate_mae.engine.checkpoint import Checkpointer
from crate_mae.engine.log import RunLogger
from crate_mae.engine.trainer import Trainer
from crate_mae.model import CrateClassifier, hub

R = TypeVar("R")
REPO = Path(__file__).resolve().parents[2]  # where the entry points live


@dataclass
class StageRun:
    """One run of a stage on this process: its config, ranks, folder and the checkpoint it resumes from."""

    cfg: Config
    d: dist.Dist
    run_dir: Path
    resume: Path | None

    def checkpointer(self, extra: Callable[[], dict[str, Any]] | None = None) -> Checkpointer:
        """The run's Checkpointer: cfg.run's interval and pruning, the (resolved) config in every file."""
        return Checkpointer(self.run_dir, every=self.cfg.run.ckpt_every, keep_last=self.cfg.run.keep_last,
                            config=config_to_dict(self.cfg), dist=self.d, extra=extra)

    @contextmanager
    def logger(self, trainer: Trainer | None = None, checkpointer: Checkpointer | None = None) -> Iterator[RunLogger]:
        """The run's logger (rank 0 writes), closed however the run ends; rank 0 saves the resolved config first,
        removes the temp files a killed write left behind, and marks a resume in log.jsonl (the steps between the
        checkpoint and the kill are logged again after it)."""
        stale: list[Path] = []
        if self.d.is_main:
            stale = ckpt.remove_stale_temp_files(self.run_dir)
            save_config(self.cfg, self.run_dir / "config.yaml")
        log = RunLogger(self.run_dir, enabled=self.d.is_main, total_steps=trainer.total_steps if trainer else 0,
                        initial_step=trainer.state.step if trainer else 0)
        if stale:
            log.info(f"removed {len(stale)} temp file(s) left by an interrupted write: {', '.join(p.name for p in stale)}")
        if self.resume is not None and trainer is not None:
            changes = checkpointer.changes if checkpointer is not None else []
            log.event("resume", trainer.state.step, checkpoint=str(self.resume), changed=changes)
            if changes:
                log.info(f"resumed at step {trainer.state.step} with a changed schedule, applied from this step on: "
                         + ", ".join(changes))
        try:
            yield log
        finally:
            log.close()


def run_stage(cfg: Config, body: Callable[[StageRun], R]) -> R:
    """Run `body` once per process (one CPU, one GPU, or every rank under torchrun) on its StageRun."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    return dist.run_with(cfg.run.device, lambda d: body(StageRun(cfg, d, run_dir, ckpt.resume_path(run_dir, cfg.run.resume))))


def stage_data(cfg: Config, d: dist.Dist) -> tuple[str, str | None]:
    """The (train, val) shard specs a stage reads: the configured shards, a torchvision set written to shards
    once, or the bundled digits demo (at the model's image size). Rank 0 writes what is missing; the others wait."""
    data = cfg.data
    if data.train_shards:
        return data.train_shards, data.val_shards
    if d.is_main:
        if data.dataset:
            ensure_torchvision(data.dataset, data.root, download=data.download)
        else:
            ensure_digits(DIGITS_DIR, size=cfg.model.img_size)
    dist.barrier(d)
    folder = f"shards/{data.dataset}" if data.dataset else DIGITS_DIR
    return f"{folder}/train.json", data.val_shards or f"{folder}/val.json"


def labelled_data(cfg: Config, d: dist.Dist) -> tuple[Config, str, str, int]:
    """(config, train spec, val spec, classes) of a classification stage; model.num_classes follows the training
    manifest's class list (the configured value when it has none)."""
    train_spec, val_spec = stage_data(cfg, d)
    if val_spec is None:
        raise ConfigError("data.val_shards: accuracy is measured on a validation set; set one")
    manifest = resolve_shards(train_spec).manifest
    classes = manifest.num_classes if manifest is not None and manifest.num_classes else cfg.model.num_classes
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=classes)), train_spec, val_spec, classes


def classifier_config(cfg: Config, checkpoint: str | None, *, default_family: str = "mae"
                      ) -> tuple[Config, hub.Checkpoint | None]:
    """The stage's config with its model section resolved against `checkpoint` (read once, here), before any data
    is prepared at the model's image size: unset fields take the checkpoint's values, a set one that differs is an
    error naming it (`hub.model_config`)."""
    try:
        weights = hub.read_checkpoint(checkpoint) if checkpoint is not None else None
    except FileNotFoundError as err:
        hint = " (the demo's encoder comes from `python pretrain.py`)" if "runs/demo" in str(checkpoint) else ""
        raise FileNotFoundError(f"{err}{hint}") from None
    model_cfg = hub.model_config(cfg.model, weights, kind="classifier", default_family=default_family)
    return dataclasses.replace(cfg, model=model_cfg), weights


def classifier_for(cfg: Config, weights: hub.Checkpoint | None, num_classes: int) -> tuple[CrateClassifier, Config]:
    """A classifier of the (resolved) `cfg.model` for `num_classes`, filled strictly from `weights` (None: fresh; a
    head of another class count is replaced), and the config with what was really built."""
    model, model_cfg = hub.create_model(cfg.model, kind="classifier", checkpoint=weights, num_classes=num_classes)
    return model, dataclasses.replace(cfg, model=model_cfg)


def write_results(run_dir: Path, result: Any) -> Path:
    """results.json from a result dataclass: its plain fields (paths as strings; models and tensors left out)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    fields = {f.name: plain(getattr(result, f.name)) for f in dataclasses.fields(result)
              if isinstance(getattr(result, f.name), (str, int, float, bool, dict, list, tuple, Path, type(None)))}
    path = run_dir / "results.json"
    path.write_text(json.dumps(fields, indent=1))
    return path


def banner(log: RunLogger, headline: str, files: list[tuple[str, str]], commands: list[str]) -> None:
    """The closing lines of a run: what it did, where each output is, and what to run next."""
    width = max(len(name) for name, _ in files) + 2
    lines = [f"\ndone: {headline}", *(f"  {name:<{width}}{what}" for name, what in files)]
    if commands:
        lines += ["next:", *(f"  {c}" for c in commands)]
    log.info("\n".join(lines))
