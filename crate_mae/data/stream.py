"""Reading shards (`read_samples`, the read step of data/reader.py's pipeline) and the rules of one sample. webdataset's
`gopen` and tar expander read a shard; ours decompresses it, checks its end-of-archive marker and a reader process's
status, and reads a failed remote shard again, passing over the samples already delivered."""
from __future__ import annotations

import contextlib
import logging
import random
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from crate_mae.data.manifest import BLOCK, DECOMPRESS_ERRORS, MAGIC_BYTES, compression, decompressing, is_remote, \
    tar_is_complete
from crate_mae.errors import DataError, ShardError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
RETRY_CAP = 60.0  # seconds: the longest wait between two reads of a shard
RETRYABLE = (OSError, tarfile.TarError, *DECOMPRESS_ERRORS)  # a transport's fault, a stream cut or garbled on the way
NOT_RUNNABLE = (126, 127)  # a shell's status for a command it cannot run or find: a typo, not a hiccup
log = logging.getLogger("crate_mae.data")


class Batch(NamedTuple):
    images: Any  # uint8 pixels (B, 3, S, S); or a RawBatch (data.decode_on: device), made pixels by `to_device`
    labels: torch.Tensor  # (B,) int64; -1 when the labels are not read (pretraining)
    keys: list[str]  # "<shard url>/<sample key>"


class BadSample(Exception):
    """One sample that cannot be used (no image, no label, an undecodable image): skipped and counted."""


class _CountingReader:
    """A readable over `stream`, `peeked` (bytes already taken from it) first, that counts the bytes read and keeps
    the last 1024 (for `tar_is_complete`). Its str, which the tar reader appends to errors, is the url."""

    def __init__(self, stream: Any, url: str, peeked: bytes = b"") -> None:
        self.stream, self.url, self.peeked, self.size, self.tail = stream, url, peeked, 0, b""

    def read(self, n: int = -1) -> bytes:
        whole = n is None or n < 0  # else at most n bytes, as a file's read: decompressors read headers bit by bit
        data, self.peeked = (self.peeked, b"") if whole else (self.peeked[:n], self.peeked[n:])
        if whole or len(data) < n:
            data += self.stream.read() if whole else self.stream.read(n - len(data))
        self.size, self.tail = self.size + len(data), (self.tail + data)[-2 * BLOCK:]
        return data

    def __str__(self) -> str:
        return self.url


def _stop(raw: Any, grace: float = 0.0) -> int | None:
    """Ends a read short of its clean end, never raising: the stream closed, its process given `grace` seconds, then
    killed. The process's own failing exit status (not a shell's 141: SIGPIPE after we closed it), else None."""
    proc = getattr(raw, "proc", None)
    with contextlib.suppress(Exception):
        getattr(raw, "stream", raw).close()
    if proc is None:
        return None
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    if proc.returncode is None:
        proc.kill()
        proc.wait()
    with contextlib.suppress(Exception):
        raw.close()  # marks it closed (its stream is): its __del__ then does nothing
    return proc.returncode if proc.returncode > 0 and proc.returncode != 141 else None


class _ReadFault(Exception):
    """A failed read: args (why, in one line; whether another read may succeed)."""


def _read_once(url: str) -> Iterator[dict]:
    """One read of a shard: its samples in order, or a _ReadFault. The last waits for the tar's end-of-archive marker
    (tarfile ends silently at a cut header, and its own decompression would hide it) and a Pipe's close."""
    raw, closed, pending = None, False, None
    try:
        raw = gopen(url, "rb")
        head = raw.read(MAGIC_BYTES)
        content, kind = _CountingReader(raw, url, head), compression(head)
        if kind is not None:
            content = _CountingReader(decompressing(kind, content), url)
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": content}])):
            if pending is not None:
                yield pending
            pending = sample
        while content.read(1 << 16):  # past the marker: its padding (and a compressed stream's checked end)
            pass
        if not tar_is_complete(content.size, content.tail):
            raise EOFError(f"the stream ended after {content.size} bytes without the tar's end-of-archive marker: "
                           f"cut short?")
        raw.close()
        closed = True
    except Exception as err:
        status = _stop(raw, grace=5.0)
        if status is not None:  # the process's own failure says more than the error it caused
            what = {126: " (cannot run it)", 127: " (command not found)"}.get(status, "")
            why = f"{'the command' if url.startswith('pipe:') else 'the download'} exited with status {status}{what}"
        else:  # webdataset adds (stream, url) to an error's args: an OSError's fields, else its first arg
            text = (f"[Errno {err.errno}] " if err.errno is not None else "") + str(err.strerror) \
                if isinstance(err, OSError) and err.strerror else str(err.args[0]) if err.args else ""
            text = text.replace(f" @ {url}", "").strip()
            why = f"{type(err).__name__}: {text.splitlines()[0] if text else 'no message'}"
        retryable = (status is not None or isinstance(err, RETRYABLE)) and status not in NOT_RUNNABLE
        raise _ReadFault(why, retryable) from None
    finally:
        if not closed:  # the consumer stopped early (GeneratorExit), or the read failed
            _stop(raw)
    if pending is not None:
        yield pending


