"""Adapter of `sglang.srt.managers.data_parallel_controller`: under `--ft --dp-size` the DP controller never blocks
on a replica without a rank 0 (replica_outbox.py)."""

from __future__ import annotations

from sglang_ft.server_args import ft_enabled


def after_init(_result, controller, *_args, **_kwargs):
    """Under `--ft --dp-size`, SGLang's DP controller sends to each replica through an outbox that never blocks."""
    if ft_enabled():
        from sglang_ft.managers.data_parallel_controller_components.replica_outbox import install

        install(controller)


def around_send_control_message(original, controller, message, *args, **kwargs):
    """Under `--ft`, the journal's request to renew a replica's socket (a new rank 0) stops at the DP controller."""
    if ft_enabled():
        from sglang_ft.managers.data_parallel_controller_components.replica_outbox import renew_on_request

        if renew_on_request(controller, message):
            return None
    return original(controller, message, *args, **kwargs)


def after_update_active_ranks(_result, controller, *_args, **_kwargs):
    """Under `--ft`, a replica the journal reports lost leaves the DP controller's routing and broadcasts."""
    if ft_enabled():
        from sglang_ft.managers.data_parallel_controller_components.replica_outbox import drop_inactive

        drop_inactive(controller)
