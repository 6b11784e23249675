"""The pretraining monitor: it never changes training, its masks are fixed, 2 ranks give 1's numbers, the kNN scores
what the features carry, an unlabelled bank is skipped in one line, and the figure and table of a history."""
from __future__ import annotations

import copy
import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_mae.config import DataConfig, MAEConfig, MonitorConfig, OptimConfig
from crate_mae.data import Batch
from crate_mae.data.reader import eval_loader
from crate_mae.engine.dist import Dist, rng_state, run_with
from crate_mae.engine.optim import build_scheduler
from crate_mae.engine.trainer import Trainer
from crate_mae.eval.monitor import Monitor, fixed_noise, monitor_figure, monitor_table
from crate_mae.model import build_mae, resolve_config
from crate_mae.model.mae import MaskedObjective
from crate_mae.seeding import seed_everything
from tests.helpers import image_bytes, write_tar_set
from tests.spawn import spawn

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
NANO = resolve_config(MAEConfig(variant="nano"))
KNN_KEYS = {"knn_cls_top1", "knn_cls_top5", "knn_mean_top1", "knn_mean_top5", "knn_bank_images"}


def monitor(train: str, val: str, *, dist: Dist = CPU, batch_size: int = 32, seed: int = 0, **cfg: object) -> Monitor:
    """A monitor of the nano model: small subsets by default (the first val shard, the first two train shards)."""
    settings = {"val_samples": 64, "bank_samples": 256, "layers_batch": 8, "knn_k": 10, **cfg}
    return Monitor(MonitorConfig(**settings), NANO, train_spec=train, val_spec=val, dist=dist, seed=seed,
                   data=DataConfig(batch_size=batch_size, num_workers=0))


def nano() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mae(NANO)


