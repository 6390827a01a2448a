"""Refuse request inputs that upstream SGLang 0.5.23 accepts but should not, before they reach a worker.

Found by sending malformed bodies to a live `--ft` server (tests/test_reliability.py): an `input_ids` token outside
the vocabulary is served (the embedding maps it to garbage on CPU; on a GPU an out-of-range index is a device-side
assert that takes the worker down, which `--ft` would then treat as a failure), and `n: 0` silently returns one
completion. Both now answer 400 with a message, through SGLang's own per-request validation step.
"""

from __future__ import annotations


def check_generate_input(obj, input_ids, vocab_size: int) -> None:
    """Raise ValueError (SGLang answers 400 with its text) for a token id outside the vocabulary or n < 1."""
    if input_ids:
        low, high = min(input_ids), max(input_ids)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size}).")
    params = getattr(obj, "sampling_params", None)
    if isinstance(params, dict) and isinstance(params.get("n"), int) and params["n"] < 1:
        raise ValueError(f"n must be at least 1, got {params['n']}.")
