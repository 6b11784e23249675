"""Evaluation, one module per protocol (as dinov2's eval/): metrics (top-k, exact over ranks), features
(extraction and cache), logreg (the CRATE-MAE paper's probe), knn (DINO's), linear (MAE's BN + Linear head), and
monitor (held-out loss, kNN and the white-box objective per layer, measured while pretraining trains).
The engine imports none of this; the stages do."""
