"""hf_source: Hugging Face datasets (save_to_disk folders, Parquet files, folders and globs of them) written as shards
and read back, labelled and not, deterministic and resumable, their bad rows skipped and counted, every mistake one
line, local paths never looked up on the Hub, and a written set trained on. Tiny datasets made with `datasets`."""
from __future__ import annotations

import dataclasses
import logging
import socket
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets", reason="the datasets library (the .[hf] extra: pip install -e \".[hf]\") "
                                                  "is not installed on this Python")

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value  # noqa: E402

from crate_mae.config import DataConfig, load_config  # noqa: E402
from crate_mae.data import ShardError, eval_loader, read_manifest  # noqa: E402
from crate_mae.data.hf import hf_source  # noqa: E402
from crate_mae.data.writer import Source, write_split  # noqa: E402
from tests.helpers import image_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["zebra", "ant", "moth"]  # not sorted: the classes keep the ClassLabel's order
N = 15
BLOBS = [image_bytes(i, size=(16 + 4 * (i % 3), 16), fmt="PNG" if i % 2 else "JPEG") for i in range(N)]
LABELS = [(i * 7) % 3 for i in range(N)]
LOCAL = DataConfig(num_workers=0, eval_crop_pct=1.0)


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the network (a local dataset must not try), and `load_dataset` converts Parquet into an Arrow
    cache in the test's own folder, not ~/.cache."""
    def refuse(self, address, *args) -> None:
        raise AssertionError(f"a connection to {address} was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def labelled(blobs: list | None = None, labels: list[int] | None = None) -> Dataset:
    images = [None if b is None else {"bytes": b, "path": None} for b in (BLOBS if blobs is None else blobs)]
    return Dataset.from_dict({"image": images, "label": LABELS if labels is None else labels},
                             features=Features({"image": Image(), "label": ClassLabel(names=NAMES)}))


def stored(folder: Path, split: str = "train") -> dict[int, dict[str, bytes]]:
    """Row index → the members of its sample (jpg | png, and cls if any), read from the tars with tarfile."""
    samples: dict[int, dict[str, bytes]] = {}
    for info in read_manifest(folder / f"{split}.json").shards:
        with tarfile.open(folder / info.name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(int(key), {})[ext] = tar.extractfile(member).read()
    return samples


def read_back(folder: Path, labels: bool = True) -> dict[int, int]:
    """Row index → label, as the shard reader gives them."""
    out = {}
    for batch in eval_loader(str(folder / "train.json"), 16, data=LOCAL, batch_size=4, labels=labels):
        out.update({int(k.rsplit("/", 1)[1]): int(y) for k, y in zip(batch.keys, batch.labels)})
    return out


def save(form: str, ds: Dataset, where: Path) -> tuple[str, str]:
    """`ds` stored as `form`: (the dataset argument, the split to ask for)."""
    if form == "disk":
        ds.save_to_disk(str(where))
        return str(where), "train"
    if form == "dict":  # a DatasetDict: its "val" split is taken, not its "train"
        DatasetDict({"train": labelled(BLOBS[:3], LABELS[:3]), "val": ds}).save_to_disk(str(where))
        return str(where), "val"
    where.mkdir()
    if form == "parquet":
        ds.to_parquet(str(where / "rows.parquet"))
        return str(where / "rows.parquet"), "train"
    for k in range(2):  # two files: rows 0 … 7 and 8 … 14, in the order of their sorted names
        ds.shard(2, k, contiguous=True).to_parquet(str(where / f"part-{k}.parquet"))
    return (str(where) if form == "folder" else str(where / "part-*.parquet")), "validation"


# ---------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("form", ["disk", "dict", "parquet", "folder", "glob"])
def test_every_local_form_is_written_with_its_images_and_class_names(tmp_path: Path, form: str) -> None:
    dataset, split = save(form, labelled(), tmp_path / "ds")
    source = hf_source(dataset, split=split, label_column="label")
    assert (source.name, source.describe(3)) == (f"hf:{dataset}:{split}", f"{dataset} {split} row 3")
    manifest = write_split(source, tmp_path / "out", "train", shard_size=6)
    assert manifest.classes == NAMES and manifest.labelled and manifest.total == N and manifest.skipped == 0
    samples = stored(tmp_path / "out")
    assert sorted(samples) == list(range(N))
    for i, sample in samples.items():  # key i is row i: its own bytes, undecoded, and its label
        assert sample[("png", "jpg")[i % 2 == 0]] == BLOBS[i] and int(sample["cls"]) == LABELS[i]
    assert read_back(tmp_path / "out") == dict(enumerate(LABELS))


def test_without_a_label_column_the_set_is_unlabelled(tmp_path: Path) -> None:
    dataset, _ = save("parquet", labelled(), tmp_path / "ds")
    manifest = write_split(hf_source(dataset), tmp_path / "out", "train", shard_size=6)
    assert not manifest.labelled and manifest.classes == [] and manifest.total == N
    samples = stored(tmp_path / "out")
    assert len(samples) == N and not any("cls" in s for s in samples.values())
    assert sorted(read_back(tmp_path / "out", labels=False)) == list(range(N))


def test_string_labels_are_sorted_names_and_integers_are_numbered(tmp_path: Path, caplog) -> None:
    words = [NAMES[y] for y in LABELS]
    numbers = [4 if y == 2 else y for y in LABELS]  # 0, 1, 4: classes "0" … "4", 2 and 3 unused
    Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in BLOBS], "word": words, "number": numbers},
                      features=Features({"image": Image(), "word": Value("string"), "number": Value("int64")})
                      ).to_parquet(str(tmp_path / "rows.parquet"))
    dataset = str(tmp_path / "rows.parquet")
    by_word = write_split(hf_source(dataset, label_column="word"), tmp_path / "w", "train")
    assert by_word.classes == ["ant", "moth", "zebra"]
    assert read_back(tmp_path / "w") == {i: sorted(NAMES).index(w) for i, w in enumerate(words)}
    with caplog.at_level(logging.INFO, logger="crate_mae.data"):
        by_number = write_split(hf_source(dataset, label_column="number"), tmp_path / "n", "train")
    assert by_number.classes == ["0", "1", "2", "3", "4"] and "have no names" in caplog.text
    assert read_back(tmp_path / "n") == dict(enumerate(numbers))


