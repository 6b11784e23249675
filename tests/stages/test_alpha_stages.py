"""CRATE-α (`model.family: alpha`) through every stage, at the nano size on the digits: supervised training from
scratch (finetune.py) and its exact resume, masked pretraining with the α encoder (configs/pretrain/alpha_demo.yaml),
its encoder in a classifier and in the linear probe, `pretrain.init_from` an α classifier, the rules every family
follows (a resume or a checkpoint of another model is one line naming the key), the viz commands on α files, and
the bundled α recipes (configs/finetune/alpha_*.yaml) with the authors' values."""
from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from crate_mae.config import ClassifierConfig, load_config
from crate_mae.engine.dist import Dist
from crate_mae.engine.optim import peak_lr
from crate_mae.errors import CheckpointError, ConfigError
from crate_mae.model import build_classifier, build_model, create_model, read_checkpoint, resolve_config, to_released
from crate_mae.model.convert import HEAD_PREFIXES, MAE_ONLY_PREFIXES
from crate_mae.model.crate import AlphaLayer
from crate_mae.seeding import seed_everything
from crate_mae.stages.common import prepare
from crate_mae.stages.finetune import FinetuneResult, run_finetune
from crate_mae.stages.linear_probe import run_linprobe
from crate_mae.stages.pretrain import PretrainResult, build_training, run_pretrain
from crate_mae.viz.__main__ import main as viz_main
from crate_mae.viz.inputs import load_images
from crate_mae.viz.measures import coding_rate

ROOT = Path(__file__).resolve().parents[2]
CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def finetune_cfg(digits: tuple[str, str], out: Path, name: str, *extra: str):
    """finetune.py from scratch as CRATE-α nano, trained on the 300 held-out digits to be quick: 2 epochs of 9 steps
    of 32, a checkpoint every 5. One data worker: the fine-tuning transform draws from the global generators, which
    the reader seeds per epoch inside a worker only (with none, a resume is not exact)."""
    return load_config(ROOT / "configs/finetune/demo.yaml", [
        "model.family=alpha", "model.variant=nano", f"data.train_shards={digits[1]}", f"data.val_shards={digits[1]}",
        "data.batch_size=32", "data.num_workers=1", "finetune.checkpoint=null", "optim.epochs=2",
        "optim.warmup_epochs=0.5", "optim.layer_decay=null", "optim.blr=2e-2", f"run.out_dir={out}", f"run.name={name}",
        "run.log_every=3", "run.ckpt_every=5", "run.keep_last=3", *extra], stage="finetune")


def pretrain_cfg(digits: tuple[str, str], out: Path, name: str, *extra: str):
    """configs/pretrain/alpha_demo.yaml (family alpha) at the nano size, on the 300 held-out digits to be quick:
    2 epochs of 9 masked steps of 32."""
    return load_config(ROOT / "configs/pretrain/alpha_demo.yaml", [
        "model.variant=nano", f"data.train_shards={digits[1]}", f"data.val_shards={digits[1]}", "data.batch_size=32",
        "data.num_workers=0", "data.shuffle_buffer=64", "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.blr=2e-2",
        f"run.out_dir={out}", f"run.name={name}", "run.log_every=3", "monitor.every=0", *extra])


@pytest.fixture(scope="module")
def finetuned(digits, tmp_path_factory: pytest.TempPathFactory) -> FinetuneResult:
    """A CRATE-α nano classifier trained from scratch by the fine-tuning stage (two short epochs)."""
    return run_finetune(finetune_cfg(digits, tmp_path_factory.mktemp("alpha-ft"), "ft"))


