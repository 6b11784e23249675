"""End-to-end pretraining throughput: JPEG shards → loader → (device decode) → train step, against the same step
on random pixels. The speed issue's target: end to end within 10 % of the random-pixel step (ratio ≥ 0.9).

    python bench/e2e.py                                  # CUDA: CRATE-MAE-B, batch 256, decode_on device and cpu
    python bench/e2e.py --decode-on device --set run.compile=true data.num_workers=12
    python bench/e2e.py --shards /data/imagenet/train.json --set data.train_samples=100000

The run is built by the pretraining stage's own `build_training` (model, loader, prefetcher, optimiser,
Trainer), from the config defaults plus `--set` overrides, so it times exactly what `pretrain.py` does.
Rows, each after --warmup steps, over --steps steps, with the device synchronised at both ends:
  step   Trainer.step on one fixed batch of random uint8 pixels already on the device: the ceiling
  input  the loader alone, every batch made ready on the device (decoded there with decode_on: device)
  e2e    the loader feeding Trainer.step, as in a run; `wait` is the host time spent waiting for batches
Without --shards, the shards are bench/data.py's generated ImageNet-like JPEGs (~500 × 375, ~110 KB),
re-read from the page cache; without CUDA, a nano-width model at 224 px stands in for the CPU run.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import ensure_shards  # noqa: E402  (bench/data.py: the generated shard set)
from step import sync  # noqa: E402  (bench/step.py)

from crate_mae.config import load_config  # noqa: E402
from crate_mae.data import Batch  # noqa: E402
from crate_mae.engine.dist import Dist, resolve_device  # noqa: E402
from crate_mae.model import resolve_config  # noqa: E402
from crate_mae.stages.pretrain import build_training  # noqa: E402


def timed(device: torch.device, warmup: int, steps: int, one: Callable[[], float | None]) -> tuple[float, float]:
    """(seconds for `steps` calls of one() after `warmup` calls, host seconds inside the calls' waits)."""
    for _ in range(warmup):
        one()
    sync(device)
    waits, start = 0.0, time.perf_counter()
    for _ in range(steps):
        waits += one() or 0.0
    sync(device)
    return time.perf_counter() - start, waits


def run(decode_on: str, args: argparse.Namespace, overrides: list[str], spec: str, device: torch.device,
        with_step: bool) -> list[dict]:
    cfg = load_config(None, [*overrides, f"data.decode_on={decode_on}", f"data.train_shards={spec}",
                             f"run.device={device}"])
    batch = cfg.data.batch_size
    samples = cfg.data.train_samples or (2 * args.warmup + 2 * args.steps + 2) * batch  # one epoch covers the benchmark
    cfg = replace(cfg, model=resolve_config(cfg.model), data=replace(cfg.data, train_samples=samples))
    trainer, loader = build_training(cfg, Dist(0, 1, device.index or 0, device), spec)
    size, rows = cfg.model.img_size, []
    base = {"decode_on": decode_on, "variant": cfg.model.variant, "batch": batch, "img_size": size,
            "precision": trainer.precision, "compile": cfg.run.compile, "num_workers": cfg.data.num_workers,
            "prefetch": cfg.data.prefetch}

    def row(what: str, seconds: float, wait: float = 0.0) -> None:
        rows.append({**base, "row": what, "images_per_s": batch * args.steps / seconds,
                     "ms_per_step": 1000 * seconds / args.steps, "wait_ms_per_step": 1000 * wait / args.steps})

    if with_step:
        pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        fixed = Batch(pixels, torch.zeros(batch, dtype=torch.long), [])

        def step() -> None:
            trainer.step([fixed])  # (the returned loss stays on the device: no host sync)

        row("step", *timed(device, args.warmup, args.steps, step))

    for what in ("input", "e2e"):
        loader.set_epoch(0 if what == "input" else 1)
        it = iter(loader)

        def one() -> float:
            t = time.perf_counter()
            ready = next(it)  # on the device already: the loader is the stage's DeviceLoader
            wait = time.perf_counter() - t
            if what == "e2e":
                trainer.step([ready])
            return wait

        row(what, *timed(device, args.warmup, args.steps, one))
        it.close()  # stops the prefetch thread and the loader's workers
    trainer.check_finite()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode-on", nargs="+", default=["device", "cpu"], choices=["device", "cpu"])
    p.add_argument("--shards", help="a shard spec to read (default: the generated set in --out)")
    p.add_argument("--out", type=Path, default=Path("/tmp/crate_mae_bench_data"), help="generated shard set folder")
    p.add_argument("--num-images", type=int, default=1000, help="images in the generated shard set")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else the CPU), cpu, cuda, cuda:1")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on CUDA, 6 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on CUDA, 2 on CPU)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (30 if cuda else 6)
    args.warmup = args.warmup or (5 if cuda else 2)
    cores = len(os.sched_getaffinity(0))
    defaults = (["model.variant=base", "data.batch_size=256", f"data.num_workers={max(1, min(12, cores - 2))}"] if cuda
                else ["model.variant=nano", "model.img_size=224", "model.patch_size=16", "data.batch_size=32",
                      "data.num_workers=1"])
    overrides = [*defaults, "data.shuffle_buffer=256", "optim.epochs=1", "optim.warmup_epochs=0", *args.overrides]
    spec = args.shards or str(ensure_shards(args.out, args.num_images))
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({cores} cores)"
    print(f"{name}; torch {torch.__version__}; shards {spec}; overrides {' '.join(overrides)}")
    rows = []
    for k, decode_on in enumerate(args.decode_on):
        rows += run(decode_on, args, overrides, spec, device, with_step=k == 0)
        if cuda:
            torch.cuda.empty_cache()
    step = next(r["images_per_s"] for r in rows if r["row"] == "step")
    print(f"\n{'decode_on':<10}{'row':<7}{'img/s':>9}{'ms/step':>9}{'wait ms':>9}{'÷ step':>8}")
    for r in rows:
        r["ratio_to_step"] = r["images_per_s"] / step
        print(f"{r['decode_on'] if r['row'] != 'step' else '-':<10}{r['row']:<7}{r['images_per_s']:>9.0f}"
              f"{r['ms_per_step']:>9.1f}{r['wait_ms_per_step']:>9.1f}{r['ratio_to_step']:>8.2f}")
    for r in rows:
        if r["row"] == "e2e":
            verdict = "MET" if r["ratio_to_step"] >= 0.9 else "NOT MET"
            print(f"target: e2e ≥ 0.9 × the random-pixel step, decode_on {r['decode_on']}: "
                  f"{r['ratio_to_step']:.2f} → {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "shards": spec,
                                         "overrides": overrides, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
