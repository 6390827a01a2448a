"""Adapter of `sglang.srt.configs.model_config`: under `--ft` a rank's head counts are the layout's (unequal) ones."""

from __future__ import annotations

from sglang_ft.launch_checks import ELASTIC_ARCHITECTURES
from sglang_ft.server_args import ft_enabled


def _elastic_shard(model_config):
    """This rank's shard where the elastic model serves `model_config` in a TP process, else None."""
    if not ft_enabled() or getattr(model_config, "is_draft_model", False):
        return None
    archs = getattr(model_config.hf_config, "architectures", None) or []
    if not any(a in ELASTIC_ARCHITECTURES for a in archs):
        return None
    from sglang_ft.distributed_state import local_shard

    try:
        return local_shard(model_config.hf_text_config)
    except (RuntimeError, ValueError, AttributeError):
        return None  # no TP group in this process (e.g. the launcher sizing memory)


def around_get_num_kv_heads(original, model_config, *args, **kwargs):
    """KV heads on this rank: the layout's (unequal) count under `--ft`."""
    shard = _elastic_shard(model_config)
    return original(model_config, *args, **kwargs) if shard is None else shard.num_kv_heads


def around_get_num_attention_heads(original, model_config, *args, **kwargs):
    """Query heads on this rank: the layout's (unequal) count under `--ft`."""
    shard = _elastic_shard(model_config)
    if shard is None:
        return original(model_config, *args, **kwargs)
    return shard.num_kv_heads * (model_config.num_attention_heads // model_config.get_total_num_kv_heads())
