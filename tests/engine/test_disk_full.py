"""A save that cannot be written (a full disk, a file size limit, a read-only or vanished run folder) ends in one
line naming the file and the cause, a `WriteError` (a `DiskFullError` for no room, with the free bytes and about the
bytes needed), and loses nothing: the earlier files stay byte-identical and no temp file is left. A kill during a
save leaves the old file or the complete new one.

The faults are the kernel's own wherever this machine allows: a 1 MiB tmpfs mounted in a private mount namespace of a
child process (root, or an unprivileged user namespace), a file size limit (RLIMIT_FSIZE) of a child, /dev/full, a
read-only bind mount, a 0555 folder (as root: written by a child without root's permission override). Each test runs this file as the child:
`python tests/engine/test_disk_full.py MODE FOLDER` prints what the save raised and what the folder held, as JSON.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import crate_mae.atomic
from crate_mae.atomic import (DiskFullError, WriteError, atomic_path, atomic_write, remove_stale_temp_files, size_text,
                              write_error)
from crate_mae.engine.checkpoint import Checkpointer
from crate_mae.engine.dist import Dist
from crate_mae.model.files import save, save_safetensors

ROOT = Path(__file__).resolve().parents[2]
CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
KEEP = "ckpt-00000001.pth"  # the earlier checkpoint every test expects to find as it was


# ---- what the child process does (also used in-process) ----

def tiny_state(width: int) -> dict[str, Any]:
    """A trainer's state after one step of a Linear(width, width) with AdamW: model and optimiser tensors, position.
    width 16 is a few KiB; width 512 is 3 MiB (weight, exp_avg, exp_avg_sq)."""
    model = torch.nn.Linear(width, width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, width)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "state": {"step": 1, "epoch": 0, "batch_in_epoch": 1}}


def checkpointer(run: Path) -> Checkpointer:
    return Checkpointer(run, every=1, keep_last=3, config={"model": {"family": "mae"}}, dist=CPU)


def tree(folder: Path) -> dict[str, str]:
    """Every file in `folder` (hidden temp files too) by name, with its sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def outcome(fn: Any) -> dict[str, Any] | None:
    """What `fn()` raised, as plain values (None: nothing)."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test reads every kind, today's RuntimeError included
        return {"type": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__], "message": str(err),
                "errno": getattr(err, "errno", None), "free": getattr(err, "free", None),
                "needed": getattr(err, "needed", None)}
    return None


def write_earlier(run: Path) -> None:
    checkpointer(run).save(KEEP, tiny_state(16))


def try_saves(run: Path, width: int) -> dict[str, Any]:
    """Saves that should fail: a raw `save` of a new file and one over the earlier file, the Checkpointer's
    collective save of a new periodic file and a safetensors export (3 tensors of width²). With the folder's files before and after, and what torch would write."""
    big = tiny_state(width)
    before = tree(run)
    buf = io.BytesIO()
    torch.save(big, buf)

    tries = {"new": outcome(lambda: save(run / "ckpt-00000002.pth", big)),
             "over": outcome(lambda: save(run / KEEP, big)),
             "checkpointer": outcome(lambda: checkpointer(run).save("ckpt-00000002.pth", big)),
             "safetensors": outcome(lambda: save_safetensors({k: torch.zeros(width, width) for k in "abc"},
                                                             {"model": {}}, run / "encoder.safetensors"))}
    return {"tries": tries, "before": before, "after": tree(run), "actual": len(buf.getvalue())}


FILES = {"new": "ckpt-00000002.pth", "over": KEEP, "checkpointer": "ckpt-00000002.pth",
         "safetensors": "encoder.safetensors"}


