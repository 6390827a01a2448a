"""The partitioning view (`ModelShape`) of a HuggingFace Llama-family model, from its config's attributes or its
config.json: what the controller plans with, and what the launch checks and the schedulers lay the model out by."""

from __future__ import annotations

import json
import os
import types

from ft.partition import ModelShape


def model_shape_of(hf_config) -> ModelShape:
    """The partitioning view of a HuggingFace Llama-family config (dense or MoE); ValueError for an MoE layout
    the elastic model cannot partition."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    experts, columns, shared_per_unit = _moe_columns(hf_config)
    return ModelShape(
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hf_config.hidden_size,
        intermediate_size=columns,
        vocab_size=hf_config.vocab_size,
        num_layers=hf_config.num_hidden_layers,
        num_experts=experts,
        shared_columns_per_unit=shared_per_unit,
    )


def _moe_columns(hf_config) -> tuple[int, int, int]:
    """(routed experts, FFN columns per expert or of the dense MLP, shared-expert columns per expert column)."""
    model_type = getattr(hf_config, "model_type", "")
    if model_type == "mixtral":
        return hf_config.num_local_experts, hf_config.intermediate_size, 0
    if model_type != "qwen2_moe":
        return 0, hf_config.intermediate_size, 0
    if getattr(hf_config, "mlp_only_layers", None) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
        raise ValueError("--ft serves Qwen2-MoE models whose every layer is sparse (decoder_sparse_step 1, no "
                         "mlp_only_layers)")
    columns, shared = hf_config.moe_intermediate_size, getattr(hf_config, "shared_expert_intermediate_size", 0) or 0
    if shared % columns:
        raise ValueError(f"--ft needs the shared expert's width ({shared}) to be a multiple of an expert's "
                         f"({columns}), so every rank holds the same share of both")
    return hf_config.num_experts, columns, shared // columns


def model_shape_from_dir(model_path: str) -> ModelShape:
    """The model's shape from its config.json, without importing transformers."""
    with open(os.path.join(model_path, "config.json")) as f:
        return model_shape_of(types.SimpleNamespace(**json.load(f)))
