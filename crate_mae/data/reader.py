"""Reading shard sets: `ShardStream` lists the steps of data/stream.py for one slot; `ShardLoader` is the DataLoader
over it; `train_loader` and `eval_loader` are the one way to build each, from a config's `data` section.

Train: every rank runs exactly `steps_per_epoch` full batches per epoch (total samples // global batch,
from the manifest), whatever the number of shards per rank: without that, DDP hangs at an epoch's end.
Shards are either resampled (each worker draws shards at random, seeded by (seed, epoch, rank, worker),
as webdataset's ResampledShards; any number of shards works) or shuffled per epoch and dealt out to
rank × worker slots and cycled. Samples then pass a shuffle buffer.

Eval: every sample exactly once across all ranks and workers: shards are dealt out in order to the
rank × worker slots; with fewer shards than slots, every slot reads every shard and keeps the samples
whose index i ≡ slot (mod slots). Each rank sums its own counts (correct, total); the engine adds them
over ranks with one all_reduce(SUM), so accuracies are exact.

A remote shard (`pipe:`, `http(s)://`) whose read fails is read again (`data.read_retries`, `data.retry_wait`),
each sample still delivered once and in order; a local file that cannot be read is an error at once
(data/stream.py's `read_samples`).

Bad samples (undecodable image, no image, no or bad label) are skipped, counted and logged with shard
and key; past `max_bad_fraction` the run stops with a one-line DataError. Where and why that is judged:
data/stream.py's docstring (one step, `decode_or_skip`, on a tally the loader's workers share).
"""
from __future__ import annotations

import functools
import random
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from crate_mae.config import DataConfig
from crate_mae.data.manifest import ShardError, ShardList, resolve_shards
from crate_mae.data.stream import (Batch, Decode, batches, collate, decode_or_skip, read_samples, shard_order, shuffled,
                                   split_by_sample, worker_role)
from crate_mae.data.tally import DataError, SampleTally
from crate_mae.data.transforms import EvalTransform, Transform
from crate_mae.seeding import mix_seed, seed_everything


