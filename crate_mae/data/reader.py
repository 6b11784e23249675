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
and key. When they exceed `max_bad_fraction` of a worker's samples (judged after 1/max_bad_fraction
samples, or at the end of its stream), it stops with an error: a systematic problem is not skipped.
The steps themselves (shard order, rank/worker split, decode-or-skip, batching) are in data/stream.py.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from crate_mae.data.device_decode import RawImage, collate_raw
from crate_mae.data.manifest import ShardError, ShardList, resolve_shards
from crate_mae.data.stream import (BadSample, DataError, SampleCount, batches, check_bad, decode_or_skip,
                                   merged_members, read_samples, sample_key, shard_order, shuffled, split_by_sample,
                                   worker_role)
from crate_mae.data.transforms import Transform
from crate_mae.seeding import mix_seed, seed_everything

if TYPE_CHECKING:
    from crate_mae.config import DataConfig

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class Batch(NamedTuple):
    images: Any  # (B, 3, S, S) uint8 pixels (the model normalises them) or normalised float; or a RawBatch
    labels: torch.Tensor  # (B,) int64
    keys: list[str]  # "<shard url>/<sample key>"


class _WorkerItem(NamedTuple):
    batch: Batch | None  # None: the worker's closing count
    slot: int
    seen: int
    bad: int
    last: str  # the worker's last bad sample so far ("" if none)


class ShardStream(IterableDataset):
    """Yields batches for one rank; inside a DataLoader each worker yields its own share (data/stream.py's steps)."""

    def __init__(self, shards: ShardList, transform: Transform, *, batch_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, resample: bool = True, shuffle_buffer: int = 1000,
                 steps_per_epoch: int | None = None, max_bad_fraction: float = 0.001, labels: bool = True) -> None:
        super().__init__()
        if train and not steps_per_epoch:
            raise ValueError("a training stream needs steps_per_epoch")
        self.shards, self.transform, self.batch_size, self.train = shards, transform, batch_size, train
        self.rank, self.world_size, self.seed, self.resample = rank, world_size, seed, resample
        self.shuffle_buffer, self.steps_per_epoch, self.max_bad_fraction = shuffle_buffer, steps_per_epoch, max_bad_fraction
        self.num_classes = shards.manifest.num_classes if shards.manifest else 0
        self.labels = labels  # False (pretraining): labels are not read, so none can stop or skip a sample
        self.epoch, self.replay = 0, 0

    def set_epoch(self, epoch: int, replay: int = 0) -> None:
        """Reseeds the order for `epoch`; `replay` resumes it after that many batches of this rank.

        Call before iterating (workers must not be persistent to see it). The replayed batches are formed
        without decoding (`transform.draw` makes the same random draws), so a resumed epoch continues with
        exactly the batches the interrupted one would have produced, given the same num_workers.
        """
        self.epoch, self.replay = epoch, replay

    def _decode(self, rng: random.Random) -> Callable[[dict, bool], tuple[torch.Tensor | None, int]]:
        """decode(sample, dry) → (image, label), or BadSample; `dry` makes the transform's random draws only."""
        def decode(sample: dict, dry: bool) -> tuple[torch.Tensor | None, int]:
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if data is None:
                merged = merged_members(sample)
                if merged:  # a naming fault of the whole set, not one bad sample: say what happened
                    key = sample_key(sample)
                    raise DataError(f"{key}: holds the members {', '.join(merged[:4])}: samples whose keys contain a "
                                    f"dot were merged (webdataset splits member names at the first dot); rewrite "
                                    f"the shards with keys without dots (python -m crate_mae.data.shards write)")
                raise BadSample(f"no image ({'/'.join(IMAGE_KEYS)})")
            label = self._label(sample) if self.labels else -1
            try:
                if dry:
                    getattr(self.transform, "draw", self.transform)(data, rng)
                    return None, label
                return self.transform(data, rng), label
            except Exception as err:  # PIL raises several types for corrupt or truncated images
                raise BadSample(f"undecodable image ({type(err).__name__}: {err})".split("\n")[0]) from None
        return decode

    def _label(self, sample: dict) -> int:
        """The sample's class: a missing or non-integer one is a BadSample (that sample is unusable); one outside the
        manifest's classes is a DataError naming the shard, key and value (the labels or the class list are wrong,
        as with 1-based labels: skipping them would drop a whole class silently)."""
        if "cls" not in sample:
            raise BadSample("no label (cls)")
        try:
            label = int(sample["cls"])
        except ValueError:
            raise BadSample(f"label {sample['cls'][:20]!r} is not an integer") from None
        if label < 0 or (self.num_classes and label >= self.num_classes):
            key = sample_key(sample)
            raise DataError(f"{key}: label {label} does not fit the {self.num_classes or 'known'} classes of "
                            f"{self.shards.spec} (labels run 0 … {max(self.num_classes - 1, 0)})")
        return label

    def __iter__(self) -> Iterator[_WorkerItem]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role, replay_mine = worker_role(worker, workers, self.replay)
        slot, slots = self.rank * workers + role, self.world_size * workers
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, role))
        if info is not None:  # timm's transforms draw from the global generators; seed them, only inside workers
            seed_everything(mix_seed(self.seed, self.epoch, self.rank, role, "global"))
        urls, by_sample = shard_order(self.shards.urls, train=self.train, resample=self.resample, slot=slot,
                                      slots=slots, seed=self.seed, epoch=self.epoch, rng=rng)
        expected = dict(zip(self.shards.urls, self.shards.samples)) if self.shards.samples is not None else None
        samples: Iterator[dict] = read_samples(urls, spec=self.shards.spec, shards=len(self.shards.urls),
                                               expected=expected)
        if by_sample:
            samples = split_by_sample(samples, slot, slots)
        if self.train:
            samples = shuffled(samples, self.shuffle_buffer, rng)
        count = SampleCount()
        items = decode_or_skip(samples, self._decode(rng), count, dry=replay_mine * self.batch_size,
                               max_bad_fraction=self.max_bad_fraction, spec=self.shards.spec)
        limit = None
        if self.train:  # every rank the same number of batches, dealt out to its workers in turn
            limit = self.steps_per_epoch // workers + (role < self.steps_per_epoch % workers)
        for batch in batches(items, self.batch_size, _collate, limit=limit, drop=replay_mine, partial=not self.train):
            yield _WorkerItem(batch, slot, count.seen, count.bad, count.last)
        if not self.train:
            check_bad(count, self.max_bad_fraction, self.shards.spec, final=True)
            yield _WorkerItem(None, slot, count.seen, count.bad, count.last)


