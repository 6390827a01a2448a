"""Adapter of `sglang.srt.entrypoints.engine`: the launcher keeps the scheduler launch arguments for restarts and
starts SGLang's children the platform's way."""

from __future__ import annotations

import logging
import multiprocessing as mp

from sglang_ft.server_args import ft_args, ft_enabled

logger = logging.getLogger(__name__)


def around_launch_scheduler_processes(original, cls, server_args, port_args, run_scheduler_process_func,
                                      *args, **kwargs):
    """Under `--ft`, the launcher keeps SGLang's scheduler launch arguments to restart dead workers with them. On the
    torch_cpu platform SGLang's children (schedulers, DP controller, detokenizer) start by fork: SGLang has just
    set `spawn` for the launcher (`_set_envs_and_config`), and nothing the launcher starts later uses the default."""
    from sglang_ft.platforms.torch_cpu import children_start_method

    method = children_start_method()
    if method != mp.get_start_method():
        logger.info("sglang-ft: SGLang's processes start by %s on this platform", method)
        mp.set_start_method(method, force=True)
    if ft_enabled():
        from sglang_ft.entrypoints.worker_spawner import prepare_restarts, remember_launch, restarts_come_soon

        remember_launch(server_args, port_args, run_scheduler_process_func)
        ft = ft_args()
        if restarts_come_soon(ft.respawn, ft.respawn_delay_s):
            prepare_restarts()
    return original(cls, server_args, port_args, run_scheduler_process_func, *args, **kwargs)
