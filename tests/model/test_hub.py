"""The one reader (model/files.py), the one resolver and builder (model/hub.py) and timm's side of them: the seed's supervised CRATE in every released layout,
our own files, strict errors, learned-table resampling, pretrained_cfg rows, save_for_hf, forward_intermediates.

The released supervised CRATE's state dict and forward pass are written here from the model's definition (docs/MODEL.md,
"Two families around one encoder" and "Key layouts") alone, with the released key names, independent of the package.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import save_for_hf
from torch.testing import assert_close

import crate_mae.model  # noqa: F401  (registers the timm names)
from crate_mae.config import ClassifierConfig, Config, MAEConfig, config_to_dict
from crate_mae.model import build_classifier, build_mae, hub, read_checkpoint, resolve_config, to_released
from crate_mae.model.files import export_encoder, shapes_of
from crate_mae.model.layers import resample_table
from crate_mae.model.timm_models import MODELS

D, HEADS, DEPTH, PATCH, IMG, CLASSES = 64, 4, 3, 4, 32, 7
GRID = IMG // PATCH


def released_supervised(seed: int = 0, *, dim: int = D, depth: int = DEPTH, patch: int = PATCH, grid: int = GRID,
                        classes: int = CLASSES) -> dict[str, torch.Tensor]:
    """Every key of the released supervised CRATE, with its shape, filled at random."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.2  # noqa: E731
    pixels = 3 * patch * patch
    state = {"to_patch_embedding.1.weight": 1 + r(pixels), "to_patch_embedding.1.bias": r(pixels),
             "to_patch_embedding.2.weight": r(dim, pixels), "to_patch_embedding.2.bias": r(dim),
             "to_patch_embedding.3.weight": 1 + r(dim), "to_patch_embedding.3.bias": r(dim),
             "pos_embedding": r(1, 1 + grid * grid, dim), "cls_token": r(1, 1, dim),
             "mlp_head.0.weight": 1 + r(dim), "mlp_head.0.bias": r(dim),
             "mlp_head.1.weight": r(classes, dim), "mlp_head.1.bias": r(classes)}
    for i in range(depth):
        k = f"transformer.layers.{i}."
        state.update({k + "0.norm.weight": 1 + r(dim), k + "0.norm.bias": r(dim), k + "0.fn.qkv.weight": r(dim, dim),
                      k + "0.fn.to_out.0.weight": r(dim, dim), k + "0.fn.to_out.0.bias": r(dim),
                      k + "1.norm.weight": 1 + r(dim), k + "1.norm.bias": r(dim), k + "1.fn.weight": r(dim, dim)})
    return state


