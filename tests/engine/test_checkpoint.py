"""The Checkpointer: what it saves is the state it was handed (with the RNG states, the config and its extras), and
one `restore` puts all of it back, from a file read once by the one reader; a file's unread "scheduler" entry (older
files hold one) is no obstacle."""
from __future__ import annotations

from pathlib import Path

import torch

from crate_mae.engine.checkpoint import Best, Checkpointer
from crate_mae.engine.dist import Dist
from crate_mae.model import read_checkpoint
from crate_mae.model.files import latest, periodic

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Run:
    """A run's state as the Trainer keeps it (a `Stateful`): what `restore` hands back is kept here."""

    def __init__(self) -> None:
        self.state: dict = {}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


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
    again, run = Best(), Run()
    Checkpointer(tmp_path, every=2, keep_last=1, config={}, dist=CPU, extra={"best": again}).restore(
        read_checkpoint(tmp_path / "final.pth"), run)
    assert run.state["state"] == state["state"] and torch.equal(run.state["model"]["cls_token"], torch.ones(1, 1, 4))
    assert (again.top1, again.top5) == (42.0, 90.0)
    assert torch.equal(torch.rand(3), expected)  # this rank's generators continue as saved
    assert not list(tmp_path.glob(".*.tmp"))  # every write atomic: no temp file left


def test_a_file_with_the_old_scheduler_entry_resumes(tmp_path: Path) -> None:
    """Files written before the schedule was left out of checkpoints hold a "scheduler" entry: the Trainer of the
    current config resumes from them all the same (the schedule follows from the step)."""
    from crate_mae.config import MAEConfig, OptimConfig
    from crate_mae.data import Batch
    from crate_mae.engine.optim import build_scheduler
    from crate_mae.engine.trainer import Trainer
    from crate_mae.model import build_mae
    from crate_mae.model.mae import MaskedObjective

    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = build_mae(MAEConfig(variant="nano"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return Trainer(MaskedObjective(model), optimizer=opt, dist=CPU,
                       scheduler=build_scheduler(OptimConfig(epochs=1, warmup_epochs=0.5), opt, 8), updates_per_epoch=8)

    old = trainer()
    old.step([Batch(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.full((2,), -1), [])])
    assert "scheduler" not in old.state_dict()
    old_style = {**old.state_dict(), "scheduler": old.scheduler.state_dict()}
    ckpt = Checkpointer(tmp_path, every=10, keep_last=1, config={"model": {"family": "mae"}}, dist=CPU)
    ckpt.save("ckpt-00000001.pth", old_style)
    new = trainer()
    ckpt.restore(read_checkpoint(tmp_path / "ckpt-00000001.pth"), new)
    assert new.state.step == 1 and new.lr == old.lr
    assert all(torch.equal(v, old.module.state_dict()[k]) for k, v in new.module.state_dict().items())
