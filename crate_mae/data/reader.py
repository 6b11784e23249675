"""Reading a shard set as batches: one webdataset pipeline per (rank, worker) slot, in a DataLoader.

`ShardStream.pipeline` lists a slot's steps as timm's `ReaderWds` does (urls → read_samples → [split by sample] →
shuffle → decode or skip → batch); slot = rank · workers + role. Ours adds exact epochs (a training slot's shard
order is endless and it takes its share of steps_per_epoch: batch i of a rank comes from role i mod workers; an
evaluation gives every sample once over all slots: shards dealt out, or sample i to slot i mod slots when fewer);
resume (`set_epoch(epoch, replay=n)` continues after n batches of this rank: roles rotated, the replayed samples'
draws made, nothing decoded); and bad samples counted and judged in each slot (a worker that reads nothing usable
stops), their sum in the main process at each epoch's end, the first NAMED logged by name.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import random
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from crate_mae.config import DataConfig
from crate_mae.config.sections import PREEMPT_SIGNALS, stop_signals as signal_numbers
from crate_mae.data.manifest import ShardList, resolve_shards
from crate_mae.data.stream import BadSample, Batch, decode_sample, read_samples, sample_key
from crate_mae.data.transforms import EvalTransform, Transform
from crate_mae.errors import DataError, ShardError
from crate_mae.seeding import mix_seed, seed_everything

NAMED = 5  # bad samples a loader logs by name; the others are counted
log = logging.getLogger("crate_mae.data")


@dataclass
class SampleCount:
    """Samples seen and bad; `last`: the last bad one ("<shard>/<key>: <reason>"); `named`: the first NAMED, unsent."""

    seen: int = 0
    bad: int = 0
    last: str = ""
    named: list[str] = field(default_factory=list)
    handed: tuple[int, int] = (0, 0)  # (seen, bad) at the last hand-over

    def hand_over(self) -> tuple[int, int, str, list[str]]:
        """What is new since the last hand-over: (seen, bad, the last bad sample, the bad ones to name)."""
        (seen, bad), self.handed = self.handed, (self.seen, self.bad)
        named, self.named = self.named, []
        return self.seen - seen, self.bad - bad, self.last, named


def check_bad(count: SampleCount, max_fraction: float, spec: str, *, final: bool) -> None:
    """The rule: a DataError when more than `max_fraction` of the samples seen were bad; judged once 1/max_fraction
    samples are seen (one early bad sample does not stop a run), or at an epoch's end (`final`)."""
    if count.bad > max_fraction * count.seen and (final or max_fraction == 0 or count.seen >= 1 / max_fraction):
        raise DataError(f"{count.bad} of {count.seen} samples were bad, more than data.max_bad_fraction="
                        f"{max_fraction} (last: {count.last}); check the shards of {spec}")


