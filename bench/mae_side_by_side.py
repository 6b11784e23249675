"""CRATE-MAE (all tokens), CRATE-MAE with a visible-only encoder, and an MAE ViT: one train step each, side by side.

    python bench/mae_side_by_side.py                                 # demo and base sizes; CUDA if present, else CPU
    python bench/mae_side_by_side.py --sizes base --batch-base 8 --rounds 7 --json side.json
    python bench/mae_side_by_side.py --device cuda --compile --batch-base 128   # bf16 autocast, torch.compile

One process, the same random pixels for every model, and interleaved rounds: each round steps A, B, C once
(`--steps` times each), so whatever drifts (clocks, other jobs on a shared CPU) hits all three alike; ms/step is the
median over `--rounds` rounds, after `--warmup` interleaved untimed steps. A step is the real one: the Trainer
(crate_mae.engine.trainer) over MaskedObjective, forward → backward → AdamW (fp32 on the CPU; bf16 autocast and
fused AdamW on CUDA, torch.compile with --compile). Rows at each size:

  crate-mae          ours as released: the encoder sees CLS + all N patches, the hidden ones as mask tokens;
  crate-mae-visible  ours with visible_only=True: the encoder sees CLS + the int(N·(1 − r)) visible patches, the
                     mask tokens join before the decoder (MAE's asymmetry);
  mae-vit            an MAE ViT of the same encoder width and depth, built here from timm's Block (MAEViT below),
                     with MAE's decoder at base size (512 wide, 8 deep, 16 heads) and our demo's decoder at demo size
                     (192 wide, 4 deep, 6 heads: 512/8 scaled to a 4-layer encoder would be a 2- or 3-layer
                     decoder of 128, too small to mean anything beside ours).

FLOPs are *counted*, not modelled: torch.utils.flop_counter.FlopCounterMode over one forward (matrix products,
convolutions and attention; attention through SDPA's math backend, so its two products are seen as products),
per image; a train step is 3 × that (backward ≈ 2 × forward, crate_mae/model/flops.py's convention). The FLOP
ratio to crate-mae is what a GPU, compute-bound at base size (not at demo size, where launches dominate), should
show in time; the CPU's ms ratio is measured. On a shared CPU other jobs' bursts land on single rounds: the table
gives each row's min–max, and the last lines compare visible_only with the MAE ViT by median and by best round.
A tree whose MAEConfig has no `visible_only` field yet skips that row, saying so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from crate_mae.config import MAEConfig, OptimConfig
from crate_mae.config.variants import VARIANTS
from crate_mae.data import Batch
from crate_mae.engine.dist import Dist, resolve_device
from crate_mae.engine.optim import build_optimizer, build_scheduler
from crate_mae.engine.trainer import Trainer
from crate_mae.model.flops import forward_flops
from crate_mae.model.hub import create_model
from crate_mae.model.layers import patchify, sincos_pos_table
from crate_mae.model.mae import MAEOutput, MaskedObjective

MASK_RATIO = 0.75
MODELS = ("crate-mae", "crate-mae-visible", "mae-vit")


@dataclass(frozen=True)
class Size:
    """A size of the comparison: our variant row (encoder and our decoder) and the MAE ViT's decoder beside it."""

    variant: str
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    cpu_batch: int
    cuda_batch: int


SIZES: dict[str, Size] = {
    # demo: our decoder's width and depth (module docstring says why not MAE's proportions)
    "demo": Size("demo", decoder_dim=192, decoder_depth=4, decoder_heads=6, cpu_batch=64, cuda_batch=256),
    # base: MAE's own decoder for ViT-B (512 wide, 8 deep, 16 heads of 32)
    "base": Size("base", decoder_dim=512, decoder_depth=8, decoder_heads=16, cpu_batch=8, cuda_batch=128),
}


