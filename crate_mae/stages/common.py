"""What every stage shares: the run folder's lock, the resolve-once phase (`prepare`), the run (folder, logger closed
however the run ends, the Checkpointer), results.json from a dataclass, and the closing banner.

    run_stage(cfg, body, weights=cfg.finetune.checkpoint)  # per process: lock, prepare, body(StageRun), release

`run_stage` takes the run folder's lock (engine/runlock.py) before anything is read from or written into the folder,
so that a second run started into it (a job submitted twice, one run.name on two machines) is refused in one line
naming the run that holds it, on every rank together; the lock is released however the run ends.

`prepare` is the only place a stage's files are read and its config settled, in this order: the resume file
(`--resume`) and the weight file, each read once by the one reader; the model config resolved by the one resolver
(against the resume file when resuming, else the weights); the data the stage reads (written once at the model's
image size when it is the bundled demo), each set's shards checked once (`resolve_shards`: the stage hands the
resolved sets on, and nothing checks them again); for a classifier whose manifest lists classes, the same
resolution again with them, so that an unset head takes them (`num_classes` has one rule, in the resolver); the
config frozen. Everything after it reads `StageRun`, which never changes. No stage imports another; they all import
this.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from crate_mae.atomic import atomic_path, remove_stale_temp_files
from crate_mae.config import ClassifierConfig, Config, config_to_dict, save_config
from crate_mae.data import ShardList, resolve_shards
from crate_mae.data.reader import unlabelled
from crate_mae.data.shards import DIGITS_DIR, ensure_digits, ensure_torchvision
from crate_mae.engine.checkpoint import Checkpointer, Stateful
from crate_mae.engine.dist import Dist, barrier, broadcast_object, run_with
from crate_mae.engine.log import RunLogger
from crate_mae.engine.runlock import RunLock
from crate_mae.errors import ConfigError, MissingFileError, RunFolderError, ShardError
from crate_mae.model import Checkpoint, read_checkpoint, resolve_config
from crate_mae.model.files import latest

R = TypeVar("R")
REPO = Path(__file__).resolve().parents[2]  # where the entry points live
FROZEN_OPTIM_KEYS = ("optimizer", "layer_decay")  # a resume cannot change them: other groups, other moments


@dataclass(frozen=True)
class StageRun:
    """One run of a stage on this process, settled by `prepare`: nothing here changes afterwards."""

    cfg: Config  # resolved (every model field set) and frozen
    dist: Dist
    run_dir: Path
    resume: Checkpoint | None  # the run checkpoint it continues from, read once
    weights: Checkpoint | None  # the pretrained weights it starts from (None when resuming: the resume holds them)
    train: ShardList  # the training set, its shards checked once (`.spec`: as configured)
    val: ShardList | None  # the validation set, likewise (None: pretraining without one)
    changes: tuple[str, ...] = ()  # 'optim.lr 0.0001 → 0.0002' for each schedule key a resume changes
    lock: RunLock | None = None  # rank 0's hold on run_dir (run_stage's; None on other ranks, or a bare prepare)

    def checkpointer(self, extra: Mapping[str, Stateful] | None = None) -> Checkpointer:
        """The run's Checkpointer (keeping `extra`): cfg.run's interval and pruning, the config in every file."""
        return Checkpointer(self.run_dir, every=self.cfg.run.ckpt_every, keep_last=self.cfg.run.keep_last,
                            config=config_to_dict(self.cfg), dist=self.dist, extra=extra)

    @contextmanager
    def logger(self, total_steps: int = 0, step: int = 0) -> Iterator[RunLogger]:
        """The run's logger (rank 0 writes), closed however the run ends; rank 0 saves the resolved config first,
        removes the temp files a killed write left behind, and marks a resume in log.jsonl (the steps between the
        checkpoint and the kill are logged again after it)."""
        stale: list[Path] = []
        if self.dist.is_main:
            stale = remove_stale_temp_files(self.run_dir)
            save_config(self.cfg, self.run_dir / "config.yaml")
        log = RunLogger(self.run_dir, enabled=self.dist.is_main, total_steps=total_steps, initial_step=step)
        if stale:
            log.info(f"removed {len(stale)} temp file(s) left by an interrupted write: {', '.join(p.name for p in stale)}")
        if self.lock is not None and self.lock.took_over:  # printed when it happened; kept in the run's own log too
            log.event("lock_taken_over", step, message=self.lock.took_over)
        if self.resume is not None:
            log.event("resume", step, checkpoint=self.resume.path, changed=list(self.changes))
            if self.changes:
                log.info(f"resumed at step {step} with a changed schedule, applied from this step on: "
                         + ", ".join(self.changes))
        try:
            yield log
        finally:
            log.close()


def run_stage(cfg: Config, body: Callable[[StageRun], R], *, weights: str | None = None,
              default_family: str = "mae") -> R:
    """Run `body` once per process (one CPU, one GPU, or every rank under torchrun) on its prepared StageRun, while
    holding the run folder (`hold_run_folder`: before `prepare` reads the resume file, released however it ends)."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    stage = body.__module__.rsplit(".", 1)[-1]  # 'pretrain', 'linear_probe', 'finetune': named in a refusal

    def per_process(dist: Dist) -> R:
        with hold_run_folder(run_dir, dist, stage=stage) as lock:
            return body(prepare(cfg, dist, weights=weights, default_family=default_family, lock=lock))

    return run_with(cfg.run.device, per_process)


