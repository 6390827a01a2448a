"""make_tiny_model: a HuggingFace-format random Llama, loadable by transformers and deterministic for a seed."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sglang_ft.tools import make_tiny_model


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_flags_shape_the_model_and_transformers_loads_it(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_model.main([str(tmp_path), "--num-layers", "3", "--hidden-size", "48", "--intermediate-size", "72",
                          "--num-attention-heads", "6", "--num-key-value-heads", "3", "--vocab-size", "300"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (3, 48, 72)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (6, 3, 300)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 300
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in chat and chat.endswith("<|assistant|>")
    ids = tokenizer("the model server", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "the model server"
    assert model(ids).logits.shape == (1, ids.shape[1], 300)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_tiny_model.main([str(a), "--seed", "3"])
    make_tiny_model.main([str(b), "--seed", "3"])
    make_tiny_model.main([str(c), "--seed", "4"])
    assert _digest(a) == _digest(b) != _digest(c)


def test_bad_flag_exits_with_a_message_naming_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sglang_ft.tools.make_tiny_model", str(tmp_path),
                           "--num-attention-heads", "6", "--num-key-value-heads", "4"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--num-attention-heads" in proc.stderr


@pytest.mark.parametrize("flag", ["--hidden-size", "--vocab-size"])
def test_non_positive_sizes_are_refused(tmp_path, flag):
    with pytest.raises(SystemExit):
        make_tiny_model.main([str(tmp_path), flag, "0"])


@pytest.mark.parametrize("architecture, model_type", [("qwen2", "qwen2"), ("mistral", "mistral")])
def test_other_llama_family_layouts(tmp_path, architecture, model_type):
    import torch
    from transformers import AutoModelForCausalLM

    make_tiny_model.main([str(tmp_path), "--architecture", architecture])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model_type
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    has_bias = any(name.endswith("q_proj.bias") for name, _ in model.named_parameters())
    assert has_bias == (architecture == "qwen2")


@pytest.mark.parametrize("base, model_type", [("llama", "mixtral"), ("qwen2", "qwen2_moe")])
def test_moe_flag_makes_mixtral_or_qwen2_moe_with_a_shared_expert(tmp_path, base, model_type):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    make_tiny_model.main([str(tmp_path), "--architecture", base, "--moe", "--num-experts", "6",
                          "--num-experts-per-tok", "3", "--intermediate-size", "32"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model_type and config["num_experts_per_tok"] == 3
    experts = config["num_local_experts"] if model_type == "mixtral" else config["num_experts"]
    assert experts == 6
    if model_type == "qwen2_moe":
        assert (config["moe_intermediate_size"], config["shared_expert_intermediate_size"]) == (32, 64)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7]])
    assert model(ids).logits.shape == (1, 3, 512)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # the hub's per-expert tensor names
        names = set(f.keys())
    per_expert = "block_sparse_moe.experts.5.w1" if model_type == "mixtral" else "mlp.experts.5.gate_proj"
    assert f"model.layers.0.{per_expert}.weight" in names
    assert any("shared_expert." in n for n in names) == (model_type == "qwen2_moe")


@pytest.mark.parametrize("argv, message", [
    (["--num-experts", "4"], "--num-experts needs --moe"),
    (["--moe", "--num-experts", "2", "--num-experts-per-tok", "3"], "--num-experts-per-tok must be in 1..--num-experts"),
    (["--moe", "--shared-expert-intermediate-size", "64"], "is for qwen2_moe"),
    (["--moe", "--architecture", "qwen2", "--shared-expert-intermediate-size", "100"], "a multiple of"),
    (["--moe", "--num-experts", "0"], "--num-experts must be positive"),
])
def test_moe_flags_are_checked(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        make_tiny_model.main([str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_the_reference_cuts_a_shorter_greedy_run_from_a_longer_one(tiny_model):
    """hf_reference answers a shorter request from the longest continuation it computed for the prompt, and that
    is the same as computing it afresh (greedy without an end token is a prefix of itself)."""
    from sglang_ft.tools import hf_reference

    prompts = ["a reference prompt", "another one"]
    longer = hf_reference.greedy_token_ids(tiny_model, prompts, 12)
    shorter = hf_reference.greedy_token_ids(tiny_model, prompts, 5)
    assert shorter == [ids[:5] for ids in longer] and all(len(ids) == 12 for ids in longer)
    hf_reference._longest.clear()
    assert hf_reference.greedy_token_ids(tiny_model, prompts, 5) == shorter
