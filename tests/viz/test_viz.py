"""Reconstructions, attention maps and the layer measures: shapes, invariants, closed forms, the command line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from crate_mae.config import ClassifierConfig, MAEConfig, config_to_dict, load_config
from crate_mae.model import build_classifier, build_mae, patchify, random_masking
from crate_mae.viz import reconstruct, reconstruction_grid
from crate_mae.viz.__main__ import main as viz_main
from crate_mae.viz.attention import cls_attention
from crate_mae.viz.measures import coding_rate, layer_measures, sparsity


def test_reconstruction_grid_and_pasted_visible_patches_equal_the_input() -> None:
    model = build_mae(MAEConfig(variant="nano", norm_pix_loss=True))
    img, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    parts = reconstruct(model, img, noise=noise)
    visible = (1 - random_masking(noise, 0.75)).bool()  # (B, N)
    pasted, original = patchify(parts["pasted"], 4), patchify(parts["original"], 4)
    assert_close(pasted[visible], original[visible])
    assert not torch.allclose(pasted[~visible], original[~visible])
    assert parts["loss"].shape == (3,) and (parts["loss"] > 0).all()
    grid = reconstruction_grid(model, img, noise=noise, pad=2)
    assert grid.shape == (3, 3 * 32 + 4 * 2, 4 * 32 + 5 * 2)  # 3 rows of 4 images, padded
    assert grid.min() >= 0 and grid.max() <= 1


@pytest.mark.parametrize("size", [32, 48])
def test_attention_panels_sum_to_one_over_the_grid(size: int) -> None:
    model = build_classifier(ClassifierConfig(variant="nano", num_classes=10))
    maps = cls_attention(model, torch.randn(2, 3, size, size), layer=-1)
    assert maps.shape == (2, 4, size // 4, size // 4)
    assert_close(maps.sum((-2, -1)), torch.ones(2, 4))
    assert (maps >= 0).all()
    assert not torch.allclose(maps, cls_attention(model, torch.randn(2, 3, size, size), layer=0))


def test_coding_rate_closed_form() -> None:
    """Z with ZᵀZ = c·I against U = I: each head's A Aᵀ = c·I_p, so R^c = K · ½ p · log(1 + p c / (N ε²))."""
    d, n, c, eps2 = 8, 8, 3.0, 0.5
    z = (math.sqrt(c) * torch.eye(d, dtype=torch.float64))[None]  # (1, N, d), one image
    for heads in (1, 2, 4):
        p = d // heads
        expected = heads * 0.5 * p * math.log(1 + p * c / (n * eps2))
        assert coding_rate(z, torch.eye(d), heads=heads, eps2=eps2).item() == pytest.approx(expected, rel=1e-12)


def test_coding_rate_equals_the_n_by_n_form() -> None:
    """Sylvester: the p × p logdet used equals the paper's N × N one."""
    torch.manual_seed(0)
    z, u, heads, eps2 = torch.randn(2, 10, 12), torch.randn(12, 12), 3, 0.5
    p, n = 4, 10
    direct = torch.zeros(2, dtype=torch.float64)
    for k in range(heads):
        a = z.double() @ u.double()[k * p:(k + 1) * p].T  # (B, N, p)
        direct += 0.5 * torch.logdet(torch.eye(n, dtype=torch.float64) + (p / (n * eps2)) * a @ a.transpose(1, 2))
    assert_close(coding_rate(z, u, heads=heads, eps2=eps2), direct)


def test_sparsity_of_a_known_tensor() -> None:
    z = torch.tensor([[[1.0, 0, 0, 0], [1.0, 1.0, 0, 0]]])
    s = sparsity(z)
    assert s["zero_fraction"] == pytest.approx(5 / 8)
    assert s["l1_over_l2"] == pytest.approx((1 + math.sqrt(2)) / 2)


def test_layer_measures_follow_the_forward_pass() -> None:
    model = build_classifier(ClassifierConfig(variant="nano", num_classes=10, encoder_depth=3))
    img = torch.randn(4, 3, 32, 32)
    rows = layer_measures(model, img)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert all(r["rate_before_mssa"] > 0 and 0 <= r["zero_fraction"] <= 1 for r in rows)
    z = model.tokens(img)
    for layer in model.encoder.layers:
        trace = layer.trace(z)
        assert_close(trace.code, layer(z))
        z = trace.code


