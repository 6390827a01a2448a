"""Adapter of `sglang.srt.distributed.bootstrap`: SGLang's process groups built so a survivor outlives a dead peer."""

from __future__ import annotations

from sglang_ft.server_args import ft_enabled


def around_init_parallel_groups(original, *args, **kwargs):
    """Under `--ft`, before a scheduler's first process group: NCCL errors raise in the survivor instead of
    ending it (`nccl_env.py`); the TCP connections the groups open are recorded, so an interrupt for a newer
    group shuts those alone (`group_interrupt.py`)."""
    if not ft_enabled():
        return original(*args, **kwargs)
    from sglang_ft.distributed.group_interrupt import GROUP_CONNECTIONS
    from sglang_ft.distributed.nccl_env import apply_nccl_error_handling

    apply_nccl_error_handling()
    with GROUP_CONNECTIONS.recording():
        return original(*args, **kwargs)
