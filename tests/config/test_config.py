"""Config: YAML and --set overrides, errors that name the key, and the resolved config written back."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import replace
from pathlib import Path

import pytest

from crate_mae.config import (ClassifierConfig, ConfigError, MAEConfig, ModelConfig, PretrainStage, add_config_args,
                              config_from_args, load_config, save_config)
from crate_mae.model import resolve_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_resolve_the_variant() -> None:
    cfg = load_config()
    assert cfg == PretrainStage() and cfg.model.dim is None  # unset until resolved (against a checkpoint, if any)
    m = resolve_config(cfg.model)
    assert (m.variant, m.family, m.dim, m.heads, m.encoder_depth, m.img_size, m.eta, m.lambd) == (
        "base", "mae", 768, 12, 12, 224, 0.1, 0.5)
    assert resolve_config(ClassifierConfig(), default_family="supervised").lambd == 0.1


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  variant: small\noptim:\n  lr: 1e-3\n  betas: [0.9, 0.99]\n")
    cfg = load_config(path, ["optim.lr=1e-4", "model.heads=8", "run.resume=auto", "optim.clip_grad=null"])
    assert resolve_config(cfg.model).dim == 576 and cfg.model.heads == 8
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.run.resume == "auto" and cfg.optim.clip_grad is None


def test_an_explicit_size_overrides_the_variant() -> None:
    cfg = resolve_config(load_config(None, ["model.variant=tiny", "model.encoder_depth=3"]).model)
    assert (cfg.dim, cfg.encoder_depth, cfg.decoder_depth) == (384, 3, 12)


def test_int_is_accepted_for_float_and_yaml_exponent_strings(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "optim:\n  blr: 1\n  min_lr: 1e-6\n"))
    assert cfg.optim.blr == 1.0 and cfg.optim.min_lr == 1e-6


@pytest.mark.parametrize("text, key", [
    ("optim:\n  lrr: 0.1\n", "optim.lrr"),
    ("modle:\n  dim: 8\n", "modle"),
    ("model:\n  variant: base\n  depth: 3\n", "model.depth"),
])
def test_unknown_key_in_yaml_is_named(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{path}.*unknown key '{key}'"):
        load_config(path)


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.lr'"):
        load_config(write(tmp_path, "optim:\n  lrr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"--set 'optim\.wieght_decay=0'.*weight_decay"):
        load_config(None, ["optim.wieght_decay=0"])


@pytest.mark.parametrize("text, key", [
    ("optim:\n  lr: fast\n", "optim.lr"),
    ("model:\n  dim: 64.5\n", "model.dim"),
    ("model:\n  norm_pix_loss: 1\n", "model.norm_pix_loss"),
    ("model:\n  pool: max\n", "model.pool"),
    ("optim:\n  betas: [0.9]\n", "optim.betas"),
    ("optim:\n  epochs: null\n", "optim.epochs"),
    ("optim: 3\n", "optim"),
])
def test_wrong_type_is_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("override, key", [
    ("model.dim=100", "model.heads"),  # 100 is not divisible by base's 12 heads
    ("model.img_size=225", "model.img_size"),
    ("model.mask_ratio=1.0", "model.mask_ratio"),
    ("model.mask_ratio=0", "model.mask_ratio"),
    ("model.variant=huge", "model.variant"),
    ("optim.warmup_epochs=900", "optim.warmup_epochs"),
    ("data.batch_size=0", "data.batch_size"),
    ("optim.lr=-1", "optim.lr"),
])
def test_impossible_values_are_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}:"):
        resolve_config(load_config(None, [override]).model)  # sizes that clash only with the row: when resolved


def test_malformed_overrides_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="'optim' is a section"):
        load_config(None, ["optim=3"])
    with pytest.raises(ConfigError, match=r"--set 'data.batch_size=many'.*data\.batch_size"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="model.heads"):
        ModelConfig(dim=64, heads=5)
    with pytest.raises(ConfigError, match="model.heads"):
        resolve_config(MAEConfig(variant="nano", heads=5))


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.variant=small", "optim.betas=[0.8, 0.9]", "optim.lr=2e-4", "run.name=x"])
    cfg = replace(cfg, model=resolve_config(cfg.model))
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert "dim: 576" in (tmp_path / "run" / "config.yaml").read_text()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no temp file left


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_bundled_config_loads(path: Path) -> None:
    load_config(path, stage=path.parent.name)  # configs/<stage>/*.yaml


def test_argparse_helpers() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--set", "optim.lr=1e-4", "model.variant=nano", "--set", "run.seed=3"])
    cfg = config_from_args(args)
    assert (cfg.optim.lr, cfg.model.variant, cfg.run.seed) == (1e-4, "nano", 3)
    assert "optim.weight_decay" in parser.format_help()


@pytest.mark.parametrize("script", ["pretrain.py", "linprobe.py", "finetune.py"])
def test_entry_points_list_every_key_in_help(script: str, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    root = Path(__file__).parents[2]
    spec = importlib.util.spec_from_file_location(script[:-3], root / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert Path(module.DEFAULT_CONFIG).exists()
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    own = {"pretrain.py": "model.mask_ratio", "linprobe.py": "probe.knn_k", "finetune.py": "finetune.mixup"}[script]
    assert own in text and "optim.epochs" in text and "--set KEY=VALUE" in text
    others = {"probe.knn_k", "finetune.mixup"} - {own}
    assert not any(key in text for key in others)  # each stage lists only its own sections
    mae_only, classifier_only = ("model.mask_ratio", "model.decoder_depth", "data.decode_on", "data.prefetch"), (
        "model.pool", "model.num_classes", "model.drop_path")  # and only the keys it reads
    assert all((key in text) == (script == "pretrain.py") for key in mae_only), script
    assert all((key in text) == (script != "pretrain.py") for key in classifier_only), script
    assert module.main(["--set", "optim.lrr=1"]) == 2 and "did you mean 'optim.lr'" in capsys.readouterr().err


def test_config_and_the_command_lines_import_neither_torch_nor_timm() -> None:
    """`--help` must not wait for torch: the config, the size table and the CLI are plain Python."""
    import subprocess
    import sys

    code = ("import sys, crate_mae.config, crate_mae.cli, crate_mae.config.variants; "
            "heavy = [m for m in ('torch', 'timm', 'numpy', 'webdataset') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    root = Path(__file__).resolve().parents[2]
    for entry in ("pretrain.py", "linprobe.py", "finetune.py"):
        out = subprocess.run([sys.executable, "-X", "importtime", str(root / entry), "--help"], capture_output=True,
                             text=True, check=True, timeout=120)
        imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
        assert not imported & {"torch", "timm"}, entry
        assert "model.variant" in out.stdout  # every key is still listed


def test_each_stage_holds_only_its_sections_with_its_own_optimiser_defaults(tmp_path: Path) -> None:
    pre, probe, ft = (load_config(stage=s) for s in ("pretrain", "linprobe", "finetune"))
    assert not hasattr(pre, "probe") and not hasattr(pre, "finetune") and not hasattr(probe, "finetune")
    assert (pre.optim.epochs, pre.optim.warmup_epochs, pre.optim.optimizer) == (800, 40.0, "adamw")
    assert (probe.optim.epochs, probe.optim.optimizer, probe.optim.blr, probe.optim.weight_decay) == (90, "lars", 0.1, 0.0)
    assert (ft.optim.epochs, ft.optim.betas, ft.optim.layer_decay, ft.optim.blr) == (100, (0.9, 0.999), 0.75, 5e-4)
    with pytest.raises(ConfigError, match=r"unknown key 'probe'"):
        load_config(write(tmp_path, "probe:\n  knn_k: 5\n"))  # a pretraining config has no probe section
    with pytest.raises(ConfigError, match=r"--set 'finetune\.mixup=0': unknown key 'finetune'"):
        load_config(None, ["finetune.mixup=0"], stage="linprobe")
    with pytest.raises(ValueError, match="stage must be one of"):
        load_config(stage="train")
    with pytest.raises(ConfigError, match=r"unknown key 'data\.prefetch'"):
        load_config(None, ["data.prefetch=0"], stage="finetune")  # read by pretraining alone
    with pytest.raises(ConfigError, match=r"unknown key 'model\.pool'"):
        load_config(None, ["model.pool=mean"])  # a CRATE-MAE does not pool
    with pytest.raises(ConfigError, match=r"unknown key 'model\.mask_ratio'"):
        load_config(None, ["model.mask_ratio=0.5"], stage="linprobe")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.run.name = "other"  # type: ignore[misc]  (a stage's config is frozen once made)


def test_a_config_file_may_name_a_base_it_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model:\n  variant: small\n  mask_ratio: 0.6\noptim:\n  epochs: 70\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  variant: tiny\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.epochs=90"])
    assert (cfg.model.variant, cfg.model.mask_ratio, cfg.optim.epochs) == ("tiny", 0.6, 90)  # child, then --set win
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loop.yaml: base: loop.yaml includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: cannot read the config file"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "bad_key.yaml").write_text("model:\n  variantt: small\n")
    (tmp_path / "uses_bad.yaml").write_text("base: bad_key.yaml\n")
    with pytest.raises(ConfigError, match=r"uses_bad\.yaml: unknown key 'model\.variantt'"):
        load_config(tmp_path / "uses_bad.yaml")
    small = load_config(Path(__file__).parents[2] / "configs/finetune/supervised_small.yaml", stage="finetune")
    assert (small.model.variant, small.optim.optimizer, small.optim.lr, small.run.name) == (
        "small", "lion", 2e-4, "crate-small-supervised-in1k")
