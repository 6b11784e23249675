"""A label outside the model's classes on shards whose manifest lists none (foreign shards, 1-based `cls`): one line
naming the shard, key, value and class count, before any step or probe uses it, in fine-tuning and in both probes
(issue 22). Before, fine-tuning reached the loss with `RuntimeError: index 10 is out of bounds for dimension 1 with
size 10`, and the kNN of the logreg probe an index error of its own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from crate_mae.config import load_config
from crate_mae.data import DataError
from crate_mae.stages.finetune import run_finetune
from crate_mae.stages.linear_probe import run_linprobe
from tests.helpers import image_bytes, write_tar_set

ROOT = Path(__file__).resolve().parents[2]


def foreign_set(folder: Path, *, first: int) -> tuple[str, str]:
    """Train and val shards of 10 classes with no manifest, their labels first … first + 9 (1: 1-based)."""
    def sample(i: int) -> dict:
        return {"__key__": f"{i:06d}", "jpg": image_bytes(i, (32, 32)), "cls": str(first + i % 10).encode()}

    for split in ("train", "val"):
        write_tar_set(folder, split, [[sample(i + 24 * k) for i in range(24)] for k in range(2)], manifest=False)
    return tuple(str(folder / f"{split}-{{000000..000001}}.tar") for split in ("train", "val"))  # type: ignore


def config(stage: str, train: str, val: str, out: Path, *extra: str):
    return load_config(ROOT / f"configs/{stage}/demo.yaml", [
        "model.variant=nano", "model.num_classes=10", f"data.train_shards={train}", f"data.val_shards={val}",
        "data.train_samples=48", "data.batch_size=8", "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0",
        f"run.out_dir={out}", "run.name=r", *extra], stage=stage)


def steps_logged(run: Path) -> list[int]:
    log = run / "log.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [line["step"] for line in lines if "loss" in line]


@pytest.mark.parametrize(("stage", "extra"), [("finetune", ["finetune.checkpoint=null"]),
                                              ("linprobe", ["probe.protocol=linear", "probe.checkpoint=null"]),
                                              ("linprobe", ["probe.protocol=logreg", "probe.checkpoint=null",
                                                            "probe.cache_dir=CACHE"])])
def test_a_label_outside_the_heads_classes_is_one_line_before_any_step(tmp_path: Path, stage: str,
                                                                        extra: list[str]) -> None:
    train, val = foreign_set(tmp_path / "set", first=1)
    extra = [e.replace("CACHE", str(tmp_path / "cache")) for e in extra]
    run = run_finetune if stage == "finetune" else run_linprobe
    with pytest.raises(DataError, match=r"(train|val)-00000\d\.tar/\d{6}: label 10 does not fit the 10 classes of the "
                                        r"model's head \(.*lists no classes\) \(labels run 0 … 9; 1-based labels\?\)"):
        run(config(stage, train, val, tmp_path / "runs", *extra))
    assert steps_logged(tmp_path / "runs" / "r") == []  # no step ran on it
    assert not list((tmp_path / "runs" / "r").glob("*.pth"))


def test_labels_that_fit_train_on_the_same_shards(tmp_path: Path) -> None:
    train, val = foreign_set(tmp_path / "set", first=0)
    result = run_finetune(config("finetune", train, val, tmp_path / "runs", "finetune.checkpoint=null"))
    assert result.steps == 48 // 8


@pytest.mark.parametrize(("given", "want"), [(None, 3), (7, 7), (2, None)])
def test_the_head_takes_the_datas_classes_unless_set_and_a_smaller_one_is_refused(tmp_path: Path, given: int | None,
                                                                                  want: int | None) -> None:
    """model.num_classes, decided in one place (`resolve_config`): set, else the data's (3 here), else the file's head;
    a set head too small for the data's classes is one line before anything runs."""
    import torch

    from crate_mae.engine.dist import Dist
    from crate_mae.errors import ConfigError
    from crate_mae.stages.common import prepare
    from tests.helpers import make_set

    train, val = make_set(tmp_path / "set", n_shards=1), make_set(tmp_path / "set", "val", n_shards=1)
    cfg = config("finetune", train, val, tmp_path / "runs", "finetune.checkpoint=null",
                 f"model.num_classes={'null' if given is None else given}")
    here = Dist(0, 1, 0, torch.device("cpu"))
    if want is None:
        with pytest.raises(ConfigError, match=r"^model.num_classes is 2, but .*train.json has 3 classes; leave it unset"):
            prepare(cfg, here, default_family="supervised")
    else:
        assert prepare(cfg, here, default_family="supervised").cfg.model.num_classes == want
