"""Evaluation, one module per protocol (as dinov2's eval/): metrics (top-k, exact over ranks), features
(extraction and cache), logreg (the CRATE-MAE paper's probe), knn (DINO's), linear (MAE's BN + Linear head), and
monitor (held-out loss, kNN and the white-box objective per layer, measured while pretraining trains).
The engine imports none of this; the stages do.

Emergent segmentation (arXiv 2308.16271): heads (each layer's CLS attention and patch features, CRATE or a timm
ViT), voc (VOC12's best-head attention mIoU), maskcut and coco (MaskCut's objects, class-agnostic COCO AP), and
their command line, `python -m crate_mae.eval {voc-seg,maskcut}` (__main__, run by segment: batches, progress,
resumable partial files, results JSON and figures)."""
