"""Published WebDataset sets' own descriptions: `_info.json` / `_info.yaml` beside the shards (timm's convention, as
the `timm/imagenet-1k-wds` set on the Hugging Face Hub ships it):

    {"name": "imagenet-1k", "num_classes": 1000,
     "splits": {"train": {"name": "train", "num_samples": 1281167,
                          "filenames": ["imagenet1k-train-0000.tar", ...], "shard_lengths": [1251, ...]},
                "validation": {...}}}

A brace pattern or glob of such shards (`data.train_shards: ".../imagenet1k-train-{0000..1023}.tar"`) takes its
counts from the split that lists its files, as it would from our own manifest: the epoch length, and the count each
shard must hold when it is read (a shard that holds another number is named as it is read). Class names are taken
where the file gives them (a top-level `classes` or `class_names` list). A spec that covers only some of a split's
files takes their counts; a file the split does not list is an error naming it.

The info file is read beside the shards: from the same folder, from the same http(s) folder, or by the same `pipe:`
command with the shard's address replaced by the info file's (`pipe:curl -s -L -H 'Authorization: Bearer …'
https://huggingface.co/datasets/…/resolve/main/imagenet1k-train-{0000..1023}.tar` for a gated Hub set).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import yaml

from crate_mae.errors import ShardError

log = logging.getLogger("crate_mae.data")

INFO_NAMES = ("_info.json", "_info.yaml", "_info.yml", "info.json", "info.yaml")  # in this order, as timm looks


def _parse(text: str, where: str) -> dict:
    try:
        info = json.loads(text) if where.rstrip("'\" ").endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ShardError(f"{where}: not a readable dataset info file ({type(err).__name__}: {err})") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise ShardError(f"{where}: a dataset info file needs a 'splits' mapping (timm's _info.json layout)")
    return info


SHARD_ENDS = (".tar", ".tar.gz", ".tgz")


def _shard_path(url: str) -> str:
    """The path or URL of the shard file that `url` reads: itself, or for a `pipe:` command the last word of it that
    names a shard file (`pipe:curl -s -L -H '…' https://host/set/train-0001.tar` → the URL); "" where none does."""
    if not url.startswith("pipe:"):
        return url
    words = [w.strip("'\"") for w in url[len("pipe:"):].split()]
    return next((w for w in reversed(words) if w.endswith(SHARD_ENDS)), "")


def shard_name(url: str) -> str:
    """The file name of the shard `url` reads (as an info file lists it)."""
    return os.path.basename(_shard_path(url))


def where_of(url: str, name: str) -> str:
    """How to read the file `name` beside the shard `url`: a path, a URL, or the `pipe:` command with the shard's
    address replaced by the file's."""
    path = _shard_path(url)
    beside = os.path.join(os.path.dirname(path) or ".", name) if "://" not in path else \
        f"{path.rsplit('/', 1)[0]}/{name}"
    if not url.startswith("pipe:"):
        return beside
    cut = url.rfind(path)
    return url[:cut] + beside + url[cut + len(path):]


def _fetch(where: str) -> str | None:
    """The text at `where` (a path, an http(s) URL, or a `pipe:` command's output), or None where it is not there.
    A network failure is an OSError: the caller gives up on the remote info file."""
    if where.startswith("pipe:"):
        try:
            done = subprocess.run(where[len("pipe:"):], shell=True, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise OSError(f"no answer in 60 s from {where}") from None
        return done.stdout.decode("utf-8", "replace") if done.returncode == 0 and done.stdout.strip() else None
    if "://" in where:
        try:
            with urllib.request.urlopen(where, timeout=30) as response:
                return response.read().decode("utf-8")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise
    if not os.path.isfile(where):
        return None
    with open(where, encoding="utf-8") as f:
        return f.read()


def read_info(url: str) -> tuple[dict, str] | None:
    """The info file beside the shard `url` (local, http(s), or read by the same `pipe:` command) and where it was
    read, or None where there is none. A remote one that cannot be fetched, or whose answer is no info file (a
    `curl -s` of a missing file prints the server's error page), is logged and taken as absent: the spec then works
    as without it. A local one that is not readable is an error naming it."""
    if not _shard_path(url):
        return None  # a command that names no shard file: nothing to put the info file's name in place of
    for name in INFO_NAMES:
        where = where_of(url, name)
        try:
            text = _fetch(where)
        except OSError as err:  # no network, a timeout, a server error: give up
            log.info("%s: not fetched (%s); the shards are read without its counts", where, err)
            return None
        if text is None:
            continue
        try:
            return _parse(text, where), where
        except ShardError:
            if is_local(url):
                raise
            log.info("%s: the answer is no dataset info file; the shards are read without its counts", where)
    return None


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def _split_of(info: dict, where: str, names: list[str]) -> tuple[str, dict] | None:
    """The split of `info` whose files include names[0] (its name and entry; None where no split lists it: the file
    describes other shards); every other name must be in it too."""
    for split, entry in info["splits"].items():
        if not isinstance(entry, dict):
            raise ShardError(f"{where}: split '{split}' is not a mapping")
        files = [os.path.basename(f) for f in entry.get("filenames") or []]
        if names[0] in files:
            missing = [n for n in names if n not in files]
            if missing:
                raise ShardError(f"{where}: split '{split}' does not list {missing[0]}"
                                 + (f" (nor {len(missing) - 1} more of the spec's shards)" if len(missing) > 1 else ""))
            return split, entry
    log.info("%s: no split lists %s (splits: %s); the shards are read without its counts", where, names[0],
             ", ".join(info["splits"]))
    return None


@dataclass
class InfoSplit:
    """What an info file says of some shards of one split: their counts in the spec's order, and the classes."""

    split: str
    samples: list[int]
    classes: list[str]
    where: str  # the info file's path or URL


def info_counts(urls: list[str], spec: str) -> InfoSplit | None:
    """The counts of the shards `urls` (one folder) from the info file beside them; None where there is no info file,
    or where it gives no per-shard counts."""
    found = read_info(urls[0])
    if found is None:
        return None
    info, where = found
    names = [shard_name(u) for u in urls]
    found = _split_of(info, where, names)
    if found is None:
        return None
    split, entry = found
    files = [os.path.basename(f) for f in entry.get("filenames") or []]
    lengths = entry.get("shard_lengths") or []
    if len(lengths) != len(files):
        log.info("%s: split '%s' gives no count per shard (%d counts for %d files); %s is read without its counts",
                 where, split, len(lengths), len(files), spec)
        return None
    try:
        count = {f: int(n) for f, n in zip(files, lengths)}
    except (TypeError, ValueError):
        raise ShardError(f"{where}: split '{split}' has shard_lengths that are not whole numbers") from None
    total = entry.get("num_samples")
    if total is not None and int(total) != sum(count.values()):
        raise ShardError(f"{where}: split '{split}' says num_samples {total} but its shard_lengths add up to "
                         f"{sum(count.values())}")
    return InfoSplit(split, [count[n] for n in names], _classes(info), where)


def _classes(info: dict[str, Any]) -> list[str]:
    for key in ("classes", "class_names"):
        names = info.get(key)
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return []
