"""Launch-time checks for `--ft`: fail before any process starts, with a message naming the flag at fault."""

from __future__ import annotations

import os

from ft.partition import ModelShape, check_tp_size

ELASTIC_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM",
                         "Qwen2MoeForCausalLM")


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


def check_ft_launch(server_args) -> list[str]:
    """Every problem with these server args under `--ft`, as messages that name the flag; empty when fine."""
    model_path = server_args.model_path
    if not model_path:
        return ["--model-path is required"]
    if not os.path.isdir(model_path) or not os.path.exists(os.path.join(model_path, "config.json")):
        return [f"--model-path {model_path!r} is not a local model directory with a config.json"]
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=server_args.trust_remote_code)
    except Exception as exc:  # a malformed config is the user's input, not our crash
        return [f"--model-path {model_path!r}: cannot read its config.json ({exc})"]
    problems = []
    archs = getattr(hf_config, "architectures", None) or []
    if not any(a in ELASTIC_ARCHITECTURES for a in archs):
        problems.append(
            f"--ft supports {', '.join(ELASTIC_ARCHITECTURES)}; --model-path {model_path!r} is {archs or 'unknown'}"
        )
        return problems
    try:
        check_tp_size(model_shape_of(hf_config), server_args.tp_size)
    except ValueError as exc:
        problems.append(str(exc))
    problems += _quantization_problems(server_args, hf_config)
    attn_dp_size = getattr(server_args, "attn_dp_size", 1)
    for flag, value in (("--pp-size", server_args.pp_size), ("--attn-dp-size", attn_dp_size)):
        if value not in (None, 1):
            problems.append(f"{flag} {value} is not supported with --ft yet (use 1)")
    nnodes = getattr(server_args, "nnodes", 1) or 1
    dp_size = server_args.dp_size or 1
    if dp_size > 1 and nnodes > 1:
        problems.append(f"--dp-size {dp_size} with --nnodes {nnodes} is not supported with --ft yet (data-parallel "
                        "replicas run on one node)")
    if nnodes > 1 and not getattr(server_args, "dist_init_addr", None):
        problems.append(f"--nnodes {nnodes} with --ft needs --dist-init-addr (node 0's address: the FT controller "
                        "runs there)")
    elif nnodes > 1 and server_args.dist_init_addr.startswith("["):
        problems.append(f"--dist-init-addr {server_args.dist_init_addr} is IPv6: --ft across nodes needs an IPv4 "
                        "address or a host name for node 0 (its ZMQ sockets are IPv4)")
    return problems


def _quantization_problems(server_args, hf_config) -> list[str]:
    """The elastic model slices full-precision weights by head and column; quantized weights (packed, with scales
    per group) are not sliced yet, so refuse them here rather than in the schedulers after launch."""
    problems = []
    quantization = getattr(server_args, "quantization", None)
    if quantization:
        problems.append(f"--quantization {quantization} is not supported with --ft yet (serve a full-precision "
                        "checkpoint)")
    checkpoint_quant = getattr(hf_config, "quantization_config", None)
    if checkpoint_quant:
        method = checkpoint_quant.get("quant_method", "unknown") if isinstance(checkpoint_quant, dict) else "unknown"
        problems.append(f"--model-path {server_args.model_path!r} is a quantized checkpoint ({method}, from its "
                        "config.json's quantization_config): not supported with --ft yet")
    return problems
