"""Adapter of `sglang.srt.configs.update_config`: under `--ft` the model keeps its true sizes on CPU."""

from __future__ import annotations

from sglang_ft.server_args import ft_enabled


def around_adjust_unaligned_cpu_tp(original, model_config, *args, **kwargs):
    """Under `--ft`, keep the true head and MLP sizes: SGLang's CPU path pads them for uneven TP, the elastic
    model splits them unevenly instead."""
    if ft_enabled():
        return model_config
    return original(model_config, *args, **kwargs)
