"""CRATE-MAE: random masking, the masked autoencoder's pass and its loss (docs/MODEL.md), and its timm face.

Two ways in, one computation:
- `forward_masked(img, mask_ratio, noise)` → MAEOutput(loss, pred, mask): the masked pass, what pretraining, the
  monitor and the reconstruction figures use (through `MaskedObjective` where DDP or torch.compile wrap it);
- `model(img)` → the reconstruction (B, 3, H, W), a tensor, as timm's tools expect of every model: in train mode the
  input is masked at `mask_ratio` (as in pretraining), in eval mode nothing is masked, so the output is deterministic
  (masking is a training-time corruption, like dropout).

Two encoders, one set of weights (`visible_only`, `CrateMAE`'s docstring): the released model's, which sees all
1 + N tokens with the hidden patches as the mask token, and MAE's asymmetric one, which sees CLS and the K visible
patches, the mask tokens joining before the decoder.

Legend: B batch, N = h·w patches, K = int(N·(1 − r)) kept (visible) patches, d width, P = 3·p·p pixels per patch.
"""
# No `from __future__ import annotations` here: torch.fx writes the root `forward`'s annotations into the code
# of a traced model, and TorchScript (timm's FX-then-script path) must read them as types, not strings.

from typing import NamedTuple

import torch
import torch.nn as nn

from timm.layers import register_notrace_function

from crate_mae.config.variants import FAMILIES
from crate_mae.model.crate import Decoder, Encoder, xavier_linear
from crate_mae.model.layers import CrateStem, grid_size, patchify, unpatchify
from crate_mae.model.taps import EncoderTaps, feature_info


class MAEOutput(NamedTuple):
    """What `CrateMAE.forward_masked` returns (`forward` returns the reconstruction alone)."""

    loss: torch.Tensor  # () mean squared error over the masked patches
    pred: torch.Tensor  # (B, N, P) predicted pixels (normalised per patch if norm_pix_loss)
    mask: torch.Tensor  # (B, N) 1 = masked (removed), 0 = kept, in the original patch order


