"""ImageNet's original archives (data/imagenet.py), hand-made in miniature: a train tar of per-class tars, a flat val
tar, its labels in every accepted form and a devkit with a meta.mat; read in place, written, resumed, trained on."""
from __future__ import annotations

import dataclasses
import io
import pickle
import random
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from crate_mae.config import DataConfig
from crate_mae.data import ShardError, eval_loader, read_manifest
from crate_mae.data.imagenet import imagenet_sources
from crate_mae.data.writer import Source, write_split
from tests.helpers import image_bytes

LOCAL = DataConfig(num_workers=0, eval_crop_pct=1.0)
WNIDS = ["n02000002", "n01000001", "n03000003"]  # as the outer tar holds them: not sorted
CLASSES = sorted(WNIDS)
IDS = {"n02000002": 1, "n03000003": 2, "n01000001": 3}  # the devkit's ILSVRC2012_IDs: not in WNID order either
BROKEN = "n01000001.tar/n01000001_9.JPEG"  # a JPEG name, no JPEG inside


def tar_of(path: Path | None, members: list[tuple[str, bytes]]) -> bytes:
    """A tar of (name, bytes) members, in this order; written to `path` if given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


@dataclasses.dataclass
class Archives:
    train: str
    val: str
    devkit: str
    labels: dict[str, str]  # the form → a val labels file in it
    images: dict[str, tuple[str, bytes]]  # "n01000001.tar/n01000001_0.JPEG", "ILSVRC2012_val_…" → (WNID, bytes)


def make_archives(root: Path) -> Archives:
    root.mkdir(parents=True, exist_ok=True)
    images, outer = {}, []
    for c, wnid in enumerate(WNIDS):
        inner = []
        for i in reversed(range(4 + c)):  # members out of name order too
            fmt = "PNG" if (c, i) == (1, 2) else "JPEG"  # ImageNet's PNG named .JPEG
            data = image_bytes(10 * c + i, size=(36 + 4 * i, 32 + 3 * c), fmt=fmt)
            inner.append((f"{wnid}_{i}.JPEG", data))
            images[f"{wnid}.tar/{wnid}_{i}.JPEG"] = (wnid, data)
        if wnid == "n01000001":
            inner += [("n01000001_9.JPEG", b"\xff\xd8\xff not a JPEG after all"), ("notes.txt", b"no image\n")]
            images[BROKEN] = (wnid, inner[-2][1])
        outer.append((f"{wnid}.tar", tar_of(None, inner)))
    outer.insert(1, ("README", b"stray\n"))
    tar_of(root / "ILSVRC2012_img_train.tar", outer)
    rng = random.Random(0)
    val = [(f"ILSVRC2012_val_{k:08d}.JPEG", rng.choice(WNIDS), image_bytes(100 + k)) for k in range(1, 10)]
    rng.shuffle(val)  # the tar's order is not the file order
    tar_of(root / "ILSVRC2012_img_val.tar", [(name, data) for name, _, data in val])
    images.update({name: (wnid, data) for name, wnid, data in val})
    ordered = sorted(val)
    labels = {"ordered": "\n".join(w for _, w, _ in ordered) + "\n",
              "pairs": "".join(f"{name} {w}\n" for name, w, _ in val),
              "kaggle": "ImageId,PredictionString\n" + "".join(f"{name[:-5]},{w} 1 2 30 40 {w} 5 6 7 8 \n"
                                                               for name, w, _ in val)}
    for form, text in labels.items():
        (root / f"{form}.txt").write_text(text)
    return Archives(str(root / "ILSVRC2012_img_train.tar"), str(root / "ILSVRC2012_img_val.tar"),
                    make_devkit(root, [IDS[w] for _, w, _ in ordered]),
                    {form: str(root / f"{form}.txt") for form in labels}, images)


def make_devkit(root: Path, truth: list[int]) -> str:
    """ILSVRC2012_devkit_t12.tar.gz in miniature: meta.mat's synsets (3 leaves and a parent of them, which is no
    class) and the ground truth, an ILSVRC2012_ID a line."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(IDS) + 1, 1), dtype=[(f, object) for f in fields])
    for k, (wnid, i) in enumerate(sorted(IDS.items(), key=lambda kv: kv[1])):
        synsets[k, 0] = (i, wnid, f"thing {i}", "a thing", 0, np.zeros((0,), np.uint8), 0, 4)
    synsets[3, 0] = (4, "n00000004", "things", "the things", 3, np.array([1, 2, 3], np.uint8), 1, 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    path = root / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("data/meta.mat", meta.getvalue()),
                           ("data/ILSVRC2012_validation_ground_truth.txt", "".join(f"{i}\n" for i in truth).encode()),
                           ("COPYING", b"text\n")]:
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Archives:
    return make_archives(tmp_path_factory.mktemp("imagenet"))


