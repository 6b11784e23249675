"""The command lines' error contract: every command (the three stages through crate_mae/cli.py, `python -m
crate_mae.viz`, the export tool) ends an expected failure in one line through `errors.report` and returns the status
of its kind: 2 for a bad config or argument (as argparse's own usage errors), 1 for the rest, 75 or 130 for a run
stopped on request. Any other error keeps its traceback, so that a bug (ours, torch's, timm's) shows where it came
from. Before issue 28 the stages exited 1 and viz and the export tool 2 for the same kind of error."""
from __future__ import annotations

from pathlib import Path

import pytest

from crate_mae.cli import stage_main
from crate_mae.errors import StopNow
from crate_mae.errors import CheckpointError, ConfigError, Preempted


def ours(cfg: object) -> None:
    raise CheckpointError("runs/x/final.pth: shape mismatch for 'head.weight': checkpoint (10, 64), model (7, 64)")


def config(cfg: object) -> None:
    raise ConfigError("run.device='cuda' but CUDA is not available on this machine")


def preempted(cfg: object) -> None:
    raise Preempted("stopped by SIGTERM after step 7/46: saved runs/x/ckpt-00000007.pth", exit_status=75)


def stopped(cfg: object) -> None:
    raise StopNow("stopped by SIGINT outside the training loop", exit_status=130)


def foreign(cfg: object) -> None:
    raise ValueError("Expected input batch_size (3) to match target batch_size (4).")  # as torch raises it


def run(function: str, *args: str) -> int:
    return stage_main(["--set", "model.variant=nano", *args], doc="a stage\n\nexamples", default_config=None,
                      stage=f"{__name__}:{function}", config="pretrain", shortcuts={})


@pytest.mark.parametrize(("function", "args", "status", "line"), [
    ("ours", [], 1, "error: runs/x/final.pth: shape mismatch for 'head.weight': checkpoint (10, 64), model (7, 64)"),
    ("config", [], 2, "error: run.device='cuda' but CUDA is not available on this machine"),
    ("ours", ["--set", "optim.lrr=1"], 2, "error: "),  # a bad key: the stage never runs
    ("preempted", [], 75, "stopped: stopped by SIGTERM after step 7/46: saved runs/x/ckpt-00000007.pth"),
    ("stopped", [], 130, "stopped: stopped by SIGINT outside the training loop")])
def test_a_stages_expected_failure_is_one_line_and_the_status_of_its_kind(capsys: pytest.CaptureFixture[str],
                                                                          function: str, args: list[str], status: int,
                                                                          line: str) -> None:
    assert run(function, *args) == status
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


def test_argparses_own_usage_errors_stay_2() -> None:
    with pytest.raises(SystemExit) as stop:
        run("ours", "--no-such-flag")
    assert stop.value.code == 2


def test_other_errors_keep_their_traceback() -> None:
    with pytest.raises(ValueError, match="to match target batch_size"):
        run("foreign")


def test_viz_and_export_exit_as_the_stages_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from crate_mae.model.files import main as files_main
    from crate_mae.viz.__main__ import main as viz_main

    missing = str(tmp_path / "missing.pth")
    for status, command in [(1, lambda: files_main(["export", missing, str(tmp_path / "enc.pth")])),
                            (1, lambda: viz_main(["layers", "--checkpoint", missing, "--images", str(tmp_path)])),
                            (2, lambda: viz_main(["layers", "--checkpoint", missing, "--images", str(tmp_path),
                                                  "--n", "0"]))]:
        assert command() == status
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
