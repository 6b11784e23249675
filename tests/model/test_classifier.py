"""CrateClassifier: any image size, pooling, strict loading from a CRATE-MAE, timm registration."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.testing import assert_close

import crate_mae.model  # noqa: F401  (registers the timm models)
from crate_mae.config import ClassifierConfig, MAEConfig
from crate_mae.model import CrateClassifier, build_classifier, build_mae, hub


def nano_classifier(**overrides) -> CrateClassifier:
    return build_classifier(ClassifierConfig(variant="nano", num_classes=10, **overrides))


@pytest.mark.parametrize("size", [32, 224, 48])
def test_any_image_size_the_patch_divides(size: int) -> None:
    clf = nano_classifier()
    logits = clf(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10)
    assert clf.forward_features(torch.randn(1, 3, size, size)).shape == (1, 1 + (size // 4) ** 2, 64)


def test_regenerated_table_equals_a_model_built_for_that_size() -> None:
    small = nano_classifier()
    big = build_classifier(ClassifierConfig(variant="nano", num_classes=10, img_size=64))
    big.load_state_dict(small.state_dict())
    img = torch.randn(1, 3, 64, 64)
    assert_close(small(img), big(img))


def test_image_size_not_divisible_by_patch_is_an_error() -> None:
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        nano_classifier()(torch.randn(1, 3, 30, 30))


def test_base_classifiers_at_224() -> None:
    clf = timm.create_model("crate_base", num_classes=10)
    with torch.no_grad():
        assert clf(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    assert clf.family == "supervised" and clf.encoder.layers[0].ista.lambd == 0.1  # the seed's supervised CRATE
    mae_encoder = timm.create_model("crate_mae_encoder_base", num_classes=10)
    assert mae_encoder.family == "mae" and mae_encoder.encoder.layers[0].ista.lambd == 0.5


def test_pooling_and_heads() -> None:
    img = torch.randn(2, 3, 32, 32)
    cls_pool, mean_pool = nano_classifier(pool="cls"), nano_classifier(pool="mean")
    mean_pool.load_state_dict(cls_pool.state_dict())
    tokens = cls_pool.forward_features(img)
    assert_close(cls_pool.forward_head(tokens, pre_logits=True), cls_pool.fc_norm(tokens[:, 0]))
    assert_close(mean_pool.forward_head(tokens, pre_logits=True), cls_pool.fc_norm(tokens[:, 1:].mean(1)))
    cls_pool.reset_classifier(0)
    assert cls_pool(img).shape == (2, 64)
    cls_pool.reset_classifier(3, "mean")
    assert cls_pool(img).shape == (2, 3) and cls_pool.pool == "mean"


def test_every_parameter_gets_a_gradient() -> None:
    clf = nano_classifier()
    clf(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    for name, p in clf.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loads_every_encoder_tensor_from_a_mae() -> None:
    mae = build_mae(MAEConfig(variant="nano"))
    clf = build_classifier(ClassifierConfig(variant="nano", num_classes=10))
    hub.load_weights(clf, {"model": {"module." + k: v for k, v in mae.state_dict().items()}})
    img = torch.randn(2, 3, 32, 32)
    assert_close(clf.forward_features(img), mae.encode(img))
    assert clf.encoder.layers[0].ista.lambd == mae.encoder.layers[0].ista.lambd == 0.5


def test_missing_encoder_key_is_named() -> None:
    state = build_mae(MAEConfig(variant="nano")).state_dict()
    del state["encoder.layers.1.attn.proj.bias"]
    with pytest.raises(ValueError, match=r"missing key 'encoder\.layers\.1\.attn\.proj\.bias'"):
        hub.load_weights(nano_classifier(), state)


def test_unexpected_key_is_named() -> None:
    state = build_mae(MAEConfig(variant="nano")).state_dict()
    state["encoder.layers.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected key 'encoder\.layers\.0\.extra\.weight'"):
        hub.load_weights(nano_classifier(), state)


def test_wrong_size_is_named() -> None:
    state = build_mae(MAEConfig(variant="nano", encoder_depth=4)).state_dict()
    with pytest.raises(ValueError, match=r"unexpected key 'encoder\.layers\.3\."):
        hub.load_weights(nano_classifier(), state)
    state = build_mae(MAEConfig(variant="nano", dim=32)).state_dict()
    with pytest.raises(ValueError, match="shape mismatch for 'cls_token'"):
        hub.load_weights(nano_classifier(), state)


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large", "demo", "nano"])
def test_timm_names_exist(size: int) -> None:
    for name in (f"crate_mae_{size}", f"crate_mae_encoder_{size}", f"crate_{size}"):
        assert name in timm.list_models("crate*")


def test_timm_create_model_builds_our_models() -> None:
    mae = timm.create_model("crate_mae_nano", norm_pix_loss=True)
    assert mae.norm_pix_loss and mae.encoder.layers[0].ista.lambd == 0.5
    clf = timm.create_model("crate_mae_encoder_nano", num_classes=7, global_pool="avg")
    assert clf.pool == "mean" and clf(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="no hosted weights"):
        timm.create_model("crate_mae_nano", pretrained=True)


def test_timm_pretrained_from_a_local_file(tmp_path) -> None:
    mae = build_mae(MAEConfig(variant="nano"))
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict()}, path)
    clf = timm.create_model("crate_mae_encoder_nano", pretrained=True, num_classes=5,
                            pretrained_cfg_overlay={"file": str(path)})
    img = torch.randn(1, 3, 32, 32)
    assert_close(clf.forward_features(img), mae.encode(img))
    again = timm.create_model("crate_mae_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert_close(again.encode(img), mae.encode(img))


def test_the_models_take_uint8_pixels_and_normalise_them_in_one_place() -> None:
    """The input contract, told by the dtype: uint8 pixels are normalised by `Normalize`, the first step; float is
    normalised already (timm's contract) and passes through; anything else is a one-line InputError."""
    from crate_mae.config.variants import IMAGE_MEAN, IMAGE_STD
    from crate_mae.model.layers import Normalize

    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = (pixels.float() / 255 - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    assert_close(Normalize()(pixels), expected)
    assert Normalize()(expected) is expected
    for family in ("mae", "supervised"):
        clf = build_classifier(ClassifierConfig(family=family, variant="nano", num_classes=10)).eval()
        assert_close(clf(pixels), clf(expected))
        assert not any("normalize" in k for k in clf.state_dict())  # the statistics are not weights
    mae, noise = build_mae(MAEConfig(variant="nano")).eval(), torch.rand(2, 64)
    out, ref = mae.forward_masked(pixels, noise=noise), mae.forward_masked(expected, noise=noise)
    assert_close(out.loss, ref.loss) and assert_close(out.pred, ref.pred)
    from crate_mae.errors import InputError

    with pytest.raises(InputError, match="uint8 pixels or normalised float images, got torch.int64"):
        clf(pixels.long())  # numpy's int64 pixels would otherwise pass as "normalised"
    with pytest.raises(InputError, match=r"RGB images \(B, 3, H, W\), got shape \[2, 1, 32, 32\]"):
        clf(pixels[:, :1])