def listing(source: Source) -> list[tuple[str, bytes, int]]:
    """(member path inside the archive, bytes, label) of every item."""
    out = []
    for i in range(source.count):
        data, label = source.load(i)
        out.append((source.describe(i).split(".tar/", 1)[1], data, label))
    return out


# ---------------------------------------------------------------------------- reading the archives

def test_classes_are_sorted_wnids_and_labels_their_index(archives: Archives) -> None:
    sources = imagenet_sources(train=archives.train, val=archives.val, devkit=archives.devkit)
    train, val = sources["train"], sources["val"]
    assert train.classes == val.classes == CLASSES
    assert train.skips == {"not a class tar": 1, "not an image": 1}  # the README; notes.txt
    items = listing(train)
    assert [name for name, _, _ in items] == sorted(name for name in archives.images if ".tar/" in name)
    for name, data, label in items:
        wnid, original = archives.images[name]
        assert (data, label) == (original, CLASSES.index(wnid)), name
    assert train.describe(0) == f"{archives.train}/n01000001.tar/n01000001_0.JPEG"
    by_devkit = listing(val)
    for name, data, label in by_devkit:
        assert (data, label) == (archives.images[name][1], CLASSES.index(archives.images[name][0])), name
    for form, path in archives.labels.items():  # every labels file, with the train classes or on its own
        for train_path in (archives.train, None):
            got = imagenet_sources(train=train_path, val=archives.val, val_labels=path)["val"]
            assert got.classes == CLASSES and listing(got) == by_devkit, (form, train_path)
    alone = imagenet_sources(val=archives.val, devkit=archives.devkit)["val"]  # the parent synset is no class
    assert alone.classes == CLASSES and listing(alone) == by_devkit
    clone = pickle.loads(pickle.dumps(train.load))  # no descriptor travels: each process opens its own
    assert clone(3) == train.load(3)


# ---------------------------------------------------------------------------- writing, resuming, training

def shard_members(folder: Path, split: str) -> dict[str, bytes]:
    out = {}
    for path in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


def test_written_with_1_or_2_workers_the_same_set_of_every_image(archives: Archives, tmp_path: Path) -> None:
    source = imagenet_sources(train=archives.train, val=archives.val, devkit=archives.devkit)["train"]
    one = write_split(source, tmp_path / "one", "train", shard_size=4, workers=1)
    two = write_split(source, tmp_path / "two", "train", shard_size=4, workers=2)
    assert one.to_json() == two.to_json()
    assert shard_members(tmp_path / "one", "train") == shard_members(tmp_path / "two", "train")
    manifest = read_manifest(tmp_path / "one" / "train.json")
    assert manifest.classes == CLASSES and manifest.total == source.count - 1
    assert manifest.skips == {"not a class tar": 1, "not an image": 1, "unreadable image": 1}
    expected = {f"{i:09d}": (source.describe(i).split(".tar/", 1)[1], label)
                for i, (_, label) in enumerate(map(source.load, range(source.count)))}
    stored = shard_members(tmp_path / "one", "train")
    for key, (name, label) in expected.items():
        if name == BROKEN:
            assert f"{key}.jpg" not in stored
            continue
        ext = "png" if name.endswith("n01000001_2.JPEG") else "jpg"  # the PNG named .JPEG is stored as the PNG it is
        assert stored[f"{key}.{ext}"] == archives.images[name][1] and stored[f"{key}.cls"] == str(label).encode()
    seen = {}
    for batch in eval_loader(str(tmp_path / "one" / "train.json"), 32, data=LOCAL, batch_size=5):
        assert batch.images.shape[1:] == (3, 32, 32)
        seen.update({k.rsplit("/", 1)[1]: int(y) for k, y in zip(batch.keys, batch.labels)})
    assert seen == {k: label for k, (name, label) in expected.items() if name != BROKEN}


def test_an_interrupted_write_continues_to_the_same_set(archives: Archives, tmp_path: Path) -> None:
    source = imagenet_sources(train=archives.train)["train"]
    calls = {"n": 0}

    def failing(i: int) -> tuple[bytes, int]:
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt  # a kill in the middle of the 3rd shard
        return source.load(i)

    whole = write_split(source, tmp_path / "whole", "train", shard_size=4)
    with pytest.raises(KeyboardInterrupt):
        write_split(dataclasses.replace(source, load=failing), tmp_path / "cut", "train", shard_size=4)
    cut = tmp_path / "cut"
    assert len(list(cut.glob("*.tar"))) == 2 and not (cut / "train.json").exists()
    again = write_split(source, cut, "train", shard_size=4)  # continues after the 2 finished shards
    assert again.to_json() == whole.to_json()
    for path in sorted((tmp_path / "whole").glob("*.tar")):
        assert (cut / path.name).read_bytes() == path.read_bytes()


