"""Reading shard sets: a seeded, rank- and worker-split stream of decoded, transformed batches.

Train: every rank runs exactly `steps_per_epoch` full batches per epoch (total samples // global batch,
from the manifest), whatever the number of shards per rank: without that, DDP hangs at an epoch's end.
Shards are either resampled (each worker draws shards at random, seeded by (seed, epoch, rank, worker),
as webdataset's ResampledShards; any number of shards works) or shuffled per epoch and dealt out to
rank × worker slots and cycled. Samples then pass a shuffle buffer.

Eval: every sample exactly once across all ranks and workers: shards are dealt out in order to the
rank × worker slots; with fewer shards than slots, every slot reads every shard and keeps the samples
whose index i ≡ slot (mod slots). Each rank sums its own counts (correct, total); the engine adds them
over ranks with one all_reduce(SUM), so accuracies are exact.

Bad samples (undecodable image, no image, no or bad label) are skipped, counted and logged with shard
and key. When skips exceed `max_bad_fraction` of a worker's samples (judged after 1/max_bad_fraction
samples, or at the end of its stream), it stops with an error: a systematic problem is not skipped.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from crate_mae.data.device_decode import RawImage, collate_raw
from crate_mae.data.manifest import ShardError, ShardList, resolve_shards
from crate_mae.data.transforms import Transform

if TYPE_CHECKING:
    from crate_mae.config import DataConfig

log = logging.getLogger("crate_mae.data")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class DataError(RuntimeError):
    """Too much of the data is bad to go on."""


class Batch(NamedTuple):
    images: Any  # (B, 3, S, S) uint8 pixels (the model normalises them) or normalised float; or a RawBatch
    labels: torch.Tensor  # (B,) int64
    keys: list[str]  # "<shard url>/<sample key>"


class _WorkerItem(NamedTuple):
    batch: Batch | None  # None: the worker's closing count
    slot: int
    seen: int
    skipped: int


@dataclass
class SkipCounter:
    seen: int = 0
    skipped: int = 0


class _Skip(Exception):
    pass


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and runs (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class ShardStream(IterableDataset):
    """Yields batches for one rank; inside a DataLoader each worker yields its own share."""

    def __init__(self, shards: ShardList, transform: Transform, *, batch_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, resample: bool = True, shuffle_buffer: int = 1000,
                 steps_per_epoch: int | None = None, max_bad_fraction: float = 0.001) -> None:
        super().__init__()
        if train and not steps_per_epoch:
            raise ValueError("a training stream needs steps_per_epoch")
        self.shards, self.transform, self.batch_size, self.train = shards, transform, batch_size, train
        self.rank, self.world_size, self.seed, self.resample = rank, world_size, seed, resample
        self.shuffle_buffer, self.steps_per_epoch, self.max_bad_fraction = shuffle_buffer, steps_per_epoch, max_bad_fraction
        self.num_classes = shards.manifest.num_classes if shards.manifest else 0
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Reseeds the order for `epoch`; `skip_batches` resumes it after that many batches of this rank.

        Call before iterating (workers must not be persistent to see it). Skipped batches are replayed
        without decoding (`transform.skip` draws the same random numbers), so a resumed epoch continues
        with exactly the batches the interrupted one would have produced, given the same num_workers.
        """
        self.epoch, self.skip_batches = epoch, skip_batches

    # ------------------------------------------------------------------ which shards this slot reads
    def _urls(self, slot: int, slots: int, rng: random.Random) -> tuple[Iterator[str], bool]:
        """(shard urls for this slot, whether to split by sample index instead of by shard)."""
        urls = self.shards.urls
        by_sample = len(urls) < slots
        if not self.train:
            return iter(urls if by_sample else urls[slot::slots]), by_sample
        if self.resample:
            return (rng.choice(urls) for _ in iter(int, 1)), False  # endless, independent per slot

        def passes() -> Iterator[str]:
            for k in iter(int, 1):  # endless passes, each in a new order shared by all slots
                order = list(urls)
                random.Random(mix_seed(self.seed, self.epoch, "pass", k)).shuffle(order)
                yield from (order if by_sample else order[slot::slots])
        return passes(), by_sample

    def _read(self, urls: Iterator[str]) -> Iterator[dict]:
        empty_run = 0
        for url in urls:
            got = False
            try:
                for sample in wds.tarfile_samples([{"url": url}]):
                    got = True
                    yield sample
            except Exception as err:  # a truncated or unreadable tar: name it and stop
                raise ShardError(f"{url}: cannot read the shard ({type(err).__name__}: {err})".split("\n")[0]) from None
            empty_run = 0 if got else empty_run + 1
            if empty_run > max(len(self.shards.urls), 8):
                raise ShardError(f"{self.shards.spec}: the shards hold no samples")

    # ------------------------------------------------------------------ one sample
    def _decode(self, sample: dict, rng: random.Random, dry: bool = False) -> tuple[torch.Tensor | None, int]:
        """(image, label) of one sample, or `_Skip`; `dry` draws the transform's random numbers only."""
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise _Skip(f"no image ({'/'.join(IMAGE_KEYS)})")
        if "cls" not in sample:
            raise _Skip("no label (cls)")
        try:
            label = int(sample["cls"])
        except ValueError:
            raise _Skip(f"label {sample['cls'][:20]!r} is not an integer") from None
        if label < 0 or (self.num_classes and label >= self.num_classes):
            raise _Skip(f"label {label} outside [0, {self.num_classes})")
        try:
            if dry:
                getattr(self.transform, "skip", self.transform)(data, rng)
                return None, label
            return self.transform(data, rng), label
        except Exception as err:  # PIL raises several types for corrupt or truncated images
            raise _Skip(f"undecodable image ({type(err).__name__}: {err})".split("\n")[0]) from None

    def _check_bad(self, counter: SkipCounter, last: str, final: bool) -> None:
        f = self.max_bad_fraction
        judged = final or f == 0 or counter.seen >= 1 / f
        if counter.skipped and judged and counter.skipped > f * counter.seen:
            raise DataError(f"{counter.skipped} of {counter.seen} samples were bad, more than data.max_bad_fraction="
                            f"{f} (last: {last}); check the shards of {self.shards.spec}")

    # ------------------------------------------------------------------ the stream
    def __iter__(self) -> Iterator[_WorkerItem]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batch i from worker i mod workers. After `skip` batches the next one must
        # come from role skip mod workers, but a new DataLoader starts at worker 0: rotate the roles.
        skip = self.skip_batches
        role = (worker + skip) % workers
        skip_mine = max(0, (skip - role + workers - 1) // workers)  # batches i < skip with i ≡ role
        slot, slots = self.rank * workers + role, self.world_size * workers
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, role))
        if info is not None:  # seed the global generators timm's transforms draw from; only inside workers
            global_seed = mix_seed(self.seed, self.epoch, self.rank, role, "global")
            random.seed(global_seed), torch.manual_seed(global_seed), np.random.seed(global_seed % 2**32)
        urls, by_sample = self._urls(slot, slots, rng)
        samples: Iterator[dict] = self._read(urls)
        if by_sample:
            samples = (s for i, s in enumerate(samples) if i % slots == slot)
        if self.train and self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(samples)
        limit = None
        if self.train:
            limit = self.steps_per_epoch // workers + (role < self.steps_per_epoch % workers)
        counter, batch, done, last = SkipCounter(), [], 0, ""
        for sample in samples:
            if limit is not None and done >= limit:
                break
            counter.seen += 1
            key = f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"
            try:
                # While replaying the start of a resumed epoch: the same random draws, no decode.
                batch.append((*self._decode(sample, rng, dry=done < skip_mine), key))
            except _Skip as skip_reason:
                counter.skipped += 1
                last = f"{key}: {skip_reason}"
                if counter.skipped <= 100 or counter.skipped % 100 == 0:
                    log.warning("skipped %s (%d skipped of %d so far)", last, counter.skipped, counter.seen)
                self._check_bad(counter, last, final=False)
                continue
            if len(batch) == self.batch_size:
                done += 1
                if done > skip_mine:
                    yield _WorkerItem(_collate(batch), slot, counter.seen, counter.skipped)
                batch = []
        if not self.train:
            self._check_bad(counter, last, final=True)
            yield _WorkerItem(_collate(batch) if batch else None, slot, counter.seen, counter.skipped)


