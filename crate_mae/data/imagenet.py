"""ImageNet-1k as image-net.org ships it, streamed from the archives with nothing extracted: the shard writer's
sources for `python -m crate_mae.data.shards write imagenet --train ... --val ... --devkit ...`.

`ILSVRC2012_img_train.tar` is a tar of 1,000 class tars (`n01440764.tar` holding `n01440764_10026.JPEG`, ...),
`ILSVRC2012_img_val.tar` a flat tar of 50,000 `ILSVRC2012_val_00000001.JPEG`, ... labelled by the devkit
(`ILSVRC2012_devkit_t12.tar.gz`: its ground truth gives an ILSVRC2012_ID a line in val-file order, its meta.mat maps
an ID to a WordNet id; the leaf synsets are the classes) or by a labels file: a WordNet id a line in val-file order,
`<file name> <wnid>` lines, or Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`, the WordNet id first).

The archives are indexed once, when the source is made, from the tar headers alone (1.28 M headers of 512 bytes for
the train set, never an image): each image's absolute byte offset and size. An inner tar is listed through a window
onto its bytes in the outer file, so an image's offset is its inner tar's plus its own. `load(i)` reads exactly
those bytes with `os.pread` on a descriptor each process opens for itself: the writer's forked workers share no file
position. Listings are sorted (images by name, classes by WordNet id), the same on every machine; the classes are
the sorted WordNet ids, as torchvision's ImageFolder and timm number them, so class k is the same class however a
set was written, and the val labels are mapped to that order. Bytes are passed as they are (the train set holds a
PNG named .JPEG and CMYK JPEGs): the writer's `prepare` deals with formats.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from collections import Counter

import numpy as np

from crate_mae.data.manifest import BLOCK, MAGIC_BYTES, ShardError, compression, tar_is_complete
from crate_mae.data.sources import IMAGE_SUFFIXES
from crate_mae.data.writer import UNREADABLE_FILE, Skip, Source, describe_skips

WNID = re.compile(r"n\d{8}")  # a WordNet noun id, as ImageNet names its classes
Image = tuple[int, int, str]  # (absolute offset in the archive, size, name inside it)


class _Window:
    """`size` bytes at `start` of a file descriptor as a read-only file, read with pread (no shared file position):
    tarfile lists an inner tar through it, and reads past its end come back short, as at the end of a file."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        self.fd, self.start, self.size, self.pos = fd, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        data = os.pread(self.fd, max(n, 0), self.start + self.pos)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos + (0, self.pos, self.size)[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


def _members(window: _Window, where: str) -> list[tarfile.TarInfo]:
    """The members of the tar in `window`, from its headers. tarfile ends a listing silently at a cut or garbled
    header, so the listing must end at an end-of-archive marker, and the tar with it, or the tar is damaged."""
    try:
        tar = tarfile.open(fileobj=window, mode="r:")
        members = tar.getmembers()
    except tarfile.TarError as err:  # "unexpected end of data": a member runs past the end
        cut = "unexpected end" in str(err)
        raise ShardError(f"{where}: {'cut short' if cut else 'not a readable tar'} ({err}){': truncated?' * cut}") \
            from None
    window.seek(tar.offset)
    marker = window.read(BLOCK)
    window.seek(max(0, window.size - 2 * BLOCK))
    if marker != bytes(BLOCK) or not tar_is_complete(window.size, window.read()):
        raise ShardError(f"{where}: cut short or damaged after {len(members)} members (no end-of-archive marker "
                         f"where they end): truncated?")
    return [m for m in members if not m.isdir()]  # a folder entry is no item lost


def _skip_reason(member: tarfile.TarInfo, suffixes: tuple[str, ...] | frozenset[str], other: str) -> str | None:
    """Why `member` is no item (None: it is one): not a regular file, hidden, empty, or not named as one (`other`)."""
    base = member.name.rsplit("/", 1)[-1]
    if not member.isreg() or member.issparse():  # a sparse member's bytes are not where offset_data says
        return "not a regular file"
    if base.startswith("."):  # macOS's ._name companions carry image names but hold no image
        return "hidden file"
    if os.path.splitext(base)[1].lower() not in suffixes:
        return other
    return "empty file" if member.size == 0 else None


def _images(fd: int, start: int, size: int, where: str, prefix: str, skips: Counter[str]) -> list[Image]:
    """The images of the tar at `start` of `fd`, sorted by name (`prefix` + member name); the members that are no
    image are counted in `skips` by reason."""
    images = []
    for m in _members(_Window(fd, start, size), where):
        if (reason := _skip_reason(m, IMAGE_SUFFIXES, "not an image")) is not None:
            skips[reason] += 1
        else:
            images.append((start + m.offset_data, m.size, prefix + m.name))
    return sorted(images, key=lambda image: image[2])


