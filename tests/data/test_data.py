"""Shards: writing, reading, splitting over ranks and workers, determinism, and every bad-data case."""
from __future__ import annotations

import io
import logging
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_mae.config import DataConfig
from crate_mae.data import (DataError, EvalTransform, PretrainTransform, ShardError, eval_loader, read_manifest,
                            resolve_shards, train_loader)
from crate_mae.data.shards import ensure_digits, main as shards_main
from crate_mae.data.sources import digits_source, imagefolder_source
from crate_mae.data.writer import Source, write_split
from tests.helpers import good_sample, image_bytes, make_set, write_tar_set

T32 = EvalTransform(16, crop_pct=1.0)
LOCAL = DataConfig(num_workers=0, eval_crop_pct=1.0)  # read in this process (unless a test says); whole images


def keys_of(loader) -> list[str]:
    return [k.rsplit("/", 1)[1] for batch in loader for k in batch.keys]


# ---------------------------------------------------------------------------- writing

def test_digits_demo_writer(tmp_path: Path) -> None:
    train, val = ensure_digits(tmp_path / "digits")
    mt, mv = read_manifest(train), read_manifest(val)
    assert (mt.total, mv.total, mt.num_classes, mt.image_size) == (1497, 300, 10, [32, 32])
    assert len(mt.shards) == 6 and all(s.samples <= 250 for s in mt.shards)
    labels = [b.labels for b in eval_loader(val, 16, data=LOCAL, batch_size=100)]
    counts = torch.bincount(torch.cat(labels), minlength=10)
    assert counts.sum() == 300 and (counts >= 25).all()  # stratified split: ~30 per class
    first_shard = eval_loader(str(tmp_path / "digits" / "train-000000.tar"), 16, data=LOCAL, batch_size=250)
    assert len(torch.unique(next(iter(first_shard)).labels)) == 10  # the order is shuffled: shards mix classes
    before = (tmp_path / "digits" / "train-000003.tar").read_bytes()
    ensure_digits(tmp_path / "digits")  # present: nothing rewritten
    write_split(digits_source("train"), tmp_path / "again", "train", shard_size=250)
    assert (tmp_path / "again" / "train-000003.tar").read_bytes() == before  # same seed, same bytes


def make_image_folder(root: Path) -> dict[str, tuple[int, bytes]]:
    """3 classes of JPEGs and PNGs of mixed sizes; returns file name → (label, bytes)."""
    files = {}
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
            data = image_bytes(10 * c + i, size=(60 + 10 * i, 40 + 5 * c), fmt=fmt)
            (root / name / f"{name}{i}.{ext}").write_bytes(data)
            files[f"{name}{i}.{ext}"] = (c, data)
    return files


