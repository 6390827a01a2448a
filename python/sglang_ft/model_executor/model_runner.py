"""Adapter of `sglang.srt.model_executor.model_runner`: attention backends built for this rank's share of heads."""

from __future__ import annotations


def around_init_attention_backends(original, runner, *args, **kwargs):
    """Under `--ft`, SGLang's attention backends are built for this rank's (possibly uneven) heads, at startup and
    after every regroup (`elastic_tp/graph_refresh.py`)."""
    from sglang_ft.elastic_tp import graph_refresh

    return graph_refresh.around_init_attention_backends(original, runner, *args, **kwargs)
