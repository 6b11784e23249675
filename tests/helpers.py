"""Small shard sets made by the tests: real JPEG/PNG images in real tars, some deliberately broken."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from crate_mae.data.manifest import Manifest, ShardInfo, write_manifest


def image_bytes(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    img = (base + 60 * np.sin(xx / 7.0 + seed)[..., None] + 40 * np.cos(yy / 5.0)[..., None]).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_tar_set(folder: Path, split: str, shards: list[list[dict]], classes: int = 3, manifest: bool = True) -> str:
    """Write each list of samples as `<split>-NNNNNN.tar` (samples are dicts of bytes), plus a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for n, samples in enumerate(shards):
        path = folder / f"{split}-{n:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as tar:
            for sample in samples:
                tar.write(sample)
        infos.append(ShardInfo(path.name, len(samples), path.stat().st_size))
    if manifest:
        write_manifest(Manifest(split=split, shards=infos, classes=[str(c) for c in range(classes)]),
                       folder / f"{split}.json")
    return str(folder / f"{split}.json")


def good_sample(index: int, classes: int = 3) -> dict:
    return {"__key__": f"{index:06d}", "jpg": image_bytes(index), "cls": str(index % classes).encode()}


def make_set(folder: Path, split: str = "train", n_shards: int = 5, per_shard: int = 12) -> str:
    shards = [[good_sample(s * per_shard + i) for i in range(per_shard)] for s in range(n_shards)]
    return write_tar_set(folder, split, shards)


def join_ranks(fn, args: tuple, nprocs: int = 2, timeout: float = 120) -> None:
    """Spawn `nprocs` ranks of `fn(rank, *args)` and wait for them; a rank still running after `timeout` seconds (one
    waiting in a collective for a rank that left) fails the test, every rank killed."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"a rank still runs after {timeout:g} s")


def image_tree(root: Path, *, hostile: bool = True) -> tuple[int, dict[str, int]]:
    """A folder of unlabelled images at several depths, as users keep them: (how many images it holds, what a write
    of it must skip, by reason). `hostile` adds what a real folder holds besides: a zero-byte .jpg, a folder named
    like an image (holding an image), a PNG named .jpg, a text file, a truncated JPEG, hidden files and folders, a
    link to nothing, a link to itself, a link back up the tree (a loop) and a FIFO."""
    import os

    (root / "a" / "b" / "c").mkdir(parents=True)
    n = 0
    for k, folder in enumerate([root, root / "a", root / "a" / "b", root / "a" / "b" / "c"]):
        for i in range(4):
            fmt = "PNG" if (k + i) % 2 else "JPEG"
            (folder / f"img{i}.{'png' if fmt == 'PNG' else 'jpg'}").write_bytes(image_bytes(10 * k + i, (36, 28), fmt))
            n += 1
    if not hostile:
        return n, {}
    (root / "shot.jpg").mkdir()
    (root / "shot.jpg" / "inside.png").write_bytes(image_bytes(90, (36, 28), "PNG"))
    (root / "a" / "really_a_png.jpg").write_bytes(image_bytes(91, (36, 28), "PNG"))
    n += 2
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "cut.jpg").write_bytes(image_bytes(92, (36, 28))[:120])
    (root / ".hidden.jpg").write_bytes(image_bytes(93, (36, 28)))
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.jpg").write_bytes(image_bytes(94, (36, 28)))
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    os.symlink("self.jpg", root / "self.jpg")
    os.symlink(root, root / "a" / "b" / "up")
    os.mkfifo(root / "a" / "pipe")
    return n, {"broken symbolic link": 2, "empty file": 1, "hidden file or folder": 2,
               "link to a folder already walked": 1, "not a regular file": 1, "not an image": 1,
               "unreadable image": 1}
