"""NCCL: the survivors shrink their communicators (ncclCommShrink) instead of connecting new ones.

On a GPU, SGLang's device groups are NCCL and its CPU groups gloo. The gloo ones come from the standby sets as on
CPU (`standby_groups.py`); each NCCL backend of the group's full size is shrunk to the survivors through torch's
`ProcessGroupNCCL.shrink` (the backend half of `torch.distributed.shrink_group`), and SGLang's build takes the shrunk
backends in the order it created the originals. A shrink is collective among the survivors, so it runs only after
they met on the set's agreement backend; with `SHRINK_ABORT` it first aborts what is outstanding on the parent,
which frees a survivor blocked in a kernel on the dead peer. So on this path the order listener shrinks instead of
aborting (`group_interrupt.abort_nccl_groups`), and anything that fails falls back to the abort and the rebuild.

Written against torch 2.14 and SGLang 0.5.23; never run: this project's test machines have no GPU. Without a torch
that shrinks, the NCCL groups are rebuilt as before (pre-forming NCCL communicators during serving would hold
several communicators' buffers per rank and initialise them beside the model's kernels).
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)
_shrunk: dict[int, list] = {}  # epoch -> this process's NCCL backends shrunk for that epoch's order
_lock = threading.Lock()


def shrink_available() -> bool:
    import torch.distributed as dist

    return dist.is_nccl_available() and hasattr(dist, "shrink_group") and hasattr(dist.ProcessGroupNCCL, "shrink")


def full_size_nccl_backends(size: int) -> list:
    """This process's NCCL backends of SGLang's groups with every member, in the order they were created."""
    import torch
    import torch.distributed as dist

    backends = []
    for group in list(dist.distributed_c10d._world.pg_map):
        desc = getattr(group, "group_desc", "")
        if desc != "default_pg" and not desc.endswith(":device"):
            continue
        try:
            backend = group._get_backend(torch.device("cuda"))
        except RuntimeError:
            continue
        if isinstance(backend, dist.ProcessGroupNCCL) and backend.size() == size and size > 1:
            backends.append(backend)
    return backends


def shrink_for(order, group: tuple[int, ...], standby_groups, agree) -> bool:
    """In the order listener, for an order that one worker's loss explains: meet the survivors on the standby
    set's agreement backend (`agree`, standby_groups.py), then shrink every full-size NCCL backend to them. True when shrunk (the old group's
    outstanding NCCL work is aborted by the shrink); False: the caller interrupts the old group as before."""
    from torch.distributed.distributed_c10d import SHRINK_ABORT

    from sglang_ft.distributed.group_interrupt import abort_pynccl_communicators

    lost = [rank for rank, worker in enumerate(group) if worker not in order.workers]
    standby = standby_groups.peek(tuple(order.workers))
    if len(lost) != 1 or standby is None or standby.agreement is None or not shrink_available():
        return False
    parents = full_size_nccl_backends(len(group))
    if not parents or not agree(standby.agreement):  # no NCCL group (CPU), or a survivor without the set
        return False
    try:
        shrunk = [backend.shrink(lost, SHRINK_ABORT, None) for backend in parents]
    except Exception as exc:  # a survivor whose communicator was already torn down, a peer gone meanwhile
        logger.warning("sglang-ft: shrinking the NCCL communicators failed (%s); rebuilding them",
                       str(exc).splitlines()[0][:200])
        return False
    abort_pynccl_communicators()  # SGLang's own communicators cannot shrink: aborted, SGLang's build makes new ones
    with _lock:
        _shrunk.clear()
        _shrunk[order.epoch] = shrunk
    logger.info("sglang-ft: shrank %d NCCL communicators to workers %s for epoch %d", len(shrunk),
                list(order.workers), order.epoch)
    return True


def take_shrunk(epoch: int) -> list | None:
    """The backends shrunk for the order of `epoch` (None: none were, the groups are rebuilt)."""
    with _lock:
        shrunk = _shrunk.pop(epoch, None)
        _shrunk.clear()
    return shrunk
