"""Train-step throughput of CRATE-MAE (and the CRATE classifier): images/s, ms/step, peak memory, MFU.

    python bench/step.py                                              # CUDA if present, else CPU; demo sizes on CPU
    python bench/step.py --kind mae classifier --variant base --batch 128 256 --precision bf16 --compile both
    python bench/step.py --variant nano --batch 32 --device cpu --json step.json

Each row is the real training step (crate_mae.engine.loop.Trainer: autocast, backward, optimiser, schedule;
fused AdamW on CUDA) on random pixels, after --warmup steps, timed over --steps with CUDA events (wall clock on
the CPU). MFU = analytic training FLOPs per image (crate_mae/model/flops.py: matrix products only, ISTA in its
two-product form, backward = 2 × forward) × images/s ÷ the device's peak, which is *measured* at the start with
a large matmul in the row's precision (so MFU is against what this card really does, as the speed issue's
797 TFLOP/s for an H200 was). `--reference` adds rows of the plain path: explicit-softmax attention and
three-product ISTA (the released model's), the oracle twins of the fast path.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch
import torch.nn as nn

from crate_mae.config import ModelConfig, OptimConfig
from crate_mae.engine.dist import Dist
from crate_mae.engine.loop import Trainer
from crate_mae.engine.optim import build_optimizer, build_scheduler
from crate_mae.model import build_classifier, build_mae
from crate_mae.model.crate import ISTA, MSSA
from crate_mae.model.flops import train_flops

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measured_peak(device: torch.device, precision: str) -> float:
    """FLOP/s of a large square matmul in this precision: the practical peak MFU is measured against."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = DTYPES[precision] if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 10 if device.type == "cuda" else 3, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def reference_path(enabled: bool):
    """Swap in the plain twins (explicit softmax attention, three-product ISTA) for the duration."""
    saved = MSSA.forward, ISTA.forward
    if enabled:
        MSSA.forward, ISTA.forward = MSSA.forward_reference, ISTA.forward_reference
    try:
        yield
    finally:
        MSSA.forward, ISTA.forward = saved


def bench_row(*, kind: str, variant: str, batch: int, precision: str, compile: bool, reference: bool,
              device: torch.device, steps: int, warmup: int) -> dict:
    cfg = ModelConfig(variant=variant, num_classes=1000)
    model = (build_mae(cfg) if kind == "mae" else build_classifier(cfg)).to(device)
    optim_cfg = OptimConfig(epochs=1, warmup_epochs=0)
    optimizer = build_optimizer(optim_cfg, model, 1e-4, device)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    criterion = nn.CrossEntropyLoss()

    def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return m(b).loss if kind == "mae" else criterion(m(b), labels)

    trainer = Trainer(model=model, optimizer=optimizer, scheduler=build_scheduler(optim_cfg, optimizer, 10**6),
                      dist=Dist(0, 1, 0, device), loss_fn=loss_fn, precision=precision, compile=compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with reference_path(reference):
        for _ in range(warmup):
            trainer.step([images])
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                trainer.step([images])
            end.record()
            sync(device)
            seconds = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step([images])
            seconds = time.perf_counter() - t0
    trainer.check_finite()
    shape = dict(dim=cfg.dim, encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth,
                 img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=None if kind == "mae" else 1000)
    rate = batch * steps / seconds
    return {"kind": kind, "variant": variant, "batch": batch, "precision": trainer.precision, "compile": compile,
            "path": "reference" if reference else "fast", "images_per_s": rate, "ms_per_step": 1000 * seconds / steps,
            "gflop_per_image": train_flops(**shape) / 1e9, "achieved_tflops": train_flops(**shape) * rate / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", nargs="+", default=["mae"], choices=["mae", "classifier"])
    parser.add_argument("--variant", nargs="+", default=None, help="default: base on CUDA, demo on CPU")
    parser.add_argument("--batch", nargs="+", type=int, default=None, help="default: 128 on CUDA, 64 on CPU")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--compile", default="no", choices=["no", "yes", "both"])
    parser.add_argument("--reference", action="store_true", help="also time the plain (reference) path, eager")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the rows and the machine to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variant or (["base"] if device.type == "cuda" else ["demo"])
    batches = args.batch or ([128] if device.type == "cuda" else [64])
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    peak = measured_peak(device, precision)
    print(f"{name}: measured {precision} matmul peak {peak / 1e12:.1f} TFLOP/s; torch {torch.__version__}")
    rows = []
    plan = [(k, v, b, c, False) for k in args.kind for v in variants for b in batches for c in compiles]
    if args.reference:
        plan += [(k, v, b, False, True) for k in args.kind for v in variants for b in batches]
    print(f"{'kind':<11}{'variant':<8}{'batch':>6} {'prec':<5}{'compiled':<9}{'path':<10}{'img/s':>9}{'ms/step':>9}"
          f"{'GFLOP/img':>10}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}")
    for kind, variant, batch, comp, ref in plan:
        row = bench_row(kind=kind, variant=variant, batch=batch, precision=precision, compile=comp, reference=ref,
                        device=device, steps=args.steps, warmup=args.warmup)
        row["mfu"] = row["achieved_tflops"] * 1e12 / peak
        rows.append(row)
        mem = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
        print(f"{kind:<11}{variant:<8}{batch:>6} {row['precision']:<5}{str(comp):<9}{row['path']:<10}"
              f"{row['images_per_s']:>9.1f}{row['ms_per_step']:>9.1f}{row['gflop_per_image']:>10.2f}"
              f"{row['achieved_tflops']:>9.2f}{row['mfu']:>7.3f}{mem:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_tflops": peak / 1e12, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
