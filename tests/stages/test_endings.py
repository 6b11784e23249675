"""Every way a run ends ends the process promptly while DataLoader workers are alive (data.num_workers=2), also under
torchrun with 2 ranks. Before, a run stopped by the bad-sample rule hung for good in multiprocessing's exit handler:
it ends daemonic children with SIGTERM, which the workers ignore (for preemption), then joins them, and PyTorch skips
its own shutdown once Python exits. Each run here is a subprocess with a deadline, so that a hang fails the test.
A finished run, and a stop by SIGTERM, SIGUSR1 or Ctrl-C sent to the process, with 2 workers and a deadline too, are
tests/stages/test_preempt.py's; here the stop signal goes to the whole process group, workers included."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crate_mae.data.manifest import Manifest, ShardInfo, write_manifest
from tests.helpers import good_sample, write_tar_set

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DEADLINE = 90  # seconds: a run here takes a few; one that hangs is killed at this point and fails its test


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 shards of 30 samples, every third image corrupt: far past data.max_bad_fraction."""
    samples = [good_sample(i) for i in range(120)]
    for i in range(0, 120, 3):
        samples[i]["jpg"] = b"not a jpeg"
    return write_tar_set(tmp_path_factory.mktemp("bad"), "train", [samples[k:k + 30] for k in range(0, 120, 30)])


def _pretrain(train: str, val: str, out: Path, *extra: str) -> list[str]:
    """The nano model, 8 steps of 8 images an epoch, 2 data workers, a log line every step."""
    return [str(ROOT / "pretrain.py"), "--set", "model.variant=nano", f"data.train_shards={train}",
            f"data.val_shards={val}", "data.batch_size=8", "data.num_workers=2", "data.shuffle_buffer=16",
            "data.train_samples=64", "optim.epochs=1", "optim.warmup_epochs=0", f"run.out_dir={out}", "run.name=r",
            "run.log_every=1", "run.ckpt_every=1000", "monitor.every=0", *extra]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its ranks in sessions of their own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *_descendants(child)]
    return found


def _end(cmd: list[str], tmp_path: Path, *, signal_at: Path | None = None,
         sig: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
    """(exit status, stderr) of `cmd`, run in its own process group; with `signal_at`, `sig` is sent to the whole group
    (as a terminal's Ctrl-C or a cluster does) once that file exists. Past DEADLINE the group is killed: a failure."""
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, *cmd], env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + DEADLINE
            while signal_at is not None and not signal_at.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, f"{signal_at} never came:\n{log.read_text()}"
                time.sleep(0.01)
            if signal_at is not None:
                os.killpg(proc.pid, sig)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, AssertionError):
            for pid in [proc.pid, *_descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the run did not end within {DEADLINE} s:\n{log.read_text()[-4000:]}")
    return proc.returncode, log.read_text()


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_a_bad_data_stop_ends_and_names_the_first_skipped_samples_then_counts_them(bad_set: str, digits,
                                                                                  tmp_path: Path) -> None:
    status, err = _end(_pretrain(bad_set, digits[1], tmp_path), tmp_path)
    assert status == 1 and _last_line(err).startswith("error: ") and "samples were bad" in _last_line(err), err
    skipped = [line for line in err.splitlines() if "crate_mae.data: skipped " in line]
    assert len(skipped) == 5, err  # then one line with the count (not one line per sample)
    assert sum("samples read so far were unusable and skipped (5 named above)" in line for line in err.splitlines())


def test_a_missing_shard_ends(digits, tmp_path: Path) -> None:
    spec = tmp_path / "gone.json"
    write_manifest(Manifest("train", [ShardInfo(f"pipe:cat {tmp_path}/gone-{n}.tar", 40) for n in range(2)]), spec)
    status, err = _end(_pretrain(str(spec), digits[1], tmp_path, "data.read_retries=0"), tmp_path)
    assert status == 1 and "cannot read the shard (the command exited with status 1)" in _last_line(err), err


def test_an_error_in_the_main_thread_ends(digits, tmp_path: Path) -> None:
    status, err = _end(_pretrain(*digits, tmp_path, "optim.lr=1e12"), tmp_path)
    assert status == 1 and _last_line(err).startswith("error: ") and "finite" in _last_line(err), err


def test_a_preemption_of_the_process_group_ends(digits, tmp_path: Path) -> None:
    cmd = _pretrain(*digits, tmp_path, "data.train_samples=2048", "run.ckpt_every=2")
    got, err = _end(cmd, tmp_path, signal_at=tmp_path / "r" / "ckpt-00000002.pth", sig=signal.SIGTERM)
    assert got == 75 and _last_line(err).startswith("stopped: stopped by SIGTERM after step "), err


def test_a_bad_data_stop_under_torchrun_ends_every_rank_and_torchrun(bad_set: str, digits, tmp_path: Path) -> None:
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_pretrain(bad_set, digits[1], tmp_path)]
    status, err = _end(cmd, tmp_path)
    assert status != 0 and sum(line.startswith("error: ") and "samples were bad" in line
                               for line in err.splitlines()) == 2, err
