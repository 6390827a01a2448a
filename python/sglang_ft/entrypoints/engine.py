"""Adapter of `sglang.srt.entrypoints.engine`: the launcher keeps the scheduler launch arguments for restarts."""

from __future__ import annotations

from sglang_ft.server_args import ft_enabled


def around_launch_scheduler_processes(original, cls, server_args, port_args, run_scheduler_process_func,
                                      *args, **kwargs):
    """Under `--ft`, the launcher keeps SGLang's scheduler launch arguments to restart dead workers with them."""
    if ft_enabled():
        from sglang_ft.entrypoints.worker_spawner import remember_launch

        remember_launch(server_args, port_args, run_scheduler_process_func)
    return original(cls, server_args, port_args, run_scheduler_process_func, *args, **kwargs)
