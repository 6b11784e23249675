"""The sources the shard writer takes (data/writer.py's `Source`): the bundled digits, torchvision's CIFAR, an
ImageFolder tree, and a folder of unlabelled images in any nesting. ImageNet's original archives are
data/imagenet.py's, Hugging Face datasets data/hf.py's.

A source lists its items once, in a fixed order (so a write is byte-deterministic and resumable), and loads item i
on demand in any process (the writer's workers are forked, so a source is a closure over its listing). What is not
an image is a `Skip` with a reason, counted in the manifest.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from crate_mae.data.manifest import ShardError
from crate_mae.data.writer import TOO_LARGE, UNREADABLE, UNREADABLE_FILE, Skip, Source, describe_skips

# The file name endings of the formats this PIL can read: a file with one of them that does not open is a broken
# image ("unreadable image"); any other file that does not open is no image at all ("not an image").
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def digits_source(split: str, *, size: int = 32) -> Source:
    """scikit-learn's digits (1,797 real 8×8 scans, shipped inside the package), upscaled to RGB `size`.

    The split is fixed: 300 images (stratified, random_state 0) are `val`, the other 1,497 `train`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=300, stratify=digits.target,
                                          random_state=0)
    indices = {"train": np.sort(train_idx), "val": np.sort(val_idx)}[split]

    def load(i: int) -> tuple[bytes, int]:
        j = int(indices[i])
        gray = Image.fromarray((digits.images[j] * (255.0 / 16.0)).round().astype(np.uint8))
        rgb = gray.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        return encode_png(np.asarray(rgb)), int(digits.target[j])

    return Source(f"digits-{size}px", [str(c) for c in range(10)], len(indices), load)


def cifar_source(name: str, root: str, split: str, *, download: bool = False) -> Source:
    """torchvision's CIFAR-10 / CIFAR-100 (`val` is the test set), stored as PNG."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        data = cls(root, train=split == "train", download=download)
    except RuntimeError as err:
        raise ShardError(f"{root}: {name} not found there ({err}); pass --download on a machine with internet") from None
    return Source(name, list(data.classes), len(data), lambda i: (encode_png(data.data[i]), int(data.targets[i])))


def imagefolder_source(root: str) -> Source:
    """An ImageFolder tree (`root/<class>/<image>`, ImageNet's layout): the files' own bytes."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise ShardError(f"{root}: no such folder")
    folder = ImageFolder(root)  # classes sorted by name, as torchvision and timm number them

    def load(i: int) -> tuple[bytes, int]:
        path, label = folder.samples[i]
        return Path(path).read_bytes(), label

    return Source(f"imagefolder:{root}", list(folder.classes), len(folder.samples), load,
                  describe=lambda i: folder.samples[i][0])


def list_images(root: str) -> tuple[list[str], dict[str, int]]:
    """Every file under `root`, at any depth, as paths relative to it in sorted order (the same listing on every
    machine and run), and what was passed over, by reason: hidden files and folders (a name starting with "."),
    broken symbolic links, links that lead back into a folder already walked (a loop, or a second way into the same
    folder: its images would be written twice), folders that cannot be listed (below the root), and what is not a
    regular file (a FIFO, a socket, a device).
    Linked folders and files are followed. Whether a file is an image is judged when it is loaded (`read_image`)."""
    files: list[str] = []
    skips: dict[str, int] = {}

    def skip(reason: str) -> None:
        skips[reason] = skips.get(reason, 0) + 1

    def walk(folder: str, rel: str, seen: set[tuple[int, int]]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            if not rel:  # the root itself: nothing to write
                raise ShardError(f"{folder}: cannot list the folder ({err.strerror or err})") from None
            skip("unreadable folder")  # one folder without permission does not stop the others
            return
        for entry in entries:
            path, name = entry.path, (f"{rel}/{entry.name}" if rel else entry.name)
            if entry.name.startswith("."):
                skip("hidden file or folder")
                continue
            try:
                info = os.stat(path)  # follows links
            except OSError:  # a link to nothing (or a loop of links, which the kernel refuses to follow: ELOOP)
                skip("broken symbolic link")
                continue
            if stat.S_ISDIR(info.st_mode):
                inode = (info.st_dev, info.st_ino)
                if inode in seen:
                    skip("link to a folder already walked")
                    continue
                seen.add(inode)
                walk(path, name, seen)
            elif stat.S_ISREG(info.st_mode):
                files.append(name)
            else:
                skip("not a regular file")

    top = os.stat(root)
    walk(root, "", {(top.st_dev, top.st_ino)})
    return files, skips


def read_listed(root: str, list_file: str) -> tuple[list[str], dict[str, int]]:
    """The files a list names (one path a line, relative to `root` unless absolute; blank lines and lines starting
    with # are passed over), in the list's order, and what was passed over by reason: paths that do not exist now
    or are not files."""
    try:
        lines = Path(list_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ShardError(f"{list_file}: cannot read the file list ({err})") from None
    files, skips = [], {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not os.path.isfile(os.path.join(root, line)):
            reason = "listed folder, not a file" if os.path.isdir(os.path.join(root, line)) else "listed file missing"
            skips[reason] = skips.get(reason, 0) + 1
            continue
        files.append(line)
    return files, skips


def read_image(path: str) -> bytes:
    """The bytes of an image file, or `Skip` with why not: an empty file, a file this PIL cannot open (an image if
    its name says so, else "not an image"), a file that cannot be read. Only the header is read of a file that is no
    image, so a folder's videos or archives cost nothing."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise Skip("empty file")
            try:
                Image.open(f)  # reads the header only
            except Image.DecompressionBombError as err:  # PIL's guard against huge images (a gigapixel scan)
                raise Skip(TOO_LARGE, str(err)) from None
            except Exception as err:  # UnidentifiedImageError mostly; a plugin may raise others: this file only
                image_name = os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES
                raise Skip(UNREADABLE if image_name else "not an image", f"{type(err).__name__}: {err}") from None
            f.seek(0)
            return f.read()
    except Skip:
        raise
    except OSError as err:  # gone since the listing, no permission, an I/O error
        raise Skip(UNREADABLE_FILE, err.strerror or str(err)) from None


def folder_source(root: str, *, files: str | None = None) -> Source:
    """A folder of unlabelled images, in any nesting (`list_images`), or the files that the list `files` names:
    every file PIL can open is a sample, whatever its name (a PNG named .jpg is stored as the PNG it is); the
    shards carry no `cls`."""
    if not os.path.isdir(root):
        raise ShardError(f"{root}: no such folder" if not os.path.exists(root) else f"{root}: not a folder")
    paths, skips = read_listed(root, files) if files else list_images(root)
    if not paths:
        skipped = f" (skipped {describe_skips(skips)})" if skips else ""
        raise ShardError(f"{files or root}: no files to write{skipped}")
    full = [os.path.join(root, p) for p in paths]
    name = f"folder:{root}" + (f" files:{files}" if files else "")
    return Source(name, [], len(paths), lambda i: (read_image(full[i]), None), describe=full.__getitem__,
                  labelled=False, skips=skips)
