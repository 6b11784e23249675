"""Decoding and cropping on the training device: the same crops as the worker path, batched."""
from __future__ import annotations

import io
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_mae.config import DataConfig
from crate_mae.data import PretrainTransform, train_loader
from crate_mae.data.device_decode import DeviceCropTransform, RawBatch, collate_raw, decode_batch, to_device
from tests.helpers import make_set

LOCAL = DataConfig(num_workers=0)


def smooth_image(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    a, b = rng.uniform(0.2, 0.8, 2)
    pixels = np.stack([xx * a % 255, yy * b % 255, (xx + yy) * 0.3 % 255], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_device_path_matches_the_worker_path(fmt: str) -> None:
    """Same crop and flip draws; bilinear area-sampled vs bicubic antialiased resampling: a few grey levels apart."""
    blobs = [smooth_image(300 + 20 * i, 200 + 10 * i, fmt, seed=i) for i in range(4)]
    worker, device_side = PretrainTransform(64, fast_decode=False), DeviceCropTransform(64)
    expected = torch.stack([worker(b, random.Random(i)) for i, b in enumerate(blobs)])
    raw = device_side.collate([device_side(b, random.Random(i)) for i, b in enumerate(blobs)])
    got = decode_batch(raw, 64, torch.device("cpu"))
    assert got.shape == (4, 3, 64, 64) and got.dtype == torch.uint8
    assert (got.float() - expected.float()).abs().mean() < 3


def test_flips_and_boxes() -> None:
    data = smooth_image(120, 80, "JPEG")
    plain, flipped = DeviceCropTransform(32, hflip=0.0), DeviceCropTransform(32, hflip=1.0)
    a = decode_batch(collate_raw([plain(data, random.Random(3))], 32), 32, torch.device("cpu"))
    b = decode_batch(collate_raw([flipped(data, random.Random(3))], 32), 32, torch.device("cpu"))
    assert torch.equal(a.flip(-1), b)
    whole = collate_raw([plain(data, random.Random(0))], 32)._replace(boxes=torch.tensor([[0.0, 0.0, 120.0, 80.0]]))
    full = decode_batch(whole, 32, torch.device("cpu"))
    reference = torch.nn.functional.interpolate(torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
                                                .permute(2, 0, 1)[None].float(), size=(32, 32), mode="area")
    assert (full.float() - reference).abs().mean() < 3  # the whole image, resized: area-like averaging


def test_loader_yields_raw_batches_and_replays_a_resume(tmp_path: Path) -> None:
    spec = make_set(tmp_path, "train", n_shards=2, per_shard=12)
    loader = train_loader(spec, DeviceCropTransform(16), data=LOCAL, batch_size=4, seed=1, shuffle_buffer=8)
    loader.set_epoch(0)
    batches = list(loader)
    assert all(isinstance(b.images, RawBatch) and len(b.images.payloads) == 4 and b.images.size == 16
               for b in batches)
    pixels = to_device(batches[0], torch.device("cpu")).images
    assert pixels.shape == (4, 3, 16, 16) and pixels.dtype == torch.uint8
    loader.set_epoch(0, replay=2)
    rest = list(loader)
    assert [b.keys for b in rest] == [b.keys for b in batches[2:]]
    assert all(torch.equal(x.images.boxes, y.images.boxes) for x, y in zip(rest, batches[2:]))


def test_pretraining_with_device_decode(tmp_path: Path) -> None:
    from crate_mae.config import load_config
    from crate_mae.data.shards import ensure_digits
    from crate_mae.stages.pretrain import run_pretrain

    train, val = ensure_digits(tmp_path / "digits")
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs/pretrain/demo.yaml", [
        "model.variant=nano", f"data.train_shards={train}", f"data.val_shards={val}", "data.num_workers=0",
        "data.decode_on=device", "data.batch_size=32", "optim.epochs=1", "optim.warmup_epochs=0.2", "optim.blr=2e-2",
        f"run.out_dir={tmp_path}", "run.log_every=10", "monitor.every=0"])
    result = run_pretrain(cfg)  # data.prefetch=2 (the default): decoded ahead in a background thread
    assert result.last_loss < result.first_loss
    cfg = replace(cfg, data=replace(cfg.data, prefetch=0), run=replace(cfg.run, name="in-step"))
    in_step = run_pretrain(cfg)  # decoded in the step's thread: the same run, to the bit
    assert in_step.steps == result.steps
    for (name, a), b in zip(result.model.state_dict().items(), in_step.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_nvjpeg_decode_and_crop_match_the_cpu() -> None:
    blobs = [smooth_image(400 + 10 * i, 300, "JPEG", seed=i) for i in range(8)]
    raw = collate_raw([DeviceCropTransform(224)(b, random.Random(i)) for i, b in enumerate(blobs)], 224)
    gpu = decode_batch(raw, 224, torch.device("cuda")).cpu()
    cpu = decode_batch(raw, 224, torch.device("cpu"))
    assert (gpu.float() - cpu.float()).abs().mean() < 2  # nvjpeg's IDCT and upsampling differ by a level or so