def _backoff(retry: int, wait: float) -> float:
    """Seconds before retry `retry` (1, 2, ...): `wait` doubled at each, at most RETRY_CAP (or `wait`), times a factor
    in [0.5, 1] from the system's entropy (workers that lost the same store come back apart; no seed is touched)."""
    return min(wait * 2 ** (retry - 1), max(RETRY_CAP, wait)) * random.SystemRandom().uniform(0.5, 1.0)


def read_samples(urls: Iterable[str], *, spec: str, shards: int, expected: dict[str, int] | None = None,
                 retries: int = 0, wait: float = 1.0) -> Iterator[dict]:
    """Each shard's samples, each once and in order: a remote shard is read again up to `retries` times (`wait` s before
    the first, doubling), passing over the samples delivered (the last must come back with the same key). A ShardError
    names a shard that cannot be read or whose count is not `expected[url]`, or the set when too many are empty."""
    empty_run = 0
    for url in urls:
        attempts, count, last_key = 1 + (retries if is_remote(url) else 0), 0, None
        for attempt in range(1, attempts + 1):
            seen = 0
            try:
                for sample in _read_once(url):
                    seen += 1
                    if seen == count and sample.get("__key__") != last_key:
                        raise ShardError(f"{url}: read again after a failure, its sample {seen} is "
                                         f"{sample.get('__key__')!r}, not {last_key!r} as before: the shard changed "
                                         f"while it was read")
                    if seen > count:
                        count, last_key = seen, sample.get("__key__")
                        yield sample
                if seen < count:
                    raise ShardError(f"{url}: read again after a failure, it holds {seen} samples, fewer than the "
                                     f"{count} already delivered: the shard changed while it was read")
                break
            except _ReadFault as fault:
                (why, retryable), delay = fault.args, _backoff(attempt, wait)
                if not retryable or attempt == attempts:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise ShardError(f"{url}: cannot read the shard{tries} ({why})") from None
                log.warning("%s: reading the shard failed on attempt %d of %d (%s); reading it again in %.2f s%s",
                            url, attempt, attempts, why, delay,
                            f", passing over the {count} samples already delivered" if count else "")
                time.sleep(delay)
        if expected and url in expected and expected[url] != count:
            raise ShardError(f"{url}: {count} samples, but the manifest of {spec} says {expected[url]}; recount with "
                             f"python -m crate_mae.data.shards manifest (see its --verify)")
        empty_run = 0 if count else empty_run + 1
        if empty_run > max(shards, 8):
            raise ShardError(f"{spec}: the shards hold no samples")


def sample_key(sample: dict) -> str:
    """"<shard url>/<sample key>": how every message and Batch names a sample."""
    return f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"


def merged_members(sample: dict) -> list[str]:
    """The members that show samples merged into one: webdataset splits member names at the first dot, so samples
    keyed `img.1`, `img.2` become one sample `img` with `1.jpg`, `2.jpg`. Empty for a true sample."""
    return sorted(k for k in sample if not k.startswith("__") and "." in k
                  and k.rsplit(".", 1)[1] in (*IMAGE_KEYS, "cls"))


def label(sample: dict, num_classes: int, classes_of: str) -> int:
    """The sample's class; missing or no integer: a BadSample. Outside `num_classes` (0: unknown) from `classes_of`:
    a DataError naming shard, key and value (1-based labels would otherwise drop a whole class silently)."""
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


def decode_sample(sample: dict, transform: Callable, rng: random.Random, *, labels: bool, num_classes: int,
                  classes_of: str, dry: bool) -> tuple[Any, int]:
    """(`transform(image bytes, rng)`, label), or a BadSample; `dry` (a replayed sample) makes only the random draws
    (`transform.draw`) and gives None. Without `labels` (pretraining) the label is -1, unread."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        if merged := merged_members(sample):
            raise DataError(f"{sample_key(sample)}: holds the members {', '.join(merged[:4])}: samples whose keys "
                            f"contain a dot were merged (webdataset splits member names at the first dot); rewrite "
                            f"the shards with keys without dots (python -m crate_mae.data.shards write)")
        raise BadSample(f"no image ({'/'.join(IMAGE_KEYS)})")
    y = label(sample, num_classes, classes_of) if labels else -1
    try:
        if dry:
            getattr(transform, "draw", transform)(data, rng)
            return None, y
        return transform(data, rng), y
    except Exception as err:  # PIL raises several types for corrupt or truncated images
        raise BadSample(f"undecodable image ({type(err).__name__}: {err})".split("\n")[0]) from None
