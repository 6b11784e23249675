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

A shard read that fails (`read_samples`) is a fourth thing again: a remote shard (`pipe:`, `http(s)://`, any scheme
but `file:`) is read again from its start after a wait, its samples already delivered passed over, so that the
consumer sees each sample once and in the order of an unbroken read; a local file is not (a corrupt file stays
corrupt). Every read checks that the shard's tar (gzip-compressed or not) reaches its end-of-archive marker.
"""
from __future__ import annotations

import logging
import random
import subprocess
import tarfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from crate_mae.data.manifest import (BLOCK, DECOMPRESS_ERRORS, MAGIC_BYTES, ShardError, compression, decompressing,
                                    tar_is_complete)
from crate_mae.data.tally import BadSample, DataError, SampleTally
from crate_mae.seeding import mix_seed

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
RETRY_CAP = 60.0  # seconds: the longest wait between two reads of a shard, however many retries
# The faults of a read that another read may not have: the transport's (an OSError: a pipe command's non-zero exit, a
# connection reset, a timeout), and a stream cut short or garbled on the way (tarfile's and the decompressors' errors).
# Anything else (a duplicate member name, an unknown URL scheme) would come back the same: it is not retried.
RETRYABLE = (OSError, tarfile.TarError, *DECOMPRESS_ERRORS)
NOT_RUNNABLE = (126, 127)  # a shell's exit status for a command it cannot run or find: a typo, not a hiccup
log = logging.getLogger("crate_mae.data")


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


def is_local(url: str) -> bool:
    """Whether webdataset's gopen reads `url` from a file itself (a plain path or `file:`), as opposed to through a
    command (`pipe:`) or a transfer (`http(s)://` and the other schemes gopen knows, each run by curl or the like)."""
    return urlparse(url).scheme in ("", "file")


class _Bytes:
    """A readable stream that counts the bytes read from it and keeps the last 1024 (for `tar_is_complete`), with
    `front` (bytes already taken from `stream`, as the peek at a compression's magic) given back first. Its str is the
    shard's url, which webdataset's tar reader appends to its errors (" @ <stream>"), so `_reason` can take it off."""

    def __init__(self, stream: Any, url: str, front: bytes = b"") -> None:
        self.stream, self.url, self.front, self.size, self.tail = stream, url, front, 0, b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            data, self.front = self.front + self.stream.read(), b""
        else:  # at most n bytes, as a file's read: the decompressors read their headers a few bytes at a time
            data, self.front = self.front[:n], self.front[n:]
            if len(data) < n:
                data += self.stream.read(n - len(data))
        self.size += len(data)
        self.tail = data[-2 * BLOCK:] if len(data) >= 2 * BLOCK else (self.tail + data)[-2 * BLOCK:]
        return data

    def __str__(self) -> str:
        return self.url


class _ReadFault(Exception):
    """One read of a shard failed: why, in one line, and whether another read may succeed."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason, self.retryable = reason, retryable


def _stop(raw: Any, grace: float = 0.0) -> int | None:
    """Ends a read that did not reach its clean end, never raising: the stream is closed, and a reader process (a
    `pipe:` command, curl) given `grace` seconds to end by itself, then killed. Its exit status when it ended by
    itself (None: no process, or killed here).

    A failed read gives a grace (the process has usually just ended, and its status says more than the tar
    reader's "empty file"); a consumer that stopped early gives none. Closing its stream first means a process still
    writing ends at once (SIGPIPE), and that a Pipe's own close, which waits for its process up to two hours, has
    nothing left to wait for."""
    proc = getattr(raw, "proc", None)
    try:
        getattr(raw, "stream", raw).close()
    except Exception:
        pass
    if proc is None:
        return None
    try:
        status = proc.wait(timeout=grace) if grace > 0 else proc.poll()
    except subprocess.TimeoutExpired:
        status = None
    if status is None:
        proc.kill()
        proc.wait()
    try:
        raw.close()  # nothing left to do but mark it closed (its stream is): its __del__ then does nothing
    except Exception:
        pass
    return status


def _failed(status: int | None) -> bool:
    """Whether a reader process's exit status is a failure of its own: not 0, not a death by a signal (negative:
    one we sent, or SIGPIPE after we closed its stream) nor a shell's 141 for SIGPIPE, which webdataset ignores."""
    return status is not None and status > 0 and status != 141


def _reason(err: BaseException, url: str, status: int | None) -> str:
    """One line saying why a read failed: a reader process's exit status when it ended badly (what webdataset's Pipe
    raises for it is a repr of its arguments), else the error's type and first message, without the decoration
    webdataset's tar reader appends to it."""
    if _failed(status):
        who = "the command" if url.startswith("pipe:") else "the download"
        what = {126: " (cannot run it)", 127: " (command not found)"}.get(status, "")
        return f"{who} exited with status {status}{what}"
    if isinstance(err, OSError) and err.strerror:  # webdataset adds (stream, url) to its args: use the fields
        text = f"[Errno {err.errno}] {err.strerror}" if err.errno is not None else err.strerror
    else:
        text = str(err.args[0]) if err.args else ""
    text = text.replace(f" @ {url}", "").strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'no message'}"


