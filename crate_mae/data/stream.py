"""The shard stream as small steps, each a generator tested alone (as timm's WebDataset reader composes its own):

    shard_order → read_samples → [split_by_sample] → shuffled → decode_or_skip → batches

A *slot* is one (rank, worker) pair reading its own part: slot = rank · workers + role, slots = ranks · workers.
`reader.ShardStream` composes the steps for one slot; nothing here knows about DataLoaders or models.

Three ideas that an older version called "skip" have three names here:
- **replay** — after a resume, the first batches of an epoch (already trained on) are replayed: their random draws
  made again, nothing decoded, nothing yielded (`decode_or_skip(dry=...)`, `batches(drop=...)`);
- **BadSample** — one unusable sample (no image, no label, an undecodable image), skipped and logged;
- **SampleCount** — how many samples a slot has seen and how many of them were bad.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from crate_mae.data.manifest import ShardError
from crate_mae.seeding import mix_seed

log = logging.getLogger("crate_mae.data")


class DataError(RuntimeError):
    """Too much of the data is bad to go on."""


class BadSample(Exception):
    """One sample that cannot be used; the message says why."""


@dataclass
class SampleCount:
    """Samples a slot has seen, and how many of them were bad."""

    seen: int = 0
    bad: int = 0
    last: str = ""  # the last bad sample, "<shard>/<key>: <reason>"


def worker_role(worker: int, workers: int, replay: int) -> tuple[int, int]:
    """(role, batches this worker replays) when an epoch resumes after `replay` batches of this rank.

    The DataLoader takes batch i from worker i mod workers. After `replay` batches the next one must come from
    role replay mod workers, but a new DataLoader starts at worker 0: the roles are rotated.
    """
    role = (worker + replay) % workers
    return role, max(0, (replay - role + workers - 1) // workers)  # batches i < replay with i ≡ role


def sample_key(sample: dict) -> str:
    """"<shard url>/<sample key>": how every message and Batch names a sample."""
    return f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"


def merged_members(sample: dict) -> list[str]:
    """The member suffixes that show several samples merged into one: webdataset splits a member name at its
    *first* dot, so the members of samples keyed `img.1`, `img.2` (files `img.1.jpg`, `img.2.jpg`, ...) all land in
    one sample `img` as `1.jpg`, `2.jpg`. Empty when the sample looks like one sample."""
    return sorted(k for k in sample if not k.startswith("__") and "." in k
                  and k.rsplit(".", 1)[1] in ("jpg", "jpeg", "png", "webp", "cls"))


def shard_order(urls: list[str], *, train: bool, resample: bool, slot: int, slots: int, seed: int, epoch: int,
                rng: random.Random) -> tuple[Iterator[str], bool]:
    """(the shard urls this slot reads, whether to split by sample index instead of by shard).

    Evaluation: shards dealt out in order to the slots, every shard once; with fewer shards than slots, every slot
    reads every shard and `split_by_sample` keeps its share. Training: endless, either resampled (each slot draws
    shards at random from `rng`, as webdataset's ResampledShards) or in passes that shuffle the whole list with a
    seed shared by all slots and deal it out.
    """
    by_sample = len(urls) < slots
    if not train:
        return iter(urls if by_sample else urls[slot::slots]), by_sample
    if resample:
        return (rng.choice(urls) for _ in iter(int, 1)), False

    def passes() -> Iterator[str]:
        for k in iter(int, 1):  # endless passes, each in a new order shared by all slots
            order = list(urls)
            random.Random(mix_seed(seed, epoch, "pass", k)).shuffle(order)
            yield from (order if by_sample else order[slot::slots])
    return passes(), by_sample


def read_samples(urls: Iterable[str], *, spec: str, shards: int, expected: dict[str, int] | None = None
                 ) -> Iterator[dict]:
    """The samples of each shard in turn (webdataset's tar reader groups a sample's members by key).

    An unreadable or truncated tar is a ShardError naming it; a shard read to its end with another number of
    samples than the manifest's (`expected`, by url) is a ShardError too, since the epoch length comes from those
    counts; a run of more empty shards than the set holds (an endless training order over empty shards) is a
    ShardError naming the set.
    """
    empty_run = 0
    for url in urls:
        count = 0
        try:
            for sample in wds.tarfile_samples([{"url": url}]):
                count += 1
                yield sample
        except Exception as err:  # a truncated or unreadable tar: name it and stop
            raise ShardError(f"{url}: cannot read the shard ({type(err).__name__}: {err})".split("\n")[0]) from None
        if expected is not None and url in expected and expected[url] != count:
            raise ShardError(f"{url}: {count} samples, but the manifest of {spec} says {expected[url]}; recount with "
                             f"python -m crate_mae.data.shards manifest (see its --verify)")
        got = count > 0
        empty_run = 0 if got else empty_run + 1
        if empty_run > max(shards, 8):
            raise ShardError(f"{spec}: the shards hold no samples")


def split_by_sample(samples: Iterable[Any], slot: int, slots: int) -> Iterator[Any]:
    """Sample i goes to slot i mod slots: every sample exactly once over the slots."""
    return (s for i, s in enumerate(samples) if i % slots == slot)


def shuffled(samples: Iterable[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle buffer of `buffer` samples, drawing from `rng` (no shuffling below 2)."""
    if buffer < 2:
        return iter(samples)
    return wds.shuffle(buffer, initial=min(buffer, 100), rng=rng)(iter(samples))


def check_bad(count: SampleCount, max_fraction: float, spec: str, *, final: bool) -> None:
    """A DataError when more than `max_fraction` of the samples seen were bad: judged once 1/max_fraction samples
    have been seen (so that one early bad sample does not stop a run), or at the end of a stream (`final`)."""
    judged = final or max_fraction == 0 or count.seen >= 1 / max_fraction
    if count.bad and judged and count.bad > max_fraction * count.seen:
        raise DataError(f"{count.bad} of {count.seen} samples were bad, more than data.max_bad_fraction="
                        f"{max_fraction} (last: {count.last}); check the shards of {spec}")


def decode_or_skip(samples: Iterable[dict], decode: Callable[[dict, bool], tuple[Any, int]], count: SampleCount, *,
                   dry: int = 0, max_bad_fraction: float, spec: str) -> Iterator[tuple[Any, int, str]]:
    """(image, label, key) of each usable sample; a BadSample is counted, logged and skipped.

    `decode(sample, dry)` gives (image, label) or raises BadSample; the first `dry` usable samples (those of the
    replayed batches) are decoded dry: the same random draws, no image (None). Past `max_bad_fraction` a DataError.
    """
    good = 0
    for sample in samples:
        count.seen += 1
        key = sample_key(sample)
        try:
            image, label = decode(sample, good < dry)
        except BadSample as reason:
            count.bad, count.last = count.bad + 1, f"{key}: {reason}"
            if count.bad <= 100 or count.bad % 100 == 0:
                log.warning("skipped %s (%d bad of %d so far)", count.last, count.bad, count.seen)
            check_bad(count, max_bad_fraction, spec, final=False)
            continue
        good += 1
        yield image, label, key


def batches(items: Iterable[Any], size: int, collate: Callable[[list[Any]], Any], *, limit: int | None = None,
            drop: int = 0, partial: bool = False) -> Iterator[Any]:
    """Full batches of `size` items, collated; at most `limit` of them (counting the first `drop`, which are
    replayed: formed but not collated or yielded); with `partial`, the last short batch too (evaluation)."""
    batch: list[Any] = []
    done = 0
    if limit == 0:
        return
    for item in items:
        batch.append(item)
        if len(batch) == size:
            done += 1
            if done > drop:
                yield collate(batch)
            batch = []
            if limit is not None and done >= limit:
                return  # before pulling (and decoding) one more sample
    if partial and batch:
        yield collate(batch)