class MAEViT(nn.Module):
    """A masked autoencoder with a ViT encoder, as MAE builds it, from timm's Block (pre-norm attention + MLP).

    img (B, 3, H, W), normalised → conv patch embedding (B, N, d) + fixed 2-D sin-cos table
    → keep the K = int(N·(1 − r)) patches of smallest noise → CLS (+ the table's zero row) prepended
    → `depth` Blocks → LayerNorm → decoder_embed Linear d → e
    → mask tokens at the N − K hidden places, all back in the original patch order → CLS first, sin-cos table (e)
    → `decoder_depth` Blocks → LayerNorm → Linear e → P = 3·p² → pred (B, N, P), the CLS row dropped.
    loss = mean over the hidden patches of the batch of (pred − patchify(img))².mean(−1) (no per-patch pixel norm).

    Blocks have MLP ratio 4, qkv bias and LayerNorm eps 1e-6. Linears start Xavier-uniform with zero bias, the patch
    convolution Xavier-uniform on its (d, P) view (it is a Linear on patches), CLS and mask token normal(0.02); the
    LayerNorms start at (1, 0). Only the timing and FLOPs matter here, but a sane start keeps the loss finite.
    """

    def __init__(self, *, img_size: int, patch_size: int, dim: int, depth: int, heads: int, decoder_dim: int,
                 decoder_depth: int, decoder_heads: int, mask_ratio: float = MASK_RATIO) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        grid = (img_size // patch_size, img_size // patch_size)
        self.patch_size, self.mask_ratio = patch_size, mask_ratio
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed tables (1, 1 + N, ·), CLS row zero: buffers, not parameters, so they are neither trained nor decayed.
        self.register_buffer("pos", sincos_pos_table(dim, grid)[None], persistent=False)
        self.register_buffer("decoder_pos", sincos_pos_table(decoder_dim, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                     for _ in range(depth)])
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                                                   norm_layer=norm) for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, 3 * patch_size * patch_size)
        self._init()

    def _init(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The tokens stay free of weight decay (timm's convention; our param_groups reads this)."""
        return {"cls_token", "mask_token"}

    def forward_masked(self, img: torch.Tensor, mask_ratio: float | None = None,
                       noise: torch.Tensor | None = None) -> MAEOutput:
        """img (B, 3, H, W), normalised → MAEOutput(loss (), pred (B, N, P), mask (B, N), 1 = hidden), as CrateMAE's.

        Masking by argsort of noise (B, N): order = argsort(noise) lists patches by rising noise, the first K are kept;
        rank = argsort(order) is each patch's place in that list, so patch j is hidden iff rank_j ≥ K, and gathering
        the shuffled sequence [kept …, mask tokens …] at `rank` puts every token back at its own patch.
        """
        x = self.patch_embed(img) + self.pos[:, 1:]  # (B, N, d)
        b, n, d = x.shape
        keep = int(n * (1 - (self.mask_ratio if mask_ratio is None else mask_ratio)))
        noise = torch.rand(b, n, device=img.device) if noise is None else noise
        order = noise.argsort(dim=1)  # (B, N)
        rank = order.argsort(dim=1)  # (B, N)
        x = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, d))  # (B, K, d): the visible patches
        x = torch.cat([(self.cls_token + self.pos[:, :1]).expand(b, -1, -1), x], dim=1)  # (B, 1 + K, d)
        for block in self.blocks:
            x = block(x)
        y = self.decoder_embed(self.norm(x))  # (B, 1 + K, e)
        e = y.shape[-1]
        shuffled = torch.cat([y[:, 1:], self.mask_token.to(y.dtype).expand(b, n - keep, -1)], dim=1)  # (B, N, e)
        y = torch.cat([y[:, :1], torch.gather(shuffled, 1, rank[..., None].expand(-1, -1, e))], dim=1)
        y = y + self.decoder_pos  # (B, 1 + N, e)
        for block in self.decoder_blocks:
            y = block(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]  # (B, N, P)
        mask = (rank >= keep).to(torch.float32)  # (B, N)
        # fp32 loss, as ours: under bf16 autocast pred arrives in bf16
        per_patch = (pred.float() - patchify(img.float(), self.patch_size)).pow(2).mean(dim=-1)  # (B, N)
        return MAEOutput(loss=(per_patch * mask).sum() / mask.sum(), pred=pred, mask=mask)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def has_visible_only() -> bool:
    """Whether our MAEConfig (and so CrateMAE) has the `visible_only` field: it arrived after this bench was written."""
    return "visible_only" in {field.name for field in dataclasses.fields(MAEConfig)}


