"""Seeing inside CRATE: reconstructions, per-head attention and its masks, PCA of patch features, a normalised-cut
foreground, the layer-wise rate and sparsity.

    python -m crate_mae.viz recon --checkpoint runs/demo/final.pth --images shards/digits/val.json
    python -m crate_mae.viz attention --checkpoint runs/demo/encoder.pth --images photos/ --layer -1
    python -m crate_mae.viz pca --model crate_base_21k_patch8 --pretrained-file base_21k.pth --images 'photos/*.jpg' --stride 4
    python -m crate_mae.viz ncut --checkpoint crate_small.pth --images photos/ --save-masks
    python -m crate_mae.viz layers --checkpoint crate_mae_base.pth --variant base --images shards/imagenet/val.json
"""
from crate_mae.viz.recon import denormalise, reconstruct, reconstruction_grid

__all__ = ["denormalise", "reconstruct", "reconstruction_grid"]
