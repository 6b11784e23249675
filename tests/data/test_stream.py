"""data/reader.py's steps alone (shard order, decode or skip, collate, the slot's counts and the bad-sample rule) and
data/stream.py's sample rules (read, decode, label)."""
from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from crate_mae.data.manifest import ShardError
from crate_mae.data.reader import SampleCount, check_bad, collate, decode_or_skip, eval_loader, shard_order, worker_role
from crate_mae.data.stream import BadSample, Batch, decode_sample, label, read_samples
from crate_mae.data.transforms import EvalTransform
from crate_mae.errors import DataError
from tests.helpers import good_sample, image_bytes, write_tar_set

URLS = [f"s{i}.tar" for i in range(6)]


def test_worker_roles_continue_the_batch_order_after_a_replay() -> None:
    # batch i of an epoch comes from role i mod workers; after 5 batches a new loader's worker 0 plays role 2
    workers, replay = 3, 5
    roles = [worker_role(w, workers, replay) for w in range(workers)]
    assert [r for r, _ in roles] == [2, 0, 1]
    for role, mine in roles:  # each role replays exactly its own batches among the first 5
        assert mine == sum(1 for i in range(replay) if i % workers == role)
    assert worker_role(1, 4, 0) == (1, 0)


def test_evaluation_order_gives_every_shard_once_over_the_slots() -> None:
    got = []
    for slot in range(4):
        urls, by_sample = shard_order(URLS, train=False, resample=False, slot=slot, slots=4, seed=0, epoch=0,
                                      rng=random.Random(0))
        got += list(urls)
        assert not by_sample
    assert sorted(got) == sorted(URLS)
    urls, by_sample = shard_order(URLS[:2], train=False, resample=False, slot=1, slots=4, seed=0, epoch=0,
                                  rng=random.Random(0))
    assert by_sample and list(urls) == URLS[:2]  # fewer shards than slots: every slot reads all, split by sample


def test_training_orders_are_endless_seeded_and_dealt_out() -> None:
    def take(slot: int, resample: bool, epoch: int = 0, n: int = 12) -> list[str]:
        urls, _ = shard_order(URLS, train=True, resample=resample, slot=slot, slots=2, seed=7, epoch=epoch,
                              rng=random.Random(slot))
        return [next(urls) for _ in range(n)]

    assert take(0, True) == take(0, True) and set(take(0, True, n=200)) == set(URLS)  # resampled, repeatable
    first, second = take(0, False, n=3), take(1, False, n=3)  # one shuffled pass dealt out to the 2 slots
    assert sorted(first + second) == sorted(URLS)
    assert take(0, False, epoch=1, n=3) != first or take(1, False, epoch=1, n=3) != second  # a new order per epoch


def test_read_samples_groups_members_and_names_a_bad_shard(tmp_path: Path) -> None:
    spec = write_tar_set(tmp_path, "train", [[{"__key__": f"k{i}", "jpg": image_bytes(i), "cls": b"1"}
                                              for i in range(3)]])
    url = str(tmp_path / "train-000000.tar")
    samples = list(read_samples([url], spec=spec, shards=1))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"] and all({"jpg", "cls"} <= set(s) for s in samples)
    (tmp_path / "cut.tar").write_bytes(Path(url).read_bytes()[:700])
    with pytest.raises(ShardError, match="cut.tar: cannot read the shard"):
        list(read_samples([str(tmp_path / "cut.tar")], spec=spec, shards=1))
    empty = tmp_path / "empty.tar"
    write_tar_set(tmp_path / "e", "x", [[]], manifest=False)
    empty.write_bytes((tmp_path / "e" / "x-000000.tar").read_bytes())
    with pytest.raises(ShardError, match="hold no samples"):
        list(read_samples((str(empty) for _ in iter(int, 1)), spec="the set", shards=1))


def test_decode_gives_the_image_and_label_or_a_bad_sample() -> None:
    def decode(sample: dict, dry: bool = False, labels: bool = True) -> tuple:
        return decode_sample(sample, EvalTransform(16), random.Random(0), labels=labels, num_classes=3,
                             classes_of="set", dry=dry)

    image, y = decode({"__key__": "k", "jpg": image_bytes(0), "cls": b"2"})
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and y == 2
    assert decode({"__key__": "k", "jpg": image_bytes(0), "cls": b"2"}, dry=True) == (None, 2)  # dry: no image
    with pytest.raises(BadSample, match="no image"):
        decode({"__key__": "k", "cls": b"1"})
    with pytest.raises(BadSample, match="undecodable image"):
        decode({"__key__": "k", "jpg": b"junk", "cls": b"1"})
    with pytest.raises(DataError, match=r"u/k: holds the members 1\.cls, 1\.jpg"):
        decode({"__url__": "u", "__key__": "k", "1.jpg": b"", "1.cls": b"0"})
    assert decode({"__key__": "k", "jpg": image_bytes(0), "cls": b"99"}, labels=False)[1] == -1  # not read


def test_the_label_rule() -> None:
    assert label({"cls": b"2"}, 3, "set") == 2 and label({"cls": b"7"}, 0, "set") == 7  # 0: classes unknown
    with pytest.raises(BadSample, match="no label"):
        label({}, 3, "set")
    with pytest.raises(BadSample, match="'seven' is not an integer"):
        label({"cls": b"seven"}, 3, "set")
    with pytest.raises(DataError, match=r"u/k: label 3 does not fit the 3 classes of set \(labels run 0 … 2; 1-based labels\?\)"):
        label({"__url__": "u", "__key__": "k", "cls": b"3"}, 3, "set")
    with pytest.raises(DataError, match="label -1"):
        label({"cls": b"-1"}, 3, "set")


