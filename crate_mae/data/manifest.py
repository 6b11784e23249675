"""Shard sets: the manifest beside them, and turning a user's shard spec into a checked list.

A split's manifest (`<folder>/<split>.json`, written last and atomically by the writer) records each
shard's name, sample count and byte size, the total, the classes and the image size if fixed. Readers
take the epoch length from it and, before training starts, check every local shard against it.

A shard spec (`data.train_shards`) is one of:
  shards/imagenet/train.json                    a manifest (recommended)
  shards/imagenet/train-{000000..001023}.tar    brace pattern (its sibling train.json is used if present)
  shards/imagenet/train-*.tar                   glob
  shards/imagenet/train-*.tar.gz                gzip-compressed shards (.tar.gz, .tgz) in any of the forms above
  pipe:curl -s https://host/train-{0..9}.tar    webdataset URLs (not checked; give a manifest for counts)

A brace pattern or glob without a sibling manifest takes its counts (and classes) from a published set's
`_info.json` / `_info.yaml` beside the shards where there is one (data/info.py: timm's convention, also fetched for
http(s) URLs and through `pipe:` commands).

A shard is compressed when its first bytes say so, whatever its name, as webdataset's tar reader (tarfile's "r|*")
decides too: a `.tar.gz` holding a plain tar is read as a plain tar. Gzip is the WebDataset format; bzip2 and xz,
which the same reader takes, are read and checked the same way.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import dataclasses
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO
from dataclasses import asdict, dataclass, field
from pathlib import Path

import braceexpand

from crate_mae.atomic import atomic_path
from crate_mae.errors import ShardError  # here too: the data layer's own error, by its old name

FORMAT = "crate-mae-shards/1"
BLOCK = 512  # a tar block; an archive ends with two zero blocks (the end-of-archive marker), then zero padding
MAGIC_BYTES = 10  # as many first bytes as `compression` looks at
# The errors of a compressed stream that is cut short (EOFError) or garbled (the rest; gzip's BadGzipFile and bz2's
# "Invalid data stream" are OSErrors).
DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)
_OPENERS: dict[str, Callable[..., BinaryIO]] = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}


def compression(head: bytes) -> str | None:
    """The compression of a stream whose first bytes are `head` (MAGIC_BYTES of them): "gzip", "bzip2", "xz", or
    None for a plain tar. The bzip2 test takes its level digit and the magic of its first block (or of its end, for
    an empty stream) too: "BZh" alone could begin the name of a plain tar's first member."""
    if head.startswith(b"\x1f\x8b"):  # RFC 1952
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and len(head) >= 10 and head[4:10] in (b"1AY&SY",
                                                                                              b"\x17rE8P\x90"):
        return "bzip2"
    return None


def decompressing(kind: str, stream: Any) -> BinaryIO:
    """A readable of the decompressed bytes of `stream` (a file object or path; non-seekable streams work), of the
    compression `kind` named by `compression`."""
    return _OPENERS[kind](stream, "rb")  # each takes a path or a readable


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's folder, or a full URL
    samples: int
    bytes: int | None = None


@dataclass
class Manifest:
    split: str
    shards: list[ShardInfo]
    classes: list[str] = field(default_factory=list)
    image_size: list[int] | None = None  # [width, height] when every image has it
    source: str = ""
    skipped: int = 0  # source items passed over when the set was written (unreadable images, other files, ...)
    format: str = FORMAT
    labelled: bool = True  # False: the samples carry no `cls` (a folder of unlabelled images); probes refuse it
    skips: dict[str, int] = field(default_factory=dict)  # `skipped` by reason ("unreadable image": 2, ...)

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return {"format": self.format, "split": self.split, "source": self.source, "total": self.total,
                "num_classes": self.num_classes, "classes": self.classes, "image_size": self.image_size,
                "labelled": self.labelled, "skipped": self.skipped, "skips": self.skips,
                "shards": [asdict(s) for s in self.shards]}


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> None:
    """Write the manifest atomically (temp file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest.to_json(), indent=1))


def read_manifest(path: str | os.PathLike) -> Manifest:
    try:
        raw = json.loads(Path(path).read_text())
        shards = [ShardInfo(name=s["name"], samples=int(s["samples"]), bytes=s.get("bytes")) for s in raw["shards"]]
        return Manifest(split=raw["split"], shards=shards, classes=list(raw.get("classes", [])),
                        image_size=raw.get("image_size"), source=raw.get("source", ""),
                        skipped=int(raw.get("skipped", 0)), format=raw.get("format", FORMAT),
                        labelled=bool(raw.get("labelled", True)), skips=dict(raw.get("skips") or {}))
    except FileNotFoundError:
        raise ShardError(f"{path}: no such manifest") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{path}: not a shard manifest ({type(err).__name__}: {err})") from None


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


@dataclass
class ShardList:
    """The shards a spec names, in a fixed order, with per-shard sample counts when a manifest gives them."""

    spec: str
    urls: list[str]
    samples: list[int] | None = None
    manifest: Manifest | None = None

    @property
    def total(self) -> int | None:
        return sum(self.samples) if self.samples is not None else None

    def first(self, n: int | None) -> "ShardList":
        """The leading shards that hold the set's first n samples (by the manifest's counts; without counts, or for
        None, every shard): what a reader of the first n samples needs, and nothing after."""
        if n is None or self.samples is None:
            return self
        total, k = 0, 0
        while k < len(self.urls) and total < n:
            total, k = total + self.samples[k], k + 1
        return dataclasses.replace(self, urls=self.urls[:k], samples=self.samples[:k])


def tar_is_complete(size: int, tail: bytes) -> bool:
    """Whether a tar stream of `size` bytes whose last (up to) 1024 bytes are `tail` ends with its end-of-archive
    marker: whole blocks, at least two of them, the last two zero. Python's tarfile (and so webdataset) ends a stream
    silently at a missing or cut header, so a shard cut at a member boundary would otherwise just yield fewer
    samples; the pre-check and the reader (data/stream.py) both judge a shard's end by this one rule."""
    return size % BLOCK == 0 and size >= 2 * BLOCK and len(tail) >= 2 * BLOCK and tail.count(0) == len(tail)


