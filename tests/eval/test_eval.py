"""The frozen-feature probes: top-k counts, weighted kNN, logistic regression (both solvers), the feature cache."""
from __future__ import annotations

import logging

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from crate_mae.eval.features import feature_cache_key, load_cached, save_cached
from crate_mae.eval.knn import knn_accuracy, knn_classify
from crate_mae.eval.logreg import fit_logistic_regression
from crate_mae.eval.metrics import topk_correct


def test_topk_correct_counts_hits_and_clips_k() -> None:
    logits = torch.tensor([[0.1, 0.7, 0.2],   # ranking 1, 2, 0
                           [0.5, 0.1, 0.4],   # ranking 0, 2, 1
                           [0.2, 0.3, 0.9]])  # ranking 2, 1, 0
    labels = torch.tensor([1, 2, 0])  # top-1 hit, top-2 hit, only top-3
    assert topk_correct(logits, labels, ks=(1, 2, 3)) == {1: 1, 2: 2, 3: 3}
    assert topk_correct(logits, labels) == {1: 1, 5: 3}  # k = 5 > K = 3 is clipped to 3


def clusters(per_class: int, *, classes: int = 5, dim: int = 16, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` points around each of `classes` orthogonal unit directions (scaled, so norms vary)."""
    y = torch.arange(classes).repeat_interleave(per_class)
    x = torch.eye(dim)[y] + noise * torch.randn(len(y), dim)
    return x * torch.rand(len(y), 1).add(0.5), y


def test_knn_is_perfect_on_separated_clusters() -> None:
    train_x, train_y = clusters(20)
    val_x, val_y = clusters(10)
    assert knn_accuracy(train_x, train_y, val_x, val_y, num_classes=5) == {"top1": 100.0, "top5": 100.0}


def test_knn_scores_do_not_depend_on_the_chunk() -> None:
    train_x, train_y = clusters(20)
    query_x, _ = clusters(7)  # 35 queries: chunks of 8 leave a remainder
    whole = knn_classify(train_x, train_y, query_x, num_classes=5, k=10)
    chunked = knn_classify(train_x, train_y, query_x, num_classes=5, k=10, chunk=8)
    assert whole.shape == (35, 5)
    torch.testing.assert_close(chunked, whole)
    # Each row is the sum of k = 10 weights exp(sim / T), each sim ≤ 1.
    assert (whole.sum(1) <= 10 * torch.tensor(1 / 0.07).exp() * (1 + 1e-5)).all()


def test_knn_weights_votes_by_similarity() -> None:
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    train_y = torch.tensor([0, 1, 1])
    scores = knn_classify(train_x, train_y, torch.tensor([[2.0, 0.0]]), num_classes=3, k=2, temperature=0.5)
    # Neighbours: (1, 0) at cos 1 (class 0) and (0.6, 0.8) at cos 0.6 (class 1); (0, 1) at cos 0 is third.
    torch.testing.assert_close(scores, torch.tensor([[torch.tensor(2.0).exp(), torch.tensor(1.2).exp(), 0.0]]))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    """sklearn's bundled 8×8 digits (1797 × 64 raw pixels, 10 classes), a fixed stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    train_x, val_x, train_y, val_y = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return tuple(torch.as_tensor(a) for a in (train_x, train_y, val_x, val_y))


@pytest.mark.parametrize("solver", ["sklearn", "torch"])
def test_logistic_regression_learns_digits(digits: tuple[torch.Tensor, ...], solver: str) -> None:
    result = fit_logistic_regression(*digits, Cs=(0.01, 1.0), solver=solver, max_iter=200, device="cpu")
    assert result.solver == solver
    assert result.C in (0.01, 1.0)
    assert set(result.searched) == {0.01, 1.0}
    assert result.heldout_top1 == result.searched[result.C] == max(result.searched.values())
    assert result.val_top1 > 90.0  # chance is 10 %
    assert result.val_top1 <= result.val_top5 <= 100.0


def test_solvers_agree_for_the_same_C(digits: tuple[torch.Tensor, ...]) -> None:
    ours = fit_logistic_regression(*digits, Cs=(0.1,), solver="torch", max_iter=300, device="cpu")
    theirs = fit_logistic_regression(*digits, Cs=(0.1,), solver="sklearn", max_iter=300)
    assert abs(ours.heldout_top1 - theirs.heldout_top1) <= 3.0
    assert abs(ours.val_top1 - theirs.val_top1) <= 2.0


@pytest.mark.parametrize("solver", ["sklearn", "torch"])
def test_unconverged_fit_is_logged_not_raised(digits: tuple[torch.Tensor, ...], solver: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="crate_mae.eval"):
        result = fit_logistic_regression(*digits, Cs=(1.0,), solver=solver, max_iter=2, device="cpu")
    assert f"({solver}, C=1) stopped at max_iter=2" in caplog.text
    assert 0.0 <= result.val_top1 <= 100.0


@pytest.mark.gpu
def test_probes_run_on_cuda(digits: tuple[torch.Tensor, ...]) -> None:
    train_x, train_y, val_x, val_y = (t.cuda() for t in digits)
    result = fit_logistic_regression(train_x, train_y, val_x, val_y, Cs=(0.1,), solver="torch", max_iter=300)
    assert result.val_top1 > 90.0
    scores = knn_classify(train_x, train_y, val_x, num_classes=10, chunk=100)
    assert scores.device.type == "cuda"
    on_cpu = knn_classify(*digits[:3], num_classes=10)
    assert (scores.argmax(1).cpu() == on_cpu.argmax(1)).float().mean() > 0.99  # near-ties at rank k may differ
    assert knn_accuracy(train_x, train_y, val_x, val_y, num_classes=10)["top1"] > 90.0


def test_auto_solver_and_tiny_classes_fall_back_to_a_plain_split() -> None:
    # Class 2 has one sample, so the held-out split cannot be stratified; it must still run.
    train_x, train_y = clusters(8, classes=3)
    train_x, train_y = train_x[:17], train_y[:17]
    val_x, val_y = clusters(4, classes=3)
    result = fit_logistic_regression(train_x, train_y, val_x, val_y, Cs=(1.0,), heldout=0.3, max_iter=100)
    assert result.solver == "sklearn"  # "auto" on a small problem
    assert result.val_top5 == 100.0  # K = 3, so top-5 is clipped to top-3


def test_logistic_regression_rejects_bad_arguments(digits: tuple[torch.Tensor, ...]) -> None:
    with pytest.raises(ValueError, match="solver"):
        fit_logistic_regression(*digits, solver="liblinear")
    with pytest.raises(ValueError, match="heldout"):
        fit_logistic_regression(*digits, heldout=0.0)


def test_feature_cache_key_is_stable_and_distinguishes() -> None:
    key = feature_cache_key("ckpt.pth", 3, {"split": "val", "layer": -1})
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == feature_cache_key("ckpt.pth", 3, {"layer": -1, "split": "val"})  # dict order does not matter
    assert key != feature_cache_key("ckpt.pth", 4, {"split": "val", "layer": -1})


def test_feature_cache_round_trip(tmp_path) -> None:
    path = tmp_path / "cache" / "feats.pth"
    assert load_cached(path) is None  # nothing there yet
    big = torch.randn(10_000, 8)
    features = {"x": big[:3], "y": torch.arange(3)}
    save_cached(path, features)
    loaded = load_cached(path)
    assert loaded is not None and loaded.keys() == features.keys()
    for name in features:
        torch.testing.assert_close(loaded[name], features[name])
    assert path.stat().st_size < 10_000  # the slice was saved without the rest of its storage
    assert [p.name for p in path.parent.iterdir()] == ["feats.pth"]  # no temp file left behind


def test_corrupt_feature_cache_is_ignored(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "feats.pth"
    save_cached(path, {"x": torch.randn(4, 4)})
    path.write_bytes(path.read_bytes()[:50])  # truncated, as by a crash of a non-atomic writer
    with caplog.at_level(logging.WARNING, logger="crate_mae.eval"):
        assert load_cached(path) is None
    assert "unreadable feature cache" in caplog.text
    path.write_bytes(b"not a torch file")
    assert load_cached(path) is None


def test_evaluate_and_extract_bring_each_batch_to_the_device_by_to_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """`to_device` is the one way a loader's batch reaches the device: both evaluations call it once per batch, and
    it takes only uint8 pixels (or a RawBatch), never float passed through on its dtype."""
    import crate_mae.eval.features as features
    import crate_mae.eval.metrics as metrics
    from crate_mae.data import Batch, to_device
    from crate_mae.engine.dist import Dist

    class Tiny(torch.nn.Module):
        num_features = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().flatten(1)[:, :3]

        def forward_intermediates(self, x: torch.Tensor, **_: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
            tokens = x.float().flatten(2).transpose(1, 2)  # (B, N, 3)
            return [(tokens, tokens[:, :1])]

    pixels = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    loader = [Batch(pixels, torch.tensor([0, 1, 2, 0]), ["a", "b", "c", "d"]),
              Batch(pixels[:2], torch.tensor([1, 1]), ["e", "f"])]
    calls = []

    def counted(batch: Batch, device: torch.device) -> Batch:
        calls.append(batch.keys)
        return to_device(batch, device)

    monkeypatch.setattr(metrics, "to_device", counted)
    monkeypatch.setattr(features, "to_device", counted)
    cpu = Dist(0, 1, 0, torch.device("cpu"))
    assert metrics.evaluate(Tiny(), loader, cpu)["samples"] == 6
    got = features.extract(Tiny(), loader, cpu, "cls", "fp32")
    assert got["x"].shape == (6, 3) and got["y"].tolist() == [0, 1, 2, 0, 1, 1]
    assert calls == [b.keys for b in loader] * 2  # each batch once, in each evaluation
    with pytest.raises(TypeError, match="uint8 pixels or a RawBatch, got torch.float32"):
        metrics.evaluate(Tiny(), [Batch(pixels.float(), torch.tensor([0, 1, 2, 0]), list("abcd"))], cpu)