def worker_role(worker: int, workers: int, replay: int) -> tuple[int, int]:
    """(role, batches it replays) of a worker when an epoch resumes after `replay` batches of this rank: the next
    batch comes from role replay mod workers, and a new DataLoader starts at worker 0."""
    role = (worker + replay) % workers
    return role, max(0, (replay - role + workers - 1) // workers)  # batches i < replay with i ≡ role


def shard_order(urls: list[str], *, train: bool, resample: bool, slot: int, slots: int, seed: int, epoch: int,
                rng: random.Random) -> tuple[Iterator[str], bool]:
    """(this slot's shard urls, whether to split by sample index). Evaluation: dealt out, or all to every slot when
    fewer than slots. Training, endless: drawn from `rng` (resample), or passes shuffled alike in all slots, dealt."""
    by_sample = len(urls) < slots
    if not train:
        return iter(urls if by_sample else urls[slot::slots]), by_sample
    if resample:
        return (rng.choice(urls) for _ in iter(int, 1)), False

    def passes() -> Iterator[str]:
        for k in iter(int, 1):
            order = list(urls)
            random.Random(mix_seed(seed, epoch, "pass", k)).shuffle(order)
            yield from (order if by_sample else order[slot::slots])
    return passes(), by_sample


def decode_or_skip(samples: Iterable[dict], decode: Callable[..., tuple[Any, int]], count: SampleCount, *,
                   max_fraction: float, spec: str, dry: int = 0, take: int | None = None) -> Iterator[tuple]:
    """(image, label, key) of the usable samples after the first `dry` (replayed: their draws made, not yielded), until
    `take` usable ones (None: all), reading no sample past it. A BadSample is counted and the rule judged."""
    good = 0
    for sample in samples if take != 0 else ():
        count.seen += 1
        try:
            image, y = decode(sample, dry=good < dry)
        except BadSample as why:
            count.bad, count.last = count.bad + 1, f"{sample_key(sample)}: {why}"
            count.named += [count.last] if count.bad <= NAMED else []
            check_bad(count, max_fraction, spec, final=False)
            continue
        good += 1
        if good > dry:
            yield image, y, sample_key(sample)
        if good == take:
            return


def collate(items: list[tuple[Any, int, str]], stack: Callable[[list[Any]], Any] = torch.stack) -> Batch:
    """(image, label, key) items → a Batch; `stack` is the transform's `collate` where it has one."""
    images, labels, keys = zip(*items)
    return Batch(stack(list(images)), torch.tensor(labels, dtype=torch.long), list(keys))


class ShardStream(IterableDataset):
    """One rank's batches, with the settings of `data`; in a DataLoader, each worker yields its slot's."""

    def __init__(self, shards: ShardList, transform: Transform, data: DataConfig, *, train: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, steps_per_epoch: int | None = None, labels: bool = True,
                 num_classes: int = 0) -> None:
        self.shards, self.transform, self.data, self.train, self.rank, self.world_size, self.seed, \
            self.steps_per_epoch, self.labels, self.epoch, self.replay = \
            shards, transform, data, train, rank, world_size, seed, steps_per_epoch, labels, 0, 0
        listed = shards.manifest.num_classes if shards.manifest else 0  # every label must fit these, else the head's
        self.num_classes = listed or num_classes
        self.classes_of = shards.spec if listed else f"the model's head ({shards.spec} lists no classes)"

    def pipeline(self, worker: int, workers: int, count: SampleCount) -> wds.DataPipeline:
        """This worker's slot's steps for the epoch set, as one list."""
        data, spec, urls, samples = self.data, self.shards.spec, self.shards.urls, self.shards.samples
        role, replayed = worker_role(worker, workers, self.replay)
        slot, slots = self.rank * workers + role, self.world_size * workers
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, role))
        global_seed = mix_seed(self.seed, self.epoch, self.rank, role, "global")
        transform: Any = self.transform
        if get_worker_info() is not None:  # timm's transforms draw from the global generators: seeded in workers
            seed_everything(global_seed)
        elif threading.current_thread() is threading.main_thread():  # in the training loop's thread (no workers):
            transform = OwnGenerators(transform, global_seed)  # its own generators, apart from the model's draws
        steps = self.steps_per_epoch or 0  # training: this role's share of the rank's batches; evaluation: all
        take = (steps // workers + (role < steps % workers)) * data.batch_size if self.train else None
        order, by_sample = shard_order(urls, train=self.train, resample=data.resample, slot=slot, slots=slots,
                                       seed=self.seed, epoch=self.epoch, rng=rng)
        decode = functools.partial(decode_sample, transform=transform, rng=rng, labels=self.labels,
                                   num_classes=self.num_classes, classes_of=self.classes_of)
        return wds.DataPipeline(
            lambda: order,
            functools.partial(read_samples, spec=spec, shards=len(urls), retries=data.read_retries,
                              wait=data.retry_wait, expected=dict(zip(urls, samples)) if samples else None),
            (lambda stream: (s for i, s in enumerate(stream) if i % slots == slot)) if by_sample else None,
            wds.shuffle(data.shuffle_buffer, initial=min(data.shuffle_buffer, 100), rng=rng)
            if self.train and data.shuffle_buffer > 1 else None,
            lambda stream: decode_or_skip(stream, decode, count, max_fraction=data.max_bad_fraction, spec=spec,
                                          dry=replayed * data.batch_size, take=take),
            wds.batched(data.batch_size, partial=not self.train,
                        collation_fn=functools.partial(collate, stack=getattr(self.transform, "collate", torch.stack))),
        )

    def __iter__(self) -> Iterator[tuple[Batch | Exception | None, tuple]]:
        """(batch, `SampleCount.hand_over()`) items, then (None, ...) at the slot's end, or (the error, ...) where one
        of ours stops it: it reaches the main process as it is, not as the DataLoader's traceback text."""
        info, count = get_worker_info(), SampleCount()
        try:
            for batch in self.pipeline(info.id if info else 0, info.num_workers if info else 1, count):
                yield batch, count.hand_over()
            yield None, count.hand_over()
        except (DataError, ShardError) as err:
            yield err, count.hand_over()


class OwnGenerators:
    """A transform run in the training process (`data.num_workers: 0`) with generator states of its own.

    timm's augmentations draw from the global Python, NumPy and torch generators, which the model draws from too
    (stochastic depth). In a worker they are the worker's own, seeded per epoch; here the transform's draws get a
    state of their own, seeded the same way, swapped in around each call and out after it. So the training's draws
    never interleave with the transform's, and a resume, whose replay runs the replayed samples' transforms without
    the steps between them, leaves both where an unbroken run has them. Only in the training loop's own thread: a
    background thread (pretraining's prefetch) swapping the global states would race the step's draws.
    """

    def __init__(self, transform: Callable, seed: int) -> None:
        self.transform = transform
        outside = _generator_states()
        seed_everything(seed)
        self.state = _generator_states()
        _set_generator_states(outside)

    def _run(self, fn: Callable, *args: Any) -> Any:
        outside = _generator_states()
        _set_generator_states(self.state)
        try:
            return fn(*args)
        finally:
            self.state = _generator_states()
            _set_generator_states(outside)

    def __call__(self, data: Any, rng: random.Random) -> Any:
        return self._run(self.transform, data, rng)

    def draw(self, data: Any, rng: random.Random) -> Any:
        """A replayed sample's draws only (`decode_sample`'s dry run), from the same states."""
        return self._run(getattr(self.transform, "draw", self.transform), data, rng)


def _generator_states() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_generator_states(states: tuple) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def _ignore_stop_signals(numbers: list[int], worker: int) -> None:
    """A worker ignores the run's stop signals, sent to the whole process group: the parent stops at a step boundary
    (engine/preempt.py) and ends its workers. The resource sharer's thread, cut off when it stops at once, is silent."""
    for number in numbers:
        signal.signal(number, signal.SIG_IGN)
    sys.excepthook = lambda kind, value, tb: None if isinstance(value, (ConnectionError, EOFError)) else \
        sys.__excepthook__(kind, value, tb)


def _end_workers(batches: Any) -> None:
    """Ends a DataLoader iterator's workers now: PyTorch's shutdown (a stop event, a join of 5 s each), then a kill
    for any still alive (PyTorch and Python's exit send SIGTERM, which the workers ignore)."""
    getattr(batches, "_shutdown_workers", lambda: None)()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)
    _LIVE.discard(batches)


