"""The DeviceLoader: the loader's batches, in order, on the device by `to_device`; prepared ahead in a thread
(depth ≥ 1) or in the caller's thread (depth 0); errors and early exits handled."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import crate_mae.data.prefetch as prefetch
from crate_mae.config import DataConfig
from crate_mae.data import DataError, PretrainTransform, train_loader
from crate_mae.data.device_decode import DeviceCropTransform, to_device
from crate_mae.data.prefetch import DeviceLoader
from crate_mae.data.stream import Batch
from tests.helpers import make_set, write_tar_set

CPU = torch.device("cpu")
LOCAL = DataConfig(num_workers=0)


def _threads() -> int:
    return sum(t.name == "crate-mae-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("depth", [2, 0])
def test_same_batches_in_the_same_order_and_epoch_control_passes_through(tmp_path: Path, depth: int) -> None:
    spec = make_set(tmp_path, "train", n_shards=3, per_shard=12)
    plain = train_loader(spec, DeviceCropTransform(16), data=LOCAL, batch_size=4, seed=3, shuffle_buffer=8)
    ready = DeviceLoader(train_loader(spec, DeviceCropTransform(16), data=LOCAL, batch_size=4, seed=3,
                                      shuffle_buffer=8), device=CPU, depth=depth)
    assert len(ready) == len(plain) == 9
    for epoch, skip in ((0, 0), (1, 0), (1, 5)):
        plain.set_epoch(epoch, replay=skip)
        ready.set_epoch(epoch, replay=skip)
        expected = [to_device(b, CPU) for b in plain]
        got = list(ready)
        assert len(got) == len(expected) == 9 - skip
        for x, y in zip(got, expected):
            assert x.keys == y.keys
            assert torch.equal(x.images, y.images) and x.images.dtype == torch.uint8
            assert torch.equal(x.labels, y.labels)
    assert ready.seen == plain.seen and ready.bad == plain.bad == 0
    assert _threads() == 0


def test_depth_0_prepares_each_batch_in_the_callers_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []

    def recording(batch: Batch, device: torch.device) -> Batch:
        threads.append(threading.current_thread().name)
        return to_device(batch, device)

    monkeypatch.setattr(prefetch, "to_device", recording)
    spec = make_set(tmp_path, "train", n_shards=1, per_shard=12)
    inline = DeviceLoader(train_loader(spec, PretrainTransform(16), data=LOCAL, batch_size=4), device=CPU, depth=0)
    inline.set_epoch(0)
    it = iter(inline)
    assert threads == []  # nothing prepared before it is asked for
    next(it)
    assert threads == [threading.current_thread().name] and _threads() == 0
    assert len(list(it)) == 2 and len(threads) == 3  # once per batch


def test_a_data_error_in_the_thread_is_raised_in_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = [{"__key__": f"{i}", "jpg": b"junk", "cls": b"0"} for i in range(30)]
    spec = write_tar_set(tmp_path, "train", [samples])
    ahead = DeviceLoader(train_loader(spec, PretrainTransform(16), data=LOCAL, batch_size=2, max_bad_fraction=0.1,
                                      shuffle_buffer=4), device=CPU)
    ahead.set_epoch(0)
    with pytest.raises(DataError, match="samples were bad"):
        list(ahead)

    def failing(batch: Batch, device: torch.device) -> Batch:
        raise ValueError("cannot prepare")

    monkeypatch.setattr(prefetch, "to_device", failing)
    good_set = make_set(tmp_path / "good", "train", n_shards=1, per_shard=8)
    good = DeviceLoader(train_loader(good_set, PretrainTransform(16), data=LOCAL, batch_size=4), device=CPU)
    good.set_epoch(0)
    with pytest.raises(ValueError, match="cannot prepare"):
        list(good)
    assert _threads() == 0


def test_leaving_early_stops_the_thread(tmp_path: Path) -> None:
    spec = make_set(tmp_path, "train", n_shards=3, per_shard=12)
    ahead = DeviceLoader(train_loader(spec, PretrainTransform(16), data=LOCAL, batch_size=2, shuffle_buffer=4),
                         device=CPU, depth=1)
    ahead.set_epoch(0)
    it = iter(ahead)
    next(it)
    time.sleep(0.2)  # the thread fills its one slot and waits
    assert _threads() == 1
    it.close()  # what a `break` out of the loop (or an exception in the step) does
    assert _threads() == 0
    with pytest.raises(ValueError, match="depth must be >= 0"):
        DeviceLoader(ahead.loader, device=CPU, depth=-1)


@pytest.mark.gpu
def test_cuda_prefetch_decodes_on_a_side_stream_like_the_step(tmp_path: Path) -> None:
    spec = make_set(tmp_path, "train", n_shards=2, per_shard=16)
    cuda = torch.device("cuda:0")
    plain = train_loader(spec, DeviceCropTransform(16), data=LOCAL, batch_size=8, seed=1, shuffle_buffer=8)
    ahead = DeviceLoader(train_loader(spec, DeviceCropTransform(16), data=LOCAL, batch_size=8, seed=1,
                                      shuffle_buffer=8), device=cuda)
    plain.set_epoch(0)
    ahead.set_epoch(0)
    for x, y in zip(ahead, plain):
        assert x.images.is_cuda and x.labels.is_cuda
        assert torch.equal(x.images, to_device(y, cuda).images)
