"""This process's place in the elastic TP group: the layout (`ft.partition.TPLayout`) and its own shard.

The model, the KV pool sizing hook and the loader all read the same layout from here, so partition sizes are
decided once per process and never recomputed ad hoc in layers.
"""

from __future__ import annotations

from ft.model_config import model_shape_of
from ft.partition import RankShard, TPLayout

_layout: TPLayout | None = None
_layout_rank: int | None = None  # this process's shard in the layout, where it differs from its TP rank


def _tp_rank_and_size() -> tuple[int, int]:
    from sglang_ft.sglang_surface import get_parallel

    parallel = get_parallel()
    return parallel.tp_rank, parallel.tp_size


def current_layout(hf_config) -> TPLayout:
    """The layout of this TP group, the balanced one (hybrid under `--ft-attention hybrid`) unless a regroup
    installed another."""
    global _layout
    if _layout is None:
        from sglang_ft.server_args import ft_args

        _, tp_size = _tp_rank_and_size()
        _layout = TPLayout.even(model_shape_of(hf_config), tp_size, hybrid=ft_args().splits_remainder)
    return _layout


def install_layout(layout: TPLayout, rank: int | None = None) -> None:
    """Replace the layout (a regroup does this before resharding). `rank` picks this process's shard when it is
    not its TP rank: a restarted worker initialises alone (a TP group of one) with a provisional shard."""
    global _layout, _layout_rank
    layout.validate()
    _layout, _layout_rank = layout, rank


def layout_rank() -> int:
    """Which shard of the layout this process holds."""
    return _tp_rank_and_size()[0] if _layout_rank is None else _layout_rank


def local_shard(hf_config) -> RankShard:
    return current_layout(hf_config).shard(layout_rank())