def test_one_pretraining_step_on_the_written_set(archives: Archives, tmp_path: Path) -> None:
    from crate_mae.config import load_config
    from crate_mae.stages.pretrain import run_pretrain

    torch.set_num_threads(1)
    sources = imagenet_sources(train=archives.train, val=archives.val, val_labels=archives.labels["pairs"])
    for split, source in sources.items():
        write_split(source, tmp_path / "set", split, shard_size=8)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/pretrain/demo.yaml", [
        "model.variant=nano", f"data.train_shards={tmp_path / 'set/train.json'}",
        f"data.val_shards={tmp_path / 'set/val.json'}", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=8", "optim.epochs=1", "optim.warmup_epochs=0", f"run.out_dir={tmp_path}", "run.name=t",
        "monitor.every=0"])
    result = run_pretrain(cfg)
    assert result.steps == 1 and np.isfinite(result.last_loss)


# ---------------------------------------------------------------------------- what is wrong, said in one line

def q(path: str | Path) -> str:
    return re.escape(str(path))


def one_line(match: str, **kwargs: str | None) -> None:
    with pytest.raises(ShardError, match=match) as err:
        imagenet_sources(**kwargs)
    assert "\n" not in str(err.value)


def test_a_truncated_or_damaged_archive_is_named(archives: Archives, tmp_path: Path) -> None:
    data = Path(archives.train).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:len(data) // 2])
    one_line(rf"--train {q(cut)}: cut short \(unexpected end of data\): truncated\?", train=str(cut))
    with tarfile.open(archives.train) as tar:
        last = tar.getmembers()[-1]
    cut.write_bytes(data[:last.offset])  # cut at a header, where tarfile just stops listing
    one_line(rf"--train {q(cut)}: cut short or damaged after 3 members", train=str(cut))
    with tarfile.open(archives.train) as tar:  # one class tar garbled: the archive and the member named
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members[0] = (members[0][0], b"garbage" * 300)
    tar_of(cut, members)
    one_line(rf"{q(cut)}/n02000002\.tar: not a readable tar", train=str(cut))
    one_line(rf"--train {q(tmp_path / 'none.tar')}: No such file or directory", train=str(tmp_path / "none.tar"))
    one_line(rf"--val {q(archives.labels['ordered'])}: not a readable tar", val=archives.labels["ordered"],
             val_labels=archives.labels["ordered"])
    shutil.copy(archives.devkit, tmp_path / "train.tar")  # a .tar.gz under a .tar name
    one_line(r"gzip-compressed; give the plain tar", train=str(tmp_path / "train.tar"))
    one_line(r"--val needs --devkit or --val-labels to label its images", val=archives.val)


def test_bad_val_labels_name_the_file_and_line(archives: Archives, tmp_path: Path) -> None:
    lines = Path(archives.labels["ordered"]).read_text().splitlines()
    bad = tmp_path / "labels.txt"
    bad.write_text("\n".join(lines[:-1]) + "\n")
    one_line(rf"--val-labels {q(bad)}: 8 labels for 9 val images", val=archives.val, val_labels=str(bad))
    bad.write_text("\n".join(lines[:4] + ["n09999999"] + lines[5:]) + "\n")
    one_line(rf"{q(bad)}:5: 'n09999999' is not one of the 3 classes of --train", train=archives.train, val=archives.val,
             val_labels=str(bad))
    one_line(rf"{q(bad)}:5: 'n09999999' is not one of the 3 classes of --devkit", val=archives.val,
             devkit=archives.devkit, val_labels=str(bad))
    bad.write_text("\n".join(lines[:2] + ["cat"] + lines[3:]) + "\n")
    one_line(rf"{q(bad)}:3: 'cat' is not a WordNet id", val=archives.val, val_labels=str(bad))
    pairs = Path(archives.labels["pairs"]).read_text().splitlines()
    bad.write_text("\n".join(pairs[:3] + ["ILSVRC2012_val_00000077.JPEG n01000001"] + pairs[4:]) + "\n")
    one_line(rf"{q(bad)}:4: ILSVRC2012_val_00000077.JPEG is no image of the val set", val=archives.val,
             val_labels=str(bad))
    bad.write_text("3\n" * 9)
    one_line(r"ILSVRC2012_IDs, the devkit's ground truth: give the devkit archive as --devkit", val=archives.val,
             val_labels=str(bad))


def test_the_command_writes_both_splits(archives: Archives, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from crate_mae.data.shards import main as shards_main

    out = tmp_path / "in1k"
    assert shards_main(["write", "imagenet", "--train", archives.train, "--val", archives.val, "--devkit",
                        archives.devkit, "--out", str(out), "--workers", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{out}/train.json: 15 samples in 1 shards, 3 classes; skipped ")
    assert lines[1] == f"{out}/val.json: 9 samples in 1 shards, 3 classes"
    assert shards_main(["write", "imagenet", "--val", archives.val, "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == "error: --val needs --devkit or --val-labels to label its images\n"
