"""Shard sets: the manifest beside them (`<split>.json`: each shard's name, samples and bytes, the classes), a
published set's `_info.json`, and a user's shard spec made a checked list. A spec (`data.train_shards`) is one of:

  shards/imagenet/train.json                    a manifest (recommended)
  shards/imagenet/train-{000000..001023}.tar    brace pattern (its sibling train.json is used if present)
  shards/imagenet/train-*.tar                   glob
  shards/imagenet/train-*.tar.gz                gzip-compressed shards (.tar.gz, .tgz) in any of the forms above
  pipe:curl -s https://host/train-{0..9}.tar    webdataset URLs (not checked here; counts from a manifest or _info.json)

A pattern without a sibling manifest takes its counts (and classes) from the `_info.json` / `_info.yaml` beside the
shards (timm's layout), read from the folder, the http(s) folder, or by the `pipe:` command with the address replaced.
A shard is compressed when its first bytes say so (gzip; bzip2, xz), whatever its name, as tarfile's "r|*" decides.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import itertools
import json
import logging
import lzma
import os
import subprocess
import urllib.error
import urllib.request
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import braceexpand
import yaml

from crate_mae.atomic import atomic_path
from crate_mae.errors import ShardError  # here too: the data layer's own error, by its old name

FORMAT = "crate-mae-shards/1"
BLOCK = 512  # a tar block; an archive ends with two zero blocks (the end-of-archive marker), then zero padding
MAGIC_BYTES = 10  # as many first bytes as `compression` looks at
# The errors of a compressed stream cut short (EOFError) or garbled (the rest; gzip's and bz2's are OSErrors).
DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)
INFO_NAMES = ("_info.json", "_info.yaml", "_info.yml", "info.json", "info.yaml")  # in this order, as timm looks
log = logging.getLogger("crate_mae.data")


def is_remote(url: str) -> bool:
    """Whether `url` is read by a command (`pipe:`) or a transfer (any scheme but `file:`): the package's one test."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file:"))


def compression(head: bytes) -> str | None:
    """"gzip", "bzip2", "xz" or None (a plain tar) for a stream that begins with `head`. bzip2 needs its level digit
    and a block (or end) magic too: "BZh" alone could begin a plain tar's first member name."""
    bzip2 = head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90")
    return "gzip" if head[:2] == b"\x1f\x8b" else "xz" if head[:6] == b"\xfd7zXZ\x00" else "bzip2" if bzip2 else None


def decompressing(kind: str, stream: Any) -> BinaryIO:
    """A readable of the decompressed bytes of `stream` (a path or a readable, seekable or not)."""
    return {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}[kind](stream, "rb")


def tar_is_complete(size: int, tail: bytes) -> bool:
    """Whether a tar stream of `size` bytes, last 1024 `tail`, ends with an end-of-archive marker (two zero blocks)."""
    return size % BLOCK == 0 and size >= 2 * BLOCK and len(tail) == 2 * BLOCK and tail.count(0) == len(tail)


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
    with atomic_path(path) as tmp:  # whole or not at all
        tmp.write_text(json.dumps(manifest.to_json(), indent=1))


def read_manifest(path: str | os.PathLike) -> Manifest:
    try:
        raw = json.loads(Path(path).read_text())
        shards = [ShardInfo(name=s["name"], samples=int(s["samples"]), bytes=s.get("bytes")) for s in raw["shards"]]
        known = {f.name for f in fields(Manifest)} - {"shards"}  # "total", "num_classes": derived, not read
        return Manifest(shards=shards, **{k: v for k, v in raw.items() if k in known})
    except FileNotFoundError:
        raise ShardError(f"{path}: no such manifest") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{path}: not a shard manifest ({type(err).__name__}: {err})") from None


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

    def first(self, n: int | None) -> ShardList:
        """The leading shards that hold the set's first n samples (all of them without counts, or for None)."""
        if n is None or self.samples is None:
            return self
        k = next((k + 1 for k, total in enumerate(itertools.accumulate(self.samples)) if total >= n), len(self.urls))
        return replace(self, urls=self.urls[:k], samples=self.samples[:k])


