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


_longest: dict[tuple[str, str], list[int]] = {}  # (model, prompt) -> the longest continuation computed so far


def greedy_token_ids(model_path: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The new token ids of float32 greedy decoding for each prompt, one prompt at a time (no padding effects).
    Greedy decoding without an end token is a prefix of itself at any length, so a shorter request is cut from the
    longest continuation already computed for that prompt in this process."""
    return [_greedy(model_path, prompt, max_new_tokens) for prompt in prompts]


def greedy_references(model_path: str, prompts: list[str], max_new_tokens: int) -> dict[str, list[int]]:
    """`greedy_token_ids` by prompt: what a load checks each completed output against."""
    return dict(zip(prompts, greedy_token_ids(model_path, prompts, max_new_tokens)))


def _greedy(model_path: str, prompt: str, max_new_tokens: int) -> list[int]:
    import torch

    known = _longest.get((model_path, prompt), [])
    if len(known) >= max_new_tokens:
        return known[:max_new_tokens]
    tokenizer, model = _load(model_path)
    with torch.no_grad():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    _longest[(model_path, prompt)] = out[0, ids.shape[1]:].tolist()
    return _longest[(model_path, prompt)]
