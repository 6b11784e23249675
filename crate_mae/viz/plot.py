"""What every figure of the viz commands shares: matplotlib off-screen, patch maps at image resolution, overlays,
and writing a figure to its PNG and, if asked, to TensorBoard.

Legend: B images, K maps per image (heads, components), (h, w) the token grid, (H, W) the image, p patch, s stride.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from crate_mae.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def pyplot() -> Any:
    """matplotlib.pyplot on the off-screen Agg backend (no display is needed, none is opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_pixels(maps: torch.Tensor, img_hw: tuple[int, int], *, patch_size: int, stride: int | None = None,
              mode: str = "nearest") -> torch.Tensor:
    """Per-token maps (B, K, h, w) → (B, K, H, W) at image resolution, each token at its patch's centre.

    Token j's p×p patch starts at pixel j·s, so its centre is j·s + p/2: each token fills the s×s cell around its
    centre (`nearest`, for masks) or is interpolated between centres (`bilinear`, for heat maps), and the
    (p − s)/2 pixels at the borders, outside every centre, repeat the outermost cell. At s = p this is plain
    upsampling by p.
    """
    s = stride or patch_size
    height, width = img_hw
    up = F.interpolate(maps.float(), size=(maps.shape[-2] * s, maps.shape[-1] * s), mode=mode,
                       **({} if mode == "nearest" else {"align_corners": False}))
    top, left = (height - up.shape[-2]) // 2, (width - up.shape[-1]) // 2
    if (top, left) == (0, 0) and up.shape[-2:] == (height, width):
        return up
    return F.pad(up, (left, width - up.shape[-1] - left, top, height - up.shape[-2] - top), mode="replicate")


def picture(image: torch.Tensor) -> Any:
    """uint8 (3, H, W) or [0, 1] float pixels → an (H, W, 3) array for imshow."""
    image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    return image.clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def show_mask(ax: Axes, image: torch.Tensor, mask: torch.Tensor, *, title: str = "") -> None:
    """The image with everything outside the mask (H, W) dimmed, and the mask's outline."""
    keep = mask.float().cpu()[..., None].numpy()
    ax.imshow(picture(image) * (0.25 + 0.75 * keep))
    if 0 < keep.mean() < 1:
        ax.contour(keep[..., 0], levels=[0.5], colors="yellow", linewidths=0.8)
    ax.set_title(title, fontsize=7)


def show_heat(ax: Axes, image: torch.Tensor, heat: torch.Tensor, *, title: str = "", cmap: str = "inferno") -> None:
    """A heat map (H, W) laid over the image."""
    ax.imshow(picture(image))
    ax.imshow(heat.float().cpu().numpy(), cmap=cmap, alpha=0.6)
    ax.set_title(title, fontsize=7)


def show_map(ax: Axes, heat: torch.Tensor, *, title: str = "", cmap: str = "coolwarm") -> None:
    """A signed map (H, W) on its own, centred on zero so that the colour tells the sign."""
    values = heat.float().cpu()
    bound = float(values.abs().max()) or 1.0
    ax.imshow(values.numpy(), cmap=cmap, vmin=-bound, vmax=bound)
    ax.set_title(title, fontsize=7)


def panels(rows: int, cols: int, *, size: float = 1.8, title: str = "") -> tuple[Figure, Any]:
    """A figure of rows × cols image panels without axes; returns (figure, axes (rows, cols))."""
    plt = pyplot()
    height = (size + 0.25) * rows + (0.4 if title else 0)
    # A fixed layout: tight_layout would draw every panel once more to measure it, which doubles the time.
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, height), squeeze=False, gridspec_kw=dict(
        left=0.01, right=0.99, bottom=0.01, top=1 - (0.4 if title else 0.05) / height, wspace=0.04,
        hspace=0.25 / size * 1.2))
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.1 / height)
    fig.crate_fixed_layout = True  # FigureSink.save leaves it as it is
    return fig, axes


def image_rows_figure(images: torch.Tensor, names: list[str], columns: Sequence[Callable[[Axes, int], None]], *,
                      title: str, size: float = 2.0) -> Figure:
    """One row per image (B, 3, H, W): the image under its name, then one panel per column, drawn by column(ax, i)."""
    fig, axes = panels(images.shape[0], len(columns) + 1, size=size, title=title)
    for i, name in enumerate(names):
        axes[i, 0].imshow(picture(images[i]))
        axes[i, 0].set_title(name, fontsize=7)
        for j, draw in enumerate(columns):
            draw(axes[i, j + 1], i)
    return fig


class FigureSink:
    """Where the figures go: PNG files, and with `tensorboard` (a log folder) the same figures as images."""

    def __init__(self, tensorboard: str | None = None) -> None:
        self.written: list[Path] = []
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard)

    def save(self, fig: Figure, path: Path, tag: str) -> None:
        """Write `fig` to `path` (PNG) and, with TensorBoard, under `tag`; then close it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not getattr(fig, "crate_fixed_layout", False):
            fig.tight_layout()
        with atomic_path(path) as tmp:  # a figure is whole or absent, as every file we write
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
        if self.tb is not None:
            self.tb.add_figure(tag, fig, close=False)
        pyplot().close(fig)
        self.written.append(path)
        print(path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