@contextmanager
def hold_run_folder(run_dir: Path, dist: Dist, *, stage: str) -> Iterator[RunLock | None]:
    """Rank 0 takes `run_dir`'s lock (RunLock.acquire: made atomically, a dead run's taken over with a printed line);
    its answer goes to every rank, so that a refusal stops them all together with rank 0's one line (a
    RunFolderError) and none waits in a collective for a rank that left. Rank 0 releases the lock when the block
    ends, however it ends: a normal end, an error, SystemExit (a preempted run's exit), KeyboardInterrupt.
    Yields rank 0's lock (None on the other ranks)."""
    lock, refusal = None, None
    if dist.is_main:
        try:
            lock = RunLock.acquire(run_dir, stage=stage)
        except RunFolderError as err:
            refusal = str(err)
        except BaseException as err:  # anything else still answers the other ranks before it goes up
            broadcast_object(dist, f"{run_dir}: rank 0 could not take the run folder's lock "
                                   f"({type(err).__name__}: {err})")
            raise
    refusal = broadcast_object(dist, refusal)
    if refusal is not None:
        raise RunFolderError(refusal)
    if lock is not None and lock.took_over:
        print(lock.took_over, flush=True)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def prepare(cfg: Config, dist: Dist, *, weights: str | None = None, default_family: str = "mae",
            lock: RunLock | None = None) -> StageRun:
    """The resolve-once phase (module docstring): files read once, the config resolved once and frozen, each set's
    shards checked once. `lock`: the run folder's, held by run_stage (kept in the StageRun so that the logger records
    a takeover)."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    resume_file = resume_path(run_dir, cfg.run.resume)
    resume = read_checkpoint(resume_file) if resume_file is not None else None
    changes = resume_changes(resume, cfg) if resume is not None else ()
    pretrained = None
    if weights is not None and resume is None:
        try:
            pretrained = read_checkpoint(weights)
        except MissingFileError as err:
            hint = " (the demo's encoder comes from `python pretrain.py`)" if "runs/demo" in str(weights) else ""
            raise MissingFileError(f"{err}{hint}") from None
    source, how = resume or pretrained, dict(default_family=default_family, resume=resume is not None)
    model = resolve_config(cfg.model, source, **how)
    train_spec, val_spec = stage_data(cfg, dist, img_size=model.img_size)
    if isinstance(model, ClassifierConfig) and val_spec is None:
        raise ConfigError("data.val_shards: accuracy is measured on a validation set; set one")
    train = resolve_shards(train_spec)  # each set's shards checked here, once: the stage hands these on
    val = resolve_shards(val_spec) if val_spec is not None else None
    if isinstance(model, ClassifierConfig):  # an unset head takes the data's classes where its manifest lists them
        for shards in (train, val):
            refuse_unlabelled(shards)
        classes = train.manifest.num_classes if train.manifest is not None else 0
        if classes:  # the same resolution, now knowing them
            model = resolve_config(cfg.model, source, **how, data_classes=classes)
        if 0 < model.num_classes < classes:
            raise ConfigError(f"model.num_classes is {model.num_classes}, but {train.spec} has {classes} classes; "
                              f"leave it unset to take them")
    return StageRun(dataclasses.replace(cfg, model=model), dist, run_dir, resume, pretrained, train, val, changes, lock)


def refuse_unlabelled(shards: ShardList) -> None:
    """A classifier's stage (fine-tuning, the probes) needs labels: a set whose manifest says it has none (written from
    a folder of unlabelled images, or an HF dataset without --label-column), or whose first sample has no `cls`, is
    refused in one line before anything else is read (`unlabelled`)."""
    why = unlabelled(shards)
    if why is not None:
        raise ShardError(f"{why}; fine-tuning and the probes need labels: point data.train_shards / data.val_shards at "
                         f"a labelled set, or pretrain on this one")


def resume_path(run_dir: Path, resume: str | None) -> Path | None:
    """What to continue from: None for a fresh run. A fresh run never overwrites one that has checkpoints."""
    if resume == "auto":
        return latest(run_dir)
    if resume:
        return Path(resume)
    if latest(run_dir) is not None:
        raise RunFolderError(f"{run_dir} holds checkpoints already: --resume auto continues that run, "
                             f"--set run.name=NAME starts another")
    if (Path(run_dir) / "results.json").exists():  # a finished probe: its figures are never overwritten silently
        raise RunFolderError(f"{run_dir}/results.json exists already: --set run.name=NAME writes another run")
    return None


def resume_changes(resume: Checkpoint, cfg: Config) -> tuple[str, ...]:
    """What a resume changes of the optimiser and schedule: 'optim.lr 0.0001 → 0.0002' for each key of `cfg` that
    differs from the checkpoint's (applied from the resumed step on). Another optimiser or layer decay cannot
    continue (other parameter groups, other moments): a ConfigError naming the key."""
    if resume.config is None:
        raise ConfigError(f"{resume.path}: holds no config, so the run it belongs to cannot be checked")
    saved = resume.config.get("optim") or {}
    now = config_to_dict(cfg)["optim"]
    for key in FROZEN_OPTIM_KEYS:
        if key in saved and saved[key] != now[key]:
            raise ConfigError(f"{resume.path}: optim.{key} is {saved[key]!r} in the checkpoint but {now[key]!r} in the "
                              f"config; its optimiser state cannot continue")
    return tuple(f"optim.{k} {saved[k]!r} → {v!r}" for k, v in now.items() if k in saved and saved[k] != v)


def stage_data(cfg: Config, dist: Dist, *, img_size: int) -> tuple[str, str | None]:
    """The (train, val) shard specs a stage reads: the configured shards, a torchvision set written to shards
    once, or the bundled digits demo (at the model's image size). Rank 0 writes what is missing; the others wait."""
    data = cfg.data
    if data.train_shards:
        return data.train_shards, data.val_shards
    if dist.is_main:
        if data.dataset:
            ensure_torchvision(data.dataset, data.root, download=data.download)
        else:
            ensure_digits(DIGITS_DIR, size=img_size)
    barrier(dist)
    folder = f"shards/{data.dataset}" if data.dataset else DIGITS_DIR
    return f"{folder}/train.json", data.val_shards or f"{folder}/val.json"


def write_results(run_dir: Path, result: Any) -> Path:
    """results.json from a result dataclass, written atomically: its plain fields (paths as strings; models and
    tensors left out)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    fields = {f.name: plain(getattr(result, f.name)) for f in dataclasses.fields(result)
              if isinstance(getattr(result, f.name), (str, int, float, bool, dict, list, tuple, Path, type(None)))}
    path = run_dir / "results.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fields, indent=1))
    return path


def banner(log: RunLogger, headline: str, files: list[tuple[str, str]], commands: list[str]) -> None:
    """The closing lines of a run: what it did, where each output is, and what to run next."""
    width = max(len(name) for name, _ in files) + 2
    lines = [f"\ndone: {headline}", *(f"  {name:<{width}}{what}" for name, what in files)]
    if commands:
        lines += ["next:", *(f"  {c}" for c in commands)]
    log.info("\n".join(lines))
