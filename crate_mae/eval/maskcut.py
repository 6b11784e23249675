"""MaskCut: up to n objects per image from repeated normalised cuts of its patch features, on the patch grid
(Wang et al., "Cut and learn for unsupervised object detection and instance segmentation" (CutLER),
arXiv 2301.11320), as "Emergence of segmentation with minimalistic white-box transformers" (arXiv 2308.16271,
§3.2, App. B.4) applies it to CRATE: n = 3 objects, τ = 0.15, no CRF.

Legend: B images, N = h·w patches, d width, K = `objects` cuts per image.

CRATE's affinity is M_ij = Σ_k ⟨U_k* z_i, U_k* z_j⟩, the inner product of the concatenated per-head projections
W = U·LN₁(z) of patches i and j (`crate_mae.viz.attention.mssa_view(...).features`). Each cut t = 1 … K:

1. the graph: A_ij = 1 if cos(f_i, f_j) > τ else ε (ε = 1e-5), the features of the patches already found set to 0
   (so their rows and columns are all ε); `crate_mae.viz.ncut.affinity`;
2. the cut: x, the generalised eigenvector of (D − A) x = λ D x with the second smallest λ
   (`crate_mae.viz.ncut.fiedler_vector`, which turns x so that its largest |x_i| is positive);
3. the bipartition fg = {i : x_i > mean(x)};
4. the foreground: with s = argmax |x|, take the other side (fg := ¬fg, x := −x) when fg holds 3 or 4 of the grid's
   4 corners (the background holds the corners), or else when s is not in fg; the seed is then argmax x;
5. the object: the 4-connected component of fg that holds the seed;
6. from the second cut on, an empty mask instead when it covers ≤ 1 % of the grid, or its IoU with the previous
   cut's mask (itself possibly emptied) is > 0.5;
7. the patches found so far: the union of the masks of steps 5–6;
8. the output: the mask less the union of the earlier outputs, so that the K outputs are disjoint.

The images of a batch go through each step together (one batched `eigh`); only the K cuts are sequential.

Where CutLER's code and the papers leave a choice, this module takes (each noted again where it is made):
- the sign of x. CutLER's rule of step 4 depends on it: with scipy's arbitrary sign, the rule flips to the side of
  s whenever s's side is not the initial fg, *even when s's side holds the corners*. `fiedler_vector` fixes the
  sign so that x_s > 0, hence s ∈ fg at step 3 and the rule reads "the side of the largest |x_i|, unless it holds
  3 or more corners" (CutLER's paper asks the object to hold fewer than two corners; its code, and so ours, turns
  the cut only at three or more). It agrees with CutLER's code whenever the side of s holds ≤ 2 corners;
- normalisation: cosines (`normalize=True`) as CutLER's code always does; the emergence paper's M is the raw inner
  product, on which τ = 0.15 has no scale (`normalize=False` keeps it, for a study);
- rejected cuts leave an empty mask in place (slot t is always cut t) and paint nothing, so the next cut sees the
  same graph as the rejected one: the third cut then repeats the second, and is judged against the emptied
  previous mask (CutLER's code does the same). The first cut is never rejected, however small;
- no hole filling (it belongs to CutLER's CRF branch, which the emergence paper removes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from crate_mae.errors import ConfigError, InputError
from crate_mae.viz.ncut import affinity, fiedler_vector

MIN_AREA = 0.01  # step 6: a mask on ≤ 1 % of the grid is too small (CutLER's ratio on the patch grid)
MAX_IOU = 0.5  # step 6: a mask overlapping the previous one by more is the same object again


def maskcut(features: torch.Tensor, grid: tuple[int, int], *, objects: int = 3, tau: float = 0.15,
            normalize: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """MaskCut (module docstring) of patch features (N, d) or a batch of them (B, N, d), N = h·w in row-major
    order on the patch grid `grid` = (h, w).

    Returns bool masks (K, h, w), or (B, K, h, w) for a batch, K = `objects`: mask t is cut t, disjoint from the
    earlier ones, all False where the cut was rejected (step 6). Everything runs on the features' device, in
    float64; memory is a few (B, N, N) float64 matrices.
    """
    if features.dim() not in (2, 3):
        raise InputError(f"maskcut: features must be (N, d) or (B, N, d), got shape {tuple(features.shape)}")
    single = features.dim() == 2
    f = features[None] if single else features  # (B, N, d)
    h, w = grid
    if h < 1 or w < 1 or h * w != f.shape[1] or h * w < 2:
        raise InputError(f"maskcut: grid {h} × {w} does not hold the features' {f.shape[1]} patches "
                         "(two or more are needed)")
    if objects < 1:
        raise ConfigError(f"maskcut: objects must be 1 or more, got {objects}")
    b, n = f.shape[:2]
    painted = torch.zeros(b, n, dtype=torch.bool, device=f.device)  # step 7: the patches found so far
    previous = painted  # the previous cut's mask (steps 5-6)
    outputs = []
    for t in range(objects):
        kept = f.masked_fill(painted[..., None], 0)  # step 1: found patches' features set to 0
        x = fiedler_vector(affinity(kept, tau=tau, eps=eps, normalize=normalize))  # step 2, (B, N)
        mask = _object(x, grid).flatten(1)  # steps 3-5
        if t > 0:
            mask = mask & ~rejected(mask, previous)[:, None]  # step 6
        outputs.append(mask & ~painted)  # step 8: the union of the earlier outputs is exactly `painted`
        painted = painted | mask
        previous = mask
    masks = torch.stack(outputs, 1).view(b, objects, h, w)
    return masks[0] if single else masks


def _object(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Steps 3–5 of the module docstring: from the cuts x (B, N) to the objects (B, h, w) bool."""
    b = x.shape[0]
    fg = x > x.mean(-1, keepdim=True)  # step 3
    rows = torch.arange(b, device=x.device)
    s = x.abs().argmax(-1)
    corners = fg.view(b, *grid)[:, [0, 0, -1, -1], [0, -1, 0, -1]].sum(-1)
    # step 4: x_s > 0 (fiedler_vector's sign), so s ∈ fg unless x is constant; the test is kept for that case
    flip = (corners >= 3) | ~fg[rows, s]
    fg = torch.where(flip[:, None], ~fg, fg)
    seed = torch.where(flip[:, None], -x, x).argmax(-1)  # the first of equal maxima, as numpy's argmax
    return seed_component(fg.view(b, *grid), seed)  # step 5


