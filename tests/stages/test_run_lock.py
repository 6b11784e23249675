"""The run folder's lock (issue 22): two runs started into one folder used to both train to the end with exit 0, each
overwriting the other's checkpoints, logs and encoder.pth. Now the first holds `run.lock` until it ends, however it
ends; a second is refused in one line naming host, pid and start; a dead run's lock is taken over with a line.

The tests through a run or a command fail against the code before the lock (there both runs train, no run is refused,
no line is printed, a read-only folder ends in a PermissionError's traceback); the RunLock tests pin the rules they
rely on: how a lock is judged dead, and that of many runs starting at one instant exactly one gets the folder."""
from __future__ import annotations

import dataclasses
import json
import os
import re
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
from crate_mae.engine.runlock import LOCK_NAME, Holder, RunLock
from crate_mae.errors import RunFolderError
from crate_mae.model.mae import CrateMAE
from crate_mae.stages.pretrain import run_pretrain
from tests.helpers import join_ranks

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
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
def holder(run: Path) -> Iterator[subprocess.Popen]:
    """A live process of this machine holding `run`'s lock while the block runs (released when its stdin closes)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=ENV)
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


def plant(run: Path, raw: bytes, *, age: float = 0.0) -> Path:
    """A lock file holding `raw`, last touched `age` seconds ago."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_NAME
    path.write_bytes(raw)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def leftovers(run: Path) -> list[str]:
    """The lock's own files in `run`: the lock, a contender's temp file, a stale file moved away."""
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