def compressed_tar_problem(path: str | os.PathLike, kind: str) -> str | None:
    """What is wrong with a compressed tar file (`kind`: gzip, bzip2, xz), read whole (None: a complete stream, its
    checksums right, whose content is a complete tar with a member). Its cost is a full decompression, so the
    pre-check calls it only when its cheap checks (`_check_compressed`) leave a doubt."""
    size, tail, head = 0, b"", b""
    try:
        with decompressing(kind, path) as f:
            while chunk := f.read(1 << 20):
                head = head or chunk[:BLOCK]
                size, tail = size + len(chunk), (tail + chunk)[-2 * BLOCK:]
    except EOFError:
        return f"the {kind} stream is cut short (no end-of-stream marker): truncated?"
    except DECOMPRESS_ERRORS as err:
        return f"not a valid {kind} stream ({type(err).__name__}: {err}): corrupt?"
    if size == 0:
        return f"an empty {kind} stream: it holds no tar"
    if not tar_is_complete(size, tail):
        return f"the {kind} stream holds {size} bytes that are no complete tar (no end-of-archive marker): not a " \
               f"tar, or one cut short before it was compressed?"
    if head.count(0) == len(head):
        return "the shard holds no samples (an empty tar)"
    return None


def _check_compressed(url: str, size: int, kind: str) -> None:
    """The pre-check of a local compressed shard, cheap as the plain tar's (its first and last bytes, not a full
    decompression, which would cost seconds per shard at every evaluation): its header and first tar block
    decompress, and the tar holds a member. Its end, where the format allows a cheap look: gzip's trailer holds the
    content's length mod 2^32 (ISIZE), a whole number of tar blocks for a complete tar, while a file cut short ends
    with deflate data instead (passing by chance once in 512); xz ends with the footer magic "YZ". Where these fail,
    the whole file is decompressed to say what is wrong (a valid file of several gzip members, or with xz padding,
    then passes). A bzip2 stream ends at a bit, not a byte: its end is not looked at here. The reader checks every
    shard completely as it reads it (data/stream.py), so what slips through here is named there."""
    try:
        with decompressing(kind, url) as f:
            head = f.read(BLOCK)
    except EOFError:
        raise ShardError(f"{url}: the {kind} stream is cut short (no end-of-stream marker): truncated?") from None
    except DECOMPRESS_ERRORS as err:
        raise ShardError(f"{url}: not a valid {kind} stream ({type(err).__name__}: {err}): corrupt?") from None
    if not head:
        raise ShardError(f"{url}: an empty {kind} stream: it holds no tar")
    if len(head) == BLOCK and head.count(0) == len(head):  # the first header block is the end-of-archive marker
        raise ShardError(f"{url}: the shard holds no samples (an empty tar)")
    with open(url, "rb") as f:
        f.seek(max(0, size - 4))
        end = f.read(4)
    doubt = len(head) < BLOCK or (kind == "gzip" and int.from_bytes(end, "little") % BLOCK) or \
        (kind == "xz" and end[-2:] != b"YZ")
    if doubt:
        problem = compressed_tar_problem(url, kind)
        if problem is not None:
            raise ShardError(f"{url}: {problem}")


