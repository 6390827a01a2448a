"""Adapter of `sglang.srt.managers.tokenizer_manager`: the request journal, input checks and a bounded drain."""

from __future__ import annotations

from sglang_ft.server_args import ft_args, ft_enabled


def around_dispatch_to_scheduler(original, tokenizer_manager, obj, *args, **kwargs):
    """Under `--ft`, the tokenizer manager journals what it sends, to re-send it to a newly elected rank 0."""
    if ft_enabled():
        from sglang_ft.managers.tokenizer_manager_components.sent_requests import JOURNAL

        JOURNAL.record(tokenizer_manager, obj)
    return original(tokenizer_manager, obj, *args, **kwargs)


def before_validate_one_request(tokenizer_manager, obj, input_ids, *args, **kwargs):
    """Under `--ft`, refuse out-of-vocabulary token ids and n < 1 with a 400 (`entrypoints/input_checks.py`)."""
    if ft_enabled():
        from sglang_ft.entrypoints.input_checks import check_generate_input

        check_generate_input(obj, input_ids, tokenizer_manager.model_config.vocab_size)


def after_sigterm(_result, signal_handler, *args, **kwargs):
    """Under `--ft`, SGLang's drain on SIGTERM ends after `--ft-drain-timeout-s` (`entrypoints/shutdown.py`)."""
    if ft_enabled():
        from sglang_ft.entrypoints.shutdown import bound_the_drain

        bound_the_drain(signal_handler.tokenizer_manager, ft_args().drain_timeout_s)


def around_is_ready(original, tokenizer_manager, *args, **kwargs) -> bool:
    """SGLang's `/ready`: also 503 while no group can serve (`entrypoints/ft_events.py` knows from the controllers)."""
    from sglang_ft.entrypoints.ft_events import around_is_ready as ready_while_a_group_serves

    return ready_while_a_group_serves(original, tokenizer_manager, *args, **kwargs)