# The DataLoader iterators whose workers may be alive, ended at exit: registered after torch's and multiprocessing's
# exit handlers (imported with DataLoader above), this runs before them, ending the workers of an iterator kept alive
# to the end (in a traceback, a prefetch thread), which multiprocessing would join for ever (they ignore its SIGTERM).
_LIVE: weakref.WeakSet = weakref.WeakSet()
atexit.register(lambda: [_end_workers(batches) for batches in list(_LIVE)])


class ShardLoader:
    """A DataLoader over a ShardStream yielding its `Batch`es; `seen` and `bad` count its samples over its epochs. The
    workers ignore `stop_signals` (the run's) and Ctrl-C; `named`: bad samples logged by name (None: all)."""

    def __init__(self, stream: ShardStream, *, pin_memory: bool = False, stop_signals: Sequence[str] = PREEMPT_SIGNALS,
                 named: int | None = NAMED) -> None:
        workers, ignored = stream.data.num_workers, signal_numbers(list(stop_signals))
        self.stream, self.named, self.seen, self.bad, self.last, self.logged = stream, named, 0, 0, "", 0
        # Its own generator: creating an iterator must not draw from the global RNG (the model's masking uses it).
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 prefetch_factor=4 if workers else None, generator=torch.Generator(),
                                 worker_init_fn=functools.partial(_ignore_stop_signals, ignored))

    def __len__(self) -> int:
        if self.stream.steps_per_epoch is None:
            raise TypeError("an evaluation loader has no fixed length per rank")
        return self.stream.steps_per_epoch

    def set_epoch(self, epoch: int, replay: int = 0) -> None:
        """Before iterating: the order of `epoch`, resumed after `replay` batches of this rank (same num_workers)."""
        self.stream.epoch, self.stream.replay = epoch, replay

    def __iter__(self) -> Iterator[Batch]:
        """One epoch's batches (evaluation: one pass), then the rule judged over every slot and epoch so far; the
        workers ended however the epoch ends."""
        bad_before, spec = self.bad, self.stream.shards.spec
        batches = iter(self.loader)
        _LIVE.add(batches)
        try:
            for item, (seen, bad, last, named) in batches:
                self.seen, self.bad, self.last = self.seen + seen, self.bad + bad, last if bad else self.last
                for name in named[:None if self.named is None else max(0, self.named - self.logged)]:
                    log.warning("skipped %s", name)
                    self.logged += 1
                if isinstance(item, Exception):
                    raise item
                if item is not None:
                    yield item
        finally:
            _end_workers(batches)
            if self.bad > max(self.logged, bad_before):
                log.warning("%s: %d of %d samples read so far were unusable and skipped (%d named above)", spec,
                            self.bad, self.seen, self.logged)
        check_bad(SampleCount(self.seen, self.bad, self.last), self.stream.data.max_bad_fraction, spec, final=True)


