"""The run folder's lock (issue 22): two runs started into one folder used to both train to the end with exit 0, each
overwriting the other's checkpoints, logs and encoder.pth. Now the first holds `run.lock` until it ends, however it
ends; a second is refused in one line naming host, pid and start; a dead run's lock is taken over with a line: one of
this host whose process is gone, or one of this scheduler job (issue 28: a SLURM requeue after a hard kill, on another
node, was refused for ten minutes).

The tests through a run or a command fail against the code before the lock (there both runs train, no run is refused,
no line is printed, a read-only folder ends in a PermissionError's traceback); the RunLock tests pin the rules they
rely on: how a lock is judged dead, and that of many runs starting at once exactly one gets the folder."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from crate_mae.config import load_config
from crate_mae.engine.runlock import LOCK_NAME, RunLock
from crate_mae.errors import RunFolderError
from crate_mae.model.mae import CrateMAE
from crate_mae.stages.pretrain import run_pretrain
from tests.helpers import join_ranks

ROOT = Path(__file__).resolve().parents[2]
SCHEDULER = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
ENV = {**{k: v for k, v in os.environ.items() if k not in SCHEDULER}, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
HOST = socket.gethostname()

# A holder in another process: takes the lock, says so, holds it until its stdin closes, then releases it.
HOLD = """
import sys
from crate_mae.engine.runlock import RunLock
lock = RunLock.acquire(sys.argv[1], stage="holder")
print("held", flush=True)
sys.stdin.read()
lock.release()
"""

# A contender of the race: waits for the start file, takes the lock or is refused, holds it until the end file.
RACE = """
import sys, time
from pathlib import Path
from crate_mae.engine.runlock import RunLock
from crate_mae.errors import RunFolderError
run, go, end = sys.argv[1:4]
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.0005)
try:
    lock = RunLock.acquire(run, stage="race")
except RunFolderError as err:
    print("refused", err, flush=True)
    sys.exit(1)
print("won", flush=True)
while not Path(end).exists():
    time.sleep(0.01)
lock.release()
"""


def overrides(digits: tuple[str, str], out: Path) -> list[str]:
    """The nano model on the digits demo, one epoch of 46 steps (seconds on a CPU), a checkpoint every 10."""
    return ["model.variant=nano", f"data.train_shards={digits[0]}", f"data.val_shards={digits[1]}",
            "data.batch_size=32", "data.num_workers=0", "data.shuffle_buffer=64", "optim.epochs=1",
            "optim.warmup_epochs=0.2", f"run.out_dir={out}", "run.name=t", "run.log_every=5", "run.ckpt_every=10",
            "monitor.every=0"]


def tiny(digits: tuple[str, str], out: Path, *extra: str):
    return load_config(ROOT / "configs/pretrain/demo.yaml", [*overrides(digits, out), *extra])


def pretrain_cmd(digits: tuple[str, str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "pretrain.py"), "--set", *overrides(digits, out), *extra]


@contextmanager
def holder(run: Path, **env: str) -> Iterator[subprocess.Popen]:
    """A live process of this machine (with `env` set) holding `run`'s lock while the block runs (released when its
    stdin closes)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**ENV, **env})
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


def dead_pid() -> int:
    """The pid of a process of this machine that ran and has ended (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(autouse=True)
def no_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process runs in no scheduler job unless a test says so (the suite itself may run in one)."""
    for name in SCHEDULER:
        monkeypatch.delenv(name, raising=False)


def plant(run: Path, **fields: object) -> Path:
    """A lock as a run of this process writes it, with `fields` changed."""
    holder = {"host": HOST, "pid": os.getpid(), "user": "ana", "job": None, "started": "2025-01-02 03:04:05+0100",
              "stage": "pretrain", "command": "pretrain.py", "token": "0", **fields}
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps(holder))
    return run / LOCK_NAME


def leftovers(run: Path) -> list[str]:
    """The lock's own files in `run`: the lock, a contender's claim file."""
    return sorted(p.name for p in run.glob("*") if "run.lock" in p.name) if run.exists() else []