class ShardStream(IterableDataset):
    """Yields batches for one rank; inside a DataLoader each worker yields its own share (data/stream.py's steps)."""

    def __init__(self, shards: ShardList, transform: Transform, *, batch_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, resample: bool = True, shuffle_buffer: int = 1000,
                 steps_per_epoch: int | None = None, max_bad_fraction: float = 0.001, labels: bool = True,
                 num_classes: int = 0, read_retries: int = 3, retry_wait: float = 1.0) -> None:
        super().__init__()
        if train and not steps_per_epoch:
            raise ValueError("a training stream needs steps_per_epoch")
        self.shards, self.transform, self.batch_size, self.train = shards, transform, batch_size, train
        self.rank, self.world_size, self.seed, self.resample = rank, world_size, seed, resample
        self.shuffle_buffer, self.steps_per_epoch, self.max_bad_fraction = shuffle_buffer, steps_per_epoch, max_bad_fraction
        # the classes every label must fit: the manifest's, else the model's head (`num_classes`; 0: not checked)
        listed = shards.manifest.num_classes if shards.manifest else 0
        self.num_classes = listed or num_classes
        self.classes_of = shards.spec if listed else f"the model's head ({shards.spec} lists no classes)"
        self.labels = labels  # False (pretraining): labels are not read, so none can stop or skip a sample
        self.read_retries, self.retry_wait = read_retries, retry_wait  # re-reads of a failed remote shard
        self.epoch, self.replay = 0, 0
        self.tally = self.tally_for(1)  # a ShardLoader gives it one row per worker

    def tally_for(self, workers: int) -> SampleTally:
        return SampleTally(workers, max_fraction=self.max_bad_fraction, spec=self.shards.spec)

    def set_epoch(self, epoch: int, replay: int = 0) -> None:
        """Reseeds the order for `epoch`; `replay` resumes it after that many batches of this rank.

        Call before iterating (workers must not be persistent to see it). The replayed batches are formed
        without decoding (`transform.draw` makes the same random draws), so a resumed epoch continues with
        exactly the batches the interrupted one would have produced, given the same num_workers.
        """
        self.epoch, self.replay = epoch, replay

    def __iter__(self) -> Iterator[Batch]:
        """This slot's batches: its settings first, then data/stream.py's steps, one line each."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.tally.slots:
            raise ValueError(f"the stream's tally has {self.tally.slots} rows for {workers} workers")
        role, replayed = worker_role(worker, workers, self.replay)
        slot, slots = self.rank * workers + role, self.world_size * workers
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, role))
        if info is not None:  # timm's transforms draw from the global generators; seed them, only inside workers
            seed_everything(mix_seed(self.seed, self.epoch, self.rank, role, "global"))
        take = None  # evaluation: every sample of this slot's share
        if self.train:  # every rank the same number of batches, dealt out to its workers in turn
            take = (self.steps_per_epoch // workers + (role < self.steps_per_epoch % workers)) * self.batch_size
        spec, urls = self.shards.spec, self.shards.urls
        expected = dict(zip(urls, self.shards.samples)) if self.shards.samples is not None else None
        decode = Decode(self.transform, rng, labels=self.labels, num_classes=self.num_classes, classes_of=self.classes_of)
        to_batch = functools.partial(collate, stack=getattr(self.transform, "collate", torch.stack))

        order, by_sample = shard_order(urls, train=self.train, resample=self.resample, slot=slot, slots=slots,
                                       seed=self.seed, epoch=self.epoch, rng=rng)                       # order
        samples = read_samples(order, spec=spec, shards=len(urls), expected=expected,                   # read
                               retries=self.read_retries, wait=self.retry_wait)
        if by_sample:
            samples = split_by_sample(samples, slot, slots)                                             # split
        if self.train:
            samples = shuffled(samples, self.shuffle_buffer, rng)                                       # shuffle
        items = decode_or_skip(samples, decode, self.tally, role, dry=replayed * self.batch_size, take=take)  # decode
        yield from batches(items, self.batch_size, to_batch, drop=replayed, partial=not self.train)     # batch


def _leave_signals_to_the_parent(worker: int) -> None:
    """A DataLoader worker ignores the signals that stop a run: a terminal (Ctrl-C) and a cluster (SLURM's SIGTERM,
    or the one #SBATCH --signal asks for) signal the whole process group, and a worker killed by one would make its
    parent fail with "DataLoader worker exited unexpectedly" in the middle of stopping cleanly (engine/preempt.py).
    The parent stops its workers itself, and a worker whose parent dies exits on its own (PyTorch watches for that)."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.excepthook = _quiet_when_the_parent_is_gone


def _quiet_when_the_parent_is_gone(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """A worker's background thread (multiprocessing's resource sharer, which hands its batches' shared memory to the
    parent, and reports its errors through sys.excepthook) loses its connection when the parent stops at once (a
    second signal: engine/preempt.py); that is the parent's story, told in its one line, so the worker says nothing
    of it. Anything else is printed as usual."""
    if isinstance(value, (ConnectionError, EOFError)):
        return
    sys.__excepthook__(kind, value, tb)


class ShardLoader:
    """A DataLoader over a ShardStream that yields its `Batch`es; `seen` and `bad` count its samples so far."""

    def __init__(self, stream: ShardStream, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.stream = stream
        stream.tally = stream.tally_for(max(num_workers, 1))  # shared by the workers, kept over the epochs
        # Its own generator: creating an iterator must not draw from the training process's global RNG
        # (the model's masking uses it; a resumed run creates its iterator at another moment).
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=False, prefetch_factor=4 if num_workers else None,
                                 generator=torch.Generator(), worker_init_fn=_leave_signals_to_the_parent)

    @property
    def steps_per_epoch(self) -> int | None:
        return self.stream.steps_per_epoch

    def __len__(self) -> int:
        if self.stream.steps_per_epoch is None:
            raise TypeError("an evaluation loader has no fixed length per rank")
        return self.stream.steps_per_epoch

    def set_epoch(self, epoch: int, replay: int = 0) -> None:
        self.stream.set_epoch(epoch, replay)

    @property
    def seen(self) -> int:
        """Samples read so far, over this loader's epochs (bad ones included)."""
        return self.stream.tally.count().seen

    @property
    def bad(self) -> int:
        """Bad samples skipped so far, over this loader's epochs."""
        return self.stream.tally.count().bad

    def __iter__(self) -> Iterator[Batch]:
        """One epoch's batches (evaluation: one pass over the set)."""
        self.stream.tally.new_epoch()
        try:
            yield from self.loader
        except (DataError, ShardError) as err:  # raised in a worker: the DataLoader wraps it in a traceback text
            raise type(err)(_worker_message(err)) from None


def _worker_message(err: Exception) -> str:
    """The one-line message of an error raised inside a DataLoader worker, without the traceback text that the
    DataLoader puts around it ("Caught DataError in DataLoader worker process 0. Original Traceback ...")."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    for prefix in (f"{type(err).__module__}.{type(err).__qualname__}: ", f"{type(err).__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def _settings(data: DataConfig | None, **given: object) -> DataConfig:
    """`data` (None: DataConfig()'s defaults) with the keywords given (not None) in place of its fields."""
    return replace(data if data is not None else DataConfig(), **{k: v for k, v in given.items() if v is not None})


def train_loader(spec: str, transform: Transform, *, data: DataConfig | None = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, accum_steps: int = 1, labels: bool = True, num_classes: int = 0,
                 pin_memory: bool = False, batch_size: int | None = None, num_workers: int | None = None,
                 resample: bool | None = None, shuffle_buffer: int | None = None, train_samples: int | None = None,
                 max_bad_fraction: float | None = None) -> ShardLoader:
    """The one way to build a training loader: one rank's full batches of `transform`ed images, per epoch
    samples // (batch × ranks × accum) × accum of them, with the settings of the `data` section (None:
    `DataConfig()`'s); a keyword named as one of its fields (batch_size ... max_bad_fraction) replaces it.
    `num_classes`: the classes every label must fit when the manifest lists none (a classifier's head)."""
    data = _settings(data, batch_size=batch_size, num_workers=num_workers, resample=resample,
                     shuffle_buffer=shuffle_buffer, train_samples=train_samples, max_bad_fraction=max_bad_fraction)
    shards = resolve_shards(spec)
    total = data.train_samples or shards.total
    if total is None:
        raise ShardError(f"{spec}: no manifest gives the number of samples; write one with "
                         "`python -m crate_mae.data.shards manifest` or set data.train_samples")
    steps = total // (data.batch_size * world_size * accum_steps) * accum_steps
    if steps == 0:
        raise ShardError(f"{spec}: {total} samples make no full global batch of {data.batch_size} × {world_size} ranks"
                         f" × {accum_steps} accumulation steps")
    stream = ShardStream(shards, transform, batch_size=data.batch_size, train=True, rank=rank, world_size=world_size,
                         seed=seed, resample=data.resample, shuffle_buffer=data.shuffle_buffer, steps_per_epoch=steps,
                         max_bad_fraction=data.max_bad_fraction, labels=labels, num_classes=num_classes,
                         read_retries=data.read_retries, retry_wait=data.retry_wait)
    return ShardLoader(stream, num_workers=data.num_workers, pin_memory=pin_memory)


def eval_loader(spec: str, img_size: int, *, data: DataConfig | None = None, rank: int = 0, world_size: int = 1,
                labels: bool = True, num_classes: int = 0, pin_memory: bool = False, batch_size: int | None = None,
                num_workers: int | None = None, eval_crop_pct: float | None = None,
                max_bad_fraction: float | None = None, first_samples: int | None = None) -> ShardLoader:
    """The one way to build an evaluation loader: one rank's share of every sample, exactly once over all ranks, as
    `EvalTransform(img_size, crop_pct=data.eval_crop_pct)` pixels, with the settings of the `data` section (None:
    `DataConfig()`'s); a keyword named as one of its fields (batch_size ... max_bad_fraction) replaces it.
    `first_samples`: read only the leading shards that hold the set's first n samples (`ShardList.first`).
    `num_classes`: the classes every label must fit when the manifest lists none (a classifier's head)."""
    data = _settings(data, batch_size=batch_size, num_workers=num_workers, eval_crop_pct=eval_crop_pct,
                     max_bad_fraction=max_bad_fraction)
    stream = ShardStream(resolve_shards(spec).first(first_samples), EvalTransform(img_size, crop_pct=data.eval_crop_pct),
                         batch_size=data.batch_size, train=False, rank=rank, world_size=world_size,
                         max_bad_fraction=data.max_bad_fraction, labels=labels, num_classes=num_classes,
                         read_retries=data.read_retries, retry_wait=data.retry_wait)
    return ShardLoader(stream, num_workers=data.num_workers, pin_memory=pin_memory)


def unlabelled(spec: str | ShardList) -> str | None:
    """Why the set `spec` cannot serve what needs labels (fine-tuning, the probes, the monitor's kNN): its manifest
    says it is unlabelled, or its first sample has no `cls`; None where it can. Only the first sample is opened: a
    set is labelled throughout or not at all. A manifest that names no classes (one counted by `manifest`, a
    published set's _info.json) says nothing of the samples: the kNN then takes the class count from the labels it
    sees. `spec` may be the set already resolved (`resolve_shards`), so that its shards are not checked again."""
    shards = spec if isinstance(spec, ShardList) else resolve_shards(spec)
    spec = shards.spec
    if shards.manifest is not None and not shards.manifest.labelled:
        return f"{spec} has no labels (an unlabelled set)"
    first = next(read_samples(shards.urls[:1], spec=spec, shards=1), None)
    if first is None or "cls" not in first:
        return f"{spec} has no labels (its first sample has no cls)"
    return None