def _check_local(url: str, expected_bytes: int | None) -> None:
    """A local shard exists, has the manifest's size, holds a member and ends with a tar end-of-archive marker; a
    compressed one is decompressed whole only where its first tar block and its end leave a doubt (gzip's last 4 bytes
    are the content's size, a multiple of 512 for a tar; xz ends with "YZ"). The reader checks every shard whole."""
    path = urlparse(url).path if url.startswith("file:") else url
    if not os.path.isfile(path):
        raise ShardError(f"{url}: {'a folder, not a shard file' if os.path.isdir(path) else 'no such shard file'}")
    size = os.path.getsize(path)
    if expected_bytes is not None and size != expected_bytes:
        raise ShardError(f"{url}: {size} bytes but the manifest says {expected_bytes}: truncated or rewritten")
    with open(path, "rb") as f:
        head = f.read(BLOCK)
        f.seek(max(0, size - 2 * BLOCK))
        end = tail = f.read()
    kind, problem = compression(head[:MAGIC_BYTES]), None
    try:
        if kind is not None:
            with decompressing(kind, path) as f:
                head = f.read(BLOCK)
        if kind is not None and (len(head) < BLOCK or (kind == "gzip" and int.from_bytes(end[-4:], "little") % BLOCK)
                                 or (kind == "xz" and end[-2:] != b"YZ")):
            size, tail = 0, b""  # a doubt: the whole stream decompressed
            with decompressing(kind, path) as f:
                while chunk := f.read(1 << 20):
                    size, tail = size + len(chunk), (tail + chunk)[-2 * BLOCK:]
            if size == 0:
                problem = f"an empty {kind} stream: it holds no tar"
            elif not tar_is_complete(size, tail):
                problem = f"the {kind} stream holds {size} bytes that are no complete tar (no end-of-archive " \
                          f"marker): not a tar, or one cut short before it was compressed?"
        elif kind is None and not tar_is_complete(size, tail):
            problem = "not a complete tar file (no end-of-archive marker): truncated?"
    except EOFError:
        problem = f"the {kind} stream is cut short (no end-of-stream marker): truncated?"
    except DECOMPRESS_ERRORS as err:
        problem = f"not a valid {kind} stream ({type(err).__name__}: {err}): corrupt?"
    if problem is None and head.count(0) == len(head):  # the first header is the end-of-archive marker
        problem = "the shard holds no samples (an empty tar)"
    if problem is not None:
        raise ShardError(f"{url}: {problem}")


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
        urls = [s.name if is_remote(s.name) else os.path.join(os.path.dirname(spec), s.name) for s in manifest.shards]
        for url, info in zip(urls, manifest.shards):
            if info.samples == 0:
                raise ShardError(f"{url}: the manifest {spec} lists it with no samples")
            if not is_remote(url):
                _check_local(url, info.bytes)
        return ShardList(spec, urls, [s.samples for s in manifest.shards], manifest)
    urls = []
    for item in braceexpand.braceexpand(spec):
        urls += (matches := sorted(glob.glob(item)) if not is_remote(item) and glob.has_magic(item) else [item])
        if not matches:
            raise ShardError(f"{item}: the pattern matches no file")
    name = os.path.basename(urls[0])
    sibling = Path(os.path.dirname(urls[0]) or ".") / f"{name.rsplit('-', 1)[0]}.json"
    if is_remote(urls[0]) or "-" not in name or not sibling.exists():
        for url in [] if is_remote(urls[0]) else urls:
            _check_local(url, None)
        return _with_info(spec, urls)
    manifest = read_manifest(sibling)
    listed = {s.name: s for s in manifest.shards}
    for url in urls:
        _check_local(url, getattr(listed.get(os.path.basename(url)), "bytes", None))  # a missing file: named first
        if os.path.basename(url) not in listed:
            raise ShardError(f"{url}: not listed in {sibling}")
    return ShardList(spec, urls, [listed[os.path.basename(u)].samples for u in urls], manifest)


def _shard_path(url: str) -> str:
    """The path or URL of the shard file `url` reads: itself, or a `pipe:` command's last word that names a shard
    file (`pipe:curl -s -L -H '…' https://host/set/train-0001.tar` → the URL); "" where none does."""
    if not url.startswith("pipe:"):
        return url
    words = [w.strip("'\"") for w in url[len("pipe:"):].split()]
    return next((w for w in reversed(words) if w.endswith((".tar", ".tar.gz", ".tgz"))), "")


