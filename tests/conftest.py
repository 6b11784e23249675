"""Shared test set-up: few threads (tests may run in parallel on 2 cores), seeded RNG, tiny configs."""
from __future__ import annotations

import socket

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The bundled digits demo written once per session: (train, val) manifest paths (1,497 + 300 images, 32 px)."""
    from crate_mae.data.shards import ensure_digits

    return ensure_digits(tmp_path_factory.mktemp("shards") / "digits")


@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface, for a gloo process group of spawned ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