def test_imagefolder_round_trip_keeps_original_bytes(tmp_path: Path) -> None:
    files = make_image_folder(tmp_path / "tree")
    assert shards_main(["write", "imagefolder", "--root", str(tmp_path / "tree"), "--out", str(tmp_path / "s"),
                        "--split", "val", "--shard-size", "4"]) == 0
    manifest = read_manifest(tmp_path / "s" / "val.json")
    assert manifest.total == 15 and len(manifest.shards) == 4 and manifest.classes == ["cat", "dog", "eel"]
    stored = {}
    for info in manifest.shards:
        with tarfile.open(tmp_path / "s" / info.name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                stored.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert len(stored) == 15
    originals = sorted((label, data) for label, data in files.values())
    written = sorted((int(s["cls"]), s.get("jpg", s.get("png"))) for s in stored.values())
    assert written == originals  # every sample, its label, and the source's own bytes
    loader = eval_loader(str(tmp_path / "s" / "val.json"), 16, data=LOCAL, batch_size=4)
    assert sum(len(b.keys) for b in loader) == 15 and loader.bad == 0


def test_resize_at_write_time(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "tree")  # shorter sides: cat 40, dog 45, eel 50
    write_split(imagefolder_source(str(tmp_path / "tree")), tmp_path / "r", "train", resize=45, quality=80)
    seen = 0
    for batch_keys, sample in _tar_samples(tmp_path / "r"):
        data = sample.get("jpg", sample.get("png"))
        img = Image.open(io.BytesIO(data))
        if int(sample["cls"]) == 2:  # larger than 45: resized, stored as JPEG
            assert min(img.size) == 45 and img.format == "JPEG" and "jpg" in sample
        else:  # small enough: the original bytes, JPEG or PNG
            assert min(img.size) in (40, 45)
        seen += 1
    assert seen == 15


def _tar_samples(folder: Path):
    for info in read_manifest(folder / "train.json").shards:
        with tarfile.open(folder / info.name) as tar:
            samples: dict[str, dict] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
            yield from samples.items()


def test_existing_split_needs_overwrite_and_stale_shards_go(tmp_path: Path) -> None:
    source = digits_source("val")
    write_split(source, tmp_path, "val", shard_size=50)
    assert len(list(tmp_path.glob("val-*.tar"))) == 6
    with pytest.raises(ShardError, match="exists already"):
        write_split(source, tmp_path, "val", shard_size=100)
    write_split(source, tmp_path, "val", shard_size=100, overwrite=True)
    assert len(list(tmp_path.glob("val-*.tar"))) == 3


def test_interrupted_write_leaves_no_complete_looking_set(tmp_path: Path) -> None:
    real = digits_source("val")

    def load(i: int):
        if i == real.count - 1:  # the last sample: after some shards are complete
            raise KeyboardInterrupt
        return real.load(i)
    order = list(range(real.count))
    random.Random(0).shuffle(order)
    stop_at = order.index(real.count - 1)
    with pytest.raises(KeyboardInterrupt):
        write_split(Source("x", real.classes, real.count, load), tmp_path, "val", shard_size=40)
    assert not (tmp_path / "val.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # the shard in progress is gone
    assert len(list(tmp_path.glob("val-*.tar"))) == stop_at // 40  # only complete shards have real names


def test_unreadable_source_image_is_skipped_and_counted(tmp_path: Path, caplog) -> None:
    make_image_folder(tmp_path / "tree")
    (tmp_path / "tree" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with caplog.at_level(logging.WARNING, logger="crate_mae.data"):
        manifest = write_split(imagefolder_source(str(tmp_path / "tree")), tmp_path / "s", "train")
    assert manifest.total == 15 and manifest.skipped == 1
    assert "broken.jpg" in caplog.text


# ---------------------------------------------------------------------------- splitting

@pytest.mark.parametrize("n_shards", [5, 2])  # 2 < ranks × workers: the by-sample fallback
def test_eval_split_over_2_ranks_x_2_workers_is_disjoint_and_complete(tmp_path: Path, n_shards: int) -> None:
    spec = make_set(tmp_path, "val", n_shards=n_shards, per_shard=13)
    per_rank = [keys_of(eval_loader(spec, 16, data=LOCAL, batch_size=5, rank=r, world_size=2, num_workers=2))
                for r in (0, 1)]
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything)) == n_shards * 13
    assert all(per_rank)


@pytest.mark.parametrize("resample, n_shards", [(True, 5), (False, 5), (False, 2)])
def test_train_ranks_run_equal_steps(tmp_path: Path, resample: bool, n_shards: int) -> None:
    spec = make_set(tmp_path, "train", n_shards=n_shards, per_shard=12)
    steps = []
    for rank in (0, 1):
        loader = train_loader(spec, T32, data=LOCAL, batch_size=4, rank=rank, world_size=2, num_workers=2,
                              resample=resample, shuffle_buffer=10)
        batches = list(loader)
        assert all(len(b.keys) == 4 for b in batches)
        steps.append(len(batches))
        assert len(batches) == len(loader) == (n_shards * 12) // 8
    assert steps[0] == steps[1]


def test_train_order_is_determined_by_seed_and_epoch(tmp_path: Path) -> None:
    spec = make_set(tmp_path, "train", n_shards=4, per_shard=10)

    def run(seed: int, epoch: int) -> tuple[list[str], torch.Tensor]:
        loader = train_loader(spec, PretrainTransform(16), data=LOCAL, batch_size=4, seed=seed, num_workers=2,
                              shuffle_buffer=8)
        loader.set_epoch(epoch)
        batches = list(loader)
        return [k for b in batches for k in b.keys], torch.cat([b.images for b in batches])

    keys, images = run(0, 1)
    keys2, images2 = run(0, 1)
    assert keys == keys2 and torch.equal(images, images2)  # same seed and epoch: same samples, same crops
    assert run(0, 2)[0] != keys and run(1, 1)[0] != keys


def test_more_epochs_are_counted(tmp_path: Path) -> None:
    spec = make_set(tmp_path, "train", n_shards=2, per_shard=8)
    loader = train_loader(spec, T32, data=LOCAL, batch_size=4, shuffle_buffer=4)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert len(list(loader)) == 4
    assert loader.seen == 32 and loader.bad == 0  # both epochs


# ---------------------------------------------------------------------------- bad data

def bad_set(tmp_path: Path) -> str:
    samples = [good_sample(i) for i in range(40)]
    samples[3] = {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 garbage", "cls": b"1"}
    samples[7] = {"__key__": "nolabel", "jpg": image_bytes(7)}
    samples[11] = {"__key__": "cutjpeg", "jpg": image_bytes(11)[:200], "cls": b"2"}
    samples[13] = {"__key__": "badlabel", "jpg": image_bytes(13), "cls": b"seven"}
    return write_tar_set(tmp_path, "val", [samples[:20], samples[20:]])


def test_bad_samples_are_skipped_counted_and_logged(tmp_path: Path, caplog) -> None:
    spec = bad_set(tmp_path)
    loader = eval_loader(spec, 16, data=LOCAL, batch_size=8, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="crate_mae.data"):
        keys = keys_of(loader)
    assert len(keys) == 36 and loader.seen == 40 and loader.bad == 4
    for key in ("val-000000.tar/corrupt", "val-000000.tar/nolabel", "val-000000.tar/cutjpeg", "val-000000.tar/badlabel"):
        assert key in caplog.text
    assert "no label" in caplog.text and "undecodable" in caplog.text


def test_the_bad_fraction_is_judged_over_the_whole_run_in_every_epoch(tmp_path: Path) -> None:
    """Short training epochs once reset the count each epoch and never judged it: 2.4 % bad passed a 0.1 % limit."""
    samples = [good_sample(i) for i in range(250)]
    for i in range(0, 250, 42):  # 6 of 250 bad: 2.4 %
        samples[i] = {"__key__": f"bad{i}", "jpg": b"\xff\xd8 not a jpeg", "cls": b"0"}
    spec = write_tar_set(tmp_path, "train", [samples[:125], samples[125:]])
    loader = train_loader(spec, T32, data=LOCAL, batch_size=8, shuffle_buffer=0,
                          max_bad_fraction=0.001)  # 31 batches/epoch
    with pytest.raises(DataError, match=r"of \d+ samples were bad, more than data\.max_bad_fraction=0\.001 "
                                        r"\(last: .*bad\d+: undecodable"):
        for epoch in range(3):
            loader.set_epoch(epoch)
            list(loader)
    assert 0 < loader.seen < 3 * 250  # stopped at the end of an epoch, not after the run


@pytest.mark.parametrize("limit, stops", [(0.04, False), (0.02, True)])
def test_the_end_of_a_pass_is_judged_over_every_worker_together(tmp_path: Path, limit: float, stops: bool) -> None:
    """Two workers, one shard each: 1 bad of 20 (5 %) and 0 of 20. Judged alone, the first would stop at a 4 % limit;
    the pass is judged over both (1 of 40, 2.5 %), in the main process, from the counts each worker hands over."""
    samples = [good_sample(i) for i in range(40)]
    samples[5] = {"__key__": "broken", "jpg": b"\xff\xd8 not a jpeg", "cls": b"0"}
    spec = write_tar_set(tmp_path, "val", [samples[:20], samples[20:]])
    loader = eval_loader(spec, 16, data=LOCAL, batch_size=8, num_workers=2, max_bad_fraction=limit)
    if stops:
        with pytest.raises(DataError, match=r"^1 of 40 samples were bad.*last: .*val-000000\.tar/broken: undecodable"):
            list(loader)
        return
    for _ in range(2):  # two passes (as an evaluation after each epoch): counted over both
        assert len(keys_of(loader)) == 39
    assert (loader.seen, loader.bad) == (80, 2)


def test_an_error_in_a_data_worker_is_one_line(tmp_path: Path) -> None:
    spec = bad_set(tmp_path)
    with pytest.raises(DataError) as caught:
        list(eval_loader(spec, 16, data=LOCAL, batch_size=8, max_bad_fraction=0.01, num_workers=2))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message and "worker process" not in message
    assert message.startswith("2 of") or "samples were bad" in message


def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path: Path) -> None:
    spec = bad_set(tmp_path)
    with pytest.raises(DataError, match=r"4 of 40 samples were bad.*max_bad_fraction=0\.05"):
        list(eval_loader(spec, 16, data=LOCAL, batch_size=8, max_bad_fraction=0.05))
    samples = [{"__key__": f"{i}", "jpg": b"junk", "cls": b"0"} for i in range(30)]
    spec = write_tar_set(tmp_path / "all_bad", "train", [samples])
    with pytest.raises(DataError, match="samples were bad"):
        list(train_loader(spec, T32, data=LOCAL, batch_size=2, max_bad_fraction=0.1, shuffle_buffer=4))


def test_truncated_tar_is_named_before_reading(tmp_path: Path) -> None:
    spec = make_set(tmp_path, "train", n_shards=3)
    shard = tmp_path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"train-000001\.tar: \d+ bytes but the manifest says"):
        train_loader(spec, T32, data=LOCAL, batch_size=4)


