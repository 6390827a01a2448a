"""Read checkpoint slices from the node's copy in host memory where it holds them, from the checkpoint elsewhere.

The copy (`ft/weight_cache.py`, made under `--ft-weight-cache host`) is a directory on tmpfs holding the checkpoint's
safetensors files; safetensors maps a cached file like any other, so a slice read from it costs a memory copy where
one from the checkpoint costs a disk read. A cached file is used only under its own name (written as `.part`, then
renamed) and at the checkpoint file's size; a file the copy lacks, or holds only partly, is read from the checkpoint.

Where a GPU is present each slice read lands in pinned host memory (`lazy_safetensors.staged`), so its copy to the
GPU is a DMA. Registering the cached files' mappings themselves as pinned memory would save that staging copy (an
mmap of each file, then `torch.cuda.cudart().cudaHostRegister(ptr, size, 0)` in each worker); that is not done:
nothing here has a GPU to check it on.
"""

from __future__ import annotations

import os

from ft.weight_cache import checkpoint_files


def _cached(checkpoint_file: str, cache_dir: str) -> str | None:
    """The whole copy of `checkpoint_file` in `cache_dir`, or None."""
    copy = os.path.join(cache_dir, os.path.basename(checkpoint_file))
    try:
        return copy if os.path.getsize(copy) == os.path.getsize(checkpoint_file) else None
    except OSError:
        return None


def split_by_source(checkpoint_dir: str, cache_dir: str) -> tuple[list[str], list[str]]:
    """The files to read: (copies in host memory, checkpoint files the copy lacks)."""
    from_cache, from_disk = [], []
    for path in checkpoint_files(checkpoint_dir):
        copy = _cached(path, cache_dir) if cache_dir else None
        (from_cache if copy else from_disk).append(copy or path)
    return from_cache, from_disk


def _nbytes(pieces) -> int:
    return sum(p.view.numel() * p.view.element_size() for p in pieces)


def read_slices(checkpoint_dir: str, pieces: list, cache_dir: str | None = None,
                between_tensors=None) -> tuple[int, int]:
    """Fill `pieces` (`weight_pieces.Piece`) from the host copy where it holds their tensors, else from the
    checkpoint; the bytes filled from each: (host cache, disk). `cache_dir` defaults to this deployment's copy;
    `between_tensors()`, if given, runs after each tensor read (the reshard lands peer transfers meanwhile)."""
    from sglang_ft.model_loader.lazy_safetensors import lazy_safetensors_iterator
    from sglang_ft.models.weight_pieces import fill_from_checkpoint

    if cache_dir is None:
        from sglang_ft.server_args import ft_args

        cache_dir = ft_args().weight_cache_dir
    from_cache, from_disk = split_by_source(checkpoint_dir, cache_dir)
    read = lambda files: _pausing(lazy_safetensors_iterator(files), between_tensors)  # noqa: E731
    filled = fill_from_checkpoint(read(from_cache), pieces, {}) if from_cache else set()
    cached = [p for p in pieces if p.name in filled]
    rest = [p for p in pieces if p.name not in filled]
    from_checkpoint = fill_from_checkpoint(read(from_disk), rest, {}) if rest else set()
    return _nbytes(cached), _nbytes([p for p in rest if p.name in from_checkpoint])


def _pausing(weights, between):
    """`weights`, calling `between()` each time the consumer asks for the next tensor (after it used the last)."""
    for item in weights:
        yield item
        if between is not None:
            between()