def _shard_samples(url: str) -> Iterator[dict]:
    """One read of a shard from its start: its complete samples in order (webdataset's tar reader groups a sample's
    members by key), or a _ReadFault.

    What it checks besides the tar reader: a compressed stream (gzip; bzip2, xz: found by its magic bytes, as
    tarfile's "r|*" would) is decompressed here, so a cut one is an EOFError and a garbled one a checksum error, and
    the tar inside is what is checked next (tarfile's own decompression would hide it): the tar must reach its
    end-of-archive marker (`tar_is_complete`), since tarfile ends silently at a missing or cut header; and a reader
    process must exit cleanly (closing a Pipe waits for it and raises for a non-zero status). The shard's last
    sample is held back until all of that has passed: the tar reader gives the sample it was grouping when its
    stream ends, and a stream cut at a member boundary would give that sample without its last members.
    """
    raw, closed, held = None, False, None
    try:
        raw = gopen(url, "rb")
        head = raw.read(MAGIC_BYTES)
        content = _Bytes(raw, url, head)
        kind = compression(head)
        if kind is not None:
            content = _Bytes(decompressing(kind, content), url)
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": content}])):
            if held is not None:
                yield held
            held = sample
        while content.read(1 << 16):  # the tar reader stops at the marker: read the padding after it (and the
            pass                      # compressed stream's end, whose checksums are checked there)
        if not tar_is_complete(content.size, content.tail):
            raise EOFError(f"the stream ended after {content.size} bytes without the tar's end-of-archive marker: "
                           f"cut short?")
        raw.close()  # a Pipe: waits for its process, raises for a non-zero exit
        closed = True
    except Exception as err:
        status = _stop(raw, grace=5.0) if raw is not None else None
        # A reader process that ended badly is a transport fault, whatever error its cut stream caused here.
        retryable = (_failed(status) or isinstance(err, RETRYABLE)) and status not in NOT_RUNNABLE
        raise _ReadFault(_reason(err, url, status), retryable) from None
    finally:
        if raw is not None and not closed:  # the consumer stopped early (GeneratorExit), or the read failed
            _stop(raw)
    if held is not None:
        yield held


def _backoff(retry: int, wait: float) -> float:
    """Seconds before retry number `retry` (1, 2, ...): `wait` doubled at each retry, at most RETRY_CAP (or `wait`,
    if larger), times a random factor in [0.5, 1] drawn from the system's entropy, so that the workers and ranks
    that lost the same object store at once do not all come back at the same moment (and the data order, drawn
    from seeded generators, is not touched)."""
    return min(wait * 2 ** (retry - 1), max(RETRY_CAP, wait)) * random.SystemRandom().uniform(0.5, 1.0)