@pytest.mark.parametrize("cut", [5000, 5120, 3333])
def test_truncated_tar_without_manifest_is_named(tmp_path: Path, cut: int) -> None:
    make_set(tmp_path, "train", n_shards=2)
    (tmp_path / "train.json").unlink()
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ShardError, match=r"train-000000\.tar: not a complete tar file"):
        eval_loader(str(tmp_path / "train-{000000..000001}.tar"), 16, data=LOCAL, batch_size=4)


def test_unreadable_shard_is_named_when_read(tmp_path: Path) -> None:
    """A shard that passes the cheap checks but is no tar (e.g. a remote one): named on reading."""
    make_set(tmp_path, "train", n_shards=1)
    (tmp_path / "train.json").unlink()
    (tmp_path / "train-000000.tar").write_bytes(b"\x01" * 512 + b"\x00" * 1024)
    with pytest.raises(ShardError, match=r"train-000000\.tar: cannot read the shard"):
        list(eval_loader(str(tmp_path / "train-000000.tar"), 16, data=LOCAL, batch_size=4))


def test_spec_errors_name_the_path(tmp_path: Path) -> None:
    make_set(tmp_path, "train", n_shards=2)
    with pytest.raises(ShardError, match=r"train-000002\.tar: no such shard file"):
        resolve_shards(str(tmp_path / "train-{000000..000002}.tar"))
    with pytest.raises(ShardError, match="matches no file"):
        resolve_shards(str(tmp_path / "val-*.tar"))
    with pytest.raises(ShardError, match="empty shard spec"):
        resolve_shards("  ")
    with pytest.raises(ShardError, match="nothing.json: no such manifest"):
        resolve_shards(str(tmp_path / "nothing.json"))
    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(ShardError, match="not a shard manifest"):
        resolve_shards(str(tmp_path / "train.json"))
    (tmp_path / "train.json").unlink()
    with pytest.raises(ShardError, match="no manifest gives the number of samples"):
        train_loader(str(tmp_path / "train-*.tar"), T32, data=LOCAL, batch_size=4)
    with pytest.raises(ShardError, match="no full global batch"):
        train_loader(str(tmp_path / "train-*.tar"), T32, data=LOCAL, batch_size=16, world_size=2, train_samples=24)


