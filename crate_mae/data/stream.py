"""The shard stream's steps, each a plain function (or a small class) tested alone, as timm's WebDataset reader
composes its own. `reader.ShardStream.__iter__` lists them for one slot, one line each:

    shard_order → read_samples → [split_by_sample] → [shuffled] → decode_or_skip (Decode) → batches (collate)

None of them calls back into the file that composes them. A *slot* is one (rank, worker) pair reading its own part:
slot = rank · workers + role, slots = ranks · workers. Nothing here knows about DataLoaders or models.

Three ideas that an older version called "skip" have three names here:
- **replay** — after a resume, the first batches of an epoch (already trained on) are replayed: their random draws
  made again, nothing decoded, nothing yielded (`decode_or_skip(dry=...)`, `batches(drop=...)`);
- **BadSample** — one unusable sample (no image, no label, an undecodable image), skipped and logged;
- **SampleTally** (data/tally.py) — how many samples each slot has seen and how many of them were bad.

The bad-sample rule is judged in one step, `decode_or_skip`, on the tally its slot shares with the loader's other
workers: where and why there is data/tally.py's docstring.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
import webdataset as wds

from crate_mae.data.manifest import ShardError
from crate_mae.data.tally import BadSample, DataError, SampleTally
from crate_mae.seeding import mix_seed

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class Batch(NamedTuple):
    images: Any  # uint8 pixels (B, 3, S, S); or a RawBatch (data.decode_on: device), made pixels by `to_device`
    labels: torch.Tensor  # (B,) int64; -1 when the labels are not read (pretraining)
    keys: list[str]  # "<shard url>/<sample key>"


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


def image_data(sample: dict) -> bytes:
    """The sample's encoded image. None is a BadSample; members that show samples merged by a dotted key are a
    DataError (a naming fault of the whole set, not one bad sample: say what happened)."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is not None:
        return data
    merged = merged_members(sample)
    if merged:
        raise DataError(f"{sample_key(sample)}: holds the members {', '.join(merged[:4])}: samples whose keys contain "
                        f"a dot were merged (webdataset splits member names at the first dot); rewrite the shards "
                        f"with keys without dots (python -m crate_mae.data.shards write)")
    raise BadSample(f"no image ({'/'.join(IMAGE_KEYS)})")


def label(sample: dict, num_classes: int, spec: str) -> int:
    """The sample's class: a missing or non-integer one is a BadSample (that sample is unusable); one outside the
    manifest's `num_classes` (0: not known) is a DataError naming the shard, key and value (the labels or the class
    list are wrong, as with 1-based labels: skipping them would drop a whole class silently)."""
    if "cls" not in sample:
        raise BadSample("no label (cls)")
    try:
        value = int(sample["cls"])
    except ValueError:
        raise BadSample(f"label {sample['cls'][:20]!r} is not an integer") from None
    if value < 0 or (num_classes and value >= num_classes):
        raise DataError(f"{sample_key(sample)}: label {value} does not fit the {num_classes or 'known'} classes of "
                        f"{spec} (labels run 0 … {max(num_classes - 1, 0)})")
    return value


class Decode:
    """The decode step of one slot: `(sample, dry)` → (image, label), or a BadSample.

    The image bytes go through `transform(data, rng)` (data/transforms.py); `dry` (a replayed sample) makes only
    the transform's random draws (`transform.draw`, when it has one) and gives no image. With `labels` False
    (pretraining) the label is not read, so none can stop or skip a sample; it is -1.
    """

    def __init__(self, transform: Callable[[bytes, random.Random], Any], rng: random.Random, *, labels: bool,
                 num_classes: int, spec: str) -> None:
        self.transform, self.rng, self.labels, self.num_classes, self.spec = transform, rng, labels, num_classes, spec

    def __call__(self, sample: dict, dry: bool) -> tuple[Any, int]:
        data = image_data(sample)
        y = label(sample, self.num_classes, self.spec) if self.labels else -1
        try:
            if dry:
                getattr(self.transform, "draw", self.transform)(data, self.rng)
                return None, y
            return self.transform(data, self.rng), y
        except Exception as err:  # PIL raises several types for corrupt or truncated images
            raise BadSample(f"undecodable image ({type(err).__name__}: {err})".split("\n")[0]) from None


def decode_or_skip(samples: Iterable[dict], decode: Callable[[dict, bool], tuple[Any, int]], tally: SampleTally,
                   row: int, *, dry: int = 0, take: int | None = None) -> Iterator[tuple[Any, int, str]]:
    """(image, label, key) of each usable sample, `take` of them at most (None: until the samples end); a BadSample
    is counted in the tally's `row`, logged and skipped, and the rule judged (where and why: data/tally.py).

    `decode(sample, dry)` gives (image, label) or raises BadSample; the first `dry` usable samples (those of the
    replayed batches) are decoded dry: the same random draws, no image (None). No sample is read past the `take`-th
    usable one. When the stream ends, the rule is judged once more, over every row if this one is the last to end.
    """
    good, samples = 0, iter(samples)
    tally.start_stream(row)
    while take is None or good < take:
        sample = next(samples, None)
        if sample is None:
            break
        tally.seen(row)
        key = sample_key(sample)
        try:
            image, y = decode(sample, good < dry)
        except BadSample as reason:
            tally.bad(row, f"{key}: {reason}")
            tally.judge(row, end=False)
            continue
        good += 1
        yield image, y, key
    tally.judge(row, end=True)


def batches(items: Iterable[Any], size: int, collate: Callable[[list[Any]], Any], *, drop: int = 0,
            partial: bool = False) -> Iterator[Any]:
    """Full batches of `size` items, collated, the first `drop` replayed (formed but not collated or yielded); with
    `partial`, the last short batch too (evaluation)."""
    batch: list[Any] = []
    done = 0
    for item in items:
        batch.append(item)
        if len(batch) == size:
            done += 1
            if done > drop:
                yield collate(batch)
            batch = []
    if partial and batch:
        yield collate(batch)


def collate(items: list[tuple[Any, int, str]], stack: Callable[[list[Any]], Any] = torch.stack) -> Batch:
    """(image, label, key) items → a Batch; `stack` batches the images (the transform's `collate` where it has one:
    `DeviceCropTransform`'s makes a RawBatch, decoded on the device)."""
    images, labels, keys = zip(*items)
    return Batch(stack(list(images)), torch.tensor(labels, dtype=torch.long), list(keys))
