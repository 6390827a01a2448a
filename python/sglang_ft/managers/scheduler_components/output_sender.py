"""Adapter of `sglang.srt.managers.scheduler_components.output_sender`: the "kill_unsent" fault."""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)


def around_send_output(original, sender, output, *args, **kwargs):
    """The "kill_unsent" fault: die after a step, before its output leaves (the tokens a dying rank 0 computed and
    never sent, on purpose)."""
    from sglang_ft.managers.ft_worker import current_worker

    worker = current_worker()
    if worker is not None and worker.die_before_next_send and getattr(output, "rids", None):
        logger.warning("sglang-ft: worker %d dies before sending the output of %d requests (injected fault)",
                       worker.worker, len(output.rids))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(sender, output, *args, **kwargs)
