"""A Hugging Face dataset as a shard-writer source (data/writer.py's `Source`), read through the `datasets` library
(the optional extra: pip install -e ".[hf]").

`dataset` is a local `save_to_disk` folder (a Dataset, or a DatasetDict whose `split` is taken), a Parquet file, a
folder of Parquet files or a glob of them (taken as the requested split, whatever the files call it), or else a
name on the Hub (`load_dataset(name, split=split)`, which needs the internet). A path that looks local is never
looked up on the Hub, so a mistyped path is an error at once, offline. Parquet is converted once into `datasets`'
Arrow cache (HF_DATASETS_CACHE), as `load_dataset` always does; the rows are then read from memory-mapped Arrow files.

The image column is an `Image` feature (read undecoded: the stored bytes, or the file at its path), raw bytes, or a
file path (a relative one from the current folder), or a struct of `bytes` and `path` (Parquet written by other tools,
without the `datasets` metadata). The label column, if given, is a `ClassLabel` (its names are the
classes), integers (classes "0" … max) or strings (the sorted unique strings). It is read whole when the source is
made; images are read row by row in `load`, which the writer calls in forked worker processes: the source is a
closure over memory-mapped tables.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Any

import numpy as np

from crate_mae.data.manifest import ShardError
from crate_mae.data.writer import Skip, Source

log = logging.getLogger("crate_mae.data")

INSTALL = "writing a Hugging Face dataset needs the datasets library: pip install -e \".[hf]\""
INTS = frozenset(f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64))
STRINGS, BINARIES = frozenset({"string", "large_string"}), frozenset({"binary", "large_binary"})


def _reason(err: BaseException) -> str:
    """An exception in one line: the library's wrappers (DatasetGenerationError) say less than their cause."""
    err = err.__cause__ or err
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _looks_local(dataset: str) -> bool:
    """Whether `dataset` is meant as a local path (never a Hub name): it exists, is a glob, is absolute, starts with
    ./ ../ or ~, or has a folder part that exists. Hub names ("owner/name") look like relative paths otherwise."""
    if os.path.exists(dataset) or any(c in dataset for c in "*?["):
        return True
    if os.path.isabs(dataset) or dataset.startswith(("./", "../", "~")):
        return True
    parent = os.path.dirname(dataset)
    return os.sep in dataset and bool(parent) and os.path.isdir(parent)


def _parquet(datasets: Any, dataset: str, files: list[str]) -> Any:
    try:  # the "parquet" builder is packaged with the library: local files are read without any network
        return datasets.load_dataset("parquet", data_files=files, split="train")
    except Exception as err:
        raise ShardError(f"{dataset}: cannot read it as Parquet ({_reason(err)})") from None


