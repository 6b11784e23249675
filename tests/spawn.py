"""`spawn`: torch.multiprocessing.spawn with a time limit, so that a hang of spawned ranks fails its test instead of
hanging the suite."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def spawn(fn: Callable[..., Any], args: tuple, nprocs: int, *, timeout: float = 300.0) -> None:
    """Run fn(rank, *args) in `nprocs` processes and wait for them all; a rank's error is raised here (as mp.spawn
    raises it), and ranks still running after `timeout` seconds are killed and a TimeoutError raised."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{nprocs} spawned ranks of {fn.__name__} still running after {timeout:g} s")
