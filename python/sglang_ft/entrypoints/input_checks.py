"""Refuse request inputs that upstream SGLang 0.5.23 accepts but should not, before they reach a worker.

Found by sending malformed bodies to a live `--ft` server (tests/server/test_reliability.py): an `input_ids` token outside
the vocabulary is served (the embedding maps it to garbage on CPU; on a GPU an out-of-range index is a device-side
assert that takes the worker down, which `--ft` would then treat as a failure), and `n: 0` silently returns one
completion. Found by schemathesis on the live server: an empty prompt (`"text": ""`, or `""` in a completions
prompt list, with a tokenizer that adds no BOS token) reaches the model as a zero-token prefill, which raises in
every worker at once and so stops the whole server. All three now answer 400 with a message, through SGLang's own
per-request validation step. Also found by schemathesis: `/v1/detokenize` of a negative token id answers 500 (the
tokenizer cannot convert it); ids outside the vocabulary now answer 400 there too.
"""

from __future__ import annotations


def check_generate_input(obj, input_ids, vocab_size: int) -> None:
    """Raise ValueError (SGLang answers 400 with its text) for an empty input, a token id outside the vocabulary or
    n < 1."""
    multimodal = getattr(obj, "contains_mm_input", lambda: False)()
    if input_ids is not None and len(input_ids) == 0 and getattr(obj, "input_embeds", None) is None and not multimodal:
        raise ValueError("The input is empty (no token after tokenization): give a non-empty text or input_ids.")
    if input_ids:
        low, high = min(input_ids), max(input_ids)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size}).")
    params = getattr(obj, "sampling_params", None)
    if isinstance(params, dict) and isinstance(params.get("n"), int) and params["n"] < 1:
        raise ValueError(f"n must be at least 1, got {params['n']}.")


def detokenize_error(tokens, vocab_size: int) -> str | None:
    """The message for a `/v1/detokenize` request naming a token id outside the vocabulary; None if all are in it.
    `tokens` is a list of ids or of id lists (SGLang checks the types itself)."""
    lists = tokens if tokens and all(isinstance(t, list) for t in tokens) else [tokens or []]
    for ids in lists:
        for token in ids:
            if isinstance(token, int) and not 0 <= token < vocab_size:
                return f"tokens contains token id {token}, outside the vocabulary [0, {vocab_size})."
    return None