def _read_shard(url: str, retries: int, wait: float) -> Generator[dict, None, int]:
    """The samples of one shard, each once and in order however many reads it takes; returns their number.

    A remote shard whose read fails in a way another read may not (`RETRYABLE`) is read again from its start, at
    most `retries` times, after `_backoff` waits, each logged; the samples an earlier read delivered are passed
    over, and the last of them must come back with the same key (else the shard changed between reads and no
    count would be exact: a ShardError). A local shard is read once: a corrupt file stays corrupt.
    """
    attempts = 1 + (retries if not is_local(url) else 0)
    count, last_key = 0, None
    for attempt in range(1, attempts + 1):
        seen = 0
        try:
            for sample in _shard_samples(url):
                seen += 1
                if seen < count:
                    continue
                if seen == count:
                    if sample.get("__key__") != last_key:
                        raise ShardError(f"{url}: read again after a failure, its sample {seen} is "
                                         f"{sample.get('__key__')!r}, not {last_key!r} as before: the shard changed "
                                         f"while it was read")
                    continue
                count, last_key = seen, sample.get("__key__")
                yield sample
            if seen < count:
                raise ShardError(f"{url}: read again after a failure, it holds {seen} samples, fewer than the {count} "
                                 f"already delivered: the shard changed while it was read")
            return count
        except _ReadFault as fault:
            if not fault.retryable or attempt == attempts:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise ShardError(f"{url}: cannot read the shard{tries} ({fault.reason})") from None
            delay = _backoff(attempt, wait)
            log.warning("%s: reading the shard failed on attempt %d of %d (%s); reading it again in %.2f s%s", url,
                        attempt, attempts, fault.reason, delay,
                        f", passing over the {count} samples already delivered" if count else "")
            time.sleep(delay)
    return count  # not reached: the last attempt returns or raises


def read_samples(urls: Iterable[str], *, spec: str, shards: int, expected: dict[str, int] | None = None,
                 retries: int = 0, wait: float = 1.0) -> Iterator[dict]:
    """The samples of each shard in turn (webdataset's tar reader groups a sample's members by key).

    A remote shard whose read fails is read again, `retries` times at most, `wait` seconds before the first retry
    (doubling): the consumer sees each sample once, in the order of an unbroken read (`_read_shard`). An unreadable
    or truncated tar (after the last attempt; a local file after the first) is a ShardError naming it; a shard read
    to its end with another number of samples than the manifest's (`expected`, by url) is a ShardError too, since
    the epoch length comes from those counts; a run of more empty shards than the set holds (an endless training
    order over empty shards) is a ShardError naming the set.
    """
    empty_run = 0
    for url in urls:
        count = yield from _read_shard(url, retries, wait)
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


def label(sample: dict, num_classes: int, classes_of: str) -> int:
    """The sample's class: a missing or non-integer one is a BadSample (that sample is unusable); a negative one, or
    one outside `num_classes` (0: not known), is a DataError naming the shard, key, value and the class count and
    where it comes from, `classes_of` (the set's manifest, or the model's head when the manifest lists none): the
    labels or the class list are wrong, as with 1-based labels, and skipping them would drop a whole class silently;
    caught here, before any step or probe uses the label."""
    if "cls" not in sample:
        raise BadSample("no label (cls): an unlabelled set? fine-tuning and the probes need labels")
    try:
        value = int(sample["cls"])
    except ValueError:
        raise BadSample(f"label {sample['cls'][:20]!r} is not an integer") from None
    if value < 0 or (num_classes and value >= num_classes):
        hint = "; 1-based labels?" if value == num_classes else ""
        raise DataError(f"{sample_key(sample)}: label {value} does not fit the {num_classes or 'known'} classes of "
                        f"{classes_of} (labels run 0 … {max(num_classes - 1, 0)}{hint})")
    return value


class Decode:
    """The decode step of one slot: `(sample, dry)` → (image, label), or a BadSample.

    The image bytes go through `transform(data, rng)` (data/transforms.py); `dry` (a replayed sample) makes only
    the transform's random draws (`transform.draw`, when it has one) and gives no image. With `labels` False
    (pretraining) the label is not read, so none can stop or skip a sample; it is -1.
    """

    def __init__(self, transform: Callable[[bytes, random.Random], Any], rng: random.Random, *, labels: bool,
                 num_classes: int, classes_of: str) -> None:
        self.transform, self.rng, self.labels, self.num_classes = transform, rng, labels, num_classes
        self.classes_of = classes_of  # where num_classes comes from, for `label`'s message

    def __call__(self, sample: dict, dry: bool) -> tuple[Any, int]:
        data = image_data(sample)
        y = label(sample, self.num_classes, self.classes_of) if self.labels else -1
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
