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
"""
from __future__ import annotations

import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from typing import Any

import yaml

from crate_mae.errors import ShardError

log = logging.getLogger("crate_mae.data")

INFO_NAMES = ("_info.json", "_info.yaml", "_info.yml", "info.json", "info.yaml")  # in this order, as timm looks


def _parse(text: str, where: str) -> dict:
    try:
        info = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ShardError(f"{where}: not a readable dataset info file ({type(err).__name__}: {err})") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise ShardError(f"{where}: a dataset info file needs a 'splits' mapping (timm's _info.json layout)")
    return info


def read_info(folder: str) -> tuple[dict, str] | None:
    """The info file in `folder` (a local folder, or an http(s) URL's folder) and its path, or None where there is
    none. A remote one that cannot be fetched is logged and taken as absent: the spec then works as without it."""
    remote = folder.startswith(("http://", "https://"))
    for name in INFO_NAMES:
        where = f"{folder.rstrip('/')}/{name}" if remote else os.path.join(folder, name)
        if not remote:
            if os.path.isfile(where):
                with open(where, encoding="utf-8") as f:
                    return _parse(f.read(), where), where
            continue
        try:
            with urllib.request.urlopen(where, timeout=30) as response:
                return _parse(response.read().decode("utf-8"), where), where
        except OSError as err:  # 404 (HTTPError): try the next name; no network (URLError), a timeout: give up
            if getattr(err, "code", None) != 404:
                log.info("%s: not fetched (%s); the shards are read without its counts", where, err)
                return None
    return None


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
    found = read_info(os.path.dirname(urls[0]) or ".")
    if found is None:
        return None
    info, where = found
    names = [os.path.basename(u) for u in urls]
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
