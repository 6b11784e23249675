"""What one evaluation of the pretraining monitor costs: `Monitor.evaluate`, by part and per image, for the demo model
on the bundled digits and for CRATE-MAE-B at 224 px on a small generated JPEG set.

    python bench/monitor.py                                 # demo + base, CUDA if present; about 1-2 min on 2 CPU cores
    python bench/monitor.py --models base --device cuda --base-val 2048 --base-bank 4096 --layers-batch 64
    python bench/monitor.py --json monitor.json

One JSON row per model (printed, and with --json written together): the evaluation's seconds by part, this rank's
`Monitor.cost` (weights: the MAE's encoder into the monitor's classifier, made at the first evaluation; data/val,
data/bank: decode and to the device; heldout: the masked MAE pass and per-image loss; features/val, features/bank:
the classifier's clean pass, one for both features (CLS, mean: `eval/features.py: pooled_features`); gather; knn:
the scoring; layers: `viz/measures.py: layer_measures`), the images each pass read, and per-image costs:
  ms_per_heldout_image   data + masked pass + loss + the image's feature pass (the queries are the held-out set)
  ms_per_bank_image      data + the feature pass
  ms_per_layers_image    layer_measures over the layers batch, per image
  knn_ns_per_pair        the scoring's time per (query, bank image) pair, both features

An ImageNet estimate per evaluation (one device; divide the first two terms by the ranks):
  val_samples × ms_per_heldout_image + bank_samples × ms_per_bank_image + layers_batch × ms_per_layers_image
  + val_samples × bank_samples × knn_ns_per_pair,
from a run with --base-val and --base-bank large enough for a few batches each (the defaults on the CPU are small
so that it ends in about two minutes; on a GPU use thousands, and a batch of 256). The base set is bench/data.py's
generated ImageNet-like JPEGs (~500 × 375 px), written once into --out; the model's weights are fresh ones (the
cost does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import ensure_shards  # noqa: E402  (bench/data.py: the generated shard set)
from step import sync  # noqa: E402  (bench/step.py)

from crate_mae.config import DataConfig, MAEConfig, MonitorConfig  # noqa: E402
from crate_mae.data.shards import ensure_digits  # noqa: E402
from crate_mae.engine.dist import Dist, resolve_device  # noqa: E402
from crate_mae.engine.trainer import resolve_precision  # noqa: E402
from crate_mae.eval.monitor import Monitor  # noqa: E402
from crate_mae.model import create_model  # noqa: E402


def bench_row(model: str, train: str, val: str, *, monitor: MonitorConfig, batch: int, device: torch.device,
              warmup: int) -> dict:
    """One model's evaluation: `warmup` untimed evaluations, then one timed, with its parts."""
    mae, cfg = create_model(MAEConfig(variant=model))
    mae = mae.to(device)
    dist = Dist(0, 1, device.index or 0, device)
    precision = resolve_precision("auto", device)
    start = time.perf_counter()
    mon = Monitor(monitor, cfg, train_spec=train, val_spec=val, data=DataConfig(batch_size=batch, num_workers=0),
                  dist=dist, seed=0, precision=precision)
    setup = time.perf_counter() - start
    for _ in range(warmup):
        mon.evaluate(mae)
    sync(device)
    start = time.perf_counter()
    out = mon.evaluate(mae)
    sync(device)
    seconds = time.perf_counter() - start
    part, read = mon.cost.seconds, mon.cost.images

    def per(parts: list[str], images: int) -> float | None:
        return 1000 * sum(part.get(p, 0.0) for p in parts) / images if images else None

    val_n, bank_n, layers_n = read.get("val", 0), read.get("bank", 0), read.get("layers", 0)
    queries, bank = out.get("heldout_images", 0), out.get("knn_bank_images", 0)
    return {"model": model, "device": str(device), "precision": precision, "img_size": cfg.img_size, "batch": batch,
            "val_images": val_n, "bank_images": bank_n, "layers_batch": layers_n, "knn_k": monitor.knn_k,
            "setup_s": setup, "seconds": seconds, "parts_s": part, "skipped": mon.skipped,
            "ms_per_heldout_image": per(["data/val", "heldout", "features/val"], val_n),
            "ms_per_heldout_image_loss_only": per(["data/val", "heldout"], val_n),
            "ms_per_bank_image": per(["data/bank", "features/bank"], bank_n),
            "ms_per_layers_image": per(["layers"], layers_n),
            "knn_ns_per_pair": 1e9 * part["knn"] / (queries * bank) if queries and bank and "knn" in part else None,
            "measures": {k: v for k, v in out.items() if not k.startswith("layer")}}