def test_two_runs_started_at_once_into_one_folder_exactly_one_trains(digits, tmp_path: Path) -> None:
    procs = [subprocess.Popen(pretrain_cmd(digits, tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], (codes, outs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    out, err = outs[loser]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {tmp_path / 't'} is in use by another run: pretrain pid {procs[winner].pid} "
                               f"on host {HOST} (user "), lines[0]
    assert ", started " in lines[0] and "still running on this machine" in lines[0] and "run.name=NAME" in lines[0]
    assert "step " not in out  # the loser trained nothing
    run = tmp_path / "t"
    assert (run / "final.pth").exists() and (run / "encoder.pth").exists() and leftovers(run) == []
    assert sum(json.loads(line).get("step") == 5 for line in (run / "log.jsonl").read_text().splitlines()) == 1


def test_a_requeued_job_takes_over_the_lock_its_killed_run_left_on_another_node(
        digits, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28: SLURM requeues a job killed hard (past the signal's grace, a node failure, an OOM kill) as the same
    job, usually on another node, within a minute or two. Its lock is taken over at once, in one line; another job
    (or none) is refused in one line naming the job and how to take over by hand."""
    proc = subprocess.Popen(pretrain_cmd(digits, tmp_path), env={**ENV, "SLURM_JOB_ID": "4242"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "t"
    deadline = time.time() + 120
    while not (run / "ckpt-00000010.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=30)
    assert (run / "ckpt-00000010.pth").exists() and not (run / "final.pth").exists(), "the run was not cut mid-way"
    left = json.loads((run / LOCK_NAME).read_text())
    assert left["pid"] == proc.pid and left["job"] == "4242"  # left behind by the kill
    (run / LOCK_NAME).write_text(json.dumps({**left, "host": "node-a"}))  # as if it ran on another node

    for job in (None, "4243"):
        if job is not None:
            monkeypatch.setenv("SLURM_JOB_ID", job)
        with pytest.raises(RunFolderError) as caught:
            run_pretrain(tiny(digits, tmp_path, "run.resume=auto"))
        assert str(caught.value) == (
            f"{run} is in use by another run: pretrain pid {proc.pid} on host node-a (user {left['user']}, job 4242), "
            f"started {left['started']}: `{left['command']}`, on another machine; if that run is dead, delete "
            f"{run / LOCK_NAME} to take the folder over, or start this one elsewhere with --set run.name=NAME")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    result = run_pretrain(tiny(digits, tmp_path, "run.resume=auto"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("run folder lock: "))
    assert line == (f"run folder lock: took over {run / LOCK_NAME} from pretrain pid {proc.pid} on host node-a (user "
                    f"{left['user']}, job 4242), started {left['started']}: `{left['command']}`: it is this job's own "
                    f"(job 4242), started again after its run ended")
    events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e.get("event") == "lock_taken_over"] == [line]
    assert result.steps == 46 and (run / "final.pth").exists() and leftovers(run) == []


@pytest.mark.parametrize("variable", ["SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"])
def test_the_same_job_takes_its_lock_over_unless_its_process_lives_here(tmp_path: Path, variable: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, "77")
    plant(tmp_path / "run", host="node-a", pid=4711, job="77")
    lock = RunLock.acquire(tmp_path / "run")
    assert lock.took_over.endswith(": it is this job's own (job 77), started again after its run ended")
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["job"] == "77"
    lock.release()
    with holder(tmp_path / "run", **{variable: "77"}) as proc:  # a live process of this host: still running
        with pytest.raises(RunFolderError, match=f"holder pid {proc.pid} on host {HOST} .*job 77.*still running"):
            RunLock.acquire(tmp_path / "run")
    assert leftovers(tmp_path / "run") == []


def test_torchruns_run_id_none_names_no_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun without --rdzv-id gives every job the run id 'none': no job's lock is another's."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    plant(tmp_path / "run", host="node-a", pid=4711, job="none")
    with pytest.raises(RunFolderError, match="on host node-a .*, on another machine; if that run is dead, delete"):
        RunLock.acquire(tmp_path / "run")
    lock = RunLock.acquire(tmp_path / "other")
    assert json.loads(lock.path.read_text())["job"] is None
    lock.release()


def test_a_dead_process_of_this_host_leaves_a_lock_that_is_taken_over(tmp_path: Path) -> None:
    pid = dead_pid()
    plant(tmp_path / "run", pid=pid)
    lock = RunLock.acquire(tmp_path / "run", stage="linear_probe")
    assert lock.took_over == (f"run folder lock: took over {tmp_path / 'run' / LOCK_NAME} from pretrain pid {pid} on "
                              f"host {HOST} (user ana), started 2025-01-02 03:04:05+0100: `pretrain.py`: its process "
                              f"{pid} is gone (the run was killed or crashed)")
    assert json.loads(lock.path.read_text())["stage"] == "linear_probe"
    lock.release()
    assert leftovers(tmp_path / "run") == []


def test_a_live_run_refuses_a_second_start_and_a_resume(digits, tmp_path: Path) -> None:
    run = tmp_path / "t"
    run_pretrain(tiny(digits, tmp_path))
    assert leftovers(run) == []  # released at the end
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    with holder(run) as proc:
        for extra in (["run.resume=auto"], ["run.resume=auto", "optim.lr=1e-3"]):
            with pytest.raises(RunFolderError) as caught:
                run_pretrain(tiny(digits, tmp_path, *extra))
            message = str(caught.value)
            assert message.startswith(f"{run} is in use by another run: holder pid {proc.pid} on host {HOST}"), message
            assert f"kill {proc.pid}" in message and "\n" not in message
        assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != LOCK_NAME} == before  # untouched
        fresh = tmp_path / "fresh"
        with holder(fresh):
            with pytest.raises(RunFolderError, match="is in use by another run"):
                run_pretrain(tiny(digits, tmp_path, "run.name=fresh"))
            assert leftovers(fresh) == [LOCK_NAME] and len(list(fresh.iterdir())) == 1  # nothing written
    result = run_pretrain(tiny(digits, tmp_path, "run.resume=auto"))  # the holder ended: the finished run resumes
    assert result.steps == 46 and leftovers(run) == []


@pytest.mark.parametrize("error", [RuntimeError("a bug"), SystemExit(75), KeyboardInterrupt()],
                         ids=["exception", "SystemExit", "KeyboardInterrupt"])
def test_the_lock_is_held_during_the_run_and_released_however_it_ends(digits, tmp_path: Path, error: BaseException,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss, seen = CrateMAE.loss, {"steps": 0, "holder": None}

    def failing(self, img, pred, mask):  # the 3rd step's loss ends the run as `error` does
        seen["steps"] += torch.is_grad_enabled()
        if seen["steps"] == 3:
            seen["holder"] = json.loads((tmp_path / "t" / LOCK_NAME).read_text())
            raise error
        return real_loss(self, img, pred, mask)

    monkeypatch.setattr(CrateMAE, "loss", failing)
    with pytest.raises(type(error)):
        run_pretrain(tiny(digits, tmp_path))
    assert seen["holder"]["pid"] == os.getpid() and seen["holder"]["stage"] == "pretrain"
    assert leftovers(tmp_path / "t") == []
    RunLock.acquire(tmp_path / "t").release()


@pytest.mark.parametrize("raw", [b"", b"\x00\x17garbage", b'{"host": "x", "pi', b'{"host": "x", "pid": 0}', b"[1, 2]",
                                 b'{"host": "x", "pid": 99999999999999}'],
                         ids=["empty", "binary", "cut-json", "pid-0", "not-an-object", "pid-too-large"])
def test_a_lock_that_names_no_run_is_refused_with_the_way_out(tmp_path: Path, raw: bytes) -> None:
    """Empty or garbled: a run killed between making it and writing it, one being written this instant, or a file
    damaged by hand. Which it is cannot be told, so the line says how to take over by hand."""
    path = tmp_path / "run" / LOCK_NAME
    path.parent.mkdir()
    path.write_bytes(raw)
    with pytest.raises(RunFolderError) as caught:
        RunLock.acquire(tmp_path / "run")
    assert str(caught.value) == (f"{tmp_path / 'run'} is in use by another run, whose lock {path} names no run this "
                                 f"user can read; if no run uses the folder, delete {path}, or start this one "
                                 f"elsewhere with --set run.name=NAME")
    path.unlink()
    RunLock.acquire(tmp_path / "run").release()


def test_another_hosts_lock_of_no_job_is_refused_with_the_way_out(digits, tmp_path: Path) -> None:
    """Its pid cannot be checked from here, and nothing else tells a dead run from a live one: refused, naming the
    host and how to take the folder over by hand, whatever the lock's age."""
    run = tmp_path / "t"
    path = plant(run, host="node-elsewhere", pid=4242)
    os.utime(path, (time.time() - 86400, time.time() - 86400))
    with pytest.raises(RunFolderError) as caught:
        run_pretrain(tiny(digits, tmp_path, "run.resume=auto"))
    assert str(caught.value) == (f"{run} is in use by another run: pretrain pid 4242 on host node-elsewhere (user "
                                 f"ana), started 2025-01-02 03:04:05+0100: `pretrain.py`, on another machine; if that "
                                 f"run is dead, delete {path} to take the folder over, or start this one elsewhere "
                                 f"with --set run.name=NAME")
    path.unlink()  # the way out it names
    assert run_pretrain(tiny(digits, tmp_path)).steps == 46 and leftovers(run) == []


def test_a_lock_replaced_during_the_run_is_left_to_its_new_holder(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    lock = RunLock.acquire(run)
    path = plant(run, host="node-elsewhere", pid=99)  # deleted by hand and taken by another run
    lock.release()
    assert json.loads(path.read_text())["host"] == "node-elsewhere"  # never removes another run's lock
    assert capsys.readouterr().err == (f"warning: could not release {path} (it is no longer this run's); delete it if "
                                       f"no run writes into {run}\n")


@pytest.mark.parametrize("stale", [False, True], ids=["no-lock", "dead-runs-lock"])
def test_exactly_one_of_many_runs_starting_at_once_takes_the_folder(tmp_path: Path, stale: bool) -> None:
    """Six processes released at one instant onto the same folder, free or held by a dead run: one wins, the five
    others are refused naming it (none takes over the winner's fresh lock), and nothing is left behind."""
    for attempt in range(3):
        run, go, end = tmp_path / f"run{attempt}", tmp_path / f"go{attempt}", tmp_path / f"end{attempt}"
        if stale:
            plant(run, pid=dead_pid())
        procs = [subprocess.Popen([sys.executable, "-c", RACE, str(run), str(go), str(end)], stdout=subprocess.PIPE,
                                  text=True, env=ENV) for _ in range(6)]
        try:
            assert all(p.stdout.readline().strip() == "ready" for p in procs)
            go.touch()
            results = {p.pid: p.stdout.readline().strip() for p in procs}
        finally:
            end.touch()
        assert all(p.wait(timeout=30) in (0, 1) for p in procs)
        winners = [pid for pid, line in results.items() if line == "won"]
        assert len(winners) == 1, results
        refused = [line for line in results.values() if line != "won"]
        assert all(line.startswith(f"refused {run} is in use by another run: race pid {winners[0]} on host {HOST}")
                   for line in refused), refused
        assert leftovers(run) == []


def _refused_rank(rank: int, world: int, port: int, digits: tuple[str, str], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        run_pretrain(tiny(digits, Path(out)))
        message = "trained"
    except RunFolderError as err:
        message = str(err)
    Path(out, f"rank{rank}.txt").write_text(message)


def test_every_rank_stops_with_rank_0s_line(digits, free_port: int, tmp_path: Path) -> None:
    """Under torchrun only rank 0 takes the lock; its answer reaches every rank, so none trains alone or waits in a
    collective for a rank that left."""
    with holder(tmp_path / "t") as proc:
        join_ranks(_refused_rank, (2, free_port, digits, str(tmp_path)))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] and f"holder pid {proc.pid} on host {HOST}" in messages[0], messages


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` read-only for this process: by its mode, or for root (whom modes do not stop) immutable."""
    folder.chmod(0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                                capture_output=True, timeout=30).returncode:
                pytest.skip("this user writes into read-only folders and cannot make one immutable")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True, timeout=30)
        folder.chmod(0o755)


def test_a_folder_that_cannot_be_written_is_one_line(digits, tmp_path: Path) -> None:
    run = tmp_path / "t"
    run_pretrain(tiny(digits, tmp_path))
    with read_only(run):
        with pytest.raises(RunFolderError) as caught:
            run_pretrain(tiny(digits, tmp_path, "run.resume=auto"))
    message = str(caught.value)
    assert message.startswith(f"{run}: cannot write in the run folder (") and "run.out_dir=DIR" in message, message
    assert "\n" not in message and leftovers(run) == []
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RunFolderError, match=r"file/t: cannot write in the run folder \(Not a directory\)"):
        run_pretrain(tiny(digits, tmp_path / "file"))
