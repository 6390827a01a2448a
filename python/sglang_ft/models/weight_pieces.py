"""Checkpoint slices a rank holds (`Piece`: a tensor's rows or columns and the view that holds them), and filling
them from the safetensors files: shared by every elastic model and by the reshard's reads from disk."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_ft.model_loader.lazy_safetensors import read_all, read_cols, read_rows


@dataclass(frozen=True)
class Piece:
    """Checkpoint tensor `name`, rows (axis 0) or columns (axis 1) [lo, hi), held in `view` on this rank."""

    name: str
    axis: int
    lo: int
    hi: int
    view: torch.Tensor


def fill_from_checkpoint(weights, pieces: list[Piece], replicated: dict[str, torch.Tensor]) -> set[str]:
    """Copy checkpoint slices into piece views (and whole tensors into replicated params); names filled."""
    by_name: dict[str, list[Piece]] = {}
    for piece in pieces:
        by_name.setdefault(piece.name, []).append(piece)
    loaded = set()
    with torch.no_grad():
        _fill(weights, by_name, replicated, loaded)
    return loaded


def _fill(weights, by_name, replicated, loaded) -> None:
    for name, tensor in weights:
        for piece in by_name.get(name, ()):
            value = read_rows(tensor, piece.lo, piece.hi) if piece.axis == 0 else read_cols(tensor, piece.lo, piece.hi)
            if value.shape != piece.view.shape:
                raise ValueError(f"{name}[{piece.lo}:{piece.hi}] has shape {tuple(value.shape)}, expected "
                                 f"{tuple(piece.view.shape)}")
            piece.view.copy_(value, non_blocking=True)  # asynchronous from pinned memory (lazy_safetensors.py)
            loaded.add(name)
        if name in replicated:
            replicated[name].data.copy_(read_all(tensor), non_blocking=True)
            loaded.add(name)
