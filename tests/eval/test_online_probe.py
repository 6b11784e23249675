"""The online probe (eval/linear.py: OnlineProbe): it learns from a frozen encoder's clean CLS features, never touches
the encoder or the global generators, and saves and restores exactly."""
from __future__ import annotations

import torch

from crate_mae.config import MAEConfig
from crate_mae.data import PretrainTransform, eval_loader, train_loader
from crate_mae.engine.dist import Dist, rng_state
from crate_mae.eval.linear import OnlineProbe
from crate_mae.model import build_mae

CPU = Dist(0, 1, 0, torch.device("cpu"))


def accuracy(probe: OnlineProbe, mae: torch.nn.Module, val: str) -> float:
    correct = n = 0
    for batch in eval_loader(val, 32, batch_size=100, num_workers=0):
        correct += (probe.logits(probe.features(mae, batch.images)).argmax(1) == batch.labels).sum().item()
        n += len(batch.labels)
    return 100 * correct / n


def test_it_learns_and_leaves_the_encoder_and_the_generators_alone(digits) -> None:
    mae = build_mae(MAEConfig(variant="nano"))
    before = {k: v.clone() for k, v in mae.state_dict().items()}
    state = rng_state()
    probe = OnlineProbe(64, 10, lr=1e-2, device=torch.device("cpu"), seed=0)
    assert rng_state() == state  # its initial weights come from its own generator
    loader = train_loader(digits[0], PretrainTransform(32), batch_size=64, num_workers=0, shuffle_buffer=64)
    chance = accuracy(probe, mae, digits[1])
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            probe.step(mae, batch.images, batch.labels, CPU)
    learned = accuracy(probe, mae, digits[1])
    assert chance < 20 and learned > 35  # from chance (10 classes) on a random encoder's features, in 69 steps
    assert all(torch.equal(before[k], v) for k, v in mae.state_dict().items())
    assert all(p.grad is None for p in mae.parameters())
    again = OnlineProbe(64, 10, lr=1e-2, device=torch.device("cpu"), seed=1)
    again.load_state_dict(probe.state_dict())
    x = probe.features(mae, next(iter(eval_loader(digits[1], 32, batch_size=8, num_workers=0))).images)
    assert torch.equal(again.logits(x), probe.logits(x))
    assert again.optimizer.state_dict()["state"].keys() == probe.optimizer.state_dict()["state"].keys()
