"""Adapter of `sglang.srt.model_loader.utils`: under `--ft` Llama-family architectures get the elastic model."""

from __future__ import annotations

from sglang_ft.launch_checks import ELASTIC_ARCHITECTURES
from sglang_ft.server_args import ft_enabled


def after_get_model_architecture(result, model_config, *_args, **_kwargs):
    """Under `--ft`, serve Llama-family architectures with the elastic model."""
    if not ft_enabled():
        return result
    _cls, arch = result
    if arch not in ELASTIC_ARCHITECTURES:
        raise ValueError(f"--ft supports {ELASTIC_ARCHITECTURES}, not {arch}")
    from sglang_ft.models.elastic_llama import ElasticLlamaForCausalLM

    return ElasticLlamaForCausalLM, arch