@pytest.fixture(scope="module")
def pretrained(digits, tmp_path_factory: pytest.TempPathFactory) -> PretrainResult:
    """A CRATE-MAE with the α encoder, briefly pretrained (final.pth, encoder.pth)."""
    return run_pretrain(pretrain_cfg(digits, tmp_path_factory.mktemp("alpha-pre"), "pre"))


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CRATE-α nano classifier (1000 classes) in the authors' layout (`conv1.*`, `transformer.layers.*`), bare."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("released") / "crate_alpha_nano.pth"
    torch.save(to_released(build_classifier(ClassifierConfig(family="alpha", variant="nano")).state_dict()), path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images of other sizes than the model's 32 px: the viz commands resize and centre-crop them."""
    from tests.helpers import image_bytes

    folder = tmp_path_factory.mktemp("photos")
    for i in range(2):
        (folder / f"img{i}.png").write_bytes(image_bytes(i, size=(40 + 8 * i, 36), fmt="PNG"))
    return folder


def test_finetune_trains_an_alpha_classifier_from_scratch(finetuned: FinetuneResult) -> None:
    run = finetuned.run_dir
    assert finetuned.steps == 2 * (300 // 32) and finetuned.classes == 10
    assert torch.isfinite(torch.tensor([finetuned.first_loss, finetuned.last_loss])).all()
    assert all(isinstance(layer, AlphaLayer) for layer in finetuned.model.encoder.layers)  # MSSA + ODL layers
    saved = json.loads((run / "results.json").read_text())
    assert saved["steps"] == 18 and saved["top1"] == finetuned.top1 and saved["samples"] == 300
    model = load_config(run / "config.yaml", stage="finetune").model  # the resolved config, as built
    assert (model.family, model.variant, model.dim, model.heads, model.lambd, model.num_classes) == (
        "alpha", "nano", 64, 4, 0.1, 10)
    final = read_checkpoint(run / "final.pth")
    assert final.describe() == "our CRATE-α classifier" and final.config["model"]["family"] == "alpha"
    assert (run / "best.pth").exists() and (run / "ckpt-00000005.pth").exists()


def test_a_resumed_alpha_finetune_ends_bit_identical(digits, finetuned: FinetuneResult, tmp_path: Path) -> None:
    """A run cut after its checkpoint at step 5 (mid-epoch, drop path 0.1 on) and resumed (the rest of the epoch, its
    evaluation and best.pth, the next epoch) ends with the weights, position, best score and figures of the run never
    cut."""
    (tmp_path / "cut").mkdir()
    shutil.copy(finetuned.run_dir / "ckpt-00000005.pth", tmp_path / "cut")
    again = run_finetune(finetune_cfg(digits, tmp_path, "cut", "run.resume=auto"))
    whole, cut = (read_checkpoint(folder / "final.pth") for folder in (finetuned.run_dir, tmp_path / "cut"))
    assert whole.payload["state"] == cut.payload["state"] and whole.payload["best"] == cut.payload["best"]
    assert whole.state.keys() == cut.state.keys()
    for key, value in whole.state.items():
        assert torch.equal(value, cut.state[key]), key
    assert (again.top1, again.top5, again.last_loss) == (finetuned.top1, finetuned.top5, finetuned.last_loss)


def test_masked_pretraining_with_the_alpha_encoder(pretrained: PretrainResult) -> None:
    run = pretrained.run_dir
    assert pretrained.steps == 2 * (300 // 32) and pretrained.last_loss < pretrained.first_loss
    assert torch.isfinite(torch.tensor(pretrained.last_loss))
    assert (run / "final.pth").stat().st_size > 0 and (run / "encoder.pth").stat().st_size > 0
    assert read_checkpoint(run / "final.pth").describe() == "our CRATE-α MAE"
    clf, cfg = create_model(ClassifierConfig(num_classes=0), run / "encoder.pth")  # family and sizes from the file
    assert (cfg.family, cfg.variant, cfg.num_classes, clf.family) == ("alpha", "nano", 0, "alpha")
    assert all(isinstance(layer, AlphaLayer) for layer in clf.encoder.layers)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the classifier computes exactly the pretrained encoder's function
        torch.testing.assert_close(clf.eval().forward_features(img), pretrained.model.eval().encode(img))


def test_the_linear_probe_reads_the_alpha_encoder(digits, pretrained: PretrainResult, tmp_path: Path) -> None:
    result = run_linprobe(load_config(ROOT / "configs/linprobe/demo.yaml", [
        f"data.train_shards={digits[0]}", f"data.val_shards={digits[1]}", "data.num_workers=0",
        f"probe.checkpoint={pretrained.run_dir / 'encoder.pth'}", "probe.Cs=[1.0]", "probe.solver=torch",
        f"probe.cache_dir={tmp_path / 'cache'}", f"run.out_dir={tmp_path}", "run.name=probe"], stage="linprobe"))
    assert result.top1 > 30 and result.val_samples == 300 and result.train_samples == 1497  # chance is 10
    model = load_config(tmp_path / "probe" / "config.yaml", stage="linprobe").model  # unset: the file's
    assert (model.family, model.variant, model.num_classes) == ("alpha", "nano", 10)
    assert json.loads((tmp_path / "probe" / "results.json").read_text())["top1"] == result.top1


@pytest.mark.parametrize("layout", ["ours", "released"])
def test_init_from_an_alpha_classifier_fills_the_encoder_and_starts_the_decoder_fresh(
        digits, finetuned: FinetuneResult, released: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        layout: str) -> None:
    path = finetuned.run_dir / "final.pth" if layout == "ours" else released
    cfg = pretrain_cfg(digits, tmp_path, "init", "model.family=alpha", "optim.epochs=1", f"pretrain.init_from={path}")
    run = prepare(cfg, CPU, weights=str(path))
    trainer, _ = build_training(run.cfg, CPU, run.train, run.weights)
    got, source = trainer.module.state_dict(), read_checkpoint(path).state
    encoder = {k for k in source if not k.startswith(HEAD_PREFIXES)}  # the head is set aside
    assert encoder == {k for k in got if not k.startswith(MAE_ONLY_PREFIXES)}
    for key in encoder:
        assert torch.equal(got[key], source[key]), key
    seed_everything(run.cfg.run.seed)  # the decoder side exactly as a fresh model of the run's seed has it
    fresh = build_model(run.cfg.model).state_dict()
    decoder = [k for k in got if k.startswith(MAE_ONLY_PREFIXES)]
    assert decoder and all(torch.equal(got[k], fresh[k]) for k in decoder)
    capsys.readouterr()
    result = run_pretrain(cfg)
    first = capsys.readouterr().out.splitlines()[0]
    what = "our CRATE-α classifier" if layout == "ours" else "a released CRATE-α classifier"
    classes = 10 if layout == "ours" else 1000
    assert first.startswith(f"{tmp_path / 'init'}: CRATE-MAE") and "'nano' (172,144 parameters)" in first
    assert f"weights from {path} ({what}: the decoder starts fresh, its {classes}-class head set aside), " \
           f"optimiser and schedule new" in first, first
    assert result.steps == 300 // 32 and torch.isfinite(torch.tensor(result.last_loss))


def _refused(kind: type[Exception], stage, cfg, *parts: str) -> None:
    """`stage(cfg)` stops with one line of `kind` that begins with parts[0] and holds every other part."""
    with pytest.raises(kind) as err:
        stage(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(parts[0]) and all(p in message for p in parts), message


def test_a_resume_or_checkpoint_of_another_model_is_one_line_naming_the_key(
        digits, finetuned: FinetuneResult, pretrained: PretrainResult, tmp_path: Path) -> None:
    ft, pre = finetuned.run_dir, pretrained.run_dir
    written = {p: p.stat().st_mtime_ns for p in [*ft.iterdir(), *pre.iterdir()] if p.is_file()}
    final, encoder = ft / "final.pth", pre / "encoder.pth"
    resume_ft = functools.partial(finetune_cfg, digits, ft.parent, ft.name, "run.resume=auto")
    resume_pre = functools.partial(pretrain_cfg, digits, pre.parent, pre.name, "run.resume=auto")
    _refused(CheckpointError, run_finetune, resume_ft("model.family=mae"),
             f"{final}: holds our CRATE-α classifier (key 'encoder.layers.0.odl.D'), but model.family is 'mae'")
    _refused(ConfigError, run_finetune, resume_ft("model.heads=2"),
             f"{final}: model.heads is 4 in the checkpoint but 2 in the config")
    _refused(CheckpointError, run_pretrain, resume_pre("model.family=mae"),
             f"{pre / 'final.pth'}: holds our CRATE-α MAE", "but model.family is 'mae'")
    _refused(ConfigError, run_pretrain, resume_pre("model.decoder_depth=2"),
             f"{pre / 'final.pth'}: model.decoder_depth is 3 in the checkpoint but 2 in the config")
    # a new run from an α file of another family than the config's: refused, naming the family
    _refused(CheckpointError, run_finetune,
             finetune_cfg(digits, tmp_path, "sup", "model.family=supervised", f"finetune.checkpoint={final}"),
             f"{final}: holds our CRATE-α classifier", "but model.family is 'supervised'")
    _refused(CheckpointError, run_finetune,
             finetune_cfg(digits, tmp_path, "mae", "model.family=mae", f"finetune.checkpoint={encoder}"),
             f"{encoder}: holds our CRATE-α encoder", "but model.family is 'mae'")
    assert {p: p.stat().st_mtime_ns for p in written} == written  # nothing rewritten
    assert not list(tmp_path.rglob("*.pth"))


@pytest.mark.parametrize("which", ["classifier", "mae", "encoder"])
def test_the_viz_commands_take_alpha_files(finetuned: FinetuneResult, pretrained: PretrainResult, photos: Path,
                                           tmp_path: Path, which: str) -> None:
    path = {"classifier": finetuned.run_dir / "final.pth", "mae": pretrained.run_dir / "final.pth",
            "encoder": pretrained.run_dir / "encoder.pth"}[which]
    for command in ("attention", "pca", "ncut", "layers", "recon"):
        out = tmp_path / f"{command}.png"
        status = viz_main([command, "--checkpoint", str(path), "--images", str(photos), "--out", str(out)])
        reconstructs = command != "recon" or which == "mae"  # only the whole MAE reconstructs; others: one line
        assert status == (0 if reconstructs else 1), command
        assert out.exists() == reconstructs and (not reconstructs or out.stat().st_size > 0), command
    # `layers`: per layer R^c of MSSA's and ODL's inputs, and the sparsity of ODL's code z2 (4d wide), not of D1 z2
    rows = json.loads((tmp_path / "layers.json").read_text())
    model = create_model(ClassifierConfig(), path)[0].eval()
    images, _ = load_images([str(photos)], img_size=32, n=8)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    with torch.no_grad():
        z = model.tokens(images)
        for row, layer in zip(rows, model.encoder.layers):
            mssa_in = layer.norm1(z)
            odl_in = layer.norm2(z + layer.attn(mssa_in))
            code = layer.odl.code(odl_in)
            assert code.shape == (2, 65, 4 * 64)  # 1 + 8 × 8 tokens, m = 4d
            assert 0 < row["zero_fraction"] < 1
            assert row["zero_fraction"] == pytest.approx((code == 0).double().mean().item(), abs=1e-12)
            heads, u = layer.attn.heads, layer.attn.U.weight
            assert row["rate_before_mssa"] == pytest.approx(coding_rate(mssa_in, u, heads=heads).mean().item())
            assert row["rate_after_mssa"] == pytest.approx(coding_rate(odl_in, u, heads=heads).mean().item())
            z = layer(z)


def test_the_alpha_recipes_load_with_the_authors_values() -> None:
    """Every key exists (each file loads: tests/config/test_config.py loads every bundled config too), and the
    values are the recipe's: ImageNet-21K from scratch, then ImageNet-1K, at 4096 images a step on 8 GPUs."""
    def config(name: str):
        return load_config(ROOT / f"configs/finetune/{name}.yaml", stage="finetune")

    in21k, in1k, cifar10, cifar100 = (config(n) for n in ("alpha_imagenet21k", "alpha_imagenet1k", "alpha_cifar10",
                                                           "alpha_cifar100"))
    for cfg in (in21k, in1k):
        o, f = cfg.optim, cfg.finetune
        batch = cfg.data.batch_size * 8 * o.accum_steps
        assert batch == 4096 and cfg.model.family == "alpha" and cfg.model.grad_checkpointing
        assert (o.optimizer, o.betas, o.weight_decay, o.layer_decay, o.epochs, o.warmup_epochs, o.min_lr,
                o.clip_grad) == ("adamw", (0.9, 0.95), 0.1, None, 91, 10.0, 1e-6, 1.0)
        assert (f.mixup, f.cutmix, f.reprob, f.crop_scale, cfg.model.drop_path) == (0.8, 1.0, 0.0, (0.08, 1.0), 0.0)
    assert peak_lr(in21k.optim, 4096) == pytest.approx(8e-4) and peak_lr(in1k.optim, 4096) == pytest.approx(1.6e-4)
    assert (in21k.finetune.checkpoint, in21k.finetune.auto_augment, in21k.finetune.smoothing) == (None, None, 0.0)
    assert (in1k.finetune.auto_augment, in1k.finetune.smoothing) == ("rand-m9-mstd0.5-inc1", 0.1)
    assert in1k.finetune.checkpoint == f"runs/{in21k.run.name}/final.pth"  # the 21K run's last weights
    large = resolve_config(in21k.model, default_family="supervised")  # L/14 at 224 px, the head from the data
    assert (large.dim, large.heads, large.encoder_depth, large.patch_size, large.img_size) == (1024, 16, 24, 14, 224)
    nano = build_model(resolve_config(replace(in21k.model, variant="nano", patch_size=None, img_size=None)))
    assert nano.encoder.grad_checkpointing  # the config key reaches the model
    for cfg, dataset in ((cifar10, "cifar10"), (cifar100, "cifar100")):
        o, model = cfg.optim, cfg.model  # the head: the data's classes (unset)
        assert (model.family, model.num_classes, cfg.finetune.checkpoint) == ("alpha", None, "crate_alpha_B16.pth")
        assert (cfg.data.dataset, cfg.data.batch_size, o.optimizer, o.lr, o.weight_decay) == (
            dataset, 256, "adamw", 5e-5, 0.01)


def test_the_cifar_recipe_resets_the_released_head(digits, released: Path, tmp_path: Path) -> None:
    """alpha_cifar10.yaml on a released α file (the authors' layout, 1000 classes): sizes from its shapes, a new head
    for the data's 10 classes, every other tensor the file's."""
    cfg = load_config(ROOT / "configs/finetune/alpha_cifar10.yaml", [
        f"finetune.checkpoint={released}", f"data.train_shards={digits[0]}", f"data.val_shards={digits[1]}",
        f"run.out_dir={tmp_path}"], stage="finetune")
    run = prepare(cfg, CPU, weights=cfg.finetune.checkpoint)
    model_cfg = run.cfg.model
    assert (model_cfg.family, model_cfg.variant, model_cfg.img_size, model_cfg.num_classes) == ("alpha", "nano", 32, 10)
    model = create_model(model_cfg, run.weights)[0]
    assert model.head.out_features == 10
    own, source = model.state_dict(), run.weights.state
    assert source["head.weight"].shape[0] == 1000
    for key, value in source.items():
        if not key.startswith("head."):
            assert torch.equal(own[key], value), key
