"""Adapter of `sglang.srt.model_loader.utils`: under `--ft` Llama-family architectures get the elastic model."""

from __future__ import annotations

from sglang_ft.launch_checks import ELASTIC_ARCHITECTURES
from sglang_ft.server_args import ft_enabled


def around_get_model_architecture(original, model_config, *args, **kwargs):
    """Under `--ft`, serve Llama-family architectures with the elastic model. The plain case (the checkpoint's
    first architecture elastic, no quantization, SGLang's own implementation) skips SGLang's model registry:
    resolving through it imports every SGLang model module first (about 4 s of CPU in each scheduler here), for a
    class sglang-ft replaces anyway. Anything else goes through SGLang and must resolve to an elastic architecture."""
    if not ft_enabled():
        return original(model_config, *args, **kwargs)
    from sglang_ft.models.elastic_llama import ElasticLlamaForCausalLM

    archs = getattr(model_config.hf_config, "architectures", None) or []
    if (archs and archs[0] in ELASTIC_ARCHITECTURES and model_config.quantization is None
            and model_config.model_impl in ("auto", "sglang")):
        from sglang.srt.configs.model_config import ModelImpl

        # what SGLang's resolution records for a natively supported architecture
        model_config._resolved_model_arch = archs[0]
        model_config._resolved_model_impl = ModelImpl.SGLANG
        return ElasticLlamaForCausalLM, archs[0]
    _cls, arch = original(model_config, *args, **kwargs)
    if arch not in ELASTIC_ARCHITECTURES:
        raise ValueError(f"--ft supports {ELASTIC_ARCHITECTURES}, not {arch}")
    return ElasticLlamaForCausalLM, arch