def probe_cost(model: str, *, batch: int, device: torch.device, steps: int = 3) -> dict:
    """What the online probe (`monitor.probe`) adds to each training step: its clean encoder pass and its head's update,
    against a training step (masked forward, backward, AdamW) on the same batch; ms per step."""
    from crate_mae.eval.linear import OnlineProbe

    mae, cfg = create_model(MAEConfig(variant=model))
    mae = mae.to(device)
    dist = Dist(0, 1, device.index or 0, device)
    images = torch.randint(0, 256, (batch, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    probe = OnlineProbe(cfg.dim, 10, lr=1e-3, device=device, seed=0)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-4)

    def train_step() -> None:
        mae.forward_masked(images).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        fn()  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        return 1000 * (time.perf_counter() - start) / steps

    train_ms = timed(train_step)
    probe_ms = timed(lambda: probe.step(mae, images, labels, dist))
    return {"model": model, "batch": batch, "train_ms_per_step": train_ms, "probe_ms_per_step": probe_ms,
            "probe_share_of_step": probe_ms / train_ms}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["demo", "base"], choices=["nano", "demo", "base"],
                   help="demo (and nano): the digits at 32 px; base: the generated set at 224 px")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else the CPU), cpu, cuda, cuda:1")
    p.add_argument("--digits", default="shards/digits", help="the digits shards (written there if missing)")
    p.add_argument("--out", type=Path, default=Path("/tmp/crate_mae_bench_monitor"), help="generated set folder")
    p.add_argument("--base-val", type=int, default=None, help="base: held-out images (default: 32 on CPU, 2048 CUDA)")
    p.add_argument("--base-bank", type=int, default=None, help="base: bank images (default: 64 on CPU, 4096 CUDA)")
    p.add_argument("--layers-batch", type=int, default=None, help="default: 64 (demo); base: 8 on CPU, 64 CUDA")
    p.add_argument("--batch", type=int, default=None, help="evaluation batch (default: 64; base 16 on CPU, 256 CUDA)")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--warmup", type=int, default=None, help="untimed evaluations first (default: 1 on CUDA, 0 CPU)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else int(cuda)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}; torch {torch.__version__}", flush=True)
    rows = []
    for model in args.models:
        if model == "base":
            val_n, bank_n = args.base_val or (2048 if cuda else 32), args.base_bank or (4096 if cuda else 64)
            val = str(ensure_shards(args.out / f"val{val_n}", val_n, seed=1))  # bench/data.py writes "train.json"
            train = str(ensure_shards(args.out / f"bank{bank_n}", bank_n, seed=0))
            layers, batch = args.layers_batch or (64 if cuda else 8), args.batch or (256 if cuda else 16)
        else:
            train, val = ensure_digits(args.digits)  # 1,497 + 300 images: all of them
            layers, batch = args.layers_batch or 64, args.batch or 64
        cfg = MonitorConfig(knn_k=args.knn_k, layers_batch=layers)
        row = bench_row(model, train, val, monitor=cfg, batch=batch, device=device, warmup=warmup)
        row["online_probe"] = probe_cost(model, batch=batch, device=device)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    print(f"\n{'model':<6}{'val':>6}{'bank':>6}{'eval s':>8}{'ms/held-out':>13}{'ms/bank':>9}{'ms/layers img':>15}"
          f"{'kNN ns/pair':>13}")
    for r in rows:
        cells = [r["ms_per_heldout_image"], r["ms_per_bank_image"], r["ms_per_layers_image"], r["knn_ns_per_pair"]]
        text = [f"{c:.2f}" if c is not None else "-" for c in cells]
        print(f"{r['model']:<6}{r['val_images']:>6}{r['bank_images']:>6}{r['seconds']:>8.1f}{text[0]:>13}{text[1]:>9}"
              f"{text[2]:>15}{text[3]:>13}")
    print(f"\n{'model':<6}{'batch':>6}{'train ms/step':>15}{'online probe ms/step':>22}{'share':>8}")
    for r in rows:
        q = r["online_probe"]
        print(f"{q['model']:<6}{q['batch']:>6}{q['train_ms_per_step']:>15.1f}{q['probe_ms_per_step']:>22.1f}"
              f"{q['probe_share_of_step']:>8.1%}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