def _collate(items: list[tuple[Any, int, str]]) -> Batch:
    images, labels, keys = zip(*items)
    if isinstance(images[0], RawImage):  # decoded later, on the device (data/device_decode.py)
        return Batch(collate_raw(list(images)), torch.tensor(labels, dtype=torch.long), list(keys))
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys))


class ShardLoader:
    """A DataLoader over a ShardStream that yields `Batch`es and keeps its workers' skip counts."""

    def __init__(self, stream: ShardStream, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.stream = stream
        # Its own generator: creating an iterator must not draw from the training process's global RNG
        # (the model's masking uses it; a resumed run creates its iterator at another moment).
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=False, prefetch_factor=4 if num_workers else None,
                                 generator=torch.Generator())
        self._done = SkipCounter()  # finished epochs
        self._current: dict[int, tuple[int, int]] = {}  # slot → (seen, skipped) in this epoch

    @property
    def steps_per_epoch(self) -> int | None:
        return self.stream.steps_per_epoch

    def __len__(self) -> int:
        if self.stream.steps_per_epoch is None:
            raise TypeError("an evaluation loader has no fixed length per rank")
        return self.stream.steps_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.stream.set_epoch(epoch, skip_batches)

    @property
    def seen(self) -> int:
        return self._done.seen + sum(s for s, _ in self._current.values())

    @property
    def skipped(self) -> int:
        return self._done.skipped + sum(k for _, k in self._current.values())

    def __iter__(self) -> Iterator[Batch]:
        self._current = {}
        for item in self.loader:
            self._current[item.slot] = (item.seen, item.skipped)
            if item.batch is not None:
                yield item.batch
        self._done.seen, self._done.skipped, self._current = self.seen, self.skipped, {}