def test_commands_write_pictures_and_numbers(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.variant=nano"])
    mae = build_mae(cfg.model)
    torch.save({"model": mae.state_dict(), "config": config_to_dict(cfg)}, tmp_path / "final.pth")
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith(("mask_token", "decoder"))}
    torch.save({"model": encoder, "config": config_to_dict(cfg)}, tmp_path / "encoder.pth")
    from tests.helpers import image_bytes

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(image_bytes(i, size=(50, 40)))
    assert viz_main(["recon", "--checkpoint", str(tmp_path / "final.pth"), "--images", str(images)]) == 0
    assert (tmp_path / "recon.png").stat().st_size > 0
    assert viz_main(["attention", "--checkpoint", str(tmp_path / "encoder.pth"), "--images", str(images / "0.jpg"),
                     "--img-size", "48", "--out", str(tmp_path / "att.png")]) == 0
    assert (tmp_path / "att.png").stat().st_size > 0
    assert viz_main(["layers", "--checkpoint", str(tmp_path / "encoder.pth"), "--images", str(images)]) == 0
    assert len(json.loads((tmp_path / "layers.json").read_text())) == 3
    # an encoder alone cannot reconstruct: one clear line
    assert viz_main(["recon", "--checkpoint", str(tmp_path / "encoder.pth"), "--images", str(images)]) == 1


def test_commands_take_the_released_checkpoint_layout(tmp_path: Path) -> None:
    from tests.helpers import image_bytes
    from tests.model.test_convert import released_state

    torch.save({"model": released_state()}, tmp_path / "released.pth")  # the authors' keys, nano-sized
    (tmp_path / "img.png").write_bytes(image_bytes(1, size=(32, 32), fmt="PNG"))
    for command in ("recon", "layers", "attention"):
        assert viz_main([command, "--checkpoint", str(tmp_path / "released.pth"), "--variant", "nano",
                         "--images", str(tmp_path / "img.png"), "--out", str(tmp_path / f"{command}.png")]) == 0
        assert (tmp_path / f"{command}.png").stat().st_size > 0


def test_attention_and_layers_take_the_supervised_family(tmp_path: Path) -> None:
    from tests.helpers import image_bytes
    from tests.model.test_hub import released_supervised

    torch.save({"state_dict": {"module." + k: v for k, v in released_supervised().items()}}, tmp_path / "crate.pth")
    (tmp_path / "img.png").write_bytes(image_bytes(2, size=(40, 40), fmt="PNG"))
    for command in ("attention", "layers"):
        assert viz_main([command, "--checkpoint", str(tmp_path / "crate.pth"), "--images", str(tmp_path / "img.png"),
                         "--img-size", "48", "--out", str(tmp_path / f"{command}.png")]) == 0
        assert (tmp_path / f"{command}.png").stat().st_size > 0
    # a supervised CRATE has no decoder: recon says so on one line
    assert viz_main(["recon", "--checkpoint", str(tmp_path / "crate.pth"), "--images", str(tmp_path / "img.png")]) == 1


def _photos(folder: Path, count: int = 3) -> Path:
    """Generated images of other sizes and modes than the model's: the commands resize and centre-crop them."""
    from tests.helpers import image_bytes

    folder.mkdir()
    for i in range(count):
        (folder / f"img{i}.png").write_bytes(image_bytes(i, size=(40 + 8 * i, 36), fmt="PNG"))
    return folder


