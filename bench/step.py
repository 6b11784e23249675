"""Train-step throughput of CRATE-MAE (and the CRATE classifier): images/s, ms/step, peak memory, MFU.

    python bench/step.py                                              # CUDA if present, else CPU; demo sizes on CPU
    python bench/step.py --kind mae classifier --variant base --batch 128 256 --precision bf16 --compile both
    python bench/step.py --variant nano --batch 32 --device cpu --json step.json
    python bench/step.py --family mae alpha --kind mae classifier     # CRATE-α's encoder beside CRATE-MAE's

Each row is the real training step (crate_mae.engine.trainer.Trainer: autocast, backward, optimiser, schedule;
fused AdamW on CUDA) on random pixels, after --warmup steps, timed over --steps with CUDA events (wall clock on
the CPU). MFU = analytic training FLOPs per image (crate_mae/model/flops.py: matrix products only, ISTA in its
two-product form, backward = 2 × forward) × images/s ÷ the device's peak, which is *measured* at the start with
a large matmul in the row's precision (so MFU is against what this card really does, as the speed issue's
797 TFLOP/s for an H200 was). `--reference` adds rows of the plain path: explicit-softmax attention and
three-product ISTA (the released model's), the reference forms the fast path is tested against.
`--compile-mode reduce-overhead` replays the compiled step as CUDA graphs. `--family` picks the encoder's family
(mae, supervised: classifiers only, alpha); `--grad-checkpointing` recomputes each layer in the backward pass
(`bench/memory.py` measures what it saves). `--visible-only` builds the MAE rows with `model.visible_only` (MAE's
encoder of the visible patches alone; not the paper's model): their FLOPs count the encoder at 1 + int(N·(1 − r))
tokens, and each row records `visible_only`.

`--profile N` runs N more steps of each row under the PyTorch profiler and prints where the time goes: the top
ops or kernels (self time on the device on CUDA, on the host otherwise) and a split into matmul, attention,
fused (Triton), norm, optimiser, copy and other elementwise, in ms per step; `--trace DIR` also writes each row's
Chrome trace (open in https://ui.perfetto.dev).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from crate_mae.config import ClassifierConfig, MAEConfig, OptimConfig
from crate_mae.config.variants import FAMILIES
from crate_mae.data import Batch
from crate_mae.engine.dist import Dist, resolve_device
from crate_mae.engine.optim import build_optimizer, build_scheduler
from crate_mae.engine.trainer import Trainer
from crate_mae.model import create_model
from crate_mae.model.classifier import ClassifierObjective
from crate_mae.model.crate import set_fused
from crate_mae.model.flops import forward_flops, train_flops
from crate_mae.model.mae import MaskedObjective

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


CATEGORIES = [  # (category, substrings of an op or kernel name), first match wins
    ("attention", ("attention", "flash", "fmha", "sdpa", "softmax")),
    ("matmul", ("gemm", "xmma", "cutlass", "cublas", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "sm90_", "sm80_")),
    ("optimiser", ("adam", "lion", "foreach", "multi_tensor", "optimizer")),
    ("norm", ("layer_norm", "layernorm")),
    ("fused (triton)", ("triton",)),
    ("copy", ("copy", "memcpy", "memset", "fill", "cast")),
]


def category(name: str) -> str:
    lower = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in lower for k in keys)), "other elementwise")


def profile_steps(step: Callable[[], None], device: torch.device, steps: int, top: int,
                  trace: str | None) -> dict:
    """Profile `steps` calls of step(): ms per step by category, and the top ops / kernels by self time.

    On CUDA only the kernels are summed (their device time partitions the GPU's busy time); on the CPU the
    ops' self times partition the host time. Either way nothing is counted twice.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    if trace:
        prof.export_chrome_trace(trace)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    time_of = (lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) \
        if cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if e.device_type == kind and time_of(e) > 0]
    total = sum(time_of(e) for e in events) / 1000 / steps  # ms per step
    by_category: dict[str, float] = {}
    for e in events:
        name = category(e.key)
        by_category[name] = by_category.get(name, 0.0) + time_of(e) / 1000 / steps
    ranked = sorted(events, key=time_of, reverse=True)[:top]
    return {"busy_ms_per_step": total, "ms_per_step_by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "top": [{"name": e.key, "ms_per_step": time_of(e) / 1000 / steps, "calls_per_step": e.count / steps}
                    for e in ranked]}