def _check_local(url: str, expected_bytes: int | None) -> None:
    """A local shard exists, has the manifest's size, ends with a tar end-of-archive marker, and holds a member
    (a compressed one: `_check_compressed`).

    The marker check matters: Python's tarfile (and so webdataset) ends a stream silently at a
    truncated header, so a shard cut short would otherwise just yield fewer samples.
    """
    if not os.path.exists(url):
        raise ShardError(f"{url}: no such shard file")
    if os.path.isdir(url):
        raise ShardError(f"{url}: a folder, not a shard file")
    size = os.path.getsize(url)
    if expected_bytes is not None and size != expected_bytes:
        raise ShardError(f"{url}: {size} bytes but the manifest says {expected_bytes}: truncated or rewritten")
    with open(url, "rb") as f:
        head = f.read(BLOCK)
        f.seek(max(0, size - 2 * BLOCK))
        tail = f.read()
    kind = compression(head[:MAGIC_BYTES])
    if kind is not None:
        _check_compressed(url, size, kind)
        return
    if not tar_is_complete(size, tail):
        raise ShardError(f"{url}: not a complete tar file (no end-of-archive marker): truncated?")
    if head.count(0) == len(head):  # the first header block is the end-of-archive marker: no member at all
        raise ShardError(f"{url}: the shard holds no samples (an empty tar)")


def _sibling_manifest(url: str) -> Path | None:
    """`<folder>/<split>.json` for a shard named `<split>-NNNNNN.tar` (or `.tar.gz`, `.tgz`, ...), if it exists."""
    name = os.path.basename(url)
    if "-" not in name:
        return None
    path = Path(os.path.dirname(url) or ".") / f"{name.rsplit('-', 1)[0]}.json"
    return path if path.exists() else None


def resolve_shards(spec: str | ShardList) -> ShardList:
    """Expand and check a shard spec; every error names the spec or the path at fault. A set already resolved is
    given back as it is (each set is resolved once per stage)."""
    if isinstance(spec, ShardList):
        return spec
    spec = str(spec).strip()
    if not spec:
        raise ShardError("empty shard spec: set data.train_shards / data.val_shards to a manifest or a pattern")
    if spec.endswith(".json") and not is_remote(spec):
        manifest = read_manifest(spec)
        if not manifest.shards:
            raise ShardError(f"{spec}: the manifest lists no shards")
        folder = os.path.dirname(spec)
        urls = [s.name if is_remote(s.name) else os.path.join(folder, s.name) for s in manifest.shards]
        for url, info in zip(urls, manifest.shards):
            if info.samples == 0:
                raise ShardError(f"{url}: the manifest {spec} lists it with no samples")
            if not is_remote(url):
                _check_local(url, info.bytes)
        return ShardList(spec, urls, [s.samples for s in manifest.shards], manifest)

    urls = []
    for item in braceexpand.braceexpand(spec):
        if not is_remote(item) and glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise ShardError(f"{item}: the pattern matches no file")
            urls.extend(matches)
        else:
            urls.append(item)
    if not urls:
        raise ShardError(f"{spec}: names no shards")
    if is_remote(urls[0]):
        return _with_info(spec, urls) if urls[0].startswith(("http://", "https://", "pipe:")) else ShardList(spec, urls)
    for url in urls:
        _check_local(url, None)
    manifest_path = _sibling_manifest(urls[0])
    if manifest_path is None:
        return _with_info(spec, urls)
    manifest = read_manifest(manifest_path)
    by_name = {s.name: s for s in manifest.shards}
    infos = []
    for url in urls:
        info = by_name.get(os.path.basename(url))
        if info is None:
            raise ShardError(f"{url}: not listed in {manifest_path}")
        _check_local(url, info.bytes)
        infos.append(info)
    return ShardList(spec, urls, [i.samples for i in infos], manifest)


def _with_info(spec: str, urls: list[str]) -> ShardList:
    """The shards `urls` with the counts and classes of the published set's info file beside them (`_info.json`,
    data/info.py), where there is one that lists them; else without counts."""
    from crate_mae.data.info import INFO_NAMES, info_counts, where_of

    if len({where_of(u, INFO_NAMES[0]) for u in urls}) != 1:
        return ShardList(spec, urls)  # shards of several folders (or commands): no one info file speaks for them
    found = info_counts(urls, spec)
    if found is None:
        return ShardList(spec, urls)
    manifest = Manifest(split=found.split, shards=[ShardInfo(os.path.basename(u) if not is_remote(u) else u, n)
                                                   for u, n in zip(urls, found.samples)],
                        classes=found.classes, source=found.where)
    return ShardList(spec, urls, found.samples, manifest)
