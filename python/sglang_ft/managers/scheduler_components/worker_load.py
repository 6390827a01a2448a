"""What one worker holds and does, read by its heartbeat thread for `/ft/status`.

After a failure the ranks hold unequal head counts (8 heads over 3 workers: 3+3+2), so the same tokens cost them
unequal KV memory and attention work; these numbers show it per worker: heads, KV slots and bytes per token, the
requests and tokens still to compute, and the latest step's time.
"""

from __future__ import annotations

from ft.messages import WorkerLoad


def kv_bytes_per_token(pool) -> int:
    """Bytes of this rank's KV pool per token slot: every layer's K and V rows (its KV heads only)."""
    return sum(buffer[0].numel() * buffer.element_size() for buffer in (*pool.k_buffer, *pool.v_buffer))


def outstanding_tokens(running, waiting) -> int:
    """Output tokens the running requests have yet to decode, plus whole waiting requests (prompt and output)."""
    def left(req) -> int:
        return max(0, req.sampling_params.max_new_tokens - len(req.output_ids))

    return sum(left(r) for r in running) + sum(len(r.origin_input_ids) + left(r) for r in waiting)


def probe_load(ft_worker) -> WorkerLoad | None:
    """This worker's load now, or None while it holds no model of the group (a restarted worker before its join)."""
    if not ft_worker.holds_weights:
        return None
    scheduler = ft_worker.scheduler
    runner = scheduler.tp_worker.model_runner
    model, allocator = runner.model, scheduler.token_to_kv_pool_allocator
    running, waiting = list(scheduler.running_batch.reqs), list(scheduler.waiting_queue)
    if scheduler.chunked_req is not None:
        waiting.append(scheduler.chunked_req)
    free = allocator.available_size()
    placement = model.remainder
    return WorkerLoad(
        q_heads=model.shard.num_kv_heads * model.layout.shape.group_size,
        kv_heads=model.shard.num_kv_heads,
        kv_tokens_used=allocator.size - free,
        kv_tokens_free=free,
        kv_bytes_per_token=kv_bytes_per_token(runner.token_to_kv_pool),
        running_requests=len(running),
        waiting_requests=len(waiting),
        outstanding_tokens=outstanding_tokens(running, waiting),
        last_step_ms=round(ft_worker.last_step_s * 1e3, 2),
        last_step_collective_ms=None if (wait := ft_worker.last_step_collective_s) is None else round(wait * 1e3, 2),
        steps=ft_worker.steps,
        busy_ms_total=round(ft_worker.busy_s_total * 1e3, 1),
        **({} if placement is None else remainder_load(placement)),
    )


def remainder_load(placement) -> dict:
    """This worker's share of the remainder heads (hybrid or cyclic): heads, owned requests, rows used and room."""
    pool = placement.pool
    return {"remainder_kv_heads": pool.k.shape[2],
            "remainder_requests": list(placement.router.owner_of.values()).count(placement.rank),
            "remainder_kv_tokens_used": pool.used,
            "remainder_kv_tokens_capacity": pool.capacity,
            "remainder_rows_copied": placement.rows_copied,
            "remainder_kv_bytes_per_token": 2 * pool.k[:, 0].numel() * pool.k.element_size()}
