"""Adapter of `sglang.srt.entrypoints.openai.serving_tokenize`: `/v1/detokenize` refuses ids outside the vocabulary."""

from __future__ import annotations

from sglang_ft.server_args import ft_enabled


def after_validate_detokenize(error, serving, request, *args, **kwargs):
    """Under `--ft`, `/v1/detokenize` of an id outside the vocabulary is a 400, not upstream's 500."""
    if ft_enabled() and error is None:
        from sglang_ft.entrypoints.input_checks import detokenize_error

        return detokenize_error(request.tokens, serving.tokenizer_manager.model_config.vocab_size)
    return None
