"""Shard sets: the manifest beside them, and turning a user's shard spec into a checked list.

A split's manifest (`<folder>/<split>.json`, written last and atomically by the writer) records each
shard's name, sample count and byte size, the total, the classes and the image size if fixed. Readers
take the epoch length from it and, before training starts, check every local shard against it.

A shard spec (`data.train_shards`) is one of:
  shards/imagenet/train.json                    a manifest (recommended)
  shards/imagenet/train-{000000..001023}.tar    brace pattern (its sibling train.json is used if present)
  shards/imagenet/train-*.tar                   glob
  pipe:curl -s https://host/train-{0..9}.tar    webdataset URLs (not checked; give a manifest for counts)
"""
from __future__ import annotations

import glob
import json
import os
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import braceexpand

from crate_mae.atomic import atomic_path
from crate_mae.errors import CrateError

FORMAT = "crate-mae-shards/1"


class ShardError(CrateError, ValueError):
    """A shard set that cannot be read as asked: the message names the path at fault."""


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
    skipped: int = 0  # source images that could not be read when the set was written
    format: str = FORMAT

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return {"format": self.format, "split": self.split, "source": self.source, "total": self.total,
                "num_classes": self.num_classes, "classes": self.classes, "image_size": self.image_size,
                "skipped": self.skipped, "shards": [asdict(s) for s in self.shards]}


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
                        skipped=int(raw.get("skipped", 0)), format=raw.get("format", FORMAT))
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


def _check_local(url: str, expected_bytes: int | None) -> None:
    """A local shard exists, has the manifest's size, ends with a tar end-of-archive marker, and holds a member.

    The marker check matters: Python's tarfile (and so webdataset) ends a stream silently at a
    truncated header, so a shard cut short would otherwise just yield fewer samples.
    """
    if not os.path.exists(url):
        raise ShardError(f"{url}: no such shard file")
    size = os.path.getsize(url)
    if expected_bytes is not None and size != expected_bytes:
        raise ShardError(f"{url}: {size} bytes but the manifest says {expected_bytes}: truncated or rewritten")
    with open(url, "rb") as f:
        head = f.read(512)
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size % 512 or size < 1024 or tail.count(0) != len(tail):
        raise ShardError(f"{url}: not a complete tar file (no end-of-archive marker): truncated?")
    if head.count(0) == len(head):  # the first header block is the end-of-archive marker: no member at all
        raise ShardError(f"{url}: the shard holds no samples (an empty tar)")


def _sibling_manifest(url: str) -> Path | None:
    """`<folder>/<split>.json` for a shard named `<split>-NNNNNN.tar`, if it exists."""
    name = os.path.basename(url)
    if "-" not in name:
        return None
    path = Path(os.path.dirname(url) or ".") / f"{name.rsplit('-', 1)[0]}.json"
    return path if path.exists() else None


def resolve_shards(spec: str) -> ShardList:
    """Expand and check a shard spec; every error names the spec or the path at fault."""
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
        return ShardList(spec, urls)
    for url in urls:
        _check_local(url, None)
    manifest_path = _sibling_manifest(urls[0])
    if manifest_path is None:
        return ShardList(spec, urls)
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
