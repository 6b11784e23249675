"""`pretrain.init_from`: a new pretraining run that starts from weights of any layout the one reader takes (our
final.pth and encoder.pth, a safetensors export, the released CRATE-MAE); not a resume: optimiser, schedule and
step start anew. The weights are really the file's, the decoder of an encoder-only file starts fresh, and a file that
disagrees with the config is a one-line error."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from crate_mae.config import ClassifierConfig, config_to_dict, load_config
from crate_mae.engine.dist import Dist
from crate_mae.errors import CheckpointError
from crate_mae.model import build_classifier, build_mae, read_checkpoint, resolve_config, to_released
from crate_mae.model.files import export_encoder
from crate_mae.stages.common import prepare
from crate_mae.stages.pretrain import build_training, run_pretrain

ROOT = Path(__file__).resolve().parents[2]
CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny(digits: tuple[str, str], out: Path, *extra: str):
    return load_config(ROOT / "configs/pretrain/demo.yaml", [
        "model.variant=nano", f"data.train_shards={digits[0]}", f"data.val_shards={digits[1]}", "data.batch_size=32",
        "data.num_workers=0",
        "data.shuffle_buffer=64", "optim.epochs=1", "optim.warmup_epochs=0.2", "optim.blr=2e-2", f"run.out_dir={out}",
        "run.name=t", "run.log_every=5", "monitor.every=0", *extra])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A nano CrateMAE (heads 2, λ 0.3: fields no shape tells) as every layout init_from takes."""
    folder = tmp_path_factory.mktemp("weights")
    cfg = load_config(None, ["model.variant=nano", "model.heads=2", "model.lambd=0.3"])
    torch.manual_seed(5)
    mae = build_mae(resolve_config(cfg.model))
    config = config_to_dict(replace(cfg, model=resolve_config(cfg.model)))
    torch.save({"model": mae.state_dict(), "optimizer": {"state": {}}, "config": config}, folder / "final.pth")
    export_encoder(mae.state_dict(), config, folder / "encoder.pth")
    export_encoder(mae.state_dict(), config, folder / "whole.safetensors", whole=True)
    torch.save(to_released(mae.state_dict()), folder / "released.pth")
    return {"final": folder / "final.pth", "encoder": folder / "encoder.pth", "safetensors": folder / "whole.safetensors",
            "released": folder / "released.pth"}


@pytest.mark.parametrize("layout", ["final", "encoder", "safetensors", "released"])
def test_the_weights_are_the_files_and_the_optimiser_is_fresh(digits, tmp_path: Path, files: dict[str, Path],
                                                              layout: str) -> None:
    extra = ["model.heads=2", "model.lambd=0.3"] if layout == "released" else []  # a released file records neither
    run = prepare(tiny(digits, tmp_path, f"pretrain.init_from={files[layout]}", *extra), CPU,
                  weights=str(files[layout]))
    assert (run.cfg.model.variant, run.cfg.model.heads, run.cfg.model.lambd) == ("nano", 2, 0.3)  # from the file
    trainer, _ = build_training(run.cfg, CPU, run.train, run.weights)
    source = read_checkpoint(files["final"]).state
    got = trainer.module.state_dict()
    assert torch.equal(got["encoder.layers.1.ista.D"], source["encoder.layers.1.ista.D"])
    assert torch.equal(got["patch_embed.proj.weight"], source["patch_embed.proj.weight"])
    fresh_decoder = not torch.equal(got["decoder.layers.0.A"], source["decoder.layers.0.A"])
    assert fresh_decoder == (layout == "encoder")  # an encoder alone: the decoder as initialised
    assert trainer.state.step == 0 and trainer.optimizer.state_dict()["state"] == {}


def test_a_run_from_an_encoder_says_so_and_trains(digits, tmp_path: Path, files: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    result = run_pretrain(tiny(digits, tmp_path, f"pretrain.init_from={files['encoder']}"))
    out = capsys.readouterr().out
    assert f"weights from {files['encoder']} (our CRATE-MAE encoder: the decoder starts fresh)" in out
    assert result.steps == 46 and result.last_loss < result.first_loss  # a whole new schedule: 1,497 // 32 steps
    saved = read_checkpoint(tmp_path / "t" / "final.pth")
    assert saved.config["pretrain"]["init_from"] == str(files["encoder"]) and saved.config["model"]["heads"] == 2


def test_a_file_that_disagrees_is_one_line(digits, tmp_path: Path, files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"final\.pth: model\.heads is 2 in the checkpoint but 4 in the config"):
        run_pretrain(tiny(digits, tmp_path, f"pretrain.init_from={files['final']}", "model.heads=4"))
    supervised = tmp_path / "supervised.pth"
    torch.save({"model": build_classifier(ClassifierConfig(family="supervised", variant="nano")).state_dict()},
               supervised)
    with pytest.raises(CheckpointError, match=r"supervised\.pth: holds our supervised CRATE .*which has no decoder"):
        run_pretrain(tiny(digits, tmp_path, f"pretrain.init_from={supervised}"))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth: no such checkpoint file"):
        run_pretrain(tiny(digits, tmp_path, f"pretrain.init_from={tmp_path / 'nowhere.pth'}"))
    assert not (tmp_path / "t").exists() or not list((tmp_path / "t").glob("*.pth"))  # nothing written


def test_a_classifier_fills_the_encoder_its_head_set_aside(digits, tmp_path: Path) -> None:
    """A fine-tuned classifier (of a family with an MAE) starts pretraining as an encoder does: its head is set aside
    and the decoder starts fresh, as for CRATE-α's released classifiers (tests/stages/test_alpha_stages.py)."""
    classifier = tmp_path / "finetuned.pth"
    state = build_classifier(ClassifierConfig(variant="nano", num_classes=10)).state_dict()
    torch.save({"model": state}, classifier)
    run = prepare(tiny(digits, tmp_path, f"pretrain.init_from={classifier}"), CPU, weights=str(classifier))
    assert run.weights.describe() == "our CRATE-MAE classifier"
    got = build_training(run.cfg, CPU, run.train, run.weights)[0].module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith(("fc_norm.", "head.")))
    assert not any(k.startswith(("fc_norm.", "head.")) for k in got)


def test_a_resume_wins_over_init_from(digits, tmp_path: Path, files: dict[str, Path]) -> None:
    """--resume continues the run (its own weights, optimiser and step); init_from is where it once started."""
    run_pretrain(tiny(digits, tmp_path, f"pretrain.init_from={files['final']}", "optim.epochs=1"))
    resumed = prepare(tiny(digits, tmp_path, f"pretrain.init_from={files['final']}", "run.resume=auto"), CPU,
                      weights=str(files["final"]))
    assert resumed.weights is None and resumed.resume is not None and resumed.resume.payload["state"]["step"] == 46
