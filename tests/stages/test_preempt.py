"""Preemption and Ctrl-C (issue 22): a signal in the training loop makes every rank finish its step, save one
checkpoint there and exit resumable (75; 130 after Ctrl-C) with one line; `--resume auto` then ends bit-identical to a
run never stopped. Before this, SIGTERM killed the process on the spot (status −15) and Ctrl-C ended in a traceback,
losing every step since the last periodic checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from crate_mae.engine.preempt import StopSignals, at_step_boundaries, requested_stop
from crate_mae.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT, Preempted, StopNow, exit_status
from crate_mae.model import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(digits: tuple[str, str], out: Path, name: str, *extra: str) -> list[str]:
    """The nano model on the digits demo, 46 steps in one epoch, a checkpoint every 11; 2 DataLoader workers (they
    get the signal too when a terminal or a cluster signals the process group)."""
    return ["--set", "model.variant=nano", f"data.train_shards={digits[0]}", f"data.val_shards={digits[1]}",
            "data.batch_size=32", "data.num_workers=2", "data.shuffle_buffer=64", "optim.epochs=1",
            "optim.warmup_epochs=0.3", f"run.out_dir={out}", f"run.name={name}", "run.ckpt_every=11", "run.log_every=5",
            "monitor.every=0", *extra]


def _pretrain(digits: tuple[str, str], out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "pretrain.py"), *_args(digits, out, name, *extra)]


@pytest.fixture(scope="module")
def whole(digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final.pth of the run never stopped."""
    out = tmp_path_factory.mktemp("whole")
    subprocess.run(_pretrain(digits, out, "whole"), check=True, env=ENV, capture_output=True, timeout=300)
    return out / "whole" / "final.pth"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert path.exists() and proc.poll() is None, "the run ended before it could be signalled"


def _same_run(a: Path, b: Path) -> None:
    x, y = read_checkpoint(a), read_checkpoint(b)
    assert x.payload["state"] == y.payload["state"]
    for key, value in x.state.items():
        assert torch.equal(value, y.state[key]), key
    assert x.payload["optimizer"]["state"].keys() == y.payload["optimizer"]["state"].keys()


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, PREEMPTED_EXIT), (signal.SIGUSR1, PREEMPTED_EXIT),
                                             (signal.SIGINT, INTERRUPTED_EXIT)])