def build(name: str, size: Size) -> nn.Module:
    """One of MODELS at `size` (crate-mae-visible needs `has_visible_only()`)."""
    if name == "crate-mae":
        return create_model(MAEConfig(variant=size.variant, mask_ratio=MASK_RATIO))[0]
    if name == "crate-mae-visible":
        return create_model(MAEConfig(variant=size.variant, mask_ratio=MASK_RATIO, visible_only=True))[0]
    row = VARIANTS[size.variant]
    return MAEViT(img_size=row.img_size, patch_size=row.patch_size, dim=row.dim, depth=row.encoder_depth,
                  heads=row.heads, decoder_dim=size.decoder_dim, decoder_depth=size.decoder_depth,
                  decoder_heads=size.decoder_heads)


def counted_forward_flops(model: nn.Module, images: torch.Tensor) -> float:
    """Forward FLOPs per image, counted by FlopCounterMode over one `forward_masked` of `images` (B, 3, H, W).

    SDPA's math backend is forced so that attention runs as explicit products the counter sees (the CPU's fused
    kernel is counted as nothing). Autograd stays on, as in training: the counter's module tracker hooks the
    inputs' gradient functions, and no_grad leaves some tensors (views of parameters) wanting one it cannot find.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward_masked(images)
    return counter.get_total_flops() / images.shape[0]


@dataclass
class Row:
    """A model being timed: its Trainer, per-round step times and counted FLOPs."""

    name: str
    model: nn.Module
    trainer: Trainer
    params: int
    forward_flops: float
    ms: list[float]


def bench_size(size_name: str, *, batch: int, rounds: int, warmup: int, steps: int, device: torch.device,
               precision: str, compile: bool) -> tuple[list[dict], list[dict]]:
    """Time the three models at one size, interleaved; returns (rows, skipped)."""
    size, row_shape = SIZES[size_name], VARIANTS[SIZES[size_name].variant]
    torch.manual_seed(0)
    images = torch.randn(batch, 3, row_shape.img_size, row_shape.img_size, device=device)  # normalised pixels
    micro = [Batch(images, torch.full((batch,), -1, device=device), [])]
    optim_cfg = OptimConfig(epochs=1, warmup_epochs=0)
    rows, skipped = [], []
    if compile:
        torch._dynamo.reset()
    for name in MODELS:
        if name == "crate-mae-visible" and not has_visible_only():
            reason = "our CrateMAE has no visible_only yet (MAEConfig has no field model.visible_only)"
            print(f"{size_name:<6}{name:<19}skipped: {reason}")
            skipped.append({"size": size_name, "model": name, "skipped": reason})
            continue
        model = build(name, size).to(device)
        flops = counted_forward_flops(model, images[:2])  # per image: 2 images are as good as the batch, and cheap
        optimizer = build_optimizer(optim_cfg, model, 1e-4, device)
        # MaskedObjective calls forward_masked(images).loss, which MAEViT has too: one step code for all three
        trainer = Trainer(MaskedObjective(model).to(device), optimizer=optimizer, dist=Dist(0, 1, 0, device),
                          scheduler=build_scheduler(optim_cfg, optimizer, 10**6), precision=precision, compile=compile)
        rows.append(Row(name, model, trainer, sum(p.numel() for p in model.parameters()), flops, []))
    for _ in range(warmup):  # interleaved too: compilation and allocator growth happen in the same conditions
        for row in rows:
            row.trainer.step(micro)
    sync(device)
    for _ in range(rounds):
        for row in rows:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                row.trainer.step(micro)
            sync(device)
            row.ms.append(1000 * (time.perf_counter() - t0) / steps)
    out = []
    first = rows[0] if rows and rows[0].name == "crate-mae" else None
    for row in rows:
        row.trainer.check_finite()
        ms = statistics.median(row.ms)
        analytic = forward_flops(dim=row_shape.dim, encoder_depth=row_shape.encoder_depth,
                                 decoder_depth=row_shape.decoder_depth, img_size=row_shape.img_size,
                                 patch_size=row_shape.patch_size) if row.name == "crate-mae" else None
        out.append({"size": size_name, "model": row.name, "batch": batch, "precision": row.trainer.precision,
                    "compile": compile, "params_m": row.params / 1e6, "ms_per_step": ms,
                    "min_ms_per_step": min(row.ms), "ms_rounds": row.ms, "images_per_s": 1000 * batch / ms,
                    "forward_gflop_per_image": row.forward_flops / 1e9,
                    "train_gflop_per_image": 3 * row.forward_flops / 1e9,
                    "analytic_forward_gflop_per_image": analytic / 1e9 if analytic else None,
                    "flop_ratio_to_crate_mae": row.forward_flops / first.forward_flops if first else None,
                    "time_ratio_to_crate_mae": ms / statistics.median(first.ms) if first else None})
    return out, skipped


def print_rows(rows: list[dict]) -> None:
    """One table line per row: median ms/step and the rounds' range, img/s, counted forward GFLOP, both ratios."""
    for r in rows:
        spread = f"{min(r['ms_rounds']):.0f}–{max(r['ms_rounds']):.0f}"
        flop_ratio = f"{r['flop_ratio_to_crate_mae']:.3f}" if r["flop_ratio_to_crate_mae"] is not None else "-"
        time_ratio = f"{r['time_ratio_to_crate_mae']:.3f}" if r["time_ratio_to_crate_mae"] is not None else "-"
        print(f"{r['size']:<6}{r['model']:<19}{r['batch']:>6}{r['params_m']:>9.1f}{r['ms_per_step']:>10.1f}"
              f"{spread:>14}{r['images_per_s']:>9.1f}{r['forward_gflop_per_image']:>11.3f}{flop_ratio:>11}"
              f"{time_ratio:>11}")


