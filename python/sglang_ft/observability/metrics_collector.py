"""SGLang's own scheduler gauges (`sglang:max_total_num_tokens`, `sglang:token_usage`, `sglang:num_used_tokens`,
`sglang:kv_cache_memory_usage_gb`, ...) kept true across regroups, so a gateway routing on them sees the server as
it is.

SGLang writes them from the TP rank 0 it started (its metrics reporter is enabled there only) and the KV constants
once, at start-up. A regroup keeps the token slots (the capacity in tokens does not change) but widens the heads
each rank holds, and after a rank 0 death nobody would report at all: the dead rank's last values would stay on
`/metrics` for good. So: a reshaped pool recomputes its size and re-emits the constants; a new rank 0 turns its
reporter on; and the FT controller drops a dead worker's gauges (`FtMetrics.forget_process`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def after_kv_reshape(scheduler) -> None:
    """The pool got new buffers: its `mem_usage` (SGLang computes it only at allocation) and the constants. Metrics
    never fail a regroup: an error here is logged and the regroup goes on."""
    try:
        pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
        pool._finalize_allocation_log(pool.size)
        if scheduler.metrics_reporter.current_scheduler_metrics_enabled:
            scheduler.emit_metrics_constants()
    except Exception:
        logger.exception("sglang-ft: SGLang's KV gauges were not updated after the reshape")


def take_over_scheduler_metrics(scheduler) -> None:
    """This worker is the new TP rank 0: SGLang's scheduler metrics (and its batch log lines) come from here on."""
    reporter = scheduler.metrics_reporter
    if reporter.metrics_collector is None:  # --enable-metrics is off
        return
    reporter.current_scheduler_metrics_enabled = True
    reporter.is_stats_logging_rank = True
    scheduler.emit_metrics_constants()
