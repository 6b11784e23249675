"""The prefetcher: the loader's batches, in order, prepared ahead in a thread; errors and early exits handled."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from crate_mae.data import DataError, PretrainTransform, train_loader
from crate_mae.data.device_decode import DeviceCropTransform, images_on
from crate_mae.data.prefetch import Prefetcher
from crate_mae.data.reader import Batch
from tests.helpers import make_set, write_tar_set

CPU = torch.device("cpu")


def _decode(batch: Batch) -> Batch:
    return batch._replace(images=images_on(batch.images, 16, CPU))


def _threads() -> int:
    return sum(t.name == "crate-mae-prefetch" for t in threading.enumerate())


def test_same_batches_in_the_same_order_and_epoch_control_passes_through(tmp_path: Path) -> None:
    spec = make_set(tmp_path, "train", n_shards=3, per_shard=12)
    plain = train_loader(spec, DeviceCropTransform(16), batch_size=4, seed=3, shuffle_buffer=8)
    ahead = Prefetcher(train_loader(spec, DeviceCropTransform(16), batch_size=4, seed=3, shuffle_buffer=8), _decode,
                       device=CPU, depth=2)
    assert len(ahead) == len(plain) == 9
    for epoch, skip in ((0, 0), (1, 0), (1, 5)):
        plain.set_epoch(epoch, replay=skip)
        ahead.set_epoch(epoch, replay=skip)
        expected = [_decode(b) for b in plain]
        got = list(ahead)
        assert len(got) == len(expected) == 9 - skip
        for x, y in zip(got, expected):
            assert x.keys == y.keys
            assert torch.equal(x.images, y.images) and x.images.dtype == torch.uint8
            assert torch.equal(x.labels, y.labels)
    assert ahead.seen == plain.seen and ahead.bad == plain.bad == 0
    assert _threads() == 0


def test_a_data_error_in_the_thread_is_raised_in_the_caller(tmp_path: Path) -> None:
    samples = [{"__key__": f"{i}", "jpg": b"junk", "cls": b"0"} for i in range(30)]
    spec = write_tar_set(tmp_path, "train", [samples])
    ahead = Prefetcher(train_loader(spec, PretrainTransform(16), batch_size=2, max_bad_fraction=0.1, shuffle_buffer=4),
                       lambda b: b, device=CPU)
    ahead.set_epoch(0)
    with pytest.raises(DataError, match="samples were bad"):
        list(ahead)

    def failing(batch: Batch) -> Batch:
        raise ValueError("cannot prepare")

    good = Prefetcher(train_loader(make_set(tmp_path / "good", "train", n_shards=1, per_shard=8), PretrainTransform(16),
                                   batch_size=4), failing, device=CPU)
    good.set_epoch(0)
    with pytest.raises(ValueError, match="cannot prepare"):
        list(good)
    assert _threads() == 0


def test_leaving_early_stops_the_thread(tmp_path: Path) -> None:
    spec = make_set(tmp_path, "train", n_shards=3, per_shard=12)
    ahead = Prefetcher(train_loader(spec, PretrainTransform(16), batch_size=2, shuffle_buffer=4), lambda b: b,
                       device=CPU, depth=1)
    ahead.set_epoch(0)
    it = iter(ahead)
    next(it)
    time.sleep(0.2)  # the thread fills its one slot and waits
    assert _threads() == 1
    it.close()  # what a `break` out of the loop (or an exception in the step) does
    assert _threads() == 0
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(ahead.loader, lambda b: b, device=CPU, depth=0)


@pytest.mark.gpu
def test_cuda_prefetch_decodes_on_a_side_stream_like_the_step(tmp_path: Path) -> None:
    spec = make_set(tmp_path, "train", n_shards=2, per_shard=16)
    cuda = torch.device("cuda:0")
    prepare = lambda b: b._replace(images=images_on(b.images, 16, cuda))  # noqa: E731
    plain = train_loader(spec, DeviceCropTransform(16), batch_size=8, seed=1, shuffle_buffer=8)
    ahead = Prefetcher(train_loader(spec, DeviceCropTransform(16), batch_size=8, seed=1, shuffle_buffer=8), prepare,
                       device=cuda)
    plain.set_epoch(0)
    ahead.set_epoch(0)
    for x, y in zip(ahead, plain):
        assert x.images.is_cuda
        assert torch.equal(x.images, prepare(y).images)
