"""The CRATE-MAE paper's linear probe: multinomial logistic regression on frozen features (sklearn, or L-BFGS in torch).

Independent of models and data loading: every function takes feature matrices and integer labels.
Legend: N samples, D feature width, K classes. Accuracies are in percent (0-100).

Logistic regression (the CRATE-MAE paper's linear probe) is multinomial with an L2 penalty on the
weights, fitted on standardised features and minimising, with xᵢ the standardised rows,
    L(W, b) = (1/N) Σᵢ CE(W xᵢ + b, yᵢ) + 1/(2·C·N) · ||W||²_F,
which is sklearn's C·Σᵢ CE + ½||W||² divided by C·N: the same minimiser, so both solvers agree.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from crate_mae.engine.dist import resolve_device
from crate_mae.eval.metrics import topk_correct

log = logging.getLogger("crate_mae.eval")

AUTO_SKLEARN_MAX_SIZE = 50e6  # "auto" uses sklearn up to N·D of this (CPU, float64), torch beyond it
TOLERANCE = 1e-4  # stop when max |∂L/∂θ| falls below this: sklearn's default `tol` for lbfgs


@dataclass
class LogRegResult:
    C: float  # the chosen inverse regularisation strength
    heldout_top1: float  # top-1 on the held-out part of train, fitted on the rest, with that C
    val_top1: float  # top-1 on val, refitted on all of train
    val_top5: float
    searched: dict[float, float]  # every C tried → its held-out top-1
    solver: str  # "sklearn" or "torch" (what "auto" resolved to)


def _standardise(fit_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every matrix by the per-feature mean and std of `fit_x` (statistics of the fitting split only)."""
    std, mean = torch.std_mean(fit_x, dim=0, correction=0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant feature stays 0 rather than ±inf (as sklearn)
    return [(x - mean) / std for x in (fit_x, *others)]


def _fit_sklearn(x: torch.Tensor, y: torch.Tensor, eval_x: torch.Tensor, *, num_classes: int, C: float,
                 max_iter: int) -> torch.Tensor:
    """Fit on standardised x (N, D), y (N,); return log-probabilities for eval_x as (Q, K)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)  # replaced by one short line of our own
        clf.fit(x.cpu().numpy(), y.cpu().numpy())
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning(f"logistic regression (sklearn, C={C:g}) stopped at max_iter={max_iter} before converging")
    # Columns follow clf.classes_, the labels present in y; a class absent from the fit can never be predicted.
    out = torch.full((len(eval_x), num_classes), -math.inf)
    out[:, torch.as_tensor(clf.classes_)] = torch.from_numpy(clf.predict_log_proba(eval_x.cpu().numpy())).float()
    return out


def _fit_torch(x: torch.Tensor, y: torch.Tensor, eval_x: torch.Tensor, *, num_classes: int, C: float,
               max_iter: int, device: torch.device) -> torch.Tensor:
    """The same objective, full batch in float32 by L-BFGS (strong-Wolfe line search) on `device`; logits (Q, K)."""
    x, y = x.to(device, torch.float32), y.to(device)
    # Convex, so the start does not matter for the optimum; zeros, as sklearn, make it deterministic.
    w = torch.zeros(num_classes, x.shape[1], device=device, requires_grad=True)
    b = torch.zeros(num_classes, device=device, requires_grad=True)
    penalty = 1.0 / (2.0 * C * len(x))  # the bias is not penalised
    # max_eval: room for line searches of several evaluations, so that max_iter is the limit that binds (as sklearn).
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=TOLERANCE, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, w, b), y) + penalty * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)  # one step runs up to max_iter L-BFGS iterations
    state = opt.state[w]  # LBFGS keeps its counters with its first parameter
    if state["n_iter"] >= max_iter or state["func_evals"] >= 2 * max_iter:
        log.warning(f"logistic regression (torch, C={C:g}) stopped at max_iter={max_iter} before converging")
    with torch.no_grad():
        return F.linear(eval_x.to(device, torch.float32), w, b).cpu()


def _split(labels: torch.Tensor, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held out) of a `heldout` fraction, stratified by class where sklearn can stratify."""
    from sklearn.model_selection import train_test_split

    y = labels.cpu().numpy()
    counts = np.bincount(y)
    counts = counts[counts > 0]
    n_test = math.ceil(heldout * len(y))  # as train_test_split rounds a fraction
    # Stratifying needs ≥ 2 samples of every class and room for every class on both sides.
    stratify = y if counts.min() >= 2 and min(n_test, len(y) - n_test) >= len(counts) else None
    return train_test_split(np.arange(len(y)), test_size=heldout, random_state=seed, stratify=stratify)


def fit_logistic_regression(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                            *, Cs: Sequence[float] = (1e-3, 1e-2, 1e-1, 1, 10, 100), heldout: float = 0.1,
                            solver: str = "auto", max_iter: int = 1000, seed: int = 0,
                            device: torch.device | str | None = None) -> LogRegResult:
    """Linear probe: pick C on a held-out part of train, refit on all of train, report val top-1 / top-5.

    train_x (N, D), train_y (N,), val_x (Q, D), val_y (Q,). Features are standardised by the mean and
    std of whichever split is being fitted. solver: "sklearn" (lbfgs on CPU), "torch" (L-BFGS on
    `device`, default CUDA when present) or "auto" (sklearn when N·D ≤ 50e6). A fit that reaches
    max_iter logs a warning (sklearn's ConvergenceWarning is replaced by it) and is used as it stands.
    Ties between Cs go to the smallest C, the most regularised.
    """
    if not 0.0 < heldout < 1.0:
        raise ValueError(f"heldout must be a fraction in (0, 1), got {heldout}")
    if solver == "auto":
        solver = "sklearn" if train_x.shape[0] * train_x.shape[1] <= AUTO_SKLEARN_MAX_SIZE else "torch"
    if solver == "sklearn":
        fit = _fit_sklearn
    elif solver == "torch":
        fit = partial(_fit_torch, device=resolve_device("auto") if device is None else torch.device(device))
    else:
        raise ValueError(f"solver must be 'auto', 'sklearn' or 'torch', got {solver!r}")
    train_x, val_x = train_x.float(), val_x.float()
    train_y, val_y = train_y.long(), val_y.long()
    num_classes = int(max(train_y.max(), val_y.max())) + 1

    fit_idx, held_idx = (torch.from_numpy(i) for i in _split(train_y, heldout, seed))
    fit_x, held_x = _standardise(train_x[fit_idx], train_x[held_idx])
    searched: dict[float, float] = {}
    for C in sorted(float(c) for c in Cs):
        logits = fit(fit_x, train_y[fit_idx], held_x, num_classes=num_classes, C=C, max_iter=max_iter)
        searched[C] = 100.0 * topk_correct(logits, train_y[held_idx], ks=(1,))[1] / len(held_idx)
    best = max(searched, key=lambda c: (searched[c], -c))

    all_x, std_val_x = _standardise(train_x, val_x)
    logits = fit(all_x, train_y, std_val_x, num_classes=num_classes, C=best, max_iter=max_iter)
    correct = topk_correct(logits, val_y, ks=(1, 5))
    return LogRegResult(C=best, heldout_top1=searched[best], val_top1=100.0 * correct[1] / len(val_y),
                        val_top5=100.0 * correct[5] / len(val_y), searched=searched, solver=solver)
