"""Users' own images in (issue 23): a folder of unlabelled images in any nesting, and published WebDataset sets
whose `_info.json` / `_info.yaml` give the counts. (Hugging Face datasets: test_hf_source.py; ImageNet's archives:
test_imagenet_archives.py; training on an unlabelled set and the probes' refusal: tests/stages/test_own_images.py.)"""
from __future__ import annotations

import json
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from crate_mae.data import ShardError, eval_loader, read_manifest, resolve_shards, train_loader
from crate_mae.data.shards import main as shards_main
from crate_mae.data.sources import folder_source
from crate_mae.data.transforms import PretrainTransform
from crate_mae.data.writer import Source, write_split
from tests.helpers import good_sample, image_bytes, image_tree, write_tar_set


def members(folder: Path) -> list[str]:
    names = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            names += tar.getnames()
    return names


def test_a_folder_of_unlabelled_images_is_written_whatever_it_holds(tmp_path: Path) -> None:
    images, skips = image_tree(tmp_path / "photos")
    one = write_split(folder_source(str(tmp_path / "photos")), tmp_path / "one", "train", shard_size=5, workers=1)
    two = write_split(folder_source(str(tmp_path / "photos")), tmp_path / "two", "train", shard_size=5, workers=2)
    assert one.to_json() == two.to_json()
    for path in sorted((tmp_path / "one").glob("*.tar")):
        assert (tmp_path / "two" / path.name).read_bytes() == path.read_bytes()
    assert one.total == images and not one.labelled and one.classes == []
    assert one.skips == skips and one.skipped == sum(skips.values())
    names = members(tmp_path / "one")
    assert len(names) == images and not any(n.endswith(".cls") for n in names)  # no labels written
    assert sum(n.endswith(".png") for n in names) == 8 + 2  # the PNG named .jpg is stored as the PNG it is
    manifest = read_manifest(tmp_path / "one" / "train.json")
    assert not manifest.labelled and manifest.skips == skips
    loader = eval_loader(str(tmp_path / "one" / "train.json"), 16, labels=False, batch_size=8, num_workers=0)
    assert sum(batch.images.shape[0] for batch in loader) == images and loader.bad == 0


