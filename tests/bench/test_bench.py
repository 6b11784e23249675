"""The benchmarks run and report what they say they do (their figures are measured in bench/, never asserted here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_step_bench_rows_mfu_and_profile(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    subprocess.run([sys.executable, str(ROOT / "bench/step.py"), "--kind", "mae", "classifier", "--variant", "nano",
                    "--batch", "8", "--steps", "2", "--warmup", "1", "--reference", "--profile", "1", "--top", "3",
                    "--trace", str(tmp_path / "traces"), "--device", "cpu", "--json", str(out)],
                   check=True, env=ENV, capture_output=True, timeout=600, cwd=tmp_path)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["kind"], r["path"]) for r in rows] == [("mae", "fast"), ("classifier", "fast"), ("mae", "reference"),
                                                      ("classifier", "reference")]
    for r in rows:
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1.5  # against a matmul peak measured in the same run
        assert abs(r["images_per_s"] * r["ms_per_step"] / 1000 - 8) < 1e-6
        prof = r["profile"]
        assert abs(sum(prof["ms_per_step_by_category"].values()) - prof["busy_ms_per_step"]) < 1e-6
        assert len(prof["top"]) == 3 and "matmul" in prof["ms_per_step_by_category"]
    assert rows[0]["gflop_per_image"] > rows[1]["gflop_per_image"]  # the decoder costs FLOPs too
    assert len(list((tmp_path / "traces").glob("*.json"))) == 4


def test_memory_bench_rows_with_and_without_checkpointing(tmp_path: Path) -> None:
    """bench/memory.py: one fresh process per row, both settings of activation checkpointing, memory that adds up."""
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(ROOT / "bench/memory.py"), "--model", "crate_alpha_mae_nano", "--batch", "2",
                    "--steps", "2", "--json", str(out)], check=True, env=ENV, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["grad_checkpointing"]) for r in rows] == [("crate_alpha_mae_nano", False),
                                                                      ("crate_alpha_mae_nano", True)]
    for r in rows:
        assert r["parameters"] == 172_144 and 0 < r["static_gib"] <= r["peak_gib"] and r["ms_per_step"] > 0
        assert abs(r["peak_gib"] - r["static_gib"] - r["activations_gib"]) < 1e-9


def test_e2e_bench_times_the_pretraining_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench/e2e.py"), "--num-images", "24", "--out", str(tmp_path / "set"),
                          "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out), "--set",
                          "data.batch_size=4", "data.num_workers=0", "model.encoder_depth=1", "model.decoder_depth=1"],
                         check=True, env=ENV, capture_output=True, timeout=600, text=True, cwd=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["decode_on"], r["row"]) for r in rows] == [("device", "step"), ("device", "input"), ("device", "e2e"),
                                                          ("cpu", "input"), ("cpu", "e2e")]
    assert all(r["images_per_s"] > 0 and r["batch"] == 4 and r["prefetch"] == 2 for r in rows)
    assert rows[0]["ratio_to_step"] == 1.0
    assert "target: e2e ≥ 0.9 × the random-pixel step, decode_on cpu" in run.stdout


def test_write_bench_rows_and_identical_sets(tmp_path: Path) -> None:
    out = tmp_path / "write.json"
    subprocess.run([sys.executable, str(ROOT / "bench/write.py"), "--images", "12", "--workers", "1", "2", "--json",
                    str(out)], check=True, env=ENV, capture_output=True, timeout=600, cwd=tmp_path)
    rows = json.loads(out.read_text())
    assert [r["workers"] for r in rows] == [1, 2] and all(r["images"] == 12 and r["images_per_s"] > 0 for r in rows)
    assert all(r["identical_to_first"] for r in rows) and rows[0]["speedup"] == 1.0


def test_write_bench_by_source(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="the datasets library (the .[hf] extra) is not installed on this Python")
    out = tmp_path / "sources.json"
    subprocess.run([sys.executable, str(ROOT / "bench/write.py"), "--images", "12", "--sources", "folder", "imagefolder",
                    "hf", "parquet", "imagenet", "--workers", "1", "--resize", "64", "--json", str(out)], check=True,
                   env=ENV, capture_output=True, timeout=600, cwd=tmp_path)
    rows = json.loads(out.read_text())
    assert [(r["source"], r["resize"]) for r in rows] == [(k, size) for k in ("folder", "imagefolder", "hf", "parquet",
                                                                            "imagenet") for size in (None, 64)]
    assert all(r["images"] == 12 and r["images_per_s"] > 0 and r["workers"] == 1 for r in rows)


def test_monitor_bench_rows(tmp_path: Path) -> None:
    out = tmp_path / "monitor.json"
    subprocess.run([sys.executable, str(ROOT / "bench/monitor.py"), "--models", "nano", "--digits", str(tmp_path / "digits"),
                    "--layers-batch", "4", "--device", "cpu", "--json", str(out)], check=True, env=ENV, capture_output=True,
                   timeout=600, cwd=tmp_path)
    [row] = json.loads(out.read_text())["rows"]
    assert (row["model"], row["val_images"], row["bank_images"], row["layers_batch"]) == ("nano", 300, 1497, 4)
    assert all(row[k] > 0 for k in ("ms_per_heldout_image", "ms_per_bank_image", "ms_per_layers_image", "knn_ns_per_pair"))
    assert row["ms_per_heldout_image"] > row["ms_per_heldout_image_loss_only"] and not row["skipped"]
    assert {"heldout", "features/val", "features/bank", "knn", "layers"} <= set(row["parts_s"])


def test_mae_side_by_side_rows_and_flops(tmp_path: Path) -> None:
    """bench/mae_side_by_side.py: CRATE-MAE, its visible_only twin, an MAE ViT, timed in one process; FLOPs counted."""
    out = tmp_path / "side.json"
    subprocess.run([sys.executable, str(ROOT / "bench/mae_side_by_side.py"), "--sizes", "demo", "--batch-demo", "8",
                    "--rounds", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)],
                   check=True, env=ENV, capture_output=True, timeout=600, cwd=tmp_path)
    result = json.loads(out.read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["crate-mae", "crate-mae-visible", "mae-vit"] and result["skipped"] == []
    for r in rows.values():
        assert r["batch"] == 8 and len(r["ms_rounds"]) == 2 and all(ms > 0 for ms in r["ms_rounds"])
        assert r["ms_per_step"] > 0 and abs(r["images_per_s"] * r["ms_per_step"] / 1000 - 8) < 1e-6
        assert r["forward_gflop_per_image"] > 0
        assert r["train_gflop_per_image"] == pytest.approx(3 * r["forward_gflop_per_image"])
    ours = rows["crate-mae"]
    # the counter sees what flops.py models (matrix products; attention through SDPA's math backend)
    assert abs(ours["forward_gflop_per_image"] / ours["analytic_forward_gflop_per_image"] - 1) < 0.01
    assert ours["forward_gflop_per_image"] > rows["crate-mae-visible"]["forward_gflop_per_image"]
    assert rows["crate-mae-visible"]["flop_ratio_to_crate_mae"] < 1 and ours["flop_ratio_to_crate_mae"] == 1