def test_pattern_uses_its_sibling_manifest(tmp_path: Path) -> None:
    make_set(tmp_path, "train", n_shards=4, per_shard=10)
    shards = resolve_shards(str(tmp_path / "train-{000001..000002}.tar"))
    assert shards.samples == [10, 10] and shards.total == 20
    assert len(train_loader(str(tmp_path / "train-*.tar"), T32, data=LOCAL, batch_size=5)) == 8


def test_manifest_and_check_commands(tmp_path: Path, capsys) -> None:
    make_set(tmp_path, "train", n_shards=3, per_shard=7)
    (tmp_path / "train.json").unlink()
    assert shards_main(["manifest", str(tmp_path / "train-*.tar")]) == 0
    assert read_manifest(tmp_path / "train.json").total == 21
    assert shards_main(["check", str(tmp_path / "train.json")]) == 0
    assert "21 samples, 0 bad" in capsys.readouterr().out
    bad_set(tmp_path / "bad")
    assert shards_main(["check", str(tmp_path / "bad" / "val.json")]) == 1
    assert shards_main(["check", str(tmp_path / "missing.json")]) == 1


# ---------------------------------------------------------------------------- transforms

def test_pretrain_transform_shape_range_and_rng() -> None:
    data = image_bytes(1, size=(500, 375))
    t = PretrainTransform(64)
    x = t(data, random.Random(0))
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    assert torch.equal(x, t(data, random.Random(0))) and not torch.equal(x, t(data, random.Random(1)))