def test_segmentation_commands_write_their_figures(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    photos = _photos(tmp_path / "photos")
    common = ["--model", "crate_nano", "--images", str(photos / "*.png"), "--size", "48", "--stride", "2"]
    assert viz_main(["attention", *common, "--out", str(tmp_path / "att")]) == 0
    written = sorted(p.name for p in (tmp_path / "att").iterdir())
    assert written == ["attention-img0.png", "attention-img1.png", "attention-img2.png", "attention.png"]
    assert viz_main(["pca", *common, "--layer", "0", "--out", str(tmp_path / "pca.png")]) == 0
    assert (tmp_path / "pca.png").stat().st_size > 0
    assert viz_main(["ncut", *common, "--save-masks", "--out", str(tmp_path / "cut" / "ncut.png")]) == 0
    masks = sorted((tmp_path / "cut").glob("ncut-*-mask.png"))
    assert len(masks) == 3
    for path in masks:  # at image resolution, 0 or 255
        mask = Image.open(path)
        assert mask.mode == "L" and mask.size == (48, 48) and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_the_figures_also_go_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    photos = _photos(tmp_path / "photos", count=2)
    for command in ("attention", "pca", "ncut", "layers"):
        assert viz_main([command, "--model", "crate_mae_encoder_nano", "--images", str(photos), "--out", str(tmp_path),
                         "--tensorboard", str(tmp_path / "tb")]) == 0
    tags = set()
    for events in (tmp_path / "tb").iterdir():
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    assert tags == {"attention/img0", "attention/img1", "attention/grid", "pca", "ncut", "layers"}


def test_a_checkpoint_of_the_supervised_family_at_a_finer_stride(tmp_path: Path) -> None:
    from tests.model.test_hub import released_supervised

    torch.save({"state_dict": {"module." + k: v for k, v in released_supervised().items()}}, tmp_path / "crate.pth")
    photos = _photos(tmp_path / "photos", count=2)
    for command in ("attention", "pca", "ncut"):
        assert viz_main([command, "--checkpoint", str(tmp_path / "crate.pth"), "--images", str(photos / "img0.png"),
                         str(photos / "img1.png"), "--stride", "2", "--size", "32", "--out", str(tmp_path / "out")]) == 0
        assert (tmp_path / "out" / f"{command}.png").stat().st_size > 0
    assert viz_main(["attention", "--model", "crate_nano", "--pretrained-file", str(tmp_path / "crate.pth"),
                     "--images", str(photos / "img0.png"), "--out", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").stat().st_size > 0


@pytest.mark.parametrize(("extra", "words", "status"), [
    (["--stride", "3"], "stride 3", 1), (["--layer", "3"], "--layer 3", 2), (["--mass", "1.5"], "mass", 2),
    (["--images", "nowhere/*.png"], "nowhere", 1), (["--model", "crate_nope"], "crate_nope", 1),
    (["--model", "crate_mae_nano"], "needs a classifier", 1), (["--n", "0"], "--n 0", 2), (["--size", "50"], "50", 2),
    (["--device", "cuda:x"], "not a device", 2)])
def test_bad_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], words: str,
                                    status: int) -> None:
    """One line, and the status of its kind (crate_mae/errors.py): 2 for a ConfigError (an argument or a config value
    out of its range), 1 for what the files, the model or the images refuse."""
    photos = _photos(tmp_path / "photos", count=1)
    args = ["--model", "crate_nano", "--images", str(photos), "--out", str(tmp_path)]
    for i, flag in enumerate(extra[::2]):  # a flag given twice: the test's value wins
        if flag in args:
            args[args.index(flag) + 1] = extra[2 * i + 1]
        else:
            args += [flag, extra[2 * i + 1]]
    assert viz_main(["attention", *args]) == status
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.gpu
def test_segmentation_commands_on_the_gpu_match_the_cpu(tmp_path: Path) -> None:
    """The same masks from the same weights on either device (ncut's cut, the attention masks' 60 % rule)."""
    import numpy as np
    from PIL import Image

    photos = _photos(tmp_path / "photos", count=2)
    cfg = load_config(None, ["model.variant=nano"])
    encoder = {k: v for k, v in build_mae(cfg.model).state_dict().items() if not k.startswith(("mask_token", "decoder"))}
    torch.save({"model": encoder, "config": config_to_dict(cfg)}, tmp_path / "encoder.pth")
    for device in ("cpu", "cuda"):
        for command in ("attention", "pca", "ncut", "layers"):
            extra = ["--stride", "2"] if command != "layers" else []
            assert viz_main([command, "--checkpoint", str(tmp_path / "encoder.pth"), "--images", str(photos), "--device", device,
                             "--out", str(tmp_path / device), *extra] + (["--save-masks"] if command == "ncut" else [])) == 0
    for name in ("ncut-img0-mask.png", "ncut-img1-mask.png"):
        cpu, cuda = (np.asarray(Image.open(tmp_path / d / name)) for d in ("cpu", "cuda"))
        assert (cpu == cuda).mean() > 0.99


def test_images_from_shards_by_manifest_or_glob_and_from_several_specs(tmp_path: Path, digits: tuple[str, str]) -> None:
    from crate_mae.viz.inputs import load_images

    _, val = digits
    by_manifest, names = load_images(val, img_size=32, n=3)
    by_glob, _ = load_images(str(Path(val).parent / "val-*.tar"), img_size=32, n=3)
    assert by_manifest.shape == (3, 3, 32, 32) and by_manifest.dtype == torch.uint8 and names[0] == "sample-0"
    assert torch.equal(by_manifest, by_glob)
    photos = _photos(tmp_path / "photos", count=2)
    images, names = load_images([str(photos / "img1.png"), str(photos)], img_size=32, n=8)
    assert images.shape[0] == 3 and names == ["img1", "img0", "img1"]  # in the order given, folders sorted


def test_ncut_refuses_an_affinity_too_large_to_hold(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photos = _photos(tmp_path / "photos", count=1)
    # 637 × 637 = 405,769 tokens at stride 1: a 1.2 TiB affinity, refused at once
    assert viz_main(["ncut", "--model", "crate_nano", "--images", str(photos), "--size", "640", "--stride", "1"]) == 1
    assert "405769 tokens per image" in capsys.readouterr().err