def random_masking(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Per-sample random masking by argsort of `noise` (B, N): the mask (B, N), 1 = masked.

    The patches with the int(N·(1 − r)) smallest noise values are kept, as in MAE:
    ids_shuffle = argsort(noise), ids_restore = argsort(ids_shuffle); patch j is kept iff its rank
    ids_restore[j] < len_keep. Equal to MAE's gather of [0]*len_keep + [1]*rest by ids_restore.
    """
    n = noise.shape[1]
    len_keep = int(n * (1 - mask_ratio))
    ids_restore = noise.argsort(dim=1).argsort(dim=1)  # (B, N) rank of each patch
    return (ids_restore >= len_keep).to(noise.dtype)


def masking(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`random_masking`'s mask (B, N) and the kept patches' indices (B, K), ascending, from one argsort of `noise`.

    σ = argsort(noise) lists the patches by rising noise; the first K = int(N·(1 − r)) of them are kept, so
    keep = sort(σ[:, :K]) and mask_j = 1 iff σ⁻¹(j) ≥ K (patch j's rank, as `random_masking` computes it). The
    count K is fixed by the shapes alone: no boolean indexing, no shape that changes per batch, no host sync.
    """
    n = noise.shape[1]
    len_keep = int(n * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)  # (B, N) σ
    mask = (ids_shuffle.argsort(dim=1) >= len_keep).to(noise.dtype)  # rank σ⁻¹(j) ≥ K: masked
    keep = torch.sort(ids_shuffle[:, :len_keep], dim=1)[0]  # (B, K); [0], not .values: TorchScript reads it
    return mask, keep


@register_notrace_function  # a random draw sized by the input: FX records the call
def draw_mask(img: torch.Tensor, patch_size: int, mask_ratio: float) -> torch.Tensor:
    """A fresh uniform random mask (B, N) for images (B, 3, H, W): `random_masking` of torch.rand noise."""
    h, w = grid_size((img.shape[-2], img.shape[-1]), patch_size)
    return random_masking(torch.rand(img.shape[0], h * w, device=img.device), mask_ratio)


@register_notrace_function  # the same draw as `draw_mask` (same generator calls), its kept patches instead
def draw_keep(img: torch.Tensor, patch_size: int, mask_ratio: float) -> torch.Tensor:
    """The kept patches (B, K), ascending, of a fresh uniform random mask for images (B, 3, H, W): `masking`'s."""
    h, w = grid_size((img.shape[-2], img.shape[-1]), patch_size)
    return masking(torch.rand(img.shape[0], h * w, device=img.device), mask_ratio)[1]


class CrateMAE(EncoderTaps, CrateStem):
    """The CRATE masked autoencoder.

    img → patch tokens → masked ones replaced by `mask_token` → CLS prepended → sin-cos table added
    → Encoder → Decoder → `decoder_pred` Linear → pred without the CLS row.
    The encoder sees all 1 + N tokens (the released model's choice, unlike MAE's visible-only encoder).
    The released model's `decoder_embed` Linear is unused by its forward pass, so this one has none.

    `visible_only=True` (ours, not the paper's model): MAE's asymmetric encoder around the same weights. With
    t = [cls ; patch_embed(img)] + pos (B, 1 + N, d), the table of every patch added before any is dropped, and
    `keep` (B, K) the kept patches in ascending order (`masking`; K = int(N·(1 − r))):

        v = [t_0 ; t_{1 + keep_1} … t_{1 + keep_K}]              (B, 1 + K, d)   `visible_tokens`: a gather
        z = Encoder(v)                                           (B, 1 + K, d)   CLS and the visible patches only
        u_0 = z_0,  u_{1 + keep_i} = z_{1 + i},                  (B, 1 + N, d)   `decoder_input`: a scatter of z's
        u_{1 + j} = mask_token + pos_{1 + j} for hidden j                        patch rows into the filler
        pred = decoder_pred(Decoder(u))[:, 1:]                   (B, N, P)       as in the released model

    so the mask token enters at the decoder, each with the position of its own place (the table the encoder side
    adds: sin-cos for family mae, the learned one for alpha), in the original patch order, CLS first, as MAE does;
    the hidden patches' pixels reach nothing but the loss's target. The encoder's cost per layer falls from
    c·T·d² + 4·T²·d at T = 1 + N to T = 1 + K (50 rather than 197 at 224 px, r = 0.75). The kept patches stay in
    ascending patch order (not the noise's): the encoder commutes with any order of its tokens (each carries its
    position), and this one makes K = N (nothing hidden) the identity gather and scatter, so both ways then compute
    the same function bit for bit. The weights are the same keys and shapes either way, and `encode`,
    `forward_intermediates` and eval-mode `forward` (nothing masked) do not depend on the choice; it changes only
    the masked passes: `forward_masked` and train-mode `forward`.

    `family` is the encoder's (config/variants.py): `mae`, the released CRATE-MAE's; `alpha`, CRATE-α's (its stem,
    learned table and layers, no final norm) before the same decoder, ours (no one has published it).

    timm's contract, for an image-to-image model: `forward_features` is the reconstruction (B, 3, H, W), so
    `num_features` = `head_hidden_size` = 3 (its channels) and `forward_head` is the identity (there is no classifier,
    `num_classes` is 0); `embed_dim` is the encoder's width d. `forward_intermediates` / `features_only=True` give the
    encoder layers' (B, d, h, w) maps; `prune_intermediate_layers` (what `features_only` calls) removes the decoder
    side, leaving an encoder whose `forward_features` is its tokens (B, 1 + N, d).
    """

    def __init__(
        self,
        *,
        family: str = "mae",
        img_size: int = 224,
        patch_size: int = 16,
        dim: int,
        heads: int,
        encoder_depth: int,
        decoder_depth: int,
        eta: float = 0.1,
        lambd: float = 0.5,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        visible_only: bool = False,
    ) -> None:
        if family in FAMILIES and not FAMILIES[family].masked:  # an unknown one: CrateStem's error
            raise ValueError(f"family {family!r} has no masked autoencoder; one of "
                             f"{', '.join(f for f, parts in FAMILIES.items() if parts.masked)}")
        super().__init__(family=family, img_size=img_size, patch_size=patch_size, dim=dim)  # normalise, embed, CLS, table
        self.mask_ratio, self.norm_pix_loss, self.visible_only = mask_ratio, norm_pix_loss, bool(visible_only)
        self.reconstructs = True  # False once `prune_intermediate_layers` has removed the decoder side
        self.num_classes, self.num_prefix_tokens = 0, 1  # timm's attributes: no classifier; CLS before the patches
        self.num_features = self.head_hidden_size = 3  # forward_features' output: the reconstructed image's channels
        self.feature_info = feature_info(encoder_depth, dim, patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        parts = FAMILIES[family]
        self.encoder = Encoder(dim=dim, heads=heads, depth=encoder_depth, eta=eta, lambd=lambd,
                               final_norm=parts.final_norm, layer=parts.layer)
        self.decoder = Decoder(dim=dim, heads=heads, depth=decoder_depth)
        self.decoder_pred = xavier_linear(dim, 3 * patch_size * patch_size, bias=True)

    def encode(self, img: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """img (B, 3, H, W) uint8 or normalised, mask (B, N) or None → encoder output (B, 1 + N, d), CLS first: the
        released model's pass, hidden patches as the mask token (`encode_visible` is the visible-only one)."""
        return self.encoder(self.tokens(img, mask, self.mask_token))

    def visible_tokens(self, img: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W), keep (B, K) kept patch indices → the visible-only encoder's input (B, 1 + K, d):
        CLS, then patch keep_i's token, each with its position (the table added over all 1 + N rows, then gathered)."""
        t = self.tokens(img)  # (B, 1 + N, d)
        index = keep.unsqueeze(-1).expand(-1, -1, t.shape[-1])  # (B, K, d)
        return torch.cat([t[:, :1], torch.gather(t[:, 1:], 1, index)], dim=1)

    def encode_visible(self, img: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W), keep (B, K) → encoder output (B, 1 + K, d) of CLS and the kept patches alone."""
        return self.encoder(self.visible_tokens(img, keep))

    def decoder_input(self, latent: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The visible-only encoder's output (B, 1 + K, d), keep (B, K), the patch grid (h, w) → the decoder's input
        (B, 1 + N, d), N = h·w: CLS first, patch keep_i's row at place 1 + keep_i, every other place the mask token
        plus that place's position (`pos` of the grid, the encoder side's table)."""
        b, d = latent.shape[0], latent.shape[-1]
        n = grid[0] * grid[1]
        # one (1, 1 + N, d) row of mask tokens through the position module: its table, resampled there for another
        # grid; expanded over the batch (no copy) and written into by the out-of-place scatter
        filler = self.pos(self.mask_token.to(latent.dtype).expand(1, 1 + n, d), grid)[:, 1:].expand(b, -1, -1)
        index = keep.unsqueeze(-1).expand(-1, -1, d)  # (B, K, d)
        return torch.cat([latent[:, :1], filler.scatter(1, index, latent[:, 1:])], dim=1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + N, d) → pred (B, N, P); the CLS row is dropped."""
        return self.decoder_pred(self.decoder(latent))[:, 1:]

    def target(self, img: torch.Tensor) -> torch.Tensor:
        """The regression target (B, N, P): patchify(img), per-patch normalised if norm_pix_loss.

        Normalisation uses the unbiased variance, as MAE (and so the released model) does:
        t ← (t − mean) / (var + 1e-6)^½ over the P pixels of each patch.
        """
        target = patchify(img, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def patch_loss(self, img: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Each patch's mean squared error (B, N), in fp32: (pred − target)².mean(−1)."""
        return (pred.float() - self.target(img.float())).pow(2).mean(dim=-1)

    def sample_loss(self, img: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each image's loss (B,): its patch errors averaged over its masked patches (what the viz commands show)."""
        return (self.patch_loss(img, pred) * mask).sum(dim=1) / mask.sum(dim=1)

    def loss(self, img: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches of the whole batch (in fp32).

        ((pred − target)².mean(−1) · mask).sum() / mask.sum()
        """
        return (self.patch_loss(img, pred) * mask).sum() / mask.sum()

    def no_weight_decay(self) -> set[str]:
        """Parameters kept free of weight decay besides norms and biases (timm's convention)."""
        return {"cls_token", "mask_token", "pos.table"} & {name for name, _ in self.named_parameters()}

    def forward_masked(
        self, img: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        """The masked autoencoder's pass: img (B, 3, H, W), uint8 pixels (or normalised float) → MAEOutput(loss,
        pred (B, N, P), mask (B, N)). In train and eval mode alike it masks: this is the pretraining objective.

        `mask_ratio` defaults to the one the model was built with. `noise` (B, N) replaces the uniform
        draw that orders patches for masking (as Hugging Face's ViTMAE does), so a mask can be reproduced.
        """
        img = self.normalize(img)  # (B, 3, H, W) float: the loss's target is the normalised image, as in MAE
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if not 0 < ratio < 1:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {ratio}")
        h, w = grid_size((img.shape[-2], img.shape[-1]), self.patch_size)
        if noise is None:
            noise = torch.rand(img.shape[0], h * w, device=img.device)
        elif noise.shape != (img.shape[0], h * w):
            raise ValueError(f"noise must have shape (B, N) = ({img.shape[0]}, {h * w}), got {tuple(noise.shape)}")
        if self.visible_only:  # K = int(N·(1 − r)) visible tokens: static shapes, one compiled region
            mask, keep = masking(noise.float(), ratio)
            pred = self.decode(self.decoder_input(self.encode_visible(img, keep), keep, (h, w)))
        else:
            mask = random_masking(noise.float(), ratio)
            pred = self.decode(self.encode(img, mask))
        return MAEOutput(loss=self.loss(img, pred, mask), pred=pred, mask=mask)

    def _final(self, z: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The last encoder layer's tokens (B, 1 + N, d) → `forward_features`: the final norm, then (unless pruned)
        the decoder and the reconstruction unpatchified on the token grid (B, 3, H, W)."""
        z = self.encoder.norm(z)
        if not self.reconstructs:
            return z
        return unpatchify(self.decode(z), self.patch_size, grid)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) → the reconstruction (B, 3, H, W) in normalised pixels (per-patch normalised units if
        norm_pix_loss), every patch predicted; in train mode from an input masked at `mask_ratio`, in eval mode from
        the whole image. Pruned (no decoder): the encoder's tokens (B, 1 + N, d)."""
        grid = grid_size((img.shape[-2], img.shape[-1]), self.patch_size)
        if self.training and self.reconstructs and self.visible_only:  # `forward_masked`'s visible-only pass
            keep = draw_keep(img, self.patch_size, self.mask_ratio)  # the draw `draw_mask` would make
            latent = self.encode_visible(img, keep)  # (B, 1 + K, d)
            return unpatchify(self.decode(self.decoder_input(latent, keep, grid)), self.patch_size, grid)
        mask = draw_mask(img, self.patch_size, self.mask_ratio) if self.training and self.reconstructs else None
        z = self.tokens(img, mask, self.mask_token if self.reconstructs else None)
        return self._final(self.encoder.forward_layers(z), grid)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The identity: the MAE has no classifier (timm's `forward_head` of a headless model)."""
        return x

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) → the reconstruction (B, 3, H, W) (`forward_features`); the loss is `forward_masked`'s."""
        return self.forward_head(self.forward_features(img))

    def _prune_head(self) -> None:
        """What `prune_intermediate_layers(prune_head=True)` removes: the decoder side (mask token, decoder, its
        prediction Linear). What is left is the encoder, and `forward_features` gives its tokens (B, 1 + N, d)."""
        del self.mask_token, self.decoder, self.decoder_pred
        self.reconstructs = False
        self.num_features = self.head_hidden_size = self.embed_dim

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's `reset_classifier`: the MAE has none, so only `num_classes` 0 (nothing to remove) is accepted."""
        if num_classes or global_pool:
            raise ValueError(f"the CRATE-MAE has no classifier (num_classes {num_classes}, global_pool {global_pool!r}):"
                             " build a classifier on its encoder (crate_mae_encoder_<size>, ClassifierConfig)")


class MaskedObjective(nn.Module):
    """Pretraining's objective as a module: `forward(images, labels)` is the masked loss of the images (a scalar).

    The Trainer wraps this module in DDP and torch.compile, which hook `forward` alone: so the CrateMAE's own `forward`
    keeps timm's tensor contract while the training step gets its loss. It owns no tensors of its own: its parameters
    are the MAE's (`model`), which the Trainer optimises and checkpoints save. Pretraining reads no labels (the loader
    hands -1s, or an online probe's labels): they are taken, to give every objective one signature, and not used.
    """

    def __init__(self, mae: CrateMAE) -> None:
        super().__init__()
        self.model = mae

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) → the loss of `forward_masked` under a fresh uniform mask (a () tensor)."""
        return self.model.forward_masked(images).loss
