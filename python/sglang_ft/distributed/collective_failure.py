"""A failed collective, recognised in one place: `collectives_may_fail` turns it into `CollectiveFailure`.

Gloo reports a dead or hung peer as a plain RuntimeError, NCCL as `torch.distributed.DistBackendError`; neither
message is an interface to match on. What is: the error came out of a call into the distributed layer (torch's
`torch.distributed`, SGLang's `sglang.srt.distributed`, sglang-ft's own group code). Such an error becomes a
`CollectiveFailure` (the original as its cause), which a survivor recovers from; any other error, a bug in a
step, passes through unchanged.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from functools import lru_cache


class CollectiveFailure(RuntimeError):
    """A collective of this worker's group failed: a peer died, hung past the collective timeout, or the group
    was interrupted for a newer one. The worker reports it and regroups; it never dies of it."""


@lru_cache(maxsize=1)
def _package_dirs() -> tuple[str, ...]:
    import sglang.srt.distributed
    import torch.distributed

    import sglang_ft.distributed

    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (torch.distributed, sglang.srt.distributed, sglang_ft.distributed))


def raised_by_a_collective(exc: BaseException) -> bool:
    """Did `exc` (or an error it was raised from) come out of the distributed layer at run time?

    A RuntimeError whose innermost frame is in a distributed package, or any `torch.distributed.DistError`.
    Argument errors (ValueError, TypeError, AssertionError) there are bugs, not failed collectives.
    """
    import torch.distributed as dist

    dirs = _package_dirs()
    while exc is not None:
        if isinstance(exc, dist.DistError):
            return True
        if isinstance(exc, RuntimeError):
            frames = traceback.extract_tb(exc.__traceback__)
            if frames and os.path.abspath(frames[-1].filename).startswith(dirs):
                return True
        exc = exc.__cause__
    return False


@contextlib.contextmanager
def collectives_may_fail() -> Iterator[None]:
    """Run a block of collectives: a failed one leaves it as `CollectiveFailure`, anything else as it was."""
    try:
        yield
    except CollectiveFailure:
        raise
    except Exception as exc:
        if raised_by_a_collective(exc):
            raise CollectiveFailure(f"{type(exc).__name__}: {exc}") from exc
        raise