def _list(path: str, flag: str, skips: Counter[str]) -> dict[str, list[Image]]:
    """The images of an archive by class: {WordNet id: images} in WordNet id order for the train tar of class tars,
    {"": images} for the flat val tar; what is no image or no class tar is counted in `skips`."""
    try:
        fd = os.open(path, os.O_RDONLY)
        head = os.pread(fd, MAGIC_BYTES, 0)  # fails on a folder
    except OSError as err:
        raise ShardError(f"{flag} {path}: {err.strerror or err}") from None
    try:
        if (kind := compression(head)) is not None:  # offsets into a compressed stream cannot be read at random
            raise ShardError(f"{flag} {path}: {kind}-compressed; give the plain tar as downloaded (decompress it)")
        window = _Window(fd, 0, os.fstat(fd).st_size)
        if flag != "--train":
            return {"": _images(fd, 0, window.size, f"{flag} {path}", "", skips)}
        groups = {}
        for m in _members(window, f"{flag} {path}"):
            if (reason := _skip_reason(m, (".tar",), "not a class tar")) is not None:
                skips[reason] += 1
                continue
            wnid = m.name.rsplit("/", 1)[-1][:-len(".tar")]
            if wnid in groups:
                raise ShardError(f"{flag} {path}: holds {wnid}.tar twice")
            groups[wnid] = _images(fd, m.offset_data, m.size, f"{path}/{m.name}", f"{m.name}/", skips)
        return dict(sorted(groups.items()))
    finally:
        os.close(fd)


class _Items:
    """An archive's listed images: `load(i)` preads image i's bytes through a descriptor opened lazily in each
    process (the writer's workers are forked), `describe(i)` names it as `archive/inner.tar/member`."""

    def __init__(self, path: str, images: list[Image], labels: list[int]) -> None:
        self.path, self.names = path, [name for _, _, name in images]
        # numpy arrays, not lists of ints: forked workers reading them copy no pages (no reference counts touched)
        self.offsets = np.array([offset for offset, _, _ in images], dtype=np.int64)
        self.sizes = np.array([size for _, size, _ in images], dtype=np.int64)
        self.labels = np.array(labels, dtype=np.int64)
        self._fd, self._pid = -1, -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": -1, "_pid": -1}  # a descriptor means nothing in another process

    def __del__(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)

    def load(self, i: int) -> tuple[bytes, int]:
        if self._pid != os.getpid():
            try:
                self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
            except OSError as err:
                raise ShardError(f"{self.path}: cannot open it any more ({err.strerror or err})") from None
        size = int(self.sizes[i])
        try:
            data = os.pread(self._fd, size, int(self.offsets[i]))
        except OSError as err:
            raise Skip(UNREADABLE_FILE, err.strerror or str(err)) from None
        if len(data) != size:
            raise Skip(UNREADABLE_FILE, f"{len(data)} of {size} bytes: the archive is shorter than when listed")
        return data, int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{self.path}/{self.names[i]}"