def visible_train_flops(mask_ratio: float, **shape: int | str | None) -> int:
    """Training FLOPs per image of the MAE with `visible_only`: `train_flops(**shape)` with each encoder layer taken
    at T' = 1 + int(N·(1 − r)) tokens instead of T = 1 + N.

    flops.py counts an encoder layer as f(T) = c·T·d² + 4·T²·d (c by the family's layer); f(T) is read back from
    `forward_flops` as the cost of one layer over none, c·d² = (f(T) − 4·T²·d) / T, and f(T') follows. The patch
    embedding (all N patches), the decoder and the head (all 1 + N tokens) are as counted there.
    """
    n = (int(shape["img_size"]) // int(shape["patch_size"])) ** 2
    t, t_visible, d = n + 1, int(n * (1 - mask_ratio)) + 1, int(shape["dim"])
    bare = {**shape, "decoder_depth": 0, "num_classes": 0}  # patch embedding + encoder layers (+ a 0-class head)
    layer = forward_flops(**{**bare, "encoder_depth": 1}) - forward_flops(**{**bare, "encoder_depth": 0})
    linear = (layer - 4 * t * t * d) // t  # c·d²
    saved = int(shape["encoder_depth"]) * (layer - (linear * t_visible + 4 * t_visible * t_visible * d))
    return train_flops(**shape) - 3 * saved


def bench_row(*, kind: str, variant: str, batch: int, precision: str, compile: bool, reference: bool,
              device: torch.device, steps: int, warmup: int, compile_mode: str = "default", profile: int = 0,
              top: int = 15, trace: str | None = None, family: str = "mae", grad_checkpointing: bool = False,
              visible_only: bool = False) -> dict:
    """One row: `kind` (mae | classifier) of `family` and `variant`; `visible_only` applies to an MAE only."""
    if compile:
        torch._dynamo.reset()  # each row compiles afresh: no dynamic-shape graph carried over from another batch
    visible_only = visible_only and kind == "mae"
    model_keys = dict(family=family, variant=variant, grad_checkpointing=grad_checkpointing)
    config = MAEConfig(**model_keys, visible_only=visible_only) if kind == "mae" else \
        ClassifierConfig(**model_keys, num_classes=1000)
    model, cfg = create_model(config)
    model = model.to(device)
    optim_cfg = OptimConfig(epochs=1, warmup_epochs=0)
    optimizer = build_optimizer(optim_cfg, model, 1e-4, device)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    objective = MaskedObjective(model) if kind == "mae" else ClassifierObjective(model, nn.CrossEntropyLoss())
    trainer = Trainer(objective.to(device), optimizer=optimizer, scheduler=build_scheduler(optim_cfg, optimizer, 10**6),
                      dist=Dist(0, 1, 0, device), precision=precision, compile=compile, compile_mode=compile_mode)
    micro = [Batch(images, labels, [])]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    set_fused(model, not reference)  # the reference forms: explicit softmax, three-product ISTA, ODL as written
    for _ in range(warmup):
        trainer.step(micro)
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            trainer.step(micro)
        end.record()
        sync(device)
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step(micro)
        seconds = time.perf_counter() - t0
    profiled = profile_steps(lambda: trainer.step(micro), device, profile, top, trace) if profile else None
    trainer.check_finite()
    shape = dict(dim=cfg.dim, encoder_depth=cfg.encoder_depth, decoder_depth=getattr(cfg, "decoder_depth", 0),
                 img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=None if kind == "mae" else 1000,
                 family=family)
    rate = batch * steps / seconds
    flops = visible_train_flops(cfg.mask_ratio, **shape) if visible_only else train_flops(**shape)
    return {"kind": kind, "family": family, "grad_checkpointing": grad_checkpointing, "visible_only": visible_only,
            "variant": variant, "batch": batch, "precision": trainer.precision,
            "compile": compile_mode if compile else False, "profile": profiled,
            "path": "reference" if reference else "fast", "images_per_s": rate, "ms_per_step": 1000 * seconds / steps,
            "gflop_per_image": flops / 1e9, "achieved_tflops": flops * rate / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def print_profile(label: str, prof: dict, device: torch.device) -> None:
    where = "device (kernels)" if device.type == "cuda" else "host (ops)"
    print(f"  profile {label}: {prof['busy_ms_per_step']:.1f} ms/step busy on the {where}")
    print("    " + ", ".join(f"{c} {ms:.1f} ({ms / prof['busy_ms_per_step']:.0%})"
                             for c, ms in prof["ms_per_step_by_category"].items()))
    for t in prof["top"]:
        print(f"    {t['ms_per_step']:>8.2f} ms {t['calls_per_step']:>6.0f}×  {category(t['name']):<18}{t['name'][:90]}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", nargs="+", default=["mae"], choices=["mae", "classifier"])
    parser.add_argument("--family", nargs="+", default=["mae"], choices=["mae", "supervised", "alpha"],
                        help="the encoder's family (supervised: classifier rows only)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer in the backward")
    parser.add_argument("--visible-only", action="store_true",
                        help="MAE rows with model.visible_only: the encoder sees the visible patches alone (ours)")
    parser.add_argument("--variant", nargs="+", default=None, help="default: base on CUDA, demo on CPU")
    parser.add_argument("--batch", nargs="+", type=int, default=None, help="default: 128 on CUDA, 64 on CPU")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--compile", default="no", choices=["no", "yes", "both"])
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    parser.add_argument("--reference", action="store_true", help="also time the plain (reference) path, eager")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps of each row")
    parser.add_argument("--top", type=int, default=15, help="ops / kernels listed per profiled row")
    parser.add_argument("--trace", metavar="DIR", help="with --profile: write each row's Chrome trace here")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else the CPU), cpu, cuda, cuda:1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the rows and the machine to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
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
    kinds = [(f, k) for f in args.family for k in args.kind if k == "classifier" or FAMILIES[f].masked]
    plan = [(f, k, v, b, c, False) for f, k in kinds for v in variants for b in batches for c in compiles]
    if args.reference:
        plan += [(f, k, v, b, False, True) for f, k in kinds for v in variants for b in batches]
    print(f"{'family':<11}{'kind':<11}{'variant':<8}{'batch':>6} {'prec':<5}{'compiled':<16}{'path':<10}{'img/s':>9}"
          f"{'ms/step':>9}"
          f"{'GFLOP/img':>10}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}")
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    for family, kind, variant, batch, comp, ref in plan:
        path, mode = "ref" if ref else "fast", args.compile_mode if comp else "eager"
        shown = f"{kind}-vis" if args.visible_only and kind == "mae" else kind  # the MAE of the visible-only encoder
        label = f"{family}-{shown}-{variant}-b{batch}-{path}-{mode}"
        row = bench_row(kind=kind, variant=variant, batch=batch, precision=precision, compile=comp, reference=ref,
                        device=device, steps=args.steps, warmup=args.warmup, compile_mode=args.compile_mode,
                        profile=args.profile, top=args.top,
                        trace=os.path.join(args.trace, f"{label}.json") if args.trace else None, family=family,
                        grad_checkpointing=args.grad_checkpointing, visible_only=args.visible_only)
        row["mfu"] = row["achieved_tflops"] * 1e12 / peak
        rows.append(row)
        mem = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
        print(f"{family:<11}{shown:<11}{variant:<8}{batch:>6} {row['precision']:<5}{row['compile'] or 'no':<16}"
              f"{row['path']:<10}"
              f"{row['images_per_s']:>9.1f}{row['ms_per_step']:>9.1f}{row['gflop_per_image']:>10.2f}"
              f"{row['achieved_tflops']:>9.2f}{row['mfu']:>7.3f}{mem:>9}")
        if row["profile"]:
            print_profile(label, row["profile"], device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_tflops": peak / 1e12, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
