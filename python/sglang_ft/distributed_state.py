"""This process's place in the elastic TP group: the layout (`ft.partition.TPLayout`) and its own shard.

The model, the KV pool sizing hook and the loader all read the same layout from here, so partition sizes are
decided once per process and never recomputed ad hoc in layers.
"""

from __future__ import annotations

from ft.partition import RankShard, TPLayout
from sglang_ft.launch_checks import model_shape_of

_layout: TPLayout | None = None


def _tp_rank_and_size() -> tuple[int, int]:
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return parallel.tp_rank, parallel.tp_size


def current_layout(hf_config) -> TPLayout:
    """The layout of this TP group, the balanced one unless a regroup installed another."""
    global _layout
    if _layout is None:
        _, tp_size = _tp_rank_and_size()
        _layout = TPLayout.even(model_shape_of(hf_config), tp_size)
    return _layout


def install_layout(layout: TPLayout) -> None:
    """Replace the layout (a regroup does this before resharding)."""
    global _layout
    layout.validate()
    _layout = layout


def local_shard(hf_config) -> RankShard:
    rank, _ = _tp_rank_and_size()
    return current_layout(hf_config).shard(rank)

