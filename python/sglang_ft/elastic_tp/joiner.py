"""A restarted TP worker: it initialises apart from the serving group, then waits to be planned back in.

The launcher starts it with SGLang's own `run_scheduler_process`, but as a TP group of one (a private store),
so its start-up collectives never touch the serving group, and:

- it is not the tokenizer manager's rank 0 (it opens no channel to the tokenizer or detokenizer);
- it builds a provisional shard (its launch shard) with `--load-format dummy`: it reads nothing from disk, since
  what it will hold comes from its peers during the regroup;
- its KV pool gets exactly the group's token slots (`kv_slots`), so slot numbers mean the same on every rank.

Once initialised it beats as `joining`; the controller orders a regroup that includes it, and it takes part like
any survivor (`sglang_ft.elastic_tp.regroup`), receiving its weights, its KV heads and the scheduler's state.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

JOINER_ENV = "SGLANG_FT_JOINER"
INIT_METHOD_ENV = "SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE"  # SGLang's own override of the rendezvous


@dataclass(frozen=True)
class JoinerIdentity:
    worker: int  # launch TP rank, the worker's stable id
    kv_slots: int  # the group's KV pool size
    launch_tp_size: int


def joiner_identity() -> JoinerIdentity | None:
    """This process's identity if it is a restarted worker (set before SGLang starts in it), else None."""
    raw = os.environ.get(JOINER_ENV)
    return JoinerIdentity(**json.loads(raw)) if raw else None


def run_joiner_process(*args) -> None:
    """Process entry point (started by the launcher's WorkerSpawner: spawned on GPUs, forked from the fork server on
    the torch_cpu platform): a small supervisor of the restarted worker.

    SGLang's scheduler process signals its parent (SIGQUIT, which takes the whole server down) when it fails. The
    restarted worker's parent is this supervisor instead, so a worker that fails to start or dies later is the
    controller's to handle, like any dead worker, and the server keeps serving. The supervisor has imported SGLang
    already (the fork server's preload, or unpickling its arguments when spawned), so on the torch_cpu platform it
    forks the worker rather than having a spawned one import it again; it runs no thread, so the fork is safe.
    """
    import multiprocessing as mp
    import signal
    import sys

    from sglang_ft.platforms.torch_cpu import children_start_method

    worker = args[0]
    signal.signal(signal.SIGQUIT, lambda *_: print(f"sglang-ft: restarted worker {worker} failed", file=sys.stderr))
    process = mp.get_context(children_start_method()).Process(target=_run_joiner_scheduler, args=args,
                                              name=f"sglang-ft-scheduler-{worker}")
    process.start()
    process.join()
    sys.exit(process.exitcode or 0)


def _run_joiner_scheduler(worker: int, kv_slots: int, server_args, port_args, gpu_id: int, pipe_writer,
                          run_scheduler_process) -> None:
    from ft.ports import free_port
    from sglang_ft import sglang_surface

    os.environ[JOINER_ENV] = json.dumps({"worker": worker, "kv_slots": kv_slots,
                                         "launch_tp_size": server_args.tp_size})
    os.environ[INIT_METHOD_ENV] = f"tcp://127.0.0.1:{free_port()}"  # a world of its own until the regroup
    alone = copy.copy(server_args)
    alone.tp_size = 1
    alone.load_format = "dummy"
    install_provisional_layout(server_args.model_path, server_args.tp_size, worker)
    sglang_surface.run_scheduler_process(run_scheduler_process, server_args=alone, port_args=port_args, gpu_id=gpu_id,
                                         tp_rank=0, pp_rank=0, dp_rank=None, pipe_writer=pipe_writer)


def install_provisional_layout(model_path: str, launch_tp_size: int, worker: int) -> None:
    """Until the regroup, this process holds the launch layout's shard of `worker` (its memory footprint)."""
    from ft.partition import TPLayout
    from sglang_ft.distributed_state import install_layout
    from ft.model_config import model_shape_from_dir

    install_layout(TPLayout.even(model_shape_from_dir(model_path), launch_tp_size), rank=worker)