def _devkit_labels(devkit: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The devkit's leaf WordNet ids (the classes, sorted) and the val images' WordNet ids in val-file order, each
    with where it was read (`archive/ground truth:line`). Read from the archive itself: torchvision's parser extracts
    it and insists on the official checksum."""
    import scipy.io

    wanted = ("meta.mat", "ILSVRC2012_validation_ground_truth.txt")
    try:
        with tarfile.open(devkit) as tar:  # small: read whole
            found = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isreg()}
            if any(name not in found for name in wanted):
                raise ShardError(f"--devkit {devkit}: no data/{wanted[0]} and data/{wanted[1]} in it")
            meta, truth = (tar.extractfile(found[name]).read() for name in wanted)
        synsets = np.atleast_1d(scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"])
        leaves = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
        lines = truth.decode().splitlines()
    except (OSError, tarfile.TarError, KeyError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"--devkit {devkit}: cannot read it ({type(err).__name__}: {err})") from None
    labels = []
    for n, line in ((n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()):
        where = f"{devkit}/{found[wanted[1]].name}:{n}"
        if not line.isdigit() or int(line) not in leaves:
            raise ShardError(f"{where}: {line!r} is not the ILSVRC2012_ID of a class in meta.mat")
        labels.append((where, leaves[int(line)]))
    return sorted(leaves.values()), labels


def _file_labels(path: str, names: list[str]) -> list[tuple[str, str]]:
    """The WordNet id of each val image (`names`, in val-file order) by the labels file `path`, each with where it
    was read (`file:line`): one id a line in that order, `<file name> <wnid>` lines, or `LOC_val_solution.csv`."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [(n, line) for n, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ShardError(f"--val-labels {path}: cannot read it ({err})") from None
    kaggle = bool(lines) and lines[0][1].startswith("ImageId,")  # then `ImageId,PredictionString` rows
    pairs = [(n, [line.partition(",")[0], *line.partition(",")[2].split()[:1]] if kaggle else line.split())
             for n, line in lines[1 if kaggle else 0:]]
    if any(len(p) == 1 and p[0].isdigit() for _, p in pairs):
        raise ShardError(f"--val-labels {path}: ILSVRC2012_IDs, the devkit's ground truth: give the devkit archive "
                         f"as --devkit instead")
    if not kaggle and all(len(p) == 1 for _, p in pairs):
        if len(pairs) != len(names):
            raise ShardError(f"--val-labels {path}: {len(pairs)} labels for {len(names)} val images (one WordNet id "
                             f"a line, in file order)")
        return [(f"{path}:{n}", p[0]) for n, p in pairs]
    stem = {os.path.splitext(name.rsplit("/", 1)[-1])[0]: k for k, name in enumerate(names)}
    found: dict[int, tuple[str, str]] = {}
    for n, p in pairs:
        if len(p) != 2:
            raise ShardError(f"{path}:{n}: not '<file name> <wnid>' (nor one WordNet id a line, nor the Kaggle CSV)")
        k = stem.get(os.path.splitext(p[0].strip().rsplit("/", 1)[-1])[0])  # Kaggle's ImageId has no .JPEG
        if k is None or k in found:
            what = "labelled twice" if k is not None else "no image of the val set"
            raise ShardError(f"{path}:{n}: {p[0]} is {what}")
        found[k] = (f"{path}:{n}", p[1])
    if len(found) != len(names):
        missing = next(name for k, name in enumerate(names) if k not in found)
        raise ShardError(f"--val-labels {path}: no label for {len(names) - len(found)} val images, e.g. {missing}")
    return [found[k] for k in range(len(names))]


def imagenet_sources(*, train: str | None = None, val: str | None = None, devkit: str | None = None,
                     val_labels: str | None = None) -> dict[str, Source]:
    """{"train": Source, "val": Source} for the archives given (at least one): `train` the ILSVRC2012_img_train.tar,
    `val` the ILSVRC2012_img_val.tar, labelled by `val_labels` (a labels file) or else by `devkit`
    (ILSVRC2012_devkit_t12.tar.gz). Classes are the sorted WordNet ids: the train set's, else the devkit's, else
    those of the labels file; a val label outside them is an error naming its file and line."""
    if not (train or val):
        raise ShardError("imagenet needs --train ILSVRC2012_img_train.tar and/or --val ILSVRC2012_img_val.tar")
    if val and not (devkit or val_labels):
        raise ShardError("--val needs --devkit or --val-labels to label its images")
    if (devkit or val_labels) and not val:
        raise ShardError(f"{'--devkit' if devkit else '--val-labels'} labels the val images: give --val too")
    sources: dict[str, Source] = {}
    classes, known_from = None, "--train"
    if train:
        groups = _list(train, "--train", skips := Counter())
        if not any(groups.values()):
            raise ShardError(f"--train {train}: no class tars of images in it ({describe_skips(skips)})")
        classes = list(groups)
        index = _Items(train, [image for images in groups.values() for image in images],
                       [k for k, images in enumerate(groups.values()) for _ in images])
        sources["train"] = Source(f"imagenet:{train}", classes, len(index.names), index.load,
                                  describe=index.describe, skips=dict(skips))
    if val:
        images = _list(val, "--val", skips := Counter())[""]
        if not images:
            raise ShardError(f"--val {val}: no images in it ({describe_skips(skips)})")
        if devkit:
            leaves, wnids = _devkit_labels(devkit)
            classes, known_from = (classes, known_from) if classes else (leaves, "--devkit")
            if not val_labels and len(wnids) != len(images):
                raise ShardError(f"--devkit {devkit}: {len(wnids)} ground-truth labels for {len(images)} images of "
                                 f"{val}")
        if val_labels:
            wnids = _file_labels(val_labels, [name for _, _, name in images])
        if classes is None:  # only a labels file: its own WordNet ids are the classes
            for where, wnid in wnids:
                if not WNID.fullmatch(wnid):
                    raise ShardError(f"{where}: {wnid!r} is not a WordNet id (n and 8 digits)")
            classes = sorted({wnid for _, wnid in wnids})
        number = {wnid: k for k, wnid in enumerate(classes)}
        for where, wnid in wnids:
            if wnid not in number:
                raise ShardError(f"{where}: {wnid!r} is not one of the {len(classes)} classes of {known_from}")
        index = _Items(val, images, [number[wnid] for _, wnid in wnids])
        sources["val"] = Source(f"imagenet:{val} labels:{val_labels or devkit}", list(classes), len(images),
                                index.load, describe=index.describe, skips=dict(skips))
    return sources
