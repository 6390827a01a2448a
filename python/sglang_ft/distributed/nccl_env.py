"""The NCCL error handling sglang-ft needs, set in each scheduler process before its first NCCL group exists.

torch's defaults suit training jobs that restart whole: when a collective fails or passes its timeout, the
watchdog ends the process (torch 2.14's default TORCH_NCCL_ASYNC_ERROR_HANDLING is 3, SkipCleanUp: tear the process
down without aborting the communicator). A survivor must instead see an error and regroup. Values the user set
are kept. The collectives' bound itself is the group's timeout (`--ft-collective-timeout-s`, set on every group
by `elastic_tp/groups.set_collective_timeout`), which the watchdog enforces.
"""

from __future__ import annotations

import os

NCCL_ERROR_HANDLING = {
    # 2 = CleanUpOnly (torch's ErrorHandlingMode): the watchdog aborts a communicator whose collective failed or
    # timed out and never terminates the process (1 TearDown and 3 SkipCleanUp both do; 0 leaves it hung)
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    # wait() leaves the host thread free, so the forward keeps running ahead of the GPU; the regroup's own
    # transfers are waited on with an explicit timeout (`p2p.wait_all`), which blocks and raises by itself
    "TORCH_NCCL_BLOCKING_WAIT": "0",
}


def apply_nccl_error_handling(environ=None) -> dict[str, str]:
    """Set each variable of `NCCL_ERROR_HANDLING` the user did not set, under its name or torch's older alias
    without the `TORCH_` prefix (which torch still reads); returns those set here."""
    environ = os.environ if environ is None else environ
    applied = {name: value for name, value in NCCL_ERROR_HANDLING.items()
               if name not in environ and name.removeprefix("TORCH_") not in environ}
    environ.update(applied)
    return applied
