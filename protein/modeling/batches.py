"""Training batches: slices of the decoded-image memory map in a seeded order, and a thread that
reads them ahead while the GPU works on the current one."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Generator, Iterator
from queue import Empty, Full, Queue
from typing import TypeVar

import numpy as np
import torch

from protein.modeling import distributed

T = TypeVar("T")

PREFETCH_THREAD_NAME = "batch-prefetch"
# How often a producer blocked on a full queue, or a consumer waiting for it to end, looks again.
PREFETCH_POLL_S = 0.1


def iterate_batches(
    images: np.ndarray,
    targets: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    rank: distributed.Rank = distributed.Rank(),
) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """Yield (uint8 NHWC images, float targets) batches; shuffled when a generator is given.
    With pin_memory (for a CUDA device) batches land in page-locked memory, so the copy to the
    GPU can run asynchronously.

    batch_size is the global batch: with several ranks, each rank yields only its shard of
    every global batch (every ranks' generator draws the same order), so no rank reads a row
    another rank reads. drop_last drops a ragged final batch (training: a batch of one image
    breaks BatchNorm, and a new shape recompiles under torch.compile) unless it is the only one."""
    order = indices
    if generator is not None:
        order = indices[torch.randperm(len(indices), generator=generator).numpy()]
    end = len(order)
    if drop_last and len(order) >= batch_size:
        end = len(order) // batch_size * batch_size
    for start in range(0, end, batch_size):
        # Sorted reads walk the memory-mapped cache forwards; batch order stays random.
        batch_idx = np.sort(distributed.shard(order[start : min(start + batch_size, end)], rank))
        x = torch.from_numpy(np.ascontiguousarray(images[batch_idx]))
        y = torch.from_numpy(targets[batch_idx])
        yield (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)


def prefetch(batches: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """Produce the next batches in a background thread (slicing the memory map and pinning
    release the GIL) while the GPU works on the current one. An error in the producer is raised
    here, after the batches before it. However the consumer stops (the end, an exception, close),
    the thread has ended when this generator has."""
    queue: Queue[T | object] = Queue(maxsize=depth)
    done = object()
    stop = threading.Event()
    failure: list[BaseException] = []

    def offer(item: T | object) -> bool:
        """Put `item` on the queue unless the consumer has stopped; False once it has. A bare
        put would block for ever on a full queue that nobody reads, holding the source (and the
        cache's memory map) and up to `depth` + 1 pinned batches: a leak per failed try, since
        Prefect retries the train task in the same process."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=PREFETCH_POLL_S)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not offer(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            failure.append(exc)
        finally:
            offer(done)

    thread = threading.Thread(target=produce, name=PREFETCH_THREAD_NAME, daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        # The collector can run this finally on any thread, the producer's own included: it must
        # not wait for itself. It sees `stop` at its next put and ends.
        if threading.current_thread() is not thread:
            # Drained, not just waited for: the batches already queued are released now, and a
            # producer blocked in put returns at once instead of after its timeout.
            while thread.is_alive():
                with contextlib.suppress(Empty):
                    queue.get(timeout=PREFETCH_POLL_S)
            thread.join()
    if failure:
        raise failure[0]