def child(mode: str, folder: str) -> None:
    torch.set_num_threads(1)
    run = Path(folder) / "run"
    if mode == "both":
        write_earlier(run)
    if os.environ.get("FSIZE"):  # a file size limit from here on: the kernel's EFBIG (and SIGXFSZ, ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["FSIZE"]), resource.RLIM_INFINITY))
    if mode in ("fail", "both"):
        print(json.dumps(try_saves(run, int(os.environ.get("WIDTH", "512")))))
    if mode == "kill":  # a kill mid-write: the write stops (for the parent's SIGKILL) once 512 KiB are written
        save(run / "final.pth", {"model": {"w": torch.full((256, 1024), 1.0)}})

        class Stalling(io.FileIO):
            def write(self, data: Any) -> int:
                n = super().write(data)
                if self.tell() > 512 << 10:
                    print("mid-write", flush=True)
                    time.sleep(60)
                return n

        crate_mae.atomic.open = Stalling  # the file atomic_write opens (the module's name shadows the builtin)
        save(run / "final.pth", {"model": {"w": torch.full((256, 1024), 2.0)}})
    if mode == "loop":  # saves for ever, alternately 1s and 2s: the parent kills it at a random moment
        value = 1.0
        while True:
            save(run / "final.pth", {"model": {"w": torch.full((256, 1024), value)}})
            print("saved", flush=True)
            value = 3.0 - value