def test_a_signal_saves_at_the_step_and_the_resume_is_bit_identical(digits, whole: Path, tmp_path: Path,
                                                                      sig: signal.Signals, status: int) -> None:
    """SIGTERM is followed to the end (the resume bit-identical to the run never stopped); SIGUSR1 and Ctrl-C take the
    same path to the saved step, so for them the stop itself is checked."""
    proc = subprocess.Popen(_pretrain(digits, tmp_path, "cut"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run = tmp_path / "cut"
    _wait_for(run / "ckpt-00000011.pth", proc)
    time.sleep(0.05)  # a few steps past the periodic checkpoint: the stop writes its own
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped: stopped by {sig.name} after step ") and "--resume auto" in last, err
    assert "Traceback" not in err
    step = int(last.split("after step ")[1].split("/")[0])
    saved = run / f"ckpt-{step:08d}.pth"
    assert 11 <= step < 46 and saved.exists() and str(saved) in last
    assert not (run / "final.pth").exists() and not list(run.glob(".*.tmp"))
    assert read_checkpoint(saved).payload["state"]["step"] == step
    if sig == signal.SIGTERM:
        subprocess.run([*_pretrain(digits, tmp_path, "cut"), "--resume", "auto"], check=True, env=ENV,
                       capture_output=True, timeout=300)
        _same_run(whole, run / "final.pth")


def test_a_second_signal_or_the_grace_bound_stops_at_once_without_half_written_files(digits, whole: Path,
                                                                                       tmp_path: Path) -> None:
    """Two signals in quick succession (whatever moment the second one meets: a step, the save, the way out), and a
    grace bound too short for any stop: each ends at once with one line and status 75, leaves no temp file and no
    partial checkpoint; the first resumes to the same end."""
    for name, extra, signals in (("twice", (), 2), ("grace", ("run.preempt_grace=0",), 1)):
        proc = subprocess.Popen(_pretrain(digits, tmp_path, name, *extra), env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        run = tmp_path / name
        _wait_for(run / "ckpt-00000011.pth", proc)
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.002)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == PREEMPTED_EXIT, err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(("stopped: ", "stopped at once")), err
        assert not list(run.glob(".*.tmp"))
        for path in run.glob("*.pth"):
            read_checkpoint(path)  # every file there is whole
        if name == "twice":
            subprocess.run([*_pretrain(digits, tmp_path, name), "--resume", "auto"], check=True, env=ENV,
                           capture_output=True, timeout=300)
            _same_run(whole, run / "final.pth")


def test_outside_a_training_loop_a_signal_stops_at_once_and_inside_it_is_a_request() -> None:
    with StopSignals(["SIGTERM"], grace=60) as stop:
        with pytest.raises(StopNow, match="stopped by SIGTERM outside the training loop") as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert info.value.exit_status == PREEMPTED_EXIT and stop.requested is None
        with at_step_boundaries():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.requested == requested_stop() == "SIGINT" and exit_status(stop.requested) == INTERRUPTED_EXIT
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was
    with pytest.raises(ValueError, match="'SIGKILL' is not a signal a process can handle"):
        StopSignals(["SIGKILL"], grace=1)


def _rank(rank: int, world: int, port: int, digits: tuple[str, str], out: str, name: str, resume: bool) -> None:
    """One rank of a 2-rank gloo run, as the entry point runs it (StopSignals around the stage); what ended it is
    written to out/name-rank.txt."""
    from crate_mae.config import load_config
    from crate_mae.stages.pretrain import run_pretrain

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    overrides = _args(digits, Path(out), name, "data.batch_size=16", "data.num_workers=0")[1:]
    cfg = load_config(ROOT / "configs/pretrain/demo.yaml", overrides + (["run.resume=auto"] if resume else []))
    outcome = "finished"
    try:
        with StopSignals(cfg.run.preempt_signals, grace=cfg.run.preempt_grace):
            run_pretrain(cfg)
    except Preempted as err:
        outcome = f"{err.exit_status} {err}"
    Path(out, f"{name}-{rank}.txt").write_text(outcome)


def _two_ranks(port: int, digits, out: Path, name: str, resume: bool = False, signal_rank: int | None = None) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, 2, port, digits, str(out), name, resume)) for r in range(2)]
    for p in procs:
        p.start()
    if signal_rank is not None:
        deadline = time.time() + 120
        while not (out / name / "ckpt-00000011.pth").exists() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(procs[signal_rank].pid, signal.SIGTERM)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def test_two_ranks_one_signalled_stop_at_the_same_step_and_resume_bit_identical(digits, free_port: int,
                                                                               tmp_path: Path) -> None:
    _two_ranks(free_port, digits, tmp_path, "whole")
    _two_ranks(free_port + 1, digits, tmp_path, "cut", signal_rank=1)
    outcomes = [(tmp_path / f"cut-{r}.txt").read_text() for r in range(2)]
    steps = {o.split("after step ")[1].split("/")[0] for o in outcomes}
    assert all(o.startswith(f"{PREEMPTED_EXIT} stopped by ") for o in outcomes) and len(steps) == 1, outcomes
    assert "SIGTERM" in outcomes[1] and "another rank's signal" in outcomes[0]
    step = int(steps.pop())
    assert 11 <= step < 46 and (tmp_path / "cut" / f"ckpt-{step:08d}.pth").exists()
    _two_ranks(free_port + 2, digits, tmp_path, "cut", resume=True)
    _same_run(tmp_path / "whole" / "final.pth", tmp_path / "cut" / "final.pth")