def _beside(url: str, name: str) -> str:
    """How to read the file `name` beside the shard `url`: a path, a URL, or the `pipe:` command with the shard's
    address replaced by the file's."""
    path = _shard_path(url)
    beside = f"{path.rsplit('/', 1)[0]}/{name}" if "://" in path else os.path.join(os.path.dirname(path) or ".", name)
    return url.replace(path, beside)


def _read_info(url: str) -> tuple[dict, str] | None:
    """(the info file beside the shard `url`, where it was read), or None. A remote one that cannot be fetched or is
    no info file (`curl -s` prints an error page) is logged and passed over; a local one is an error naming it."""
    for where in [_beside(url, name) for name in INFO_NAMES] if _shard_path(url) else []:
        try:
            if where.startswith("pipe:"):
                done = subprocess.run(where[len("pipe:"):], shell=True, capture_output=True, timeout=60)
                text = done.stdout.decode("utf-8", "replace") if done.returncode == 0 and done.stdout.strip() else None
            elif "://" in where:
                with urllib.request.urlopen(where, timeout=30) as response:
                    text = response.read().decode("utf-8")
            else:
                text = Path(where).read_text(encoding="utf-8") if os.path.isfile(where) else None
            if text is None:
                continue
            info = json.loads(text) if where.rstrip("'\" ").endswith(".json") else yaml.safe_load(text)
            if isinstance(info, dict) and isinstance(info.get("splits"), dict):
                return info, where
            problem = "a dataset info file needs a 'splits' mapping (timm's _info.json layout)"
        except (OSError, subprocess.TimeoutExpired) as err:  # no network, a timeout, a server error: give up
            if isinstance(err, urllib.error.HTTPError) and err.code == 404:  # not there: the next name
                continue
            log.info("%s: not fetched (%s); the shards are read without its counts", where, err)
            return None
        except (ValueError, yaml.YAMLError) as err:
            problem = f"not a readable dataset info file ({type(err).__name__}: {err})"
        if not is_remote(url):
            raise ShardError(f"{where}: {problem}")
        log.info("%s: %s; the shards are read without its counts", where, problem)
    return None


def _with_info(spec: str, urls: list[str]) -> ShardList:
    """The shards `urls` with the counts and classes of the info file beside them (one folder or command), from the
    split that lists them; else without counts."""
    found = _read_info(urls[0]) if len({_beside(u, INFO_NAMES[0]) for u in urls}) == 1 else None
    if found is None:
        return ShardList(spec, urls)
    (info, where), names = found, [os.path.basename(_shard_path(u)) for u in urls]
    files_of = {split: [os.path.basename(f) for f in entry.get("filenames") or []]
                for split, entry in info["splits"].items() if isinstance(entry, dict)}
    split = next((split for split, files in files_of.items() if names[0] in files), None)
    entry, files = info["splits"].get(split, {}), files_of.get(split, [])
    if missing := [n for n in names if n not in files] if split else []:
        raise ShardError(f"{where}: split '{split}' does not list {missing[0]}"
                         + (f" (nor {len(missing) - 1} more of the spec's shards)" if len(missing) > 1 else ""))
    if split is None or len(lengths := entry.get("shard_lengths") or []) != len(files):
        log.info("%s: %s; the shards are read without its counts", where, f"no split lists {names[0]}" if split is None
                 else f"split '{split}' gives {len(lengths)} counts for its {len(files)} files")
        return ShardList(spec, urls)
    if not all(str(n).isdigit() for n in lengths):
        raise ShardError(f"{where}: split '{split}' has shard_lengths that are not whole numbers")
    count = {f: int(n) for f, n in zip(files, lengths)}
    if entry.get("num_samples") is not None and int(entry["num_samples"]) != sum(count.values()):
        raise ShardError(f"{where}: split '{split}' says num_samples {entry['num_samples']} but its shard_lengths "
                         f"add up to {sum(count.values())}")
    classes = next((c for c in (info.get("classes"), info.get("class_names"))
                    if isinstance(c, list) and all(isinstance(n, str) for n in c)), [])
    manifest = Manifest(split=split, shards=[ShardInfo(u if is_remote(u) else os.path.basename(u), count[n])
                                             for u, n in zip(urls, names)], classes=classes, source=where)
    return ShardList(spec, urls, [count[n] for n in names], manifest)