def test_images_as_bytes_as_paths_and_as_image_paths(tmp_path: Path) -> None:
    files = [str(tmp_path / f"img{i}.png") for i in range(4)]
    for i, file in enumerate(files):
        Path(file).write_bytes(BLOBS[2 * i + 1])
    Dataset.from_dict({"raw": [BLOBS[2 * i + 1] for i in range(4)], "file": files,
                       "pic": [{"bytes": None, "path": f} for f in files]},
                      features=Features({"raw": Value("binary"), "file": Value("string"), "pic": Image()})
                      ).to_parquet(str(tmp_path / "rows.parquet"))
    Path(files[3]).unlink()  # gone since: that row is skipped, not the write
    for column, count in (("raw", 4), ("file", 3), ("pic", 3)):
        out = tmp_path / column
        manifest = write_split(hf_source(str(tmp_path / "rows.parquet"), image_column=column), out, "train")
        assert manifest.total == count and manifest.skips == ({"no image": 1} if count == 3 else {})
        assert {i: s["png"] for i, s in stored(out).items()} == {i: BLOBS[2 * i + 1] for i in range(count)}


# ---------------------------------------------------------------------------- determinism

def test_two_workers_write_the_bytes_of_one_and_an_interrupted_write_continues(tmp_path: Path) -> None:
    dataset, _ = save("disk", labelled(), tmp_path / "ds")
    source = hf_source(dataset, label_column="label")
    one = write_split(source, tmp_path / "one", "train", shard_size=4, workers=1)
    two = write_split(source, tmp_path / "two", "train", shard_size=4, workers=2)  # forked workers read the table
    assert one.to_json() == two.to_json()
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "two").glob("*.tar"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()

    def failing(after: int) -> Source:
        calls = {"n": 0}

        def load(i: int):
            calls["n"] += 1
            if calls["n"] > after:
                raise KeyboardInterrupt  # a kill in the middle of the 3rd shard
            return source.load(i)
        return dataclasses.replace(source, load=load)

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        write_split(failing(10), cut, "train", shard_size=4)
    assert len(list(cut.glob("*.tar"))) == 2 and not (cut / "train.json").exists()
    again = write_split(hf_source(dataset, label_column="label"), cut, "train", shard_size=4)
    assert again.to_json() == one.to_json()
    for name in names:
        assert (cut / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


# ---------------------------------------------------------------------------- hostile input

def test_rows_without_an_image_or_a_label_are_skipped_and_counted(tmp_path: Path) -> None:
    blobs, labels = list(BLOBS), list(LABELS)
    blobs[4], labels[9] = None, -1  # the Hub's "no label", as in ImageNet's test split
    labelled(blobs, labels).to_parquet(str(tmp_path / "rows.parquet"))
    manifest = write_split(hf_source(str(tmp_path / "rows.parquet"), label_column="label"), tmp_path / "out", "train")
    assert manifest.skips == {"no image": 1, "no label": 1} and manifest.skipped == 2 and manifest.total == N - 2
    assert read_back(tmp_path / "out") == {i: y for i, y in enumerate(LABELS) if i not in (4, 9)}
    unlabelled = write_split(hf_source(str(tmp_path / "rows.parquet")), tmp_path / "u", "train")
    assert unlabelled.skips == {"no image": 1} and unlabelled.total == N - 1  # its label is not read


def one_line(match: str):
    class _OneLine:
        def __enter__(self):
            self.raises = pytest.raises(ShardError, match=match)
            self.info = self.raises.__enter__()

        def __exit__(self, *exc):
            handled = self.raises.__exit__(*exc)
            assert "\n" not in str(self.info.value), str(self.info.value)
            return handled
    return _OneLine()


def test_mistakes_are_one_line_naming_the_dataset_and_column(tmp_path: Path) -> None:
    dataset, _ = save("disk", labelled(), tmp_path / "ds")
    with one_line(r"ds: no column 'img'; the columns are image, label$"):
        hf_source(dataset, image_column="img")
    with one_line(r"ds: no column 'labels'; the columns are image, label$"):
        hf_source(dataset, label_column="labels")
    with one_line(r"ds: image column 'label' is ClassLabel\(.*\), not an image, bytes or a file path$"):
        hf_source(dataset, image_column="label")
    with one_line(r"ds: label column 'image' is Image\(.*\), not class labels, integers or strings$"):
        hf_source(dataset, label_column="image")
    with one_line(r"blank: no row has a label in column 'label' \(every one is empty or -1\); leave out "
                  r"--label-column to write the split unlabelled$"):
        labelled(labels=[-1] * N).save_to_disk(str(tmp_path / "blank"))
        hf_source(str(tmp_path / "blank"), label_column="label")
    DatasetDict({"train": labelled()}).save_to_disk(str(tmp_path / "dict"))
    with one_line(r"dict: no split 'test'; its splits are train$"):
        hf_source(str(tmp_path / "dict"), split="test")
    (tmp_path / "empty").mkdir()
    with one_line(r"empty: neither a save_to_disk folder nor a folder of Parquet files$"):
        hf_source(str(tmp_path / "empty"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with one_line(r"bad\.parquet: cannot read it as Parquet \("):
        hf_source(str(tmp_path / "bad.parquet"))


def test_a_missing_local_path_is_never_looked_up_on_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args, **kwargs):
        raise AssertionError(f"load_dataset{args} was called")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    start = time.monotonic()
    for path in (str(tmp_path / "nope"), "./nope", "../nope", "here/nope", "~/crate-mae-no-such-dataset"):
        with one_line(r"(nope|no-such-dataset): no such file or folder \(a local path, so not looked up on the Hub\)$"):
            hf_source(path)
    with one_line(r"nope-\*\.parquet: no file matches the pattern$"):
        hf_source(str(tmp_path / "nope-*.parquet"))
    assert time.monotonic() - start < 2


def test_a_hub_name_that_cannot_be_loaded_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, split: str):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)  # no network in the tests: the Hub is stood in for
    with one_line(r"^someone/images: cannot load it from the Hugging Face Hub \(ConnectionError: Couldn't reach "
                  r"'someone/images' on the Hub \(LocalEntryNotFoundError\)\)$"):
        hf_source("someone/images", split="validation")


def test_without_the_datasets_library_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails as if it were not installed
    with one_line(r"needs the datasets library: pip install -e \"\.\[hf\]\"$"):
        hf_source("anything")


# ---------------------------------------------------------------------------- trained on

def test_a_written_set_is_fine_tuned_on(tmp_path: Path) -> None:
    from crate_mae.stages.finetune import run_finetune

    torch.set_num_threads(1)
    dataset, _ = save("parquet", labelled(), tmp_path / "ds")
    write_split(hf_source(dataset, label_column="label"), tmp_path / "out", "train")
    spec = str(tmp_path / "out" / "train.json")
    result = run_finetune(load_config(ROOT / "configs/finetune/demo.yaml", [
        "model.variant=nano", f"data.train_shards={spec}", f"data.val_shards={spec}", "data.batch_size=8",
        "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", "finetune.checkpoint=null",
        f"run.out_dir={tmp_path / 'runs'}", "run.name=hf"], stage="finetune"))
    assert result.classes == len(NAMES) and result.steps == N // 8
    assert result.first_loss is not None and torch.isfinite(torch.tensor(result.last_loss))


def test_the_command_writes_the_split_under_its_own_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from crate_mae.data.shards import main as shards_main

    dataset, _ = save("folder", labelled(), tmp_path / "ds")
    out = tmp_path / "out"
    assert shards_main(["write", "hf", "--dataset", dataset, "--split", "validation", "--label-column", "label",
                        "--out", str(out), "--workers", "1"]) == 0
    assert capsys.readouterr().out == f"{out}/validation.json: {N} samples in 1 shards, 3 classes\n"
    assert shards_main(["write", "hf", "--out", str(out)]) == 1
    assert "--dataset is required for hf" in capsys.readouterr().err


def test_parquet_written_by_other_tools_is_read_by_its_image_struct(tmp_path: Path) -> None:
    """pyarrow or pandas write an image as struct<bytes, path> without the `datasets` metadata that marks it an Image
    feature; a row whose struct is null is skipped as having no image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(BLOBS)]
    rows[4] = None
    pq.write_table(pa.table({"image": rows, "label": LABELS}), str(tmp_path / "plain.parquet"))
    manifest = write_split(hf_source(str(tmp_path / "plain.parquet"), label_column="label"), tmp_path / "out", "train")
    assert manifest.total == N - 1 and manifest.skips == {"no image": 1} and manifest.classes == ["0", "1", "2"]
    samples = stored(tmp_path / "out")
    assert all(sample[("png", "jpg")[i % 2 == 0]] == BLOBS[i] for i, sample in samples.items())
