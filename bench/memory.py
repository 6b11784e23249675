"""Training memory with and without activation checkpointing (`set_grad_checkpointing`, `model.grad_checkpointing`).

    python bench/memory.py                                            # CRATE-α B/16 and L/14, batch 2, on the CPU
    python bench/memory.py --model crate_alpha_large_patch14 crate_alpha_huge_patch14 --batch 4 --device cuda
    python bench/memory.py --model crate_alpha_mae_base crate_base --batch 2 --json memory.json

Each row runs in a fresh process (peak RSS only grows within one), builds the timm name at its own size, and takes
`--steps` real training steps (forward, cross-entropy or the masked loss, backward, AdamW) on random pixels. It
reports the memory the weights, gradients and AdamW's two moments hold (`static`: 4 copies of the parameters), the
peak over the steps, and their difference, the activations kept for the backward pass, which is what checkpointing
trades for recomputing each layer once more (the ms per step). On the CPU memory is the process's resident set
(static: VmRSS after the optimiser's state exists; peak: the kernel's ru_maxrss); on CUDA it is PyTorch's allocator
(`memory_allocated`, `max_memory_allocated`).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

GIB = 2**30


def _rss() -> int:
    """This process's resident set now, in bytes (Linux: /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(name: str, batch: int, checkpointing: bool, steps: int, device: str) -> dict:
    """One row, in this process: static and peak memory (bytes) and ms per step of `steps` training steps."""
    import timm

    import crate_mae.model  # noqa: F401  (registers the crate_* names)

    dev = torch.device(device)
    model = timm.create_model(name).to(dev).train()
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():  # gradients and AdamW's moments exist before the first step, as they do after it
        p.grad = torch.zeros_like(p)
    optimizer.step()
    side = model.pretrained_cfg["input_size"][-1]
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, max(model.num_classes, 1), (batch,), device=dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    static = torch.cuda.memory_allocated(dev) if cuda else _rss()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model.forward_masked(images).loss if hasattr(model, "forward_masked") else \
            F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(dev) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": name, "batch": batch, "grad_checkpointing": checkpointing, "device": device,
            "parameters": sum(p.numel() for p in model.parameters()), "static_gib": static / GIB,
            "peak_gib": peak / GIB, "activations_gib": (peak - static) / GIB,
            "ms_per_step": 1000 * min(times[1:] or times)}  # the first step also allocates: the fastest of the rest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["crate_alpha_base_patch16", "crate_alpha_large_patch14"],
                        help="timm names (crate_*), each at its own image size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "CHECKPOINTING"), help=argparse.SUPPRESS)  # a child
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.row:  # a child process: one row, as JSON on stdout
        print(json.dumps(measure(args.row[0], args.batch, args.row[1] == "on", args.steps, args.device)))
        return
    print(f"{'model':<28}{'batch':>6}{'checkpointing':>15}{'params':>13}{'static GiB':>12}{'peak GiB':>10}"
          f"{'activ. GiB':>12}{'ms/step':>10}")
    rows = []
    for name in args.model:
        for flag in ("off", "on"):
            child = subprocess.run([sys.executable, __file__, "--row", name, flag, "--batch", str(args.batch),
                                    "--steps", str(args.steps), "--device", args.device],
                                   capture_output=True, text=True, check=True, timeout=3600)
            row = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{name:<28}{args.batch:>6}{flag:>15}{row['parameters']:>13,}{row['static_gib']:>12.2f}"
                  f"{row['peak_gib']:>10.2f}{row['activations_gib']:>12.2f}{row['ms_per_step']:>10.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