def _decode(sample: dict, dry: bool) -> tuple[object, int]:
    if sample.get("bad"):
        raise BadSample("broken on purpose")
    return (None if dry else sample["x"]), sample["y"]


def _samples(n: int, bad: set[int]) -> list[dict]:
    return [{"__url__": "u", "__key__": f"k{i}", "x": i, "y": i % 3, "bad": i in bad} for i in range(n)]


def _skip(samples, count: SampleCount, limit: float = 0.5, **kw) -> list:
    return list(decode_or_skip(samples, _decode, count, max_fraction=limit, spec="set", **kw))


def test_decode_or_skip_counts_names_the_first_and_replays_without_yielding() -> None:
    count = SampleCount()
    out = _skip(_samples(20, {2, 5, 9, 10, 11, 12, 13}), count, limit=0.5, dry=3)
    assert [k for _, _, k in out] == [f"u/k{i}" for i in (4, 6, 7, 8, 14, 15, 16, 17, 18, 19)]  # after 3 usable
    assert [img for img, _, _ in out[:2]] == [4, 6]
    assert (count.seen, count.bad, count.last) == (20, 7, "u/k13: broken on purpose")
    named = [f"u/k{i}: broken on purpose" for i in (2, 5, 9, 10, 11)]
    assert count.named == named  # the first NAMED (5) only
    assert count.hand_over() == (20, 7, "u/k13: broken on purpose", named)
    assert count.hand_over() == (0, 0, "u/k13: broken on purpose", [])  # what is new since: nothing


def test_decode_or_skip_takes_its_share_and_reads_no_sample_past_it() -> None:
    pulled = Counter()

    def samples():
        for s in _samples(100, set()):
            pulled["n"] += 1
            yield s
    count = SampleCount()
    assert len(_skip(samples(), count, take=8)) == 8 and pulled["n"] == 8
    assert _skip(samples(), count, take=0) == [] and pulled["n"] == 8
    assert count.seen == 8


def test_a_slot_stops_itself_on_too_many_bad_samples_with_one_line() -> None:
    with pytest.raises(DataError, match=r"3 of 4 samples were bad.*last: u/k3"):
        _skip(_samples(10, {1, 2, 3}), SampleCount(), limit=0.25)
    with pytest.raises(DataError, match=r"10 of 10 samples were bad"):  # a slot that reads nothing usable stops
        _skip(({"__key__": "k", "bad": True} for _ in iter(int, 1)), SampleCount(), limit=0.1)
    quiet = SampleCount(seen=3, bad=1)
    check_bad(quiet, 0.1, "set", final=False)  # 3 < 1/0.1 samples seen: not judged yet
    with pytest.raises(DataError):
        check_bad(quiet, 0.1, "set", final=True)


def test_the_first_bad_samples_are_named_then_counted_in_one_line(tmp_path: Path, caplog) -> None:
    """Each skipped sample was once its own warning (250 lines for 2 ranks): now the first 5 of a loader, then one
    line with the count at the end of each pass that had more."""
    samples = [good_sample(i) for i in range(40)]
    for i in range(0, 40, 4):
        samples[i] = {"__key__": f"bad{i}", "jpg": b"junk", "cls": b"0"}
    spec = write_tar_set(tmp_path, "val", [samples[:20], samples[20:]])
    for workers in (0, 2):
        caplog.clear()
        loader = eval_loader(spec, 16, batch_size=8, num_workers=workers, max_bad_fraction=0.5)
        with caplog.at_level(logging.WARNING, logger="crate_mae.data"):
            for _ in range(2):
                assert sum(len(b.keys) for b in loader) == 30
        lines = [r.getMessage() for r in caplog.records if r.name == "crate_mae.data"]
        assert len(lines) == 7 and all(line.startswith(f"skipped {tmp_path}/val-00000") and "/bad" in line
                                       and ": undecodable image" in line for line in lines[:5])
        assert lines[5:] == [f"{spec}: 10 of 40 samples read so far were unusable and skipped (5 named above)",
                             f"{spec}: 20 of 80 samples read so far were unusable and skipped (5 named above)"]
        assert (loader.seen, loader.bad) == (80, 20)


def test_collate_makes_a_batch_and_takes_the_transforms_stack() -> None:
    items = [(torch.full((3, 2, 2), i, dtype=torch.uint8), i, f"u/k{i}") for i in range(3)]
    batch = collate(items)
    assert isinstance(batch, Batch) and batch.images.shape == (3, 3, 2, 2) and batch.keys == ["u/k0", "u/k1", "u/k2"]
    assert batch.labels.dtype == torch.long and batch.labels.tolist() == [0, 1, 2]
    assert collate(items, stack=len).images == 3


def test_workers_of_a_loader_still_iterated_at_exit_are_ended(tmp_path: Path) -> None:
    """An epoch left unfinished and kept alive to the end (here in a global; in a run, an exception's traceback or a
    prefetch thread): its workers ignore SIGTERM, with which Python's exit would end them before joining them for
    ever. The loader's exit handler ends them first."""
    import subprocess
    import sys

    spec = write_tar_set(tmp_path, "val", [[good_sample(i) for i in range(40)] for _ in range(2)])
    script = ("import sys\nfrom crate_mae.data import eval_loader\n"
              f"batches = iter(eval_loader({spec!r}, 16, batch_size=2, num_workers=2))\nnext(batches)\nsys.exit(3)\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not end: its workers were joined for ever")
    assert done.returncode == 3, done.stderr