def test_a_killed_runs_lock_is_taken_over_by_its_resume(digits, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    proc = subprocess.Popen(pretrain_cmd(digits, tmp_path), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = tmp_path / "t"
    deadline = time.time() + 120
    while not (run / "ckpt-00000010.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert (run / "ckpt-00000010.pth").exists() and not (run / "final.pth").exists(), "the run was not cut mid-way"
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind by the kill

    result = run_pretrain(tiny(digits, tmp_path, "run.resume=auto"))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("run folder lock: "))
    assert line.startswith(f"run folder lock: took over {run / LOCK_NAME} from pretrain pid {proc.pid} on host {HOST}")
    assert line.endswith(f"its process {proc.pid} is gone (the run was killed or crashed)")
    events = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e.get("event") == "lock_taken_over"] == [line]
    assert result.steps == 46 and (run / "final.pth").exists() and leftovers(run) == []


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


@pytest.mark.parametrize("raw", [b"", b"\x00\x17garbage", b'{"host": "' + HOST.encode() + b'", "pi',
                                 b'{"host": "x", "pid": 0}', b"[1, 2]", b'{"host": "x", "pid": 99999999999999}'],
                         ids=["empty", "binary", "cut-json", "pid-0", "not-an-object", "pid-too-large"])
def test_an_empty_or_garbled_lock_is_waited_for_briefly_then_taken_over(tmp_path: Path, raw: bytes) -> None:
    """A crash between creating a lock and writing it (or a file damaged by hand): its holder would have written it
    within microseconds, so once it is a few seconds old it is a dead start's; younger, it is waited for."""
    run = tmp_path / "run"
    plant(run, raw)
    start = time.monotonic()
    lock = RunLock.acquire(run, unreadable_grace=0.6)
    assert time.monotonic() - start >= 0.5  # it waited for the young file to be written
    assert lock.took_over is not None and "(no holder named in it)" in lock.took_over
    assert ("has been empty for" if raw == b"" else "has been garbled (no JSON naming a host and a pid) for") \
        in lock.took_over
    assert Holder.parse((run / LOCK_NAME).read_bytes()) == lock.holder
    lock.release()
    assert leftovers(run) == []


def test_an_old_garbled_lock_does_not_stop_a_run(digits, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plant(tmp_path / "t", b"", age=60)
    assert run_pretrain(tiny(digits, tmp_path)).steps == 46
    said = f"run folder lock: took over {tmp_path / 't' / LOCK_NAME} (no holder named in it): it has been empty for "
    assert re.search(re.escape(said) + r"6\d s \(a run killed while taking it\)", capsys.readouterr().out)
    assert leftovers(tmp_path / "t") == []


def test_another_machines_lock_is_judged_by_its_heartbeat(digits, tmp_path: Path) -> None:
    """Its pid cannot be checked from here: refused while it was touched within STALE_AFTER, naming the host and how
    to clear it; taken over once older. A container of this machine with its own pids counts as another machine."""
    run = tmp_path / "t"
    elsewhere = dataclasses.replace(Holder.this_process("pretrain"), host="node-elsewhere", pid=4242, boot_id="b")
    for other, age in [(elsewhere, 30), (dataclasses.replace(elsewhere, host=HOST, pid=dead_pid(), pid_ns="pid:[1]"),
                                         90)]:
        plant(run, other.to_bytes(), age=age)
        with pytest.raises(RunFolderError) as caught:
            run_pretrain(tiny(digits, tmp_path, "run.resume=auto"))
        message = str(caught.value)
        assert message.startswith(f"{run} is in use by another run: pretrain pid {other.pid} on host {other.host} "), \
            message
        said = re.search(r"its lock touched (\d+) s ago; if that run is dead, delete (\S+) \(taken over by itself "
                         r"after 10 min untouched\)", message)
        assert said and age <= int(said[1]) < age + 10 and said[2] == str(run / LOCK_NAME), message
    plant(run, elsewhere.to_bytes(), age=11 * 60)
    lock = RunLock.acquire(run)
    assert lock.took_over == (f"run folder lock: took over {run / LOCK_NAME} from {elsewhere.describe()}: untouched "
                              f"for 11 min (a live run touches it every 30 s)")
    lock.release()
    assert leftovers(run) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path: Path) -> None:
    """The holder's pid now runs another program (this test's own process, started at another time)."""
    me = Holder.this_process("pretrain")
    plant(tmp_path / "run", dataclasses.replace(me, proc_start=me.proc_start - 1).to_bytes())
    lock = RunLock.acquire(tmp_path / "run")
    assert lock.took_over.endswith(f"pid {os.getpid()} now belongs to another program (the run was killed or crashed)")
    lock.release()


def test_the_heartbeat_keeps_the_lock_fresh_and_notices_a_takeover(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    lock = RunLock.acquire(run, heartbeat=0.05)
    path = run / LOCK_NAME
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 5  # touched again
    thief = dataclasses.replace(Holder.this_process("finetune"), host="node-elsewhere", pid=99)
    (run / "thief").write_bytes(thief.to_bytes())
    os.replace(run / "thief", path)  # whole at once, as a lock is taken (a heartbeat never reads it half-written)
    deadline = time.time() + 10
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.02)
    assert lock.lost == (f"warning: {path} is no longer this run's lock (it is now {thief.describe()}'s): another run "
                         f"may be writing into {run}")
    assert lock.lost in capsys.readouterr().err
    lock.release()
    assert Holder.parse(path.read_bytes()) == thief  # never removes another run's lock


@pytest.mark.parametrize("stale", [False, True], ids=["no-lock", "dead-runs-lock"])
def test_exactly_one_of_many_runs_starting_at_once_takes_the_folder(tmp_path: Path, stale: bool) -> None:
    """Six processes released at one instant onto the same folder, free or held by a dead run: one wins, the five
    others are refused naming it (none takes over the winner's fresh lock), and nothing is left behind."""
    for attempt in range(3):
        run, go, end = tmp_path / f"run{attempt}", tmp_path / f"go{attempt}", tmp_path / f"end{attempt}"
        if stale:
            plant(run, dataclasses.replace(Holder.this_process("pretrain"), pid=dead_pid(), proc_start=None).to_bytes())
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
                                                                capture_output=True).returncode:
                pytest.skip("this user writes into read-only folders and cannot make one immutable")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
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
