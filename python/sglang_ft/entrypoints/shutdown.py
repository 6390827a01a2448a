"""Bound SGLang's drain on SIGTERM.

Upstream's SIGTERM handler stops admitting and waits for the requests in flight with no limit (a stuck or very long
request holds the shutdown forever). Under `--ft`, the requests still running `--ft-drain-timeout-s` after the
signal are aborted through SGLang's own abort (their clients get a finish reason "abort"), and SGLang's shutdown
then goes on as usual: schedulers, detokenizer, FT controller and backup store all exit.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)


def bound_the_drain(tokenizer_manager, timeout_s: float) -> threading.Timer:
    def give_up() -> None:
        remaining = len(tokenizer_manager.rid_to_state)
        loop = tokenizer_manager.event_loop
        if remaining and loop is not None:
            logger.warning("sglang-ft: %d requests still running %.0f s after SIGTERM (--ft-drain-timeout-s); "
                           "aborting them so the shutdown completes", remaining, timeout_s)
            loop.call_soon_threadsafe(lambda: tokenizer_manager.abort_request(abort_all=True))

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    return timer