def test_fast_decode_gives_nearly_the_same_crop() -> None:
    """Reduced-size JPEG decode changes only the resampling path, not the crop or its geometry."""
    data = image_bytes(3, size=(800, 600))
    fast, full = PretrainTransform(32, fast_decode=True), PretrainTransform(32, fast_decode=False)
    for seed in range(5):
        a, b = fast(data, random.Random(seed)).float(), full(data, random.Random(seed)).float()
        assert (a - b).abs().mean() < 4, seed  # a few grey levels of 255 on average
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (100, 75))
    assert img.size == (100, 75)  # the scale the fast path can use here really is available


def test_eval_transform_is_torchvisions_resize_and_centre_crop() -> None:
    data = image_bytes(2, size=(300, 200), fmt="PNG")
    t = EvalTransform(64)
    assert t(data).shape == (3, 64, 64) and t(data).dtype == torch.uint8 and torch.equal(t(data), t(data))
    from torchvision.transforms import functional as TF
    yy, xx = np.mgrid[0:200, 0:300]
    smooth = np.stack([xx * 0.8, yy * 1.2, (xx + yy) * 0.5], -1).clip(0, 255).astype(np.uint8)
    img, buf = Image.fromarray(smooth), io.BytesIO()
    img.save(buf, format="PNG")
    reference = TF.pil_to_tensor(TF.center_crop(TF.resize(img, 73, interpolation=TF.InterpolationMode.BICUBIC), 64))
    # One resampling of the same central region instead of two: the same pixels up to sub-pixel alignment.
    assert (t(buf.getvalue()).float() - reference.float()).abs().max() <= 3
    fast = EvalTransform(32)(image_bytes(4, size=(400, 300)))
    full = EvalTransform(32, fast_decode=False)(image_bytes(4, size=(400, 300)))
    assert (fast.float() - full.float()).abs().mean() < 4
    gray = io.BytesIO()
    Image.fromarray(np.full((50, 50), 128, np.uint8)).save(gray, format="PNG")
    assert EvalTransform(32)(gray.getvalue()).shape == (3, 32, 32)  # grayscale becomes RGB


