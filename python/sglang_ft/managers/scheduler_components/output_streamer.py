"""Adapter of `sglang.srt.managers.scheduler_components.output_streamer`: the requests that just finished."""

from __future__ import annotations


def after_stream_output(_result, streamer, reqs, *_args, **_kwargs):
    """Remember the requests that just finished: a dying rank 0 may not have sent their end (output_rewind.py);
    under hybrid attention they no longer count towards their owner's load."""
    from sglang_ft.managers.ft_worker import current_worker
    from sglang_ft.layers.attention.remainder_placement import active

    worker = current_worker()
    if worker is not None:
        worker.finished.record(reqs)
    if (placement := active()) is not None:
        placement.finished(reqs)
