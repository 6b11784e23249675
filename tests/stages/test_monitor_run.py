"""The monitor inside a pretraining run (stages/pretrain.py: MonitorHistory): it never changes training, a resume
continues its history with no evaluation duplicated or missing, and the run leaves its figure, table and events."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from crate_mae.config import load_config
from crate_mae.engine.log import read_events
from crate_mae.model import read_checkpoint
from crate_mae.stages.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[2]


def tiny(digits: tuple[str, str], out: Path, name: str, *extra: str):
    return load_config(ROOT / "configs/pretrain/demo.yaml", [
        "model.variant=nano", f"data.train_shards={digits[0]}", f"data.val_shards={digits[1]}", "data.batch_size=64",
        "data.num_workers=0", "data.shuffle_buffer=64", "optim.epochs=2", "optim.warmup_epochs=0.2", "optim.blr=2e-2",
        f"run.out_dir={out}", f"run.name={name}", "run.log_every=5", "run.ckpt_every=30", "monitor.every=1",
        "monitor.bank_samples=500",
        "monitor.val_samples=200", "monitor.layers_batch=16", *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path).state


def test_the_monitor_never_changes_training(digits, tmp_path: Path) -> None:
    run_pretrain(tiny(digits, tmp_path, "on", "monitor.probe=true"))  # the online probe too
    run_pretrain(tiny(digits, tmp_path, "off", "monitor.every=0"))
    on, off = weights(tmp_path / "on" / "final.pth"), weights(tmp_path / "off" / "final.pth")
    assert all(torch.equal(on[k], off[k]) for k in on)  # bit-identical, with evaluations before, between and after
    history = read_events(tmp_path / "on", "monitor")
    assert [e["epoch"] for e in history] == [0, 1, 2]
    assert {"heldout_loss", "knn_cls_top1", "knn_mean_top1", "layer1/zero_fraction", "probe_top1"} <= set(history[0])
    assert history[-1]["heldout_loss"] < history[0]["heldout_loss"]  # it learns, and the monitor sees it
    assert all(0 <= e["probe_top1"] <= e["probe_top5"] <= 100 for e in history)  # what it learns: test_online_probe.py
    assert (tmp_path / "on" / "monitor.png").stat().st_size > 0 and not (tmp_path / "off" / "monitor.png").exists()


def test_a_resume_continues_the_history_exactly(digits, tmp_path: Path) -> None:
    whole = tiny(digits, tmp_path, "whole", "monitor.probe=true")  # the probe's head and moments resume too
    run_pretrain(whole)  # 2 epochs of 23 steps: periodic checkpoint at step 30, in the second epoch
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tmp_path / "whole" / "ckpt-00000030.pth", cut)
    lines = (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 30]
    (cut / "log.jsonl").write_text("\n".join(kept) + "\n")  # what a kill at step 30 < s < 46 leaves
    run_pretrain(tiny(digits, tmp_path, "cut", "monitor.probe=true", "run.resume=auto"))
    a, b = weights(tmp_path / "whole" / "final.pth"), weights(cut / "final.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume with the monitor on
    got, want = read_events(cut, "monitor"), read_events(tmp_path / "whole", "monitor")
    assert [e["epoch"] for e in got] == [0, 1, 2] and got == [{**w, "time": g["time"]} for g, w in zip(got, want)]


def test_an_evaluation_cut_off_by_a_kill_is_made_on_resume(digits, tmp_path: Path) -> None:
    """A run killed after its last checkpoint of an epoch but before that epoch's evaluation: the resume makes it."""
    run_pretrain(tiny(digits, tmp_path, "r", "optim.epochs=1"))
    log = tmp_path / "r" / "log.jsonl"
    lines = log.read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if json.loads(line).get("event") == "monitor")
    log.write_text("\n".join(lines[:last]) + "\n")  # epoch 1's evaluation lost
    run_pretrain(tiny(digits, tmp_path, "r", "optim.epochs=2", "run.resume=auto"))
    assert [e["epoch"] for e in read_events(tmp_path / "r", "monitor")] == [0, 1, 2]


def test_unlabelled_training_shards_skip_the_knn_in_one_line(digits, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import image_bytes, write_tar_set

    shards = [[{"__key__": f"{s}-{i:04d}", "png": image_bytes(s * 100 + i, (32, 32), "PNG")} for i in range(40)]
              for s in range(2)]
    train = write_tar_set(tmp_path / "unlabelled", "train", shards, classes=0)
    run_pretrain(tiny(digits, tmp_path, "u", f"data.train_shards={train}", "optim.epochs=1"))
    out = capsys.readouterr().out
    assert sum("kNN" in line and "skip" in line for line in out.splitlines()) == 1
    history = read_events(tmp_path / "u", "monitor")
    assert len(history) == 2 and "heldout_loss" in history[0] and not any(k.startswith("knn") for k in history[0])