def train_loader(spec: str | ShardList, transform: Transform, *, data: DataConfig | None = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, accum_steps: int = 1, labels: bool = True, num_classes: int = 0,
                 pin_memory: bool = False, stop_signals: Sequence[str] = PREEMPT_SIGNALS,
                 **settings: Any) -> ShardLoader:
    """One rank's training batches, per epoch samples // (batch × ranks × accum) × accum of them, of `transform`ed
    images, with the settings of `data` (None: `DataConfig()`'s) and of each keyword given that names one of its
    fields (batch_size=...; None: `data`'s). `num_classes`: what every label must fit when the manifest lists none."""
    data, shards = replace(data or DataConfig(), **{k: v for k, v in settings.items() if v is not None}), \
        resolve_shards(spec)
    total = data.train_samples or shards.total
    if total is None:
        raise ShardError(f"{shards.spec}: no manifest gives the number of samples; write one with "
                         "`python -m crate_mae.data.shards manifest` or set data.train_samples")
    steps = total // (data.batch_size * world_size * accum_steps) * accum_steps
    if steps == 0:
        raise ShardError(f"{shards.spec}: {total} samples make no full global batch of {data.batch_size} × "
                         f"{world_size} ranks × {accum_steps} accumulation steps")
    stream = ShardStream(shards, transform, data, train=True, rank=rank, world_size=world_size, seed=seed,
                         steps_per_epoch=steps, labels=labels, num_classes=num_classes)
    return ShardLoader(stream, pin_memory=pin_memory, stop_signals=stop_signals)


def eval_loader(spec: str | ShardList, img_size: int, *, data: DataConfig | None = None, rank: int = 0,
                world_size: int = 1, labels: bool = True, num_classes: int = 0, pin_memory: bool = False,
                first_samples: int | None = None, stop_signals: Sequence[str] = PREEMPT_SIGNALS,
                **settings: Any) -> ShardLoader:
    """One rank's share of every sample, each once over all ranks, as `EvalTransform(img_size, data.eval_crop_pct)`'s
    pixels; settings as for `train_loader`. `first_samples`: only the leading shards that hold the first n samples."""
    data, shards = replace(data or DataConfig(), **{k: v for k, v in settings.items() if v is not None}), \
        resolve_shards(spec).first(first_samples)
    stream = ShardStream(shards, EvalTransform(img_size, crop_pct=data.eval_crop_pct), data, train=False, rank=rank,
                         world_size=world_size, labels=labels, num_classes=num_classes)
    return ShardLoader(stream, pin_memory=pin_memory, stop_signals=stop_signals)


def unlabelled(spec: str | ShardList) -> str | None:
    """Why the set cannot serve what needs labels (fine-tuning, the probes, the monitor's kNN): its manifest says it
    is unlabelled, or its first sample has no `cls` (a set is labelled throughout or not at all); None where it can."""
    shards = resolve_shards(spec)
    if shards.manifest is not None and not shards.manifest.labelled:
        return f"{shards.spec} has no labels (an unlabelled set)"
    with contextlib.closing(read_samples(shards.urls[:1], spec=shards.spec, shards=1)) as samples:
        first = next(samples, None)  # closed at once: a `pipe:` command ended
    return f"{shards.spec} has no labels (its first sample has no cls)" if first is None or "cls" not in first else None
