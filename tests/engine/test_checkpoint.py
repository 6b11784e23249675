"""The Checkpointer is handed state and never calls the trainer: what it saves is what it was given (with the RNG
states, the config and its extras), and `restore` gives it back, from a file read once by the one reader."""
from __future__ import annotations

from pathlib import Path

import torch

from crate_mae.engine.checkpoint import Best, Checkpointer, latest, periodic
from crate_mae.engine.dist import Dist
from crate_mae.model import read_checkpoint

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_saves_what_it_is_given_and_restores_it(tmp_path: Path) -> None:
    best = Best(top1=42.0, top5=90.0)
    ckpt = Checkpointer(tmp_path, every=2, keep_last=1, config={"model": {"family": "mae"}}, dist=CPU,
                        extra={"best": best})
    assert [s for s in range(1, 7) if ckpt.due(s, last=s == 6)] == [2, 4]  # the last step is final.pth's
    state = {"model": {"cls_token": torch.ones(1, 1, 4), "encoder.layers.0.ista.D": torch.eye(4)},
             "state": {"step": 4, "epoch": 1, "batch_in_epoch": 2}}
    ckpt.save("ckpt-00000002.pth", state)
    ckpt.save("ckpt-00000004.pth", state)
    assert [p.name for p in periodic(tmp_path)] == ["ckpt-00000004.pth"] and latest(tmp_path).name == "ckpt-00000004.pth"
    torch.manual_seed(7)
    expected = torch.rand(3)  # the generator's next draws after the save
    torch.manual_seed(7)
    ckpt.save("final.pth", state)
    torch.manual_seed(123)
    again = Best()
    restored = Checkpointer(tmp_path, every=2, keep_last=1, config={}, dist=CPU, extra={"best": again}).restore(
        read_checkpoint(tmp_path / "final.pth"))
    assert restored["state"] == state["state"] and torch.equal(restored["model"]["cls_token"], torch.ones(1, 1, 4))
    assert (again.top1, again.top5) == (42.0, 90.0)
    assert torch.equal(torch.rand(3), expected)  # this rank's generators continue as saved
    assert not list(tmp_path.glob(".*.tmp"))  # every write atomic: no temp file left
