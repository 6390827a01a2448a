"""Adapter of `sglang.srt.managers.scheduler_components.ipc_channels`: a restarted worker is not rank 0 yet."""

from __future__ import annotations


def around_create_ipc_channels(original, cls, *args, **kwargs):
    """A restarted worker starts as a TP group of one, so SGLang takes it for rank 0: it must not open the
    tokenizer manager's channels (it would take requests meant for the real rank 0) until a regroup makes it
    rank 0 for real."""
    from sglang_ft.managers.ft_worker import current_worker
    from sglang_ft.elastic_tp.joiner import joiner_identity

    if kwargs.get("is_rank_zero") and current_worker() is None and joiner_identity() is not None:
        kwargs["is_rank_zero"] = False
    return original(cls, *args, **kwargs)
