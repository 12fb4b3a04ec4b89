"""Reused memory for big tensors: a buffer is handed out again once nothing refers to it.

Folding reads a weight, multiplies it into a new array and writes that out, layer
after layer.  Fresh memory for each of them costs a page fault and a zeroed page per
4 KiB (a third of the fold's time on ResNet-50); a pool hands the same buffers out
again, so a model folds in the memory of its largest weights.
"""

from __future__ import annotations

import sys

import numpy as np

#: Smaller requests get fresh memory: numpy's and malloc's own caches serve them well.
MIN_POOLED = 1 << 20


class BufferPool:
    """Byte buffers handed out as views; one is free again when only the pool refers to it."""

    def __init__(self, max_free: int = 2) -> None:
        self.max_free = max_free  # free buffers kept for reuse (the rest are dropped)
        self._buffers: list[np.ndarray] = []

    def _free(self) -> list[np.ndarray]:
        # References to a free buffer: the pool's list, the loop variable, getrefcount's argument.
        return [b for b in self._buffers if sys.getrefcount(b) <= 3]

    def take(self, n: int) -> memoryview:
        """A writable view of ``n`` bytes, from the smallest free buffer that holds them, else fresh."""
        free = sorted((b for b in self._free() if len(b) >= n), key=len)
        if free:
            return free[0].data[:n]
        del free
        idle = sorted(self._free(), key=len)
        drop = {id(b) for b in idle[: max(0, len(idle) + 1 - self.max_free)]}
        # Keep a few free buffers, not every size ever taken (by identity: arrays compare by value).
        self._buffers = [b for b in self._buffers if id(b) not in drop]
        del idle
        buf = np.empty(n, dtype=np.uint8)  # not zeroed: every byte is written before it is read
        self._buffers.append(buf)
        return buf.data

    def owns(self, value: object) -> bool:
        """Whether ``value`` (an array) lies in memory of one of this pool's buffers."""
        return isinstance(value, np.ndarray) and any(np.may_share_memory(value, b) for b in self._buffers)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialized array of ``shape`` and ``dtype`` in a pooled buffer."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype, count=count).reshape(shape)
