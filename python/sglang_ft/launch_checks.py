"""Launch-time checks for `--ft`: fail before any process starts, with a message naming the flag at fault."""

from __future__ import annotations

import os

from ft.model_config import model_shape_of
from ft.partition import check_tp_size

ELASTIC_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM",
                         "Qwen2MoeForCausalLM")


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