def test_evaluate_never_changes_training(digits) -> None:
    """Training with evaluations in between ends bit-identical to training without; around one evaluation every
    generator, every module's mode, every weight and every .grad are as they were."""
    base = nano()
    batches = torch.randint(0, 256, (3, 8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    before = rng_state()
    mon = monitor(*digits, val_samples=32, bank_samples=64, layers_batch=4)
    assert rng_state() == before  # the monitor draws nothing when it is made (its classifier: at evaluate, put back)
    weights = []
    for evaluate in (True, False):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        trainer = Trainer(MaskedObjective(model), optimizer=opt, dist=CPU,  # masks: the global generators
                          scheduler=build_scheduler(OptimConfig(epochs=10, warmup_epochs=0), opt, 1))
        seed_everything(3)
        for batch in batches:
            trainer.step([Batch(batch, torch.full((len(batch),), -1), [])])
            if evaluate:
                mon.evaluate(model)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    assert not torch.equal(weights[0]["decoder_pred.weight"], base.state_dict()["decoder_pred.weight"])  # it trained

    model.train()
    model.decoder.eval()  # a model partly in eval mode stays so
    modes = {name: m.training for name, m in model.named_modules()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    before = rng_state()
    mon.evaluate(model)
    assert rng_state() == before
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name][0]) and torch.equal(p.grad, params[name][1]), name


def test_heldout_loss_has_fixed_masks(digits) -> None:
    """The same weights give the same loss twice, and with another batch size; it is the model's own per-image
    loss (norm_pix_loss honoured) of the first val_samples images in key order, under their keys' noise."""
    mae = nano()
    mon = monitor(*digits, knn_k=0, layers_batch=0)
    first = mon.evaluate(mae)
    assert first == mon.evaluate(mae) and set(first) == {"heldout_loss", "heldout_images"}
    assert first["heldout_images"] == 64
    other = monitor(*digits, knn_k=0, layers_batch=0, batch_size=7).evaluate(mae)["heldout_loss"]
    assert other == pytest.approx(first["heldout_loss"], abs=1e-6, rel=0)
    assert monitor(*digits, knn_k=0, layers_batch=0, seed=1).evaluate(mae)["heldout_loss"] != first["heldout_loss"]

    batch = next(iter(eval_loader(digits[1], 32, batch_size=1000, num_workers=0, labels=False)))  # the whole set
    keep = sorted(range(len(batch.keys)), key=batch.keys.__getitem__)[:64]
    images, keys = batch.images[keep], [batch.keys[i] for i in keep]
    with torch.no_grad():
        for norm_pix in (False, True):
            mae.norm_pix_loss = norm_pix
            out = mae.forward_masked(images, noise=fixed_noise(keys, 64, 0))
            expected = mae.sample_loss(mae.normalize(images), out.pred, out.mask).double().mean().item()
            assert mon.evaluate(mae)["heldout_loss"] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(first["heldout_loss"], rel=1e-3)  # norm_pix_loss changes the measure


def _rank(rank: int, world: int, port: int, digits: tuple[str, str], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    result = run_with("cpu", lambda d: monitor(*digits, dist=d, val_samples=100, bank_samples=300,
                                               batch_size=16).evaluate(nano()))
    torch.save(result, Path(out) / f"rank{rank}.pt")


def test_two_ranks_measure_what_one_does(digits, free_port: int, tmp_path: Path) -> None:
    """val_samples=100 lies in the first val shard (split by sample over the ranks), the bank of 300 in the first two
    train shards (one per rank): the same subsets, losses and kNN counts on every rank as on one."""
    spawn(_rank, args=(2, free_port, digits, str(tmp_path)), nprocs=2)
    one = monitor(*digits, val_samples=100, bank_samples=300, batch_size=16).evaluate(nano())
    assert one["heldout_images"] == 100 and one["knn_bank_images"] == 300 and KNN_KEYS <= set(one)
    for rank in (0, 1):
        two = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(two) == set(one)
        for key, value in one.items():
            assert abs(two[key] - value) <= 1e-6, (rank, key, two[key], value)


def _solid(colour: tuple[int, int, int], seed: int) -> bytes:
    """A 32 px PNG of one colour, with a little noise of its own."""
    noise = np.random.default_rng(seed).integers(-4, 5, (32, 32, 3))
    buf = io.BytesIO()
    Image.fromarray((np.array(colour) + noise).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def colour_set(folder: Path, split: str, per_class: int, *, shift: int = 0) -> str:
    """Class c is one colour (red, green, blue); each image is labelled (c + shift) mod 3."""
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    samples = [{"__key__": f"{split}{i:05d}", "png": _solid(colours[i % 3], i),
                "cls": str((i % 3 + shift) % 3).encode()} for i in range(3 * per_class)]
    return write_tar_set(folder, split, [samples[: len(samples) // 2], samples[len(samples) // 2:]])


def test_knn_scores_what_the_features_carry(tmp_path: Path) -> None:
    """Images of one colour per class: any encoder's features carry the class, so the kNN through `evaluate` scores
    100 % for both features; the same images labelled one class off score 0 %, so labels follow their features."""
    train = colour_set(tmp_path / "c", "train", 12)
    mae = nano()
    for shift, expected in ((0, 100.0), (1, 0.0)):
        val = colour_set(tmp_path / f"v{shift}", "val", 5, shift=shift)
        out = monitor(train, val, val_samples=None, bank_samples=None, knn_k=5, batch_size=8).evaluate(mae)
        assert (out["knn_cls_top1"], out["knn_mean_top1"]) == (expected, expected), out
        assert out["knn_bank_images"] == 36 and out["heldout_images"] == 15
    assert out["knn_cls_top5"] == 100.0  # 3 classes: every label is in the top 5


@pytest.mark.parametrize("missing", ["manifest", "samples"])
def test_unlabelled_bank_skips_the_knn_in_one_line(digits, tmp_path: Path, missing: str) -> None:
    """A train set without labels (a manifest without classes, or samples without cls): the kNN is skipped with one
    line naming the set, and the held-out loss and the per-layer measures are still taken."""
    samples = [{"__key__": f"{i:06d}", "jpg": image_bytes(i, (40, 40))} for i in range(24)]
    classes = 0 if missing == "manifest" else 3  # a manifest listing no classes, or samples without cls
    train = write_tar_set(tmp_path / "u", "train", [samples[:12], samples[12:]], classes=classes)
    mon = monitor(train, digits[1])
    assert len(mon.skipped) == 1 and mon.skipped[0].startswith(f"kNN skipped: {train} has no labels"), mon.skipped
    out = mon.evaluate(nano())
    assert not KNN_KEYS & set(out)
    assert out["heldout_images"] == 64 and {"layer0/zero_fraction", "layer1/rate_after_mssa"} <= set(out)


def history() -> list[dict[str, float]]:
    """Three evaluations of a 2-layer model; the first before the kNN was taken."""
    rows = []
    for e in range(3):
        row = {"epoch": e, "step": 10 * e, "heldout_loss": 1.0 - 0.2 * e, "heldout_images": 64.0}
        if e:
            row |= {"knn_cls_top1": 20.0 + 10 * e, "knn_cls_top5": 60.0, "knn_mean_top1": 25.0 + 5 * e,
                    "knn_mean_top5": 70.0}
        for i in range(2):
            row |= {f"layer{i}/rate_before_mssa": 50.0 + i + e, f"layer{i}/rate_after_mssa": 49.0 + i,
                    f"layer{i}/zero_fraction": 0.5 + 0.1 * i, f"layer{i}/l1_over_l2": 4.0 - e * 0.1}
        rows.append(row)
    return rows


def test_figure_and_table_of_a_history(tmp_path: Path) -> None:
    fig = monitor_figure(history())
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["held-out loss (masked patches)", "kNN top-1", "$R^c$ before MSSA", "$R^c$ after MSSA",
                      "sparse code (ISTA; ODL z2): fraction of zeros", "sparse code: ℓ1/ℓ2 per token"]
    assert [len(ax.lines) for ax in fig.axes[:6]] == [1, 2, 2, 2, 2, 2]  # one line per layer
    fig.savefig(tmp_path / "monitor.png")
    assert (tmp_path / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lines = monitor_table(history()).splitlines()
    assert len(lines) == 2 + 3
    assert lines[0].split() == ["epoch", "step", "held-out", "loss", "kNN", "top-1", "CLS", "%", "kNN", "top-1", "mean",
                                "%", "layer", "1", "zeros", "layer", "1", "ℓ1/ℓ2"]
    assert lines[2].split() == ["0", "0", "1.0000", "-", "-", "0.600", "4.00"]
    assert lines[4].split() == ["2", "20", "0.6000", "40.00", "35.00", "0.600", "3.80"]
