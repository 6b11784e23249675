"""data/stream.py: each step of the shard stream alone (order, split, read, shuffle, decode-or-skip, batches)."""
from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import pytest

from crate_mae.data.manifest import ShardError
from crate_mae.data.stream import (BadSample, DataError, SampleCount, batches, check_bad, decode_or_skip, read_samples,
                                   shard_order, shuffled, split_by_sample, worker_role)
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


def _decode(sample: dict, dry: bool) -> tuple[object, int]:
    if sample.get("bad"):
        raise BadSample("broken on purpose")
    return (None if dry else sample["x"]), sample["y"]


def _samples(n: int, bad: set[int]) -> list[dict]:
    return [{"__url__": "u", "__key__": f"k{i}", "x": i, "y": i % 3, "bad": i in bad} for i in range(n)]


def test_decode_or_skip_counts_logs_and_replays_dry(caplog) -> None:
    count = SampleCount()
    with caplog.at_level(logging.WARNING, logger="crate_mae.data"):
        out = list(decode_or_skip(_samples(10, {2, 5}), _decode, count, dry=3, max_bad_fraction=0.5, spec="set"))
    assert [k for _, _, k in out] == [f"u/k{i}" for i in (0, 1, 3, 4, 6, 7, 8, 9)]
    assert [img for img, _, _ in out[:4]] == [None, None, None, 4]  # the first 3 usable ones dry
    assert (count.seen, count.bad) == (10, 2) and count.last == "u/k5: broken on purpose"
    assert "u/k2: broken on purpose" in caplog.text


def test_too_many_bad_samples_stop_with_one_line() -> None:
    count = SampleCount()
    with pytest.raises(DataError, match=r"3 of 4 samples were bad.*last: u/k3"):
        list(decode_or_skip(_samples(10, {1, 2, 3}), _decode, count, max_bad_fraction=0.25, spec="set"))
    quiet = SampleCount(seen=3, bad=1)
    check_bad(quiet, 0.1, "set", final=False)  # 3 < 1/0.1 samples seen: not judged yet
    with pytest.raises(DataError):
        check_bad(quiet, 0.1, "set", final=True)


def test_batches_full_limited_replayed_and_partial() -> None:
    collate = list
    assert list(batches(range(10), 3, collate)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert list(batches(range(10), 3, collate, partial=True))[-1] == [9]
    assert list(batches(range(10), 3, collate, limit=2, drop=1)) == [[3, 4, 5]]
    pulled = Counter()

    def items():
        for i in range(100):
            pulled["n"] += 1
            yield i
    assert len(list(batches(items(), 4, collate, limit=2))) == 2 and pulled["n"] == 8  # no sample read past the limit
    assert list(batches(range(10), 3, collate, limit=0)) == []
