"""The command lines' error contract (crate_mae/cli.py): the project's own errors end in one line and exit 1; any
other error keeps its traceback, so that a bug (ours, torch's, timm's) shows where it came from."""
from __future__ import annotations

import pytest

from crate_mae.cli import stage_main
from crate_mae.errors import CheckpointError


def ours(cfg: object) -> None:
    raise CheckpointError("runs/x/final.pth: shape mismatch for 'head.weight': checkpoint (10, 64), model (7, 64)")


def foreign(cfg: object) -> None:
    raise ValueError("Expected input batch_size (3) to match target batch_size (4).")  # as torch raises it


def run(function: str) -> int:
    return stage_main(["--set", "model.variant=nano"], doc="a stage\n\nexamples", default_config=None,
                      stage=f"{__name__}:{function}", config="pretrain", shortcuts={})


def test_the_projects_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("ours") == 1
    err = capsys.readouterr().err
    assert err == "error: runs/x/final.pth: shape mismatch for 'head.weight': checkpoint (10, 64), model (7, 64)\n"


def test_other_errors_keep_their_traceback() -> None:
    with pytest.raises(ValueError, match="to match target batch_size"):
        run("foreign")
