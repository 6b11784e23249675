"""Seeing inside CRATE-MAE: reconstructions, per-head attention maps, the layer-wise rate and sparsity.

    python -m crate_mae.viz recon --checkpoint runs/demo/final.pth --images shards/digits/val.json
    python -m crate_mae.viz attention --checkpoint runs/demo/encoder.pth --images photo.jpg --layer -1
    python -m crate_mae.viz layers --checkpoint crate_mae_base.pth --variant base --images shards/imagenet/val.json
"""
from crate_mae.viz.recon import denormalise, reconstruct, reconstruction_grid

__all__ = ["denormalise", "reconstruct", "reconstruction_grid"]