def run_child(mode: str, folder: Path, *, prefix: list[str] | None = None, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """This file as a child process (after `prefix`: unshare and a shell that mounts, or setpriv); its JSON on
    stdout."""
    cmd = [*(prefix or []), sys.executable, str(Path(__file__).resolve()), mode, str(folder)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=timeout)


def report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- a private mount namespace with a small tmpfs, where this machine allows one ----

def _unshare() -> list[str]:
    return ["unshare", "-m", "--propagation", "private"] if os.geteuid() == 0 else \
        ["unshare", "-r", "-m", "--propagation", "private"]


def _in_namespace(shell: str) -> list[str]:
    """A prefix for run_child: a private mount namespace in which `shell` runs first, then the child; the mounts
    vanish with the child, also when it is killed. In `shell`, "$3" is the child's folder ($0 python, $1 this
    file, $2 the mode)."""
    return [*_unshare(), "sh", "-c", shell + ' && exec "$0" "$@"']


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips the test where this machine lets no process mount a tmpfs in a namespace of its own."""
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` here: cannot mount a small tmpfs to fill")
    probe = tmp_path_factory.mktemp("probe")
    try:
        proc = subprocess.run([*_unshare(), "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(probe)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot make a private mount namespace: {err}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace (needs root or user namespaces): "
                    f"{proc.stderr.strip()}")


def _tmpfs(size: str) -> list[str]:
    """The child's folder becomes a tmpfs of `size` (bytes, or 1m)."""
    return _in_namespace(f'mount -t tmpfs -o size={size},mode=0777 tmpfs "$3"')


def _check_full(result: dict[str, Any], run: str, code: int, cause: str) -> None:
    """Each save of ours raised a one-line DiskFullError naming its file, `cause` and about the bytes needed; the
    earlier file is byte-identical; no temp file is left."""
    for name, got in result["tries"].items():
        assert got is not None, f"{name}: the save did not fail"
        assert got["type"] == "DiskFullError", f"{name}: {got['type']}: {got['message']}"  # today: RuntimeError
        assert {"WriteError", "CrateError", "OSError"} <= set(got["mro"])
        message = got["message"]
        assert "\n" not in message and message.startswith(f"cannot write {run}/{FILES[name]}: {cause}")
        assert got["errno"] == code
        assert got["needed"] is not None and f"about {size_text(got['needed'])} needed" in message
        assert got["needed"] > 3 << 20  # the three 1 MiB tensors at least (safetensors: 3 of 512²)
    assert result["after"] == result["before"] and KEEP in result["after"]  # byte-identical, nothing added
    assert not [n for n in result["after"] if n.endswith(".tmp")]


def test_a_full_disk_is_one_line_with_free_and_needed_bytes_and_loses_nothing(mounts: None, tmp_path: Path) -> None:
    result = report(run_child("both", tmp_path, prefix=_tmpfs("1m")))
    run = str(tmp_path / "run")
    _check_full(result, run, errno.ENOSPC, "the disk is full (")
    new = result["tries"]["new"]
    assert 0 < new["free"] < new["needed"] and f"{size_text(new['free'])} free in {run}" in new["message"]
    assert result["actual"] <= new["needed"] <= 1.5 * result["actual"]  # "about": not below what torch writes


def test_a_file_size_limit_is_named_as_such(tmp_path: Path) -> None:
    """RLIMIT_FSIZE needs no privilege: the kernel's own EFBIG, on any machine."""
    result = report(run_child("both", tmp_path, env={"FSIZE": str(256 << 10)}))
    _check_full(result, str(tmp_path / "run"), errno.EFBIG, "file too large (")


def test_a_read_only_mount_is_one_line_and_loses_nothing(mounts: None, tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_earlier(run)
    before = tree(run)
    ro = _in_namespace('mount --bind "$3/run" "$3/run" && mount -o remount,bind,ro "$3/run"')
    result = report(run_child("fail", tmp_path, prefix=ro, env={"WIDTH": "16"}))
    for name, got in result["tries"].items():
        assert got is not None and got["type"] == "WriteError", f"{name}: {got}"
        assert "\n" not in got["message"] and got["errno"] == errno.EROFS
        assert got["message"] == f"cannot write {run}/{FILES[name]}: read-only file system"
    assert tree(run) == before == result["after"]


def test_a_folder_read_only_to_the_user_is_one_line_and_loses_nothing(tmp_path: Path) -> None:
    """chmod 0555. Root ignores permissions: as root the child runs without the capabilities that let it (setpriv)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and no `setpriv` to drop CAP_DAC_OVERRIDE: root may write a 0555 folder")
        drop = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"]
    run = tmp_path / "run"
    write_earlier(run)
    before = tree(run)
    run.chmod(0o555)
    try:
        result = report(run_child("fail", tmp_path, prefix=prefix, env={"WIDTH": "16"}))
    finally:
        run.chmod(0o755)
    for name, got in result["tries"].items():
        assert got is not None and got["type"] == "WriteError", f"{name}: {got}"
        assert got["message"] == f"cannot write {run}/{FILES[name]}: permission denied"
        assert got["errno"] == errno.EACCES
    assert tree(run) == before == result["after"]


class _RemovesFolder:
    """Pickled by torch.save while the checkpoint is written: the run folder vanishes mid-save (as an `rm -r` by
    someone sharing the cluster)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self) -> tuple[Any, ...]:
        shutil.rmtree(self.folder)
        return int, (0,)


def test_a_folder_that_vanishes_during_the_save_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_earlier(run)
    with pytest.raises(WriteError) as caught:
        save(run / "ckpt-00000002.pth", {**tiny_state(16), "vanish": _RemovesFolder(run)})
    assert str(caught.value) == f"cannot write {run}/ckpt-00000002.pth: no such file or directory"
    assert caught.value.errno == errno.ENOENT and not run.exists()  # nothing was left behind, no temp file either


def test_an_error_that_is_not_the_writes_keeps_its_type(tmp_path: Path) -> None:
    """A source the writer reads is missing, or a bug: not this file's write error, so not a WriteError (a bug keeps
    its traceback); the temp file is removed all the same."""
    with pytest.raises(FileNotFoundError) as caught:
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text((tmp_path / "missing-source.json").read_text())
    assert not isinstance(caught.value, WriteError)
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
            raise KeyError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_on_another_file_system_gets_its_temp_file_there(tmp_path: Path) -> None:
    """The temp file is made beside the target, so the rename never crosses file systems (no EXDEV), even when the
    run folder is a link to another file system."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (/dev/shm) here")
    elsewhere = Path(tempfile.mkdtemp(dir=shm, prefix="crate-run-"))
    try:
        (tmp_path / "run").symlink_to(elsewhere)
        path = checkpointer(tmp_path / "run").save(KEEP, tiny_state(16))
        assert os.stat(path).st_dev == os.stat(elsewhere).st_dev and (elsewhere / KEEP).is_file()
        assert not list(elsewhere.glob(".*.tmp"))
    finally:
        shutil.rmtree(elsewhere)


def test_the_system_error_is_seen_through_torch_save(tmp_path: Path) -> None:
    """torch.save into our file object wraps a failed write's OSError in a RuntimeError (or not, as its C++ writer
    pleases): found along the exception's chain all the same. The temp file's writes go to /dev/full (ENOSPC)."""
    if not Path("/dev/full").exists() or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full here")
    write_earlier(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(DiskFullError) as caught:
        with atomic_write(tmp_path / KEEP, needed=3 << 20) as f:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, f.fileno())
            os.close(full)
            torch.save(tiny_state(512), f)
    assert caught.value.errno == errno.ENOSPC and caught.value.needed == 3 << 20
    assert str(caught.value).startswith(f"cannot write {tmp_path}/{KEEP}: the disk is full (")
    assert str(caught.value).endswith(" free in {}, about 3.0 MiB needed); the files already there are unchanged"
                                      .format(tmp_path))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("code, words", [(errno.EDQUOT, "disk quota exceeded ("),
                                         (errno.EXDEV, "invalid cross-device link"),
                                         (errno.EIO, "input/output error")])
def test_faults_not_made_here_are_named_too(code: int, words: str, tmp_path: Path) -> None:
    """A quota needs quota tools or a tmpfs with quota support (neither here); EXDEV cannot happen (the temp file is
    beside the target); EIO is a failing disk. Their lines, from the errno."""
    fault = write_error(tmp_path / "x.pth", code, needed=3 << 19)
    assert str(fault).startswith(f"cannot write {tmp_path}/x.pth: {words}") and fault.errno == code
    assert isinstance(fault, DiskFullError) == (code == errno.EDQUOT)
    assert ("about 1.5 MiB needed); the files already there are unchanged" in str(fault)) == (code == errno.EDQUOT)
    again = pickle.loads(pickle.dumps(fault))  # as it travels to the other ranks
    assert type(again) is type(fault) and str(again) == str(fault) and again.errno == code
    assert getattr(again, "needed", None) == getattr(fault, "needed", None)


def _popen_child(mode: str, folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), mode, str(folder)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_kill_mid_save_leaves_the_old_file_and_a_temp_file_that_is_cleaned_up(tmp_path: Path) -> None:
    with _popen_child("kill", tmp_path) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "mid-write"
        finally:
            proc.kill()
    run = tmp_path / "run"
    assert torch.equal(torch.load(run / "final.pth", weights_only=True)["model"]["w"], torch.full((256, 1024), 1.0))
    stale = remove_stale_temp_files(run)  # what a run starting in the folder does
    assert len(stale) == 1 and stale[0].name.startswith(".final.pth.") and not list(run.glob(".*"))


def test_a_kill_at_any_moment_leaves_the_old_or_the_complete_new_file(tmp_path: Path) -> None:
    with _popen_child("loop", tmp_path) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
            time.sleep(random.uniform(0.05, 0.3))
        finally:
            proc.kill()  # SIGKILL
    w = torch.load(tmp_path / "run" / "final.pth", weights_only=True)["model"]["w"]
    assert torch.equal(w, torch.full((256, 1024), 1.0)) or torch.equal(w, torch.full((256, 1024), 2.0))


def _rank(rank: int, port: int, folder: str) -> None:
    """One of two gloo ranks saving into a run folder that is a file: rank 0 cannot write; every rank records
    what its save raised."""
    import crate_mae.engine.dist as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    d = dist.init("cpu")
    ckpt = Checkpointer(Path(folder) / "run", every=1, keep_last=1, config={}, dist=d)
    got = outcome(lambda: ckpt.save(KEEP, tiny_state(16)))
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(got))
    dist.shutdown()


def test_every_rank_raises_the_line_when_rank_0_cannot_write(tmp_path: Path, free_port: int) -> None:
    """Without it rank 1 fails with gloo's "Connection closed by peer" once rank 0 has exited (or, while rank 0
    lives on, waits for it up to the process group's 30-minute timeout), and says nothing of the cause."""
    from tests.helpers import join_ranks

    (tmp_path / "run").write_text("a file where the run folder should be")
    join_ranks(_rank, (free_port, str(tmp_path)), timeout=90)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] and got[0]["type"] == "WriteError"
    assert got[0]["message"] == f"cannot write {tmp_path}/run/{KEEP}: not a directory"


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
