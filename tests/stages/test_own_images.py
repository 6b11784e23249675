"""A set of unlabelled images end to end (issue 23): written from a folder, pretrained on (the monitor's held-out
loss without its kNN), pictured by the viz commands, and refused in one line by fine-tuning and both probes, which
need labels."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crate_mae.config import load_config
from crate_mae.data import ShardError
from crate_mae.data.sources import folder_source
from crate_mae.data.writer import write_split
from crate_mae.engine.log import read_events
from crate_mae.stages.finetune import run_finetune
from crate_mae.stages.linear_probe import run_linprobe
from crate_mae.stages.pretrain import run_pretrain
from crate_mae.viz.__main__ import main as viz_main
from tests.helpers import image_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Train and val sets written from folders of 40 and 16 unlabelled images, two levels deep."""
    root = tmp_path_factory.mktemp("own")
    specs = []
    for split, n in (("train", 40), ("val", 16)):
        for i in range(n):
            folder = root / split / f"day{i % 3}" / f"cam{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(image_bytes(i + 100 * (split == "val"), (40, 36)))
        write_split(folder_source(str(root / split)), root / "shards", split, shard_size=16)
        specs.append(str(root / "shards" / f"{split}.json"))
    return specs[0], specs[1]


def config(stage: str, sets: tuple[str, str], out: Path, *extra: str):
    return load_config(ROOT / f"configs/{stage}/demo.yaml", [
        "model.variant=nano", f"data.train_shards={sets[0]}", f"data.val_shards={sets[1]}", "data.batch_size=8",
        "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", f"run.out_dir={out}", "run.name=r", *extra],
        stage=stage)


def test_pretraining_and_the_viz_commands_take_an_unlabelled_set(unlabelled: tuple[str, str], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    result = run_pretrain(config("pretrain", unlabelled, tmp_path, "data.shuffle_buffer=16", "monitor.every=1"))
    assert result.steps == 40 // 8
    history = read_events(tmp_path / "r", "monitor")
    assert history and "heldout_loss" in history[-1] and not any(k.startswith("knn") for k in history[-1])
    assert "has no labels (an unlabelled set)" in capsys.readouterr().out
    assert (tmp_path / "r" / "reconstructions.png").stat().st_size > 0  # the run's own reconstruction figure
    final = str(tmp_path / "r" / "final.pth")
    for command in ("recon", "attention"):
        assert viz_main([command, "--checkpoint", final, "--images", unlabelled[1], "--n", "3",
                         "--out", str(tmp_path / f"{command}.png")]) == 0
        assert (tmp_path / f"{command}.png").stat().st_size > 0


@pytest.mark.parametrize(("stage", "extra"), [("finetune", ["finetune.checkpoint=null"]),
                                              ("linprobe", ["probe.protocol=linear", "probe.checkpoint=null"]),
                                              ("linprobe", ["probe.protocol=logreg", "probe.checkpoint=null"])])
def test_fine_tuning_and_the_probes_refuse_an_unlabelled_set_in_one_line(unlabelled: tuple[str, str], tmp_path: Path,
                                                                         stage: str, extra: list[str]) -> None:
    run = run_finetune if stage == "finetune" else run_linprobe
    with pytest.raises(ShardError) as err:
        run(config(stage, unlabelled, tmp_path, "model.num_classes=10", *extra))
    message = str(err.value)
    assert message.startswith(f"{unlabelled[0]} has no labels (an unlabelled set)") and "need labels" in message
    assert "\n" not in message and not list((tmp_path / "r").glob("*.pth"))


def test_the_entry_point_says_it_in_one_line(unlabelled: tuple[str, str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--config", "configs/finetune/demo.yaml",
                           "--set", f"data.train_shards={unlabelled[0]}", f"data.val_shards={unlabelled[1]}",
                           "model.variant=nano", "finetune.checkpoint=null", f"run.out_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "an unlabelled set" in lines[0] and "need labels" in lines[0], proc.stderr


def test_shards_without_a_manifest_whose_samples_carry_no_labels_are_refused_too(unlabelled: tuple[str, str],
                                                                                  tmp_path: Path) -> None:
    import shutil

    for shard in Path(unlabelled[0]).parent.glob("train-*.tar"):  # the same shards without their manifest
        (tmp_path / "bare").mkdir(exist_ok=True)
        shutil.copy(shard, tmp_path / "bare" / shard.name)
    spec = str(tmp_path / "bare" / "train-*.tar")
    with pytest.raises(ShardError, match=r"has no labels \(its first sample has no cls\); fine-tuning and the probes "
                                         r"need labels"):
        run_finetune(config("finetune", (spec, spec), tmp_path, "model.num_classes=10", "data.train_samples=40",
                            "finetune.checkpoint=null"))


def test_a_published_set_is_pretrained_on_by_its_brace_pattern_alone(tmp_path: Path) -> None:
    """timm's layout from the Hub: shards with `jpg`, `cls`, `json` members and an _info.json, no manifest of ours and
    no data.train_samples: the epoch length comes from the info file."""
    import json

    from tests.helpers import write_tar_set

    def sample(i: int) -> dict:
        return {"__key__": f"{i:06d}", "jpg": image_bytes(i, (36, 32)), "cls": str(i % 4).encode(),
                "json": json.dumps({"filename": f"img{i}.JPEG"}).encode()}

    folder = tmp_path / "wds"
    write_tar_set(folder, "set-train", [[sample(10 * s + i) for i in range(10)] for s in range(3)], manifest=False)
    (folder / "_info.json").write_text(json.dumps({"name": "set", "splits": {"train": {
        "name": "train", "num_samples": 30, "filenames": [f"set-train-{s:06d}.tar" for s in range(3)],
        "shard_lengths": [10, 10, 10]}}}))
    spec = str(folder / "set-train-{000000..000002}.tar")
    torch.set_num_threads(1)
    result = run_pretrain(config("pretrain", (spec, spec), tmp_path, "data.shuffle_buffer=16", "monitor.every=0"))
    assert result.steps == 30 // 8


def test_the_monitors_knn_runs_on_a_labelled_set_whose_info_file_names_no_classes(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from tests.helpers import write_tar_set

    folder = tmp_path / "wds"
    for split, n in (("train", 32), ("validation", 16)):
        samples = [{"__key__": f"{i:06d}", "jpg": image_bytes(i + 1000 * (n == 16), (36, 32)), "cls": str(i % 4).encode()}
                   for i in range(n)]
        write_tar_set(folder, f"set-{split}", [samples], manifest=False)
    (folder / "_info.json").write_text(json.dumps({"splits": {
        split: {"name": split, "num_samples": n, "filenames": [f"set-{split}-000000.tar"], "shard_lengths": [n]}
        for split, n in (("train", 32), ("validation", 16))}}))
    sets = (str(folder / "set-train-000000.tar"), str(folder / "set-validation-000000.tar"))
    torch.set_num_threads(1)
    run_pretrain(config("pretrain", sets, tmp_path, "data.shuffle_buffer=16", "monitor.every=1", "monitor.probe=false"))
    history = read_events(tmp_path / "r", "monitor")
    assert any(k.startswith("knn") for k in history[-1]), history[-1]
    assert "kNN skipped" not in capsys.readouterr().out
