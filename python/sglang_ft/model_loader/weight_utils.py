"""Adapter of `sglang.srt.model_loader.weight_utils`: under `--ft` each rank reads only its slices of the weights."""

from __future__ import annotations

from sglang_ft.server_args import ft_enabled


def around_safetensors_iterator(original, hf_weights_files, *args, **kwargs):
    """Under `--ft`, yield lazy tensors so each rank reads only its own slices from the files."""
    if not ft_enabled():
        return original(hf_weights_files, *args, **kwargs)
    from sglang_ft.model_loader.lazy_safetensors import lazy_safetensors_iterator

    return lazy_safetensors_iterator(hf_weights_files)