def test_finetune_transform_hands_over_pixels_and_erases_at_its_rate() -> None:
    """timm's recipe, uint8 out: unerased pixels come back exactly from the erasing's normalised space, so an image
    the erasing skipped equals the same draws without erasing, bit for bit; an erased one differs in one box only."""
    from crate_mae.data.transforms import FinetuneTransform
    from crate_mae.seeding import seed_everything

    data = image_bytes(5, size=(60, 45))
    erasing, plain = FinetuneTransform(16, re_prob=0.25), FinetuneTransform(16, re_prob=0.0)
    erased = 0
    for seed in range(160):
        seed_everything(seed)
        x = erasing(data)
        seed_everything(seed)
        y = plain(data)  # the same crop, flip and RandAugment draws
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 == y.dtype
        if torch.equal(x, y):
            continue
        erased += 1
        rows, cols = (x != y).any(0).nonzero(as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box <= 16 * 16 / 3 + 16, seed  # timm's largest box (a third of the image, rounded): the rest is exact
    assert 20 <= erased <= 60  # 25 % of 160 is 40; the binomial's sd is 5.5


def test_finetune_transform_is_deterministic_under_the_readers_seeding(tmp_path: Path) -> None:
    from crate_mae.data.transforms import FinetuneTransform

    spec = make_set(tmp_path, "train", n_shards=2, per_shard=8)

    def images(epoch: int) -> torch.Tensor:
        loader = train_loader(spec, FinetuneTransform(16), data=LOCAL, batch_size=4, seed=1, num_workers=2,
                              shuffle_buffer=4)
        loader.set_epoch(epoch)
        return torch.cat([b.images for b in loader])

    first = images(0)
    assert first.dtype == torch.uint8 and first.shape == (16, 3, 16, 16)
    assert torch.equal(first, images(0)) and not torch.equal(first, images(1))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_a_resumed_epoch_continues_with_the_same_batches(tmp_path: Path, workers: int) -> None:
    spec = make_set(tmp_path, "train", n_shards=3, per_shard=14)  # 42 samples → 10 batches of 4
    loader = train_loader(spec, PretrainTransform(16), data=LOCAL, batch_size=4, seed=5, num_workers=workers,
                          shuffle_buffer=8)
    loader.set_epoch(3)
    full = list(loader)
    assert len(full) == 10
    for skip in (1, 4, 7):
        loader.set_epoch(3, replay=skip)
        rest = list(loader)
        assert [b.keys for b in rest] == [b.keys for b in full[skip:]], skip
        assert all(torch.equal(a.images, b.images) for a, b in zip(rest, full[skip:]))


def test_webdataset_pipe_urls_are_read(tmp_path: Path) -> None:
    """Remote-style specs (`pipe:` commands, as for `pipe:curl ...`) go through webdataset's opener."""
    make_set(tmp_path, "train", n_shards=2, per_shard=6)
    spec = f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar"
    assert len(resolve_shards(spec).urls) == 2 and resolve_shards(spec).total is None
    assert len(keys_of(eval_loader(spec, 16, data=LOCAL, batch_size=4))) == 12
    with pytest.raises(ShardError, match="data.train_samples"):
        train_loader(spec, T32, data=LOCAL, batch_size=4)
    assert len(list(train_loader(spec, T32, data=LOCAL, batch_size=4, train_samples=12, shuffle_buffer=4))) == 3


def test_an_empty_shard_is_named_before_anything_is_read(tmp_path: Path) -> None:
    write_tar_set(tmp_path / "e", "val", [[]], manifest=False)  # a tar with no member: only the end marker
    empty = str(tmp_path / "e" / "val-000000.tar")
    with pytest.raises(ShardError, match=r"val-000000\.tar: the shard holds no samples"):
        resolve_shards(empty)
    spec = write_tar_set(tmp_path / "m", "val", [[good_sample(0)], []])  # a manifest that lists an empty shard
    with pytest.raises(ShardError, match=r"val-000001\.tar: the manifest .* lists it with no samples"):
        resolve_shards(spec)


def test_an_evaluation_that_reads_nothing_is_an_error(tmp_path: Path) -> None:
    import torch

    from crate_mae.engine.dist import Dist
    from crate_mae.eval.metrics import evaluate

    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().flatten(1)[:, :3]  # three "logits" from the first pixels

    spec = write_tar_set(tmp_path, "val", [[good_sample(0)]])
    loader, cpu = eval_loader(spec, 16, data=LOCAL, batch_size=4), Dist(0, 1, 0, torch.device("cpu"))
    assert evaluate(Tiny(), loader, cpu)["samples"] == 1
    loader.stream.shards.urls = []  # a set that yields no sample (all of it another rank's, or filtered away)
    with pytest.raises(ShardError, match=r"val\.json: evaluation read no samples"):
        evaluate(Tiny(), loader, cpu)


def test_a_label_outside_the_classes_is_an_error_naming_shard_key_and_value(tmp_path: Path) -> None:
    samples = [good_sample(i) for i in range(8)]
    samples[5] = {"__key__": "onebased", "jpg": image_bytes(5), "cls": b"3"}  # 3 classes: 0, 1, 2
    spec = write_tar_set(tmp_path, "val", [samples])
    with pytest.raises(DataError, match=r"val-000000\.tar/onebased: label 3 does not fit the 3 classes of .*val\.json"):
        list(eval_loader(spec, 16, data=LOCAL, batch_size=4, max_bad_fraction=1.0))
    with pytest.raises(DataError, match=r"onebased: label 3") as caught:  # from a worker too, on one line
        list(eval_loader(spec, 16, data=LOCAL, batch_size=4, max_bad_fraction=1.0, num_workers=2))
    assert "\n" not in str(caught.value)


def test_pretraining_reads_no_labels_so_none_can_stop_or_skip_it(tmp_path: Path) -> None:
    samples = [good_sample(i) for i in range(16)]
    samples[2] = {"__key__": "nolabel", "jpg": image_bytes(2)}
    samples[3] = {"__key__": "wild", "jpg": image_bytes(3), "cls": b"99"}
    samples[4] = {"__key__": "text", "jpg": image_bytes(4), "cls": b"cat"}
    spec = write_tar_set(tmp_path, "train", [samples])
    loader = train_loader(spec, T32, data=LOCAL, batch_size=4, shuffle_buffer=0, max_bad_fraction=0.0, labels=False)
    loader.set_epoch(0)
    batches = list(loader)
    assert sum(len(b.keys) for b in batches) == 16 and loader.bad == 0
    assert all((b.labels == -1).all() for b in batches)


def test_keys_with_dots_are_never_written_and_are_named_when_read(tmp_path: Path) -> None:
    from crate_mae.data.writer import ShardWriter

    writer = ShardWriter(tmp_path / "w", "train", max_count=10, max_bytes=10**9)
    with pytest.raises(ValueError, match=r"sample key 'img\.1' contains a dot"):
        writer.write("img.1", image_bytes(0), "jpg", 0)
    writer.abort()
    dotted = [{"__key__": f"img.{i}", "jpg": image_bytes(i), "cls": b"0"} for i in range(8)]
    spec = write_tar_set(tmp_path / "d", "val", [dotted], manifest=False)  # a hand-made set, as users make them
    shard = str(tmp_path / "d" / "val-000000.tar")
    with pytest.raises(DataError, match=r"val-000000\.tar/img: holds the members 0\.cls, 0\.jpg, 1\.cls, 1\.jpg: samples "
                                        r"whose keys contain a dot were merged"):
        list(eval_loader(shard, 16, data=LOCAL, batch_size=4, max_bad_fraction=1.0))
    assert shards_main(["manifest", shard]) == 1  # the manifest tool refuses to count "1 samples" for 8
    assert not (tmp_path / "d" / "val.json").exists()
    del spec


def test_a_manifest_whose_counts_are_wrong_is_caught_as_read_and_by_verify(tmp_path: Path, capsys) -> None:
    import json

    spec = write_tar_set(tmp_path, "val", [[good_sample(i) for i in range(6)], [good_sample(i) for i in range(6, 10)]])
    assert shards_main(["manifest", spec, "--verify"]) == 0
    raw = json.loads(Path(spec).read_text())
    raw["shards"][1]["samples"] = 40  # ten times too many
    Path(spec).write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=r"val-000001\.tar: 4 samples, but the manifest of .*val\.json says 40"):
        list(eval_loader(spec, 16, data=LOCAL, batch_size=4))
    capsys.readouterr()
    assert shards_main(["manifest", spec, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "val-000001.tar: 4 samples, the manifest says 40" in out and "1 of 2 shards agree" in out


def _encoded(img, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("PT", "PNG"),
                                       ("RGBA", "PNG"), ("I;16", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"),
                                       ("RGBA", "WEBP"), ("RGB", "WEBP")])
def test_every_image_mode_becomes_8_bit_rgb(mode: str, fmt: str) -> None:
    import numpy as np
    from PIL import Image

    from crate_mae.data.transforms import FinetuneTransform

    grey = np.full((40, 50), 128, dtype=np.uint8)
    if mode == "I;16":
        img = Image.fromarray(np.full((40, 50), 0x8080, dtype=np.uint16))  # 16-bit mid-grey
    elif mode == "PT":  # a palette with a transparent colour
        img = Image.fromarray(grey).convert("RGB").convert("P")
        img.info["transparency"] = 0
    else:
        img = Image.fromarray(np.stack([grey] * 3, -1)).convert(mode)
    data = _encoded(img, fmt)
    for transform in (T32, PretrainTransform(16), FinetuneTransform(16, auto_augment=None, re_prob=0.0)):
        out = transform(data, __import__("random").Random(0))
        assert out.shape == (3, 16, 16)
        if out.dtype == torch.uint8 and mode != "1":
            assert 100 <= float(out.float().mean()) <= 160, (mode, fmt, transform)  # mid-grey stays mid-grey


def test_oversized_images_are_decoded_reduced_or_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    import crate_mae.data.transforms as tr

    monkeypatch.setattr(tr, "MAX_PIXELS", 20_000)  # a 320 × 240 image is "oversized" here
    big = Image.new("RGB", (320, 240), (200, 60, 30))
    jpeg, png = _encoded(big, "JPEG"), _encoded(big, "PNG")
    for transform in (T32, PretrainTransform(16, fast_decode=False)):
        assert transform(jpeg, __import__("random").Random(0)).shape == (3, 16, 16)  # a reduced DCT decode
        with pytest.raises(ValueError, match=r"320×240 pixels is more than the 20,000-pixel limit"):
            transform(png, __import__("random").Random(0))
    huge = _encoded(Image.new("RGB", (1600, 1200)), "JPEG")  # even 1/8 scale (200 × 150) is over
    with pytest.raises(ValueError, match="pixel limit"):
        T32(huge)
    spec = write_tar_set(tmp_path, "val", [[good_sample(0), {"__key__": "big", "png": png, "cls": b"1"}]])
    loader = eval_loader(spec, 16, data=LOCAL, batch_size=4, max_bad_fraction=1.0)
    assert keys_of(loader) == ["000000"] and loader.bad == 1  # a counted skip, with its reason


def test_the_parallel_writer_writes_the_same_set_as_one_process(tmp_path: Path) -> None:
    from crate_mae.data.writer import Source

    blobs = [image_bytes(i, size=(60 + i % 7, 40 + i % 5), fmt="PNG" if i % 3 else "JPEG") for i in range(45)]
    blobs[17] = b"not an image"  # skipped and counted the same way by both
    source = Source("test", ["a", "b", "c"], len(blobs), lambda i: (blobs[i], i % 3))
    one = write_split(source, tmp_path / "one", "train", shard_size=8, resize=32, workers=1)
    two = write_split(source, tmp_path / "two", "train", shard_size=8, resize=32, workers=2)
    assert one.to_json() == two.to_json() and one.skipped == 1
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.tar")) and len(names) == 6
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_an_interrupted_write_continues_to_the_same_set(tmp_path: Path) -> None:
    from crate_mae.data.writer import Source

    blobs = [image_bytes(i, size=(50, 40)) for i in range(40)]
    blobs[5] = b"unreadable"

    def source(fail_at: int | None = None) -> Source:
        calls = {"n": 0}

        def load(i: int) -> tuple[bytes, int]:
            calls["n"] += 1
            if fail_at is not None and calls["n"] > fail_at:
                raise KeyboardInterrupt  # a kill in the middle of the 4th shard
            return blobs[i], i % 3
        return Source("test", ["a", "b", "c"], len(blobs), load)

    whole = write_split(source(), tmp_path / "whole", "train", shard_size=8)
    with pytest.raises(KeyboardInterrupt):
        write_split(source(fail_at=29), tmp_path / "cut", "train", shard_size=8)
    cut = tmp_path / "cut"
    assert len(list(cut.glob("*.tar"))) == 3 and not (cut / "train.json").exists()
    with pytest.raises(ShardError, match=r"an interrupted write with shard_size=8 is there; this one has 6"):
        write_split(source(), cut, "train", shard_size=6)
    again = write_split(source(), cut, "train", shard_size=8)  # continues after the 3 finished shards
    assert again.to_json() == whole.to_json() and again.skipped == 1
    for path in sorted((tmp_path / "whole").glob("*.tar")):
        assert (cut / path.name).read_bytes() == path.read_bytes()
    assert not list(cut.glob(".*"))  # no parameters file or temp file left
    with pytest.raises(ShardError, match="exists already"):
        write_split(source(), cut, "train", shard_size=8)


def test_machines_write_their_parts_and_the_merge_joins_them(tmp_path: Path) -> None:
    from crate_mae.data.writer import Source, merge_parts

    blobs = [image_bytes(i, size=(50, 40)) for i in range(30)]
    source = Source("test", ["a", "b", "c"], len(blobs), lambda i: (blobs[i], i % 3))
    whole = write_split(source, tmp_path / "one", "train", shard_size=8)
    write_split(source, tmp_path / "two", "train", shard_size=8, num_nodes=2, node_rank=1)
    with pytest.raises(ShardError, match=r"the parts of machines 0 of 2 are not written yet"):
        merge_parts(tmp_path / "two", "train")
    write_split(source, tmp_path / "two", "train", shard_size=8, num_nodes=2, node_rank=0)
    assert shards_main(["manifest", str(tmp_path / "two"), "--merge", "--split", "train"]) == 0
    merged = read_manifest(tmp_path / "two" / "train.json")
    assert merged.total == whole.total == 30 and merged.num_classes == 3
    assert [s.name for s in merged.shards][:2] == ["train-000-000000.tar", "train-000-000001.tar"]
    keys = keys_of(eval_loader(str(tmp_path / "two" / "train.json"), 16, data=LOCAL, batch_size=8))
    assert sorted(keys) == sorted(f"{i:09d}" for i in range(30))  # every sample exactly once over the parts
    with pytest.raises(ShardError, match=r"--node-rank 2 is not in 0 … 1"):
        write_split(source, tmp_path / "three", "train", num_nodes=2, node_rank=2)


def test_a_reader_of_the_first_samples_opens_only_the_shards_that_hold_them(tmp_path: Path) -> None:
    spec = make_set(tmp_path / "set", n_shards=5, per_shard=12)  # 60 samples, 12 a shard
    shards = resolve_shards(spec)
    assert [len(shards.first(n).urls) for n in (1, 12, 13, 60, 1000)] == [1, 1, 2, 5, 5]
    assert shards.first(None) is shards and shards.first(13).samples == [12, 12]
    loader = eval_loader(spec, 32, num_workers=0, batch_size=7, first_samples=20)
    assert sum(len(b.keys) for b in loader) == 24  # the two shards that hold the first 20, read whole

