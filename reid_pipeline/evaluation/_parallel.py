"""Worker threads for chunked tensor work on the CPU.

Torch's intra-op threads synchronise at every operation; for many medium-sized operations on a
busy machine those barriers cost more than the parallelism gains. Here independent chunks are
spread over Python worker threads (torch releases the GIL inside operations) while torch itself
runs single-threaded, and results are collected in submission order, so outputs do not depend on
scheduling.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Workers", "cpu_workers"]


class Workers:
    """Maps a function over items on worker threads (results in order), or inline for one."""

    def __init__(self, num: int) -> None:
        if num < 1:
            raise ValueError(f"number of worker threads must be >= 1, got {num}")
        self.num = num
        self.pool = ThreadPoolExecutor(num) if num > 1 else None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        if self.pool is None:
            return [fn(x) for x in items]
        return list(self.pool.map(fn, items))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


@contextlib.contextmanager
def cpu_workers(device: torch.device, num_threads: int | None) -> Iterator[Workers]:
    """Workers for ``device``: ``num_threads`` (default: torch's thread count) on the CPU, with
    torch's intra-op threads set to 1 meanwhile (restored afterwards); one inline worker on a GPU."""
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    num = (num_threads or torch.get_num_threads()) if device.type == "cpu" else 1
    workers = Workers(num)
    before = torch.get_num_threads()
    if num > 1:
        torch.set_num_threads(1)
    try:
        yield workers
    finally:
        if num > 1:
            torch.set_num_threads(before)
        workers.close()