def supervised_forward(s: dict[str, torch.Tensor], img: torch.Tensor, *, heads: int = HEADS, patch: int = PATCH,
                       eta: float = 0.1, lambd: float = 0.1, pool: str = "cls") -> torch.Tensor:
    """The released supervised CRATE's forward pass, from docs/MODEL.md: logits (B, K)."""
    dim = s["cls_token"].shape[-1]
    b, c, h, w = img.shape
    x = img.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    x = x.reshape(b, -1, patch * patch * c)
    x = F.layer_norm(x, x.shape[-1:], s["to_patch_embedding.1.weight"], s["to_patch_embedding.1.bias"])
    x = F.linear(x, s["to_patch_embedding.2.weight"], s["to_patch_embedding.2.bias"])
    x = F.layer_norm(x, (dim,), s["to_patch_embedding.3.weight"], s["to_patch_embedding.3.bias"])
    x = torch.cat([s["cls_token"].expand(b, -1, -1), x], dim=1) + s["pos_embedding"]
    for i in range(sum(k.endswith("1.fn.weight") for k in s)):
        k = f"transformer.layers.{i}."
        u = F.layer_norm(x, (dim,), s[k + "0.norm.weight"], s[k + "0.norm.bias"])
        q = F.linear(u, s[k + "0.fn.qkv.weight"]).reshape(b, -1, heads, dim // heads).transpose(1, 2)
        a = torch.softmax(q @ q.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
        o = (a @ q).transpose(1, 2).reshape(b, -1, dim)
        x = x + F.linear(o, s[k + "0.fn.to_out.0.weight"], s[k + "0.fn.to_out.0.bias"])
        u, weight = F.layer_norm(x, (dim,), s[k + "1.norm.weight"], s[k + "1.norm.bias"]), s[k + "1.fn.weight"]
        grad = F.linear(u, weight.t()) - F.linear(F.linear(u, weight), weight.t())  # Dᵀu − DᵀDu
        x = F.relu(u + eta * grad - eta * lambd)
    feat = x[:, 0] if pool == "cls" else x.mean(dim=1)  # no final norm; mean over all tokens, CLS included
    feat = F.layer_norm(feat, (dim,), s["mlp_head.0.weight"], s["mlp_head.0.bias"])
    return F.linear(feat, s["mlp_head.1.weight"], s["mlp_head.1.bias"])


WRAPPERS = {
    "bare": lambda s: s,
    "released CRATE-S": lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}},
    "emergence notebooks": lambda s: {"model": s},
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_each_released_supervised_layout_gives_the_released_logits(tmp_path: Path, wrapper: str, pool: str) -> None:
    state = released_supervised()
    path = tmp_path / "crate.pth"
    torch.save(WRAPPERS[wrapper](state), path)
    model, cfg = hub.create_model(ClassifierConfig(pool=pool), path)
    assert (cfg.family, cfg.variant, cfg.heads, cfg.num_classes, cfg.lambd) == ("supervised", "nano", HEADS, CLASSES, 0.1)
    img = torch.randn(3, 3, IMG, IMG)
    assert_close(model.eval()(img), supervised_forward(state, img, pool=pool), atol=1e-5, rtol=1e-4)
    back = to_released(model.state_dict())
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    again = timm.create_model("crate_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, pool=pool)
    assert_close(again.eval()(img), model(img))  # timm's own loading path gives the same model


def test_the_emergence_models_are_registered_with_their_shapes() -> None:
    for name, (dim, heads) in {"crate_small_21k_patch8": (384, 6), "crate_base_21k_patch8": (768, 12)}.items():
        model = timm.create_model(name)
        assert (model.num_features, model.encoder.layers[0].attn.heads, model.patch_size) == (dim, heads, 8)
        assert model.num_classes == 21842 and model.pos.table.shape == (1, 1 + 28 * 28, dim)
        assert model.family == "supervised" and len(model.encoder.layers) == 12
        assert model.pretrained_cfg["num_classes"] == 21842


def test_seed_sizes_have_the_published_parameter_counts() -> None:
    # the CRATE paper's Table: CRATE-T 6.09M, CRATE-S 13.12M, CRATE-B 22.80M, CRATE-L 77.64M (ImageNet-1K head)
    counts = {n: sum(p.numel() for p in timm.create_model(f"crate_{n}").parameters()) / 1e6
              for n in ("tiny", "small", "base", "large")}
    assert [round(c, 2) for c in counts.values()] == [6.09, 13.12, 22.8, 77.64]


def test_timm_pretrained_cfg_of_every_row() -> None:
    for name, row in MODELS.items():
        cfg = timm.get_pretrained_cfg(name).to_dict()
        side = 32 if row.variant in ("nano", "demo") else 224
        assert cfg["input_size"] == (3, side, side), name
        assert cfg["crop_pct"] == (1.0 if side == 32 else 0.875) and cfg["interpolation"] == "bicubic"
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["first_conv"] == "patch_embed.proj"
        assert cfg["classifier"] == ("head" if row.kind == "classifier" else None)
        assert cfg["num_classes"] == (0 if row.kind == "mae" else 21842 if "21k" in name else 1000)
        # timm's tools shrink an input to 96 or 128 px unless a smaller size is given: patch 14 divides neither
        assert cfg.get("min_input_size") == ((3, 112, 112) if name.endswith("patch14") else None), name
    for name, side in (("crate_demo", 32), ("crate_mae_encoder_nano", 32), ("crate_mae_base", 224), ("crate_tiny", 224)):
        data = timm.data.resolve_model_data_config(timm.create_model(name))
        assert data["input_size"] == (3, side, side) and data["crop_pct"] == (1.0 if side == 32 else 0.875)


def _ours(tmp_path: Path, **model: object) -> tuple[torch.nn.Module, Path, Config]:
    """A nano CrateMAE and its final.pth as a run writes it (model, optimiser-free, config)."""
    cfg = Config(model=resolve_config(MAEConfig(variant="nano", **model)))
    mae = build_mae(cfg.model)
    path = tmp_path / "final.pth"
    torch.save({"model": mae.state_dict(), "step": 3, "config": config_to_dict(cfg)}, path)
    return mae, path, cfg


def test_our_files_final_encoder_and_safetensors_carry_their_config(tmp_path: Path) -> None:
    mae, final, _ = _ours(tmp_path, heads=2, lambd=0.3)
    img = torch.randn(2, 3, IMG, IMG)
    saved = read_checkpoint(final)
    export_encoder(saved.state, saved.config, tmp_path / "encoder.pth")
    export_encoder(saved.state, saved.config, tmp_path / "encoder.safetensors")
    export_encoder(saved.state, saved.config, tmp_path / "whole.safetensors", whole=True)
    for name in ("final.pth", "encoder.pth", "encoder.safetensors", "whole.safetensors"):
        clf, cfg = hub.create_model(ClassifierConfig(num_classes=10), tmp_path / name)
        assert (cfg.heads, cfg.lambd, clf.encoder.layers[0].attn.heads) == (2, 0.3, 2), name
        assert_close(clf.eval().forward_features(img), mae.eval().encode(img))
        with pytest.raises(ValueError, match=rf"{name}: model\.heads is 2 in the checkpoint but 4 in the config"):
            hub.create_model(ClassifierConfig(heads=4), tmp_path / name)
    again, _ = hub.create_model(MAEConfig(), tmp_path / "whole.safetensors")
    noise = torch.rand(2, GRID * GRID)
    assert torch.equal(again.eval().forward_masked(img, noise=noise).pred, mae.forward_masked(img, noise=noise).pred)
    with pytest.raises(ValueError, match="encoder.pth: holds no decoder"):
        hub.create_model(MAEConfig(), tmp_path / "encoder.pth")
    timm_clf = timm.create_model("crate_mae_encoder_nano", pretrained=True, pretrained_cfg_overlay={"file": str(final)})
    assert timm_clf.encoder.layers[0].attn.heads == 2 and timm_clf.encoder.layers[0].ista.lambd == 0.3
    with pytest.raises(ValueError, match=r"final\.pth: model\.eta is 0\.1 in the checkpoint but 0\.2"):
        timm.create_model("crate_mae_encoder_nano", pretrained=True, eta=0.2, pretrained_cfg_overlay={"file": str(final)})


def test_family_size_patch_and_head_mismatches_are_one_line_errors(tmp_path: Path) -> None:
    sup, mae_file = tmp_path / "sup.pth", tmp_path / "final.pth"
    torch.save({"model": released_supervised()}, sup)
    _ours(tmp_path)
    cases = [
        (ClassifierConfig(family="mae"), sup, r"sup\.pth: holds a released supervised CRATE \(key "
                                                        r"'to_patch_embedding\.1\.weight'\), but model\.family is 'mae'"),
        (ClassifierConfig(family="supervised"), mae_file, r"final\.pth: holds our CRATE-MAE \(key 'patch_embed"
                                                                   r"\.proj\.weight'\), but model\.family is 'supervised'"),
        (ClassifierConfig(variant="demo"), sup, r"sup\.pth: shape mismatch for 'patch_embed\.proj\.weight': "
                                                         r"checkpoint \(64, 48\), model \(192, 48\)"),
        (ClassifierConfig(patch_size=8), sup, r"shape mismatch for 'patch_embed\.pre_norm\.weight': "
                                                       r"checkpoint \(48,\), model \(192,\)"),
        (ClassifierConfig(encoder_depth=4), sup, r"missing key 'encoder\.layers\.3\.\S+' \(and 7 more\)"),
        (MAEConfig(variant="demo"), mae_file, r"final\.pth: model\.variant is 'nano' in the checkpoint but 'demo'"),
    ]
    for cfg, path, message in cases:
        with pytest.raises(ValueError, match=message):
            hub.create_model(cfg, path)
    model = build_classifier(ClassifierConfig(family="supervised", variant="nano", num_classes=3))
    with pytest.raises(ValueError, match=r"shape mismatch for 'head\.weight': checkpoint \(7, 64\), model \(3, 64\)"):
        hub.load_weights(model, released_supervised())
    hub.load_weights(model, released_supervised(), new_head=True)  # asked for: the head is set aside
    assert torch.equal(model.fc_norm.weight, released_supervised()["mlp_head.0.weight"])
    fresh, cfg = hub.create_model(ClassifierConfig(num_classes=3), sup)  # another dataset
    assert fresh.num_classes == 3 and cfg.num_classes == 3
    junk = tmp_path / "junk.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2)}}, junk)
    with pytest.raises(ValueError, match=r"junk\.pth: no CRATE layout: key 'fc\.weight'"):
        read_checkpoint(junk)


def _bicubic_1d(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch's bicubic (a = −0.75, half-pixel centres, borders replicated) as an (n_out, n_in) matrix, by hand."""
    def kernel(t: float) -> float:
        a, t = -0.75, abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for k in range(base - 1, base + 3):
            m[i, min(max(k, 0), n_in - 1)] += kernel(src - k)
    return m


@pytest.mark.parametrize("side", [12, 5])
def test_learned_table_interpolation_at_other_sizes(side: int) -> None:
    state = released_supervised()
    table = state["pos_embedding"]  # (1, 1 + 8·8, d)
    grid = table[0, 1:].reshape(GRID, GRID, D).double().numpy()
    m = _bicubic_1d(GRID, side)
    expected = np.einsum("ih,jw,hwd->ijd", m, m, grid).reshape(side * side, D)
    got = resample_table(table, (side, side))
    assert torch.equal(got[0, 0], table[0, 0])  # the CLS row is kept
    assert_close(got[0, 1:].double(), torch.from_numpy(expected), atol=1e-5, rtol=1e-5)
    assert torch.equal(resample_table(table, (GRID, GRID)), table)
    model = build_classifier(ClassifierConfig(family="supervised", variant="nano", num_classes=CLASSES))
    hub.load_weights(model, state)
    img = torch.randn(2, 3, side * PATCH, side * PATCH)
    resized_state = dict(state, pos_embedding=got)  # the released forward at that size, with the table resampled
    assert_close(model.eval()(img), supervised_forward(resized_state, img), atol=1e-5, rtol=1e-4)
    # a model built at that size: the table is resampled at load, and computes the same
    built_there, _ = hub.create_model(ClassifierConfig(img_size=side * PATCH), _saved(state))
    assert built_there.pos.table.shape == (1, 1 + side * side, D)
    assert_close(built_there.eval()(img), model(img), atol=1e-5, rtol=1e-4)


def _saved(state: dict[str, torch.Tensor]) -> hub.Checkpoint:
    """A Checkpoint in memory, as read_checkpoint would give for a file holding `state`."""
    from crate_mae.model.convert import layout_of, to_ours

    ours = to_ours(state)
    return hub.Checkpoint("memory", ours, layout_of(state), None, shapes_of(ours, "supervised"),
                          int(ours["head.weight"].shape[0]))


@pytest.mark.parametrize("name, args", [("crate_nano", {"heads": 2, "lambd": 0.3, "num_classes": 5}),
                                        ("crate_mae_encoder_nano", {"eta": 0.2, "pool": "mean"}),
                                        ("crate_mae_nano", {"heads": 8, "norm_pix_loss": True})])
def test_save_for_hf_then_local_dir_round_trips(tmp_path: Path, name: str, args: dict) -> None:
    model = timm.create_model(name, **args).eval()
    save_for_hf(model, tmp_path / "hf", safe_serialization=True)
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors"}
    again = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    img = torch.randn(2, 3, IMG, IMG)
    if name == "crate_mae_nano":
        noise = torch.rand(2, GRID * GRID)
        assert torch.equal(again.forward_masked(img, noise=noise).pred, model.forward_masked(img, noise=noise).pred)
        assert again.norm_pix_loss
    else:
        assert torch.equal(again(img), model(img)) and again.pool == model.pool
    layer = again.encoder.layers[0]
    assert (layer.attn.heads, layer.ista.lambd, layer.ista.eta) == (args.get("heads", 4), args.get("lambd", layer.ista.lambd),
                                                                    args.get("eta", 0.1))


@pytest.mark.parametrize("family", ["mae", "supervised"])
def test_forward_intermediates_against_the_layers_run_by_hand(family: str) -> None:
    model = build_classifier(ClassifierConfig(family=family, variant="nano", encoder_depth=3, num_classes=5)).eval()
    img = torch.randn(2, 3, IMG, IMG)
    z, by_hand = model.tokens(img), []
    for layer in model.encoder.layers:
        z = layer(z)
        by_hand.append(z)
    final, outs = model.forward_intermediates(img)  # every layer, NCHW, patch tokens only
    assert_close(final, model.encoder.norm(by_hand[-1]))
    assert_close(final, model.forward_features(img))
    for got, want in zip(outs, by_hand):
        assert got.shape == (2, D, GRID, GRID)
        assert_close(got, want[:, 1:].reshape(2, GRID, GRID, D).permute(0, 3, 1, 2))
    last_two = model.forward_intermediates(img, indices=2, output_fmt="NLC", intermediates_only=True)
    assert [t.shape for t in last_two] == [(2, GRID * GRID, D)] * 2
    assert_close(last_two[0], by_hand[1][:, 1:])
    [(patches, cls)] = model.forward_intermediates(img, indices=[-3], return_prefix_tokens=True, norm=True,
                                                   stop_early=True, output_fmt="NLC", intermediates_only=True)
    assert_close(torch.cat([cls, patches], 1), model.encoder.norm(by_hand[0]))
    assert_close(model.layer_input(img, 2), by_hand[1])
    inputs = model.layer_inputs(img)
    assert len(inputs) == 3 and all(assert_close(a, b) is None for a, b in zip(inputs[1:], by_hand[:-1]))
    assert_close(model.layer_input(img, 0), model.tokens(img))
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(img, indices=[3])
    assert model.prune_intermediate_layers([1]) == [1] and len(model.encoder.layers) == 2
    assert model(img).shape == (2, D)  # the head pruned: pooled features


def test_stage_style_config_records_what_was_built(tmp_path: Path) -> None:
    _, final, _ = _ours(tmp_path, heads=2)
    _, cfg = hub.create_model(ClassifierConfig(num_classes=10), final)
    assert cfg.resolved and (cfg.variant, cfg.heads, cfg.num_classes, cfg.family) == ("nano", 2, 10, "mae")


def test_a_headless_classifier_file_reloads_headless(tmp_path: Path) -> None:
    """A classifier saved with num_classes=0 (its head's norm, no Linear) is built again headless when the class count
    is left unset, and gets a new head when one is asked for."""
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(family="alpha", variant="nano", num_classes=0))
    torch.save({"model": model.state_dict()}, tmp_path / "headless.pth")
    again, cfg = hub.create_model(ClassifierConfig(), tmp_path / "headless.pth")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert cfg.num_classes == 0 and read_checkpoint(tmp_path / "headless.pth").num_classes == 0
    torch.testing.assert_close(again.eval()(images), model.eval()(images))  # the pooled, normed features
    ten, cfg = hub.create_model(ClassifierConfig(num_classes=10), tmp_path / "headless.pth")
    assert cfg.num_classes == 10 and ten(images).shape == (2, 10)