def _collate(items: list[tuple[Any, int, str]]) -> Batch:
    images, labels, keys = zip(*items)
    if isinstance(images[0], RawImage):  # decoded later, on the device (data/device_decode.py)
        return Batch(collate_raw(list(images)), torch.tensor(labels, dtype=torch.long), list(keys))
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys))


class ShardLoader:
    """A DataLoader over a ShardStream that yields `Batch`es and keeps its workers' sample counts (seen, bad)."""

    def __init__(self, stream: ShardStream, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.stream = stream
        # Its own generator: creating an iterator must not draw from the training process's global RNG
        # (the model's masking uses it; a resumed run creates its iterator at another moment).
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=False, prefetch_factor=4 if num_workers else None,
                                 generator=torch.Generator())
        self._done = SampleCount()  # finished epochs
        self._current: dict[int, tuple[int, int]] = {}  # slot → (seen, bad) in this epoch
        self._last = ""  # the last bad sample any worker reported

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
        return self._done.seen + sum(s for s, _ in self._current.values())

    @property
    def bad(self) -> int:
        """Bad samples skipped so far, over this loader's epochs."""
        return self._done.bad + sum(k for _, k in self._current.values())

    def __iter__(self) -> Iterator[Batch]:
        """One epoch's batches. At its end the bad samples are judged over everything this loader has read, all
        workers and epochs together: a run of short epochs cannot stay under the limit epoch by epoch."""
        self._current = {}
        try:
            for item in self.loader:
                self._current[item.slot] = (item.seen, item.bad)
                self._last = item.last or self._last
                if item.batch is not None:
                    yield item.batch
        except (DataError, ShardError) as err:  # raised in a worker: the DataLoader wraps it in a traceback text
            raise type(err)(_worker_message(err)) from None
        self._done.seen, self._done.bad, self._current = self.seen, self.bad, {}
        check_bad(SampleCount(self.seen, self.bad, self._last), self.stream.max_bad_fraction, self.stream.shards.spec,
                  final=True)


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


def train_loader(spec: str, transform: Transform, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, resample: bool = True, shuffle_buffer: int = 1000,
                 samples_per_epoch: int | None = None, max_bad_fraction: float = 0.001, accum_steps: int = 1,
                 pin_memory: bool = False, labels: bool = True) -> ShardLoader:
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
                         max_bad_fraction=max_bad_fraction, labels=labels)
    return ShardLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


def eval_loader(spec: str, transform: Transform, *, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, max_bad_fraction: float = 0.001, pin_memory: bool = False,
                labels: bool = True) -> ShardLoader:
    """The evaluation loader of one rank: its share of every sample, exactly once over all ranks."""
    stream = ShardStream(resolve_shards(spec), transform, batch_size=batch_size, train=False, rank=rank,
                         world_size=world_size, max_bad_fraction=max_bad_fraction, labels=labels)
    return ShardLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


def config_train_loader(data: "DataConfig", spec: str, transform: Transform, *, rank: int, world_size: int,
                        seed: int, accum_steps: int, pin_memory: bool, labels: bool = True) -> ShardLoader:
    """`train_loader` with the settings of a config's `data` section (what every training stage uses)."""
    return train_loader(spec, transform, batch_size=data.batch_size, rank=rank, world_size=world_size, seed=seed,
                        num_workers=data.num_workers, resample=data.resample, shuffle_buffer=data.shuffle_buffer,
                        samples_per_epoch=data.train_samples, max_bad_fraction=data.max_bad_fraction,
                        accum_steps=accum_steps, pin_memory=pin_memory, labels=labels)


def config_eval_loader(data: "DataConfig", spec: str, img_size: int, *, rank: int, world_size: int,
                       pin_memory: bool) -> ShardLoader:
    """`eval_loader` of `EvalTransform(img_size, data.eval_crop_pct)` with the `data` section's settings."""
    from crate_mae.data.transforms import EvalTransform

    return eval_loader(spec, EvalTransform(img_size, crop_pct=data.eval_crop_pct), batch_size=data.batch_size,
                       rank=rank, world_size=world_size, num_workers=data.num_workers,
                       max_bad_fraction=data.max_bad_fraction, pin_memory=pin_memory)
