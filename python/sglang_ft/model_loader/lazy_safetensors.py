"""Lazy safetensors weights: SGLang's loader yields `(name, LazyTensor)` and the elastic model reads only its slice.

Under `--ft`, an AROUND hook swaps SGLang's safetensors iterators for `lazy_safetensors_iterator`; the elastic
model's loader calls `read_rows` / `read_cols`, which read just the requested rows or columns from the file
(safetensors' `get_slice`), and counts the bytes so a test can check that no rank read the whole model.
Where CUDA is available, every read lands in pinned host memory, so its copy to the GPU is an asynchronous DMA
(`copy_(..., non_blocking=True)`) rather than a pageable copy that blocks the host.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import lru_cache

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)


class ReadStats:
    """Bytes this process read from checkpoint files versus the bytes those tensors hold in full."""

    bytes_read = 0
    bytes_total = 0

    @classmethod
    def reset(cls) -> None:
        cls.bytes_read = cls.bytes_total = 0


class LazyTensor:
    """A checkpoint tensor not yet read: its shape, and slice reads straight from the file."""

    def __init__(self, handle, name: str):
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        self.name = name
        numel = 1
        for dim in self.shape:
            numel *= dim
        self._itemsize = _itemsize(self._slice.get_dtype())
        ReadStats.bytes_total += numel * self._itemsize

    def _count(self, tensor: torch.Tensor) -> torch.Tensor:
        ReadStats.bytes_read += tensor.numel() * self._itemsize
        return staged(tensor)

    def read_all(self) -> torch.Tensor:
        return self._count(self._slice[:])

    def read_rows(self, start: int, end: int) -> torch.Tensor:
        return self._count(self._slice[start:end])

    def read_cols(self, start: int, end: int) -> torch.Tensor:
        return self._count(self._slice[:, start:end])


@lru_cache(maxsize=1)
def _pinning() -> bool:
    return torch.cuda.is_available()


def staged(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (read on the host) in pinned memory where CUDA is available; as it is otherwise. torch's caching
    host allocator keeps a pinned block alive until the copies queued from it have run."""
    return tensor.pin_memory() if _pinning() else tensor


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 1)


def lazy_safetensors_iterator(hf_weights_files: list[str]) -> Iterator[tuple[str, LazyTensor]]:
    """Yield every tensor of the files as a `LazyTensor`; each file stays open while its tensors are consumed."""
    ReadStats.reset()
    for path in sorted(hf_weights_files):
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, LazyTensor(handle, name)
    logger.info(
        "sglang-ft: read %d of %d checkpoint bytes (%.1f%%) for this rank's slices",
        ReadStats.bytes_read,
        ReadStats.bytes_total,
        100.0 * ReadStats.bytes_read / max(1, ReadStats.bytes_total),
    )


def read_rows(tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of a LazyTensor or an already-read tensor."""
    if isinstance(tensor, LazyTensor):
        return tensor.read_rows(start, end)
    return tensor[start:end]


def read_cols(tensor, start: int, end: int) -> torch.Tensor:
    """Columns [start, end) of a 2-D LazyTensor or an already-read tensor."""
    if isinstance(tensor, LazyTensor):
        return tensor.read_cols(start, end)
    return tensor[:, start:end]


def read_all(tensor) -> torch.Tensor:
    return tensor.read_all() if isinstance(tensor, LazyTensor) else tensor