def _open(datasets: Any, dataset: str, split: str) -> Any:
    """The `datasets.Dataset` of `split` that `dataset` names (see the module docstring)."""
    if not _looks_local(dataset):
        try:
            return datasets.load_dataset(dataset, split=split)
        except Exception as err:
            raise ShardError(f"{dataset}: cannot load it from the Hugging Face Hub ({_reason(err)})") from None
    path = os.path.expanduser(dataset)
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise ShardError(f"{dataset}: no file matches the pattern")
        return _parquet(datasets, dataset, files)
    if not os.path.exists(path):
        raise ShardError(f"{dataset}: no such file or folder (a local path, so not looked up on the Hub)")
    if not os.path.isdir(path):
        return _parquet(datasets, dataset, [path])
    if any(os.path.exists(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")):  # save_to_disk
        try:
            ds = datasets.load_from_disk(path)
        except Exception as err:
            raise ShardError(f"{dataset}: cannot load the saved dataset ({_reason(err)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ShardError(f"{dataset}: no split {split!r}; its splits are {', '.join(ds)}")
            ds = ds[split]
        return ds
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
    if not files:
        nested = "; its Parquet files are in subfolders: pass a glob of the split's files" if glob.glob(
            os.path.join(glob.escape(path), "**", "*.parquet"), recursive=True) else ""
        raise ShardError(f"{dataset}: neither a save_to_disk folder nor a folder of Parquet files{nested}")
    return _parquet(datasets, dataset, files)


def _labels(datasets: Any, ds: Any, dataset: str, column: str) -> tuple[list[str], np.ndarray]:
    """(classes, label of every row, -1 where it has none) of the label column, read whole."""
    feature = ds.features[column]
    # the arrow format reads the column in one piece, in the dataset's row order (an indices mapping included)
    values = ds.select_columns([column]).with_format("arrow")[:].column(0).to_pylist()
    if isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value) and feature.dtype in INTS):
        # None or negative: no label (the Hub's -1, as in ImageNet's test split)
        labels = np.array([-1 if v is None or v < 0 else v for v in values], dtype=np.int64)
        top = int(labels.max(initial=-1))
        if isinstance(feature, datasets.ClassLabel):
            classes = list(feature.names)
            if top >= len(classes):
                raise ShardError(f"{dataset}: label {top} in column {column!r} is outside its {len(classes)} class "
                                 "names")
        else:
            classes = [str(c) for c in range(top + 1)]
            log.info("%s: the labels of column %r have no names; the classes are 0 … %d", dataset, column, top)
    elif isinstance(feature, datasets.Value) and feature.dtype in STRINGS:
        classes = sorted({v for v in values if v is not None})
        index = {name: n for n, name in enumerate(classes)}
        labels = np.array([-1 if v is None else index[v] for v in values], dtype=np.int64)
    else:
        raise ShardError(f"{dataset}: label column {column!r} is {feature!r}, not class labels, integers or strings")
    if not (labels >= 0).any():
        raise ShardError(f"{dataset}: no row has a label in column {column!r} (every one is empty or -1); leave out "
                         "--label-column to write the split unlabelled")
    return classes, labels


def _image_kind(datasets: Any, feature: Any, dataset: str, column: str) -> str:
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, dict) and "bytes" in feature:  # Parquet written by other tools: struct<bytes, path>
        return "struct"
    if isinstance(feature, datasets.Value) and feature.dtype in BINARIES:
        return "bytes"
    if isinstance(feature, datasets.Value) and feature.dtype in STRINGS:
        return "path"
    raise ShardError(f"{dataset}: image column {column!r} is {feature!r}, not an image, bytes or a file path")


def _read(value: Any) -> bytes:
    """The encoded image of a row's undecoded {"bytes", "path"}: its bytes if stored, else the file at its path."""
    if value is None:
        raise Skip("no image", "the row's image is empty")
    if value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path")
    if not path:
        raise Skip("no image", "neither bytes nor a path")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise Skip("no image", f"{path}: {err.strerror or err}") from None


def hf_source(dataset: str, *, split: str = "train", image_column: str = "image",
              label_column: str | None = None) -> Source:
    """The rows of a Hugging Face dataset's `split` (a local save_to_disk folder, Parquet files, or a Hub name) as a
    shard-writer source: the images of `image_column`, undecoded, and with `label_column` the labels (else an
    unlabelled source, whose shards carry no `cls`). A row without an image, or without a label when labels are
    written, is skipped and counted."""
    try:
        import datasets
    except ImportError:
        raise ShardError(INSTALL) from None
    ds = _open(datasets, dataset, split)
    for column in (image_column, label_column):
        if column is not None and column not in ds.column_names:
            raise ShardError(f"{dataset}: no column {column!r}; the columns are {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise ShardError(f"{dataset}: split {split!r} has no rows")
    kind = _image_kind(datasets, ds.features[image_column], dataset, image_column)
    classes, labels = _labels(datasets, ds, dataset, label_column) if label_column else ([], None)
    images = ds.select_columns([image_column])  # a row read in `load` then holds nothing else
    if kind == "image":  # undecoded: {"bytes", "path"}, so the writer stores the original JPEG/PNG bytes
        images = images.cast_column(image_column, datasets.Image(decode=False))

    def load(i: int) -> tuple[bytes, int | None]:
        label = None
        if labels is not None:
            label = int(labels[i])
            if label < 0:  # checked first: a row without a label costs no image read
                raise Skip("no label", f"column {label_column!r} is empty or -1")
        value = images[i][image_column]
        if kind in ("bytes", "path") and value is not None:
            value = {"bytes": value, "path": None} if kind == "bytes" else {"bytes": None, "path": value}
        return _read(value), label

    return Source(f"hf:{dataset}:{split}", classes, len(ds), load, describe=lambda i: f"{dataset} {split} row {i}",
                  labelled=label_column is not None, skips={})
