"""The one seeding site: every generator of a process from one seed, and stable seeds mixed from parts.

    seed_everything(cfg.run.seed)                          # a stage: the same initial weights on every rank
    seed_everything(mix_seed(cfg.run.seed, "rank", rank))  # then: each rank its own masks and augmentations
    seed_everything(mix_seed(seed, epoch, rank, role))     # a data worker: timm's transforms draw from the globals

The data's order is a function of (seed, epoch, rank, worker) alone, and so is the augmentation drawn inside data
workers. The main process's generators carry on from its rank's seed, and every checkpoint holds them: a resumed run
draws what an uninterrupted one does.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and runs (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every GPU) generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