def train_loader(spec: str, transform: Transform, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, resample: bool = True, shuffle_buffer: int = 1000,
                 samples_per_epoch: int | None = None, max_bad_fraction: float = 0.001, accum_steps: int = 1,
                 pin_memory: bool = False) -> ShardLoader:
    """The training loader of one rank: full batches per epoch = samples // (batch × ranks × accum) × accum."""
    shards = resolve_shards(spec)
    total = samples_per_epoch or shards.total
    if total is None:
        raise ShardError(f"{spec}: no manifest gives the number of samples; write one with "
                         "`python -m crate_mae.data.shards manifest` or set data.train_samples")
    steps = total // (batch_size * world_size * accum_steps) * accum_steps
    if steps == 0:
        raise ShardError(f"{spec}: {total} samples make no full global batch of {batch_size} × {world_size} ranks"
                         f" × {accum_steps} accumulation steps")
    stream = ShardStream(shards, transform, batch_size=batch_size, train=True, rank=rank, world_size=world_size,
                         seed=seed, resample=resample, shuffle_buffer=shuffle_buffer, steps_per_epoch=steps,
                         max_bad_fraction=max_bad_fraction)
    return ShardLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


def eval_loader(spec: str, transform: Transform, *, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, max_bad_fraction: float = 0.001, pin_memory: bool = False) -> ShardLoader:
    """The evaluation loader of one rank: its share of every sample, exactly once over all ranks."""
    stream = ShardStream(resolve_shards(spec), transform, batch_size=batch_size, train=False, rank=rank,
                         world_size=world_size, max_bad_fraction=max_bad_fraction)
    return ShardLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


def config_train_loader(data: "DataConfig", spec: str, transform: Transform, *, rank: int, world_size: int,
                        seed: int, accum_steps: int, pin_memory: bool) -> ShardLoader:
    """`train_loader` with the settings of a config's `data` section (what every training stage uses)."""
    return train_loader(spec, transform, batch_size=data.batch_size, rank=rank, world_size=world_size, seed=seed,
                        num_workers=data.num_workers, resample=data.resample, shuffle_buffer=data.shuffle_buffer,
                        samples_per_epoch=data.train_samples, max_bad_fraction=data.max_bad_fraction,
                        accum_steps=accum_steps, pin_memory=pin_memory)


def config_eval_loader(data: "DataConfig", spec: str, img_size: int, *, rank: int, world_size: int,
                       pin_memory: bool) -> ShardLoader:
    """`eval_loader` of `EvalTransform(img_size, data.eval_crop_pct)` with the `data` section's settings."""
    from crate_mae.data.transforms import EvalTransform

    return eval_loader(spec, EvalTransform(img_size, crop_pct=data.eval_crop_pct), batch_size=data.batch_size,
                       rank=rank, world_size=world_size, num_workers=data.num_workers,
                       max_bad_fraction=data.max_bad_fraction, pin_memory=pin_memory)