def test_a_file_list_writes_that_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image_tree(tmp_path / "photos", hostile=False)
    listing = tmp_path / "keep.txt"
    listing.write_text("# curated\nimg0.jpg\n\na/b/img1.png\na/b/c/img3.jpg\nno/such.jpg\na\n")
    assert shards_main(["write", "folder", "--root", str(tmp_path / "photos"), "--files", str(listing),
                        "--out", str(tmp_path / "s"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 samples in 1 shards, no labels; skipped 1 × listed file missing, 1 × listed folder, not a file" in out
    assert read_manifest(tmp_path / "s" / "train.json").total == 3


def test_an_interrupted_folder_write_continues_to_the_same_set(tmp_path: Path) -> None:
    image_tree(tmp_path / "photos")
    whole = write_split(folder_source(str(tmp_path / "photos")), tmp_path / "whole", "train", shard_size=4)

    def cut_after(n: int) -> Source:
        source, calls = folder_source(str(tmp_path / "photos")), [0]
        load = source.load

        def counted(i: int):
            calls[0] += 1
            if calls[0] > n:
                raise KeyboardInterrupt  # a kill half way through
            return load(i)
        source.load = counted
        return source

    with pytest.raises(KeyboardInterrupt):
        write_split(cut_after(14), tmp_path / "cut", "train", shard_size=4)
    assert list((tmp_path / "cut").glob("*.tar")) and not (tmp_path / "cut" / "train.json").exists()
    again = write_split(folder_source(str(tmp_path / "photos")), tmp_path / "cut", "train", shard_size=4)
    assert again.to_json() == whole.to_json()  # the skips before the cut are counted under their reasons again
    for path in sorted((tmp_path / "whole").glob("*.tar")):
        assert (tmp_path / "cut" / path.name).read_bytes() == path.read_bytes()


def test_an_image_past_pils_size_guard_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    image_tree(tmp_path / "photos", hostile=False)
    (tmp_path / "photos" / "huge.png").write_bytes(image_bytes(7, (400, 300), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # a 400 × 300 image is a "bomb" past 2 × this
    manifest = write_split(folder_source(str(tmp_path / "photos")), tmp_path / "s", "train", workers=1)
    assert manifest.total == 16 and manifest.skips == {"image too large": 1}


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no images"])
def test_a_folder_that_gives_nothing_is_one_line(tmp_path: Path, case: str) -> None:
    root = tmp_path / "r"
    if case == "file":
        root.write_text("x")
    elif case != "missing":
        root.mkdir()
        if case == "no images":
            (root / "a.txt").write_text("x")
    with pytest.raises(ShardError) as err:
        write_split(folder_source(str(root)), tmp_path / "out", "train")
    assert str(root) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- published sets: _info.json / _info.yaml


def published_set(folder: Path, *, fmt: str = "json", lengths: list[int] | None = None) -> str:
    """Shards named as the Hub's timm/imagenet-1k-wds names them, no manifest, and the info file beside them."""
    per = [6, 5, 7]
    shards = [[good_sample(sum(per[:s]) + i, classes=3) for i in range(n)] for s, n in enumerate(per)]
    write_tar_set(folder, "tiny-train", shards, manifest=False)
    write_tar_set(folder, "tiny-validation", [[good_sample(100 + i) for i in range(4)]], manifest=False)
    info = {"name": "tiny", "num_classes": 3, "classes": ["cat", "dog", "eel"],
            "splits": {"train": {"name": "train", "num_samples": sum(lengths or per),
                                 "filenames": [f"tiny-train-{s:06d}.tar" for s in range(3)],
                                 "shard_lengths": lengths or per},
                       "validation": {"name": "validation", "num_samples": 4,
                                      "filenames": ["tiny-validation-000000.tar"], "shard_lengths": [4]}}}
    text = json.dumps(info) if fmt == "json" else yaml.safe_dump(info)
    (folder / f"_info.{fmt}").write_text(text)
    return str(folder / "tiny-train-{000000..000002}.tar")


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_a_published_sets_info_file_gives_the_counts_and_classes(tmp_path: Path, fmt: str) -> None:
    spec = published_set(tmp_path / "set", fmt=fmt)
    shards = resolve_shards(spec)
    assert shards.samples == [6, 5, 7] and shards.manifest.classes == ["cat", "dog", "eel"]
    loader = train_loader(spec, PretrainTransform(16), batch_size=4, num_workers=0, labels=True)
    assert len(loader) == 18 // 4  # the epoch length, with no data.train_samples and no manifest
    assert sum(1 for _ in loader) == 4
    assert resolve_shards(str(tmp_path / "set" / "tiny-train-00000[12].tar")).samples == [5, 7]  # a part of a split
    val = eval_loader(str(tmp_path / "set" / "tiny-validation-000000.tar"), 16, batch_size=8, num_workers=0)
    assert sum(b.images.shape[0] for b in val) == 4


def test_a_count_the_info_file_gets_wrong_is_named_as_the_shard_is_read(tmp_path: Path, capsys) -> None:
    spec = published_set(tmp_path / "set", lengths=[6, 6, 7])
    loader = eval_loader(spec, 16, batch_size=4, num_workers=0)
    with pytest.raises(ShardError, match=r"tiny-train-000001\.tar: 5 samples, but the manifest of .* says 6"):
        list(loader)
    assert shards_main(["manifest", "--verify", spec]) == 1
    assert "tiny-train-000001.tar: 5 samples, the manifest says 6" in capsys.readouterr().out


def test_the_manifest_command_takes_the_info_files_counts(tmp_path: Path, capsys) -> None:
    spec = published_set(tmp_path / "set")
    assert shards_main(["manifest", spec]) == 0
    assert "the counts of" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "set" / "tiny-train.json")
    assert [s.samples for s in manifest.shards] == [6, 5, 7] and manifest.classes == ["cat", "dog", "eel"]
    assert all(s.bytes for s in manifest.shards)
    assert shards_main(["manifest", "--verify", str(tmp_path / "set" / "tiny-train.json")]) == 0


@pytest.mark.parametrize(("change", "message"), [
    (lambda info: info["splits"]["train"]["filenames"].pop(), r"split 'train' does not list tiny-train-000002\.tar"),
    (lambda info: info["splits"]["train"].update(num_samples=99), r"num_samples 99 but its shard_lengths add up to 18"),
    (lambda info: info.pop("splits"), r"needs a 'splits' mapping"),
    (lambda info: info["splits"]["train"].update(shard_lengths=[6, "six", 6]), r"shard_lengths that are not whole"),
])
def test_an_info_file_that_does_not_fit_is_one_line(tmp_path: Path, change, message: str) -> None:
    spec = published_set(tmp_path / "set")
    path = tmp_path / "set" / "_info.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))
    with pytest.raises(ShardError, match=message):
        resolve_shards(spec)


def test_an_info_file_without_per_shard_counts_leaves_the_set_uncounted(tmp_path: Path) -> None:
    spec = published_set(tmp_path / "set")
    path = tmp_path / "set" / "_info.json"
    info = json.loads(path.read_text())
    del info["splits"]["train"]["shard_lengths"]
    path.write_text(json.dumps(info))
    assert resolve_shards(spec).samples is None


def test_a_remote_sets_info_file_is_fetched_beside_its_shards(tmp_path: Path) -> None:
    published_set(tmp_path / "set")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "set")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tiny-train-{{000000..000002}}.tar"
        shards = resolve_shards(url)
        assert shards.samples == [6, 5, 7] and shards.manifest.classes == ["cat", "dog", "eel"]
        assert sum(b.images.shape[0] for b in eval_loader(url, 16, batch_size=8, num_workers=0)) == 18
    finally:
        server.shutdown()


def test_every_image_mode_and_format_in_a_folder_is_written_and_decodes(tmp_path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    root = tmp_path / "modes"
    root.mkdir()
    rgb = Image.open(io.BytesIO(image_bytes(3, (24, 20)))).convert("RGB")
    cases = {"gray16.png": rgb.convert("I").point(lambda v: v * 200).convert("I;16"), "cmyk.jpg": rgb.convert("CMYK"),
             "palette.gif": rgb.convert("P"), "rgba.webp": rgb.convert("RGBA"), "scan.tif": rgb.convert("L"),
             "old.bmp": rgb, "mask.png": rgb.convert("1"),
             "float.tiff": Image.fromarray(np.full((20, 24), 0.5, np.float32))}
    for name, img in cases.items():
        img.save(root / name)
    manifest = write_split(folder_source(str(root)), tmp_path / "s", "train", workers=1)
    assert manifest.total == len(cases) and manifest.skipped == 0
    loader = eval_loader(str(tmp_path / "s" / "train.json"), 16, labels=False, batch_size=16, num_workers=0)
    assert sum(b.images.shape[0] for b in loader) == len(cases) and loader.bad == 0


def test_a_folder_written_on_two_machines_counts_each_skip_once(tmp_path: Path) -> None:
    from crate_mae.data.writer import merge_parts

    images, skips = image_tree(tmp_path / "photos")
    whole = write_split(folder_source(str(tmp_path / "photos")), tmp_path / "one", "train", shard_size=5)
    for rank in range(2):
        write_split(folder_source(str(tmp_path / "photos")), tmp_path / "two", "train", shard_size=5, num_nodes=2,
                    node_rank=rank)
    merged = merge_parts(tmp_path / "two", "train")
    assert merged.total == whole.total == images and not merged.labelled
    assert merged.skips == whole.skips == skips and list(merged.skips) == sorted(skips)


def test_a_folder_that_cannot_be_listed_is_skipped_and_counted_unless_it_is_the_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    image_tree(tmp_path / "photos", hostile=False)
    scandir = os.scandir

    def refusing(path):  # a folder without read permission (the tests run as root, where chmod does not refuse)
        if str(path).endswith(os.path.join("a", "b")):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    manifest = write_split(folder_source(str(tmp_path / "photos")), tmp_path / "s", "train")
    assert manifest.total == 8 and manifest.skips == {"unreadable folder": 1}  # a/b and a/b/c not reached
    with pytest.raises(ShardError, match=r"photos/a/b: cannot list the folder \(Permission denied\)"):
        folder_source(str(tmp_path / "photos" / "a" / "b"))


def test_an_info_file_of_other_shards_is_passed_over(tmp_path: Path) -> None:
    spec = published_set(tmp_path / "set")
    write_tar_set(tmp_path / "set", "mine", [[good_sample(i) for i in range(3)]], manifest=False)
    assert resolve_shards(str(tmp_path / "set" / "mine-000000.tar")).samples is None  # no split lists it
    assert resolve_shards(spec).samples == [6, 5, 7]


def test_a_pipe_specs_info_file_is_read_by_the_same_command(tmp_path: Path) -> None:
    published_set(tmp_path / "set")
    spec = f"pipe:cat '{tmp_path}/set/tiny-train-{{000000..000002}}.tar'"
    shards = resolve_shards(spec)
    assert shards.samples == [6, 5, 7] and shards.manifest.source == f"pipe:cat '{tmp_path}/set/_info.json'"
    assert sum(b.images.shape[0] for b in eval_loader(spec, 16, batch_size=8, num_workers=0)) == 18
    assert resolve_shards(f"pipe:cat {tmp_path}/set/tiny-train-000000.tar | cat").samples == [6]
    assert resolve_shards("pipe:echo nothing").samples is None  # a command that names no shard file
    (tmp_path / "set" / "_info.json").unlink()
    (tmp_path / "set" / "_info.yaml").write_text("<html>404</html>\n")  # a remote answer that is no info file
    assert resolve_shards(spec).samples is None
