"""HuggingFace `transformers` greedy generation: the correctness anchor every sglang-ft output is compared with."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4)
def _load(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare fixed-length continuations (servers use ignore_eos)
    return tokenizer, model


def greedy_token_ids(model_path: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The new token ids of float32 greedy decoding for each prompt, one prompt at a time (no padding effects)."""
    import torch

    tokenizer, model = _load(model_path)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs
