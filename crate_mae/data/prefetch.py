"""`DeviceLoader`: the wrapper every training stage reads through, so that each batch reaches the device once, by
`to_device` (data/device_decode.py), before the step sees it; the loss functions never move a batch themselves.

`depth` ≥ 1: batches made ready ahead of the step, in a background thread on a side CUDA stream. With
`data.decode_on: device` a batch arrives as JPEG bytes and is decoded and cropped on the GPU; torchvision's
nvjpeg decoder runs on its own stream but blocks the calling host thread until the batch is decoded, so done
inside the train step it holds up the launches of the step's kernels. Here one thread iterates the loader and
runs `to_device` on a side stream, up to `depth` batches ahead; the step's stream waits only on the event
recorded after each batch. The hardware JPEG engines and the side stream's crop kernels then work while the
model trains. `depth` 0: `to_device` runs in the consumer's thread as each batch is asked for (no thread).

Nothing about the order changes: batches come out in the loader's order, `to_device` draws no random
numbers, and the trainer counts the batches it *consumed* (not those read ahead), so checkpoints and
resume are exactly as without prefetching (tested equal).
"""
from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from crate_mae.data.device_decode import to_device
from crate_mae.data.reader import Batch, ShardLoader

_END = object()  # the loader's epoch is over


class DeviceLoader:
    """Wraps a ShardLoader: iterating yields its batches on `device` (`to_device`), made up to `depth` ahead.

    With `depth` ≥ 1 `to_device` runs in a background thread (on a side stream on CUDA); an exception there
    (a DataError, a decode failure) is raised in the caller at the batch where it happened. With `depth` 0 it
    runs in the caller's thread. The loader's epoch control (`set_epoch`, `len`, sample counts) passes through.
    """

    def __init__(self, loader: ShardLoader, *, device: torch.device, depth: int = 2) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.loader, self.device, self.depth = loader, device, depth

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, replay: int = 0) -> None:
        self.loader.set_epoch(epoch, replay)

    @property
    def seen(self) -> int:
        return self.loader.seen

    @property
    def bad(self) -> int:
        return self.loader.bad

    def __iter__(self) -> Iterator[Batch]:
        if self.depth == 0:
            return (to_device(batch, self.device) for batch in self.loader)
        return self._ahead()

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        context = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()

        def put(item: Any) -> bool:  # False: the consumer has gone
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with torch.cuda.device(self.device) if cuda else contextlib.nullcontext(), context:
                for batch in self.loader:
                    ready = to_device(batch, self.device)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((ready, event)):
                        return
            put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

    def _ahead(self) -> Iterator[Batch]:
        out: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop), name="crate-mae-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for tensor in batch:  # made on the side stream, freed after use on this one
                        if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                            tensor.record_stream(current)
                yield batch
        finally:
            stop.set()
            thread.join()