def verdicts(rows: list[dict], device: str) -> list[str]:
    """One line per size with both visible_only and the MAE ViT: visible_only's step time and FLOPs over the ViT's."""
    lines = []
    for size in dict.fromkeys(r["size"] for r in rows):
        by = {r["model"]: r for r in rows if r["size"] == size}
        if "crate-mae-visible" in by and "mae-vit" in by:
            vis, vit = by["crate-mae-visible"], by["mae-vit"]
            time_ratio = vis["ms_per_step"] / vit["ms_per_step"]
            best_ratio = min(vis["ms_rounds"]) / min(vit["ms_rounds"])
            flop_ratio = vis["forward_gflop_per_image"] / vit["forward_gflop_per_image"]
            lines.append(f"{size}: visible_only / MAE ViT on the {device}: step time {time_ratio:.3f}× (median), "
                         f"{best_ratio:.3f}× (best round); FLOPs {flop_ratio:.3f}×")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch-demo", type=int, default=None, help="default: 64 on the CPU, 256 on CUDA")
    parser.add_argument("--batch-base", type=int, default=None, help="default: 8 on the CPU, 128 on CUDA")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; each steps every model --steps times")
    parser.add_argument("--steps", type=int, default=1, help="steps per model per round (their mean is the round's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed interleaved steps per model first")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else the CPU), cpu, cuda, cuda:1")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's step (CUDA's setting)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the rows, the skipped ones and the machine to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    print(f"{name}: {precision}, compile {args.compile}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.rounds} interleaved rounds × {args.steps} step(s) after {args.warmup} warm-up")
    print(f"{'size':<6}{'model':<19}{'batch':>6}{'params M':>9}{'ms/step':>10}{'min–max ms':>14}{'img/s':>9}"
          f"{'fwd GFLOP':>11}{'FLOP ×ours':>11}{'time ×ours':>11}")
    rows, skipped, start = [], [], time.perf_counter()
    for size in args.sizes:
        default = SIZES[size].cuda_batch if cuda else SIZES[size].cpu_batch
        batch = {"demo": args.batch_demo, "base": args.batch_base}[size] or default
        size_rows, size_skipped = bench_size(size, batch=batch, rounds=args.rounds, warmup=args.warmup,
                                             steps=args.steps, device=device, precision=precision,
                                             compile=args.compile)
        print_rows(size_rows)
        rows += size_rows
        skipped += size_skipped
    seconds = time.perf_counter() - start
    for line in verdicts(rows, device.type):
        print(line)
    print("the goal: visible_only's step time ≤ 1× the MAE ViT's at base size on the CPU. On a shared CPU the best "
          "round is the figure least touched by other jobs")
    print(f"fwd GFLOP: counted per image (FlopCounterMode, SDPA as math); a train step is 3 × that. {seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "precision": precision, "compile": args.compile, "rounds": args.rounds, "steps": args.steps,
                       "warmup": args.warmup, "seconds": seconds, "rows": rows, "skipped": skipped}, f, indent=1)


if __name__ == "__main__":
    main()
