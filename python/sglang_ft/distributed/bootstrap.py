"""Adapter of `sglang.srt.distributed.bootstrap`: SGLang's process groups built so a survivor outlives a dead peer,
and a `torch_cpu` rank's threads fitted to its cores."""

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
    broadcast_objects_over_the_cpu_group()
    with GROUP_CONNECTIONS.recording():
        return original(*args, **kwargs)


def broadcast_objects_over_the_cpu_group() -> None:
    """Under `--ft`, SGLang's groups broadcast Python objects over their gloo CPU group, not their shared-memory
    queue (`SGLANG_USE_MESSAGE_QUEUE_BROADCASTER`): the queue's readers spin on shared memory with no timeout
    (`MessageQueue.acquire_read` only warns), so a dead writer would hang a survivor where a gloo broadcast
    raises; TP serving never broadcasts through it (the scheduler's requests go over the CPU group); and building
    it cost each group build about 10 ms (a same-node check, a handle broadcast, a ZMQ connection per reader),
    every regroup included. A user's explicit setting is kept, with a warning."""
    import logging

    from sglang.srt.environ import envs

    if not envs.SGLANG_USE_MESSAGE_QUEUE_BROADCASTER.is_set():
        envs.SGLANG_USE_MESSAGE_QUEUE_BROADCASTER.set(False)
    elif envs.SGLANG_USE_MESSAGE_QUEUE_BROADCASTER.get():
        logging.getLogger(__name__).warning(
            "sglang-ft: SGLANG_USE_MESSAGE_QUEUE_BROADCASTER is set: a broadcast through its shared-memory queue "
            "waits forever on a dead peer instead of failing")


def around_init_cpu_threads_env(original, *args, **kwargs):
    """On the `torch_cpu` platform, with or without `--ft`: the rank's torch threads from its cores
    (`torch_cpu.use_rank_cores`); SGLang's own binding needs sgl_kernel's CPU ops, which that platform is without.
    Any other platform: SGLang's."""
    from sglang.srt.platforms import current_platform

    from sglang_ft.platforms.torch_cpu import TorchCpuPlatform, use_rank_cores

    if not isinstance(current_platform, TorchCpuPlatform):
        return original(*args, **kwargs)
    use_rank_cores(kwargs.get("local_omp_cpuid"))
