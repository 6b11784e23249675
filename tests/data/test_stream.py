"""data/stream.py: each step of the shard stream alone (order, split, read, shuffle, decode, label, decode-or-skip,
batches, collate); data/tally.py: the one judge of the bad-sample rule."""
from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from crate_mae.data.manifest import ShardError
from crate_mae.data.stream import (Batch, Decode, batches, collate, decode_or_skip, label, read_samples, shard_order,
                                   shuffled, split_by_sample, worker_role)
from crate_mae.data.tally import BadSample, DataError, SampleCount, SampleTally, check_bad
from crate_mae.data.transforms import EvalTransform
from tests.helpers import image_bytes, write_tar_set

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


def test_split_by_sample_is_disjoint_and_complete() -> None:
    parts = [list(split_by_sample(range(10), slot, 3)) for slot in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


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


def test_shuffled_is_a_seeded_permutation() -> None:
    a = list(shuffled(range(50), 10, random.Random(1)))
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert a == list(shuffled(range(50), 10, random.Random(1)))
    assert list(shuffled(range(5), 1, random.Random(1))) == list(range(5))


def test_decode_gives_the_image_and_label_or_a_bad_sample() -> None:
    decode = Decode(EvalTransform(16), random.Random(0), labels=True, num_classes=3, classes_of="set")
    image, y = decode({"__key__": "k", "jpg": image_bytes(0), "cls": b"2"}, False)
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and y == 2
    assert decode({"__key__": "k", "jpg": image_bytes(0), "cls": b"2"}, True) == (None, 2)  # dry: no image
    with pytest.raises(BadSample, match="no image"):
        decode({"__key__": "k", "cls": b"1"}, False)
    with pytest.raises(BadSample, match="undecodable image"):
        decode({"__key__": "k", "jpg": b"junk", "cls": b"1"}, False)
    with pytest.raises(DataError, match=r"u/k: holds the members 1\.cls, 1\.jpg"):
        decode({"__url__": "u", "__key__": "k", "1.jpg": b"", "1.cls": b"0"}, False)
    unlabelled = Decode(EvalTransform(16), random.Random(0), labels=False, num_classes=3, classes_of="set")
    assert unlabelled({"__key__": "k", "jpg": image_bytes(0), "cls": b"99"}, False)[1] == -1  # not read


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


def test_decode_or_skip_counts_logs_and_replays_dry(caplog) -> None:
    tally = SampleTally(1, max_fraction=0.5, spec="set")
    with caplog.at_level(logging.WARNING, logger="crate_mae.data"):
        out = list(decode_or_skip(_samples(10, {2, 5}), _decode, tally, 0, dry=3))
    assert [k for _, _, k in out] == [f"u/k{i}" for i in (0, 1, 3, 4, 6, 7, 8, 9)]
    assert [img for img, _, _ in out[:4]] == [None, None, None, 4]  # the first 3 usable ones dry
    assert tally.count(0) == tally.count() == SampleCount(10, 2, "u/k5: broken on purpose")
    assert "u/k2: broken on purpose" in caplog.text


def test_decode_or_skip_takes_its_share_and_reads_no_sample_past_it() -> None:
    pulled = Counter()

    def samples():
        for s in _samples(100, set()):
            pulled["n"] += 1
            yield s
    tally = SampleTally(1, max_fraction=0.1, spec="set")
    assert len(list(decode_or_skip(samples(), _decode, tally, 0, take=8))) == 8 and pulled["n"] == 8
    assert list(decode_or_skip(samples(), _decode, tally, 0, take=0)) == [] and pulled["n"] == 8
    assert tally.count().seen == 8


def test_too_many_bad_samples_stop_with_one_line() -> None:
    tally = SampleTally(1, max_fraction=0.25, spec="set")
    with pytest.raises(DataError, match=r"3 of 4 samples were bad.*last: u/k3"):
        list(decode_or_skip(_samples(10, {1, 2, 3}), _decode, tally, 0))
    quiet = SampleCount(seen=3, bad=1)
    check_bad(quiet, 0.1, "set", final=False)  # 3 < 1/0.1 samples seen: not judged yet
    with pytest.raises(DataError):
        check_bad(quiet, 0.1, "set", final=True)


def test_the_tally_judges_a_row_while_it_runs_and_every_row_when_the_last_ends() -> None:
    """Two slots: one with 1 bad sample in 4, one clean. Neither reaches 1/0.1 samples, so nothing is judged until the
    end; the first slot to end is not judged alone (1 of 4 would be over the limit); the last judges both together."""
    tally = SampleTally(2, max_fraction=0.1, spec="set")
    tally.new_epoch()
    assert len(list(decode_or_skip(_samples(4, {2}), _decode, tally, 0))) == 3  # 1 of 4 bad, but not the last to end
    assert len(list(decode_or_skip(_samples(8, set()), _decode, tally, 1))) == 8  # 1 of 12 together: under 10 %
    tally.new_epoch()
    list(decode_or_skip(_samples(8, set()), _decode, tally, 1))
    with pytest.raises(DataError, match=r"3 of 24 samples were bad.*last: u/k2: broken"):  # over both epochs
        list(decode_or_skip(_samples(4, {1, 2}), _decode, tally, 0))
    lone = SampleTally(2, max_fraction=0.25, spec="set")  # one slot's own rows stop it as soon as they are judged
    with pytest.raises(DataError, match=r"2 of 4 samples were bad"):
        list(decode_or_skip(_samples(10, {1, 3}), _decode, lone, 1))
    assert lone.count(0) == SampleCount()


def test_batches_full_replayed_and_partial() -> None:
    assert list(batches(range(10), 3, list)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert list(batches(range(10), 3, list, partial=True))[-1] == [9]
    assert list(batches(range(6), 3, list, drop=1)) == [[3, 4, 5]]


def test_collate_makes_a_batch_and_takes_the_transforms_stack() -> None:
    items = [(torch.full((3, 2, 2), i, dtype=torch.uint8), i, f"u/k{i}") for i in range(3)]
    batch = collate(items)
    assert isinstance(batch, Batch) and batch.images.shape == (3, 3, 2, 2) and batch.keys == ["u/k0", "u/k1", "u/k2"]
    assert batch.labels.dtype == torch.long and batch.labels.tolist() == [0, 1, 2]
    assert collate(items, stack=len).images == 3