def seed_component(fg: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The 4-connected component of each binary grid fg (B, h, w) that holds patch seed (B,) (a row-major index):
    (B, h, w) bool, empty where the seed is not in fg.

    A geodesic dilation: C₀ = {seed} ∩ fg, C_{k+1} = (C_k ⊕ cross) ∩ fg until it stops growing, all grids at once
    on their device (as `scipy.ndimage.label`'s default structure, but without leaving the device).
    """
    b, h, w = fg.shape
    rows = torch.arange(b, device=fg.device)
    comp = torch.zeros(b, h * w, dtype=torch.bool, device=fg.device)
    comp[rows, seed] = fg.flatten(1)[rows, seed]
    comp = comp.view(b, h, w)
    while True:
        before = comp
        for _ in range(8):  # several steps per check: the check syncs with the device
            grown = comp.clone()
            grown[:, 1:] |= comp[:, :-1]
            grown[:, :-1] |= comp[:, 1:]
            grown[:, :, 1:] |= comp[:, :, :-1]
            grown[:, :, :-1] |= comp[:, :, 1:]
            comp = grown & fg
        if torch.equal(comp, before):
            return comp


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a ∧ b| / |a ∨ b| of each pair of bool masks (B, ...) → (B,); 0 where both are empty."""
    inter = (a & b).flatten(1).sum(-1)
    union = (a | b).flatten(1).sum(-1)
    return inter / union.clamp_min(1)


def rejected(mask: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Step 6 of the module docstring for masks (B, N) bool against the previous cut's masks (B, N): (B,) bool,
    True where the mask covers ≤ 1 % of the N patches or overlaps the previous one by IoU > 0.5."""
    area = mask.flatten(1).sum(-1) / mask.flatten(1).shape[-1]
    return (area <= MIN_AREA) | (mask_iou(mask, previous) > MAX_IOU)


def to_pixels(masks: torch.Tensor, size: tuple[int, int], *, mode: str = "nearest") -> torch.Tensor:
    """Patch-grid masks (..., h, w) bool → image masks (..., H, W) bool, `size` = (H, W), the grid taken to cover
    the whole image (as MaskCut's square resize does, whatever the image's aspect).

    `nearest` (the default) gives each pixel the mask value of the patch its centre falls in (PyTorch's
    "nearest-exact"): the block edges land at their scaled positions j·H/h. That is what CutLER's chain does up
    to a pixel (nearest ×8 to 480², a bicubic resize to (W, H), threshold at half the maximum: a symmetric kernel
    crosses half a step at the step). `bilinear` interpolates the 0/1 mask and keeps values > 0.5: rounder corners,
    sub-patch edges that are not in the features; disjoint masks stay disjoint either way (their interpolations
    sum to ≤ 1).
    """
    if mode not in ("nearest", "bilinear"):
        raise ConfigError(f"to_pixels: mode must be nearest or bilinear, got {mode!r}")
    lead, (h, w) = masks.shape[:-2], masks.shape[-2:]
    m = masks.reshape(-1, 1, h, w).float()
    if mode == "nearest":
        up = F.interpolate(m, size=size, mode="nearest-exact") > 0.5
    else:
        up = F.interpolate(m, size=size, mode="bilinear", align_corners=False) > 0.5
    return up.view(*lead, *size)


def boxes(masks: torch.Tensor) -> torch.Tensor:
    """The tight box of each mask (..., H, W) bool as COCO's [x, y, w, h] (..., 4) int64 in pixels: x, y the first
    column and row, w = last column − x + 1, h likewise (as `pycocotools.mask.toBbox`); all 0 for an empty mask."""
    cols, rows = masks.any(-2), masks.any(-1)  # (..., W), (..., H)

    def span(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(hit.shape[-1], device=hit.device)
        first = torch.where(hit, idx, hit.shape[-1]).amin(-1)
        last = torch.where(hit, idx, -1).amax(-1)
        return first, last

    x0, x1 = span(cols)
    y0, y1 = span(rows)
    out = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], -1)
    return torch.where(masks.flatten(-2).any(-1)[..., None], out, 0).long()
