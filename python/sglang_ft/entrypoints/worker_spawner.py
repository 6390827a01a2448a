"""Restart dead TP workers from the launcher process, with the arguments SGLang used to start them.

An AROUND hook on SGLang's `Engine._launch_scheduler_processes` keeps those arguments. The spawner listens to the
controller's orders and, on a `Respawn`, starts a fresh scheduler process for that worker on the same device
through `sglang_ft.elastic_tp.joiner.run_joiner_process`; the launcher stays its parent, as for every scheduler.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from dataclasses import dataclass

import zmq

from ft.messages import Respawn, decode_order
from ft.sockets import connect_socket, process_keys
from ft.wire import Dropped

logger = logging.getLogger(__name__)


@dataclass
class LaunchArgs:
    server_args: object
    port_args: object
    run_scheduler_process: object

    def gpu_id(self, worker: int) -> int:
        """The device SGLang gave TP rank `worker` at launch (one node, no pipeline parallelism)."""
        return self.server_args.base_gpu_id + worker * self.server_args.gpu_id_step


_LAUNCH: LaunchArgs | None = None


def remember_launch(server_args, port_args, run_scheduler_process) -> None:
    global _LAUNCH
    _LAUNCH = LaunchArgs(server_args, port_args, run_scheduler_process)


_RESTARTED: dict[int, mp.Process] = {}  # worker -> the process of its latest restart


def restarted_worker_alive() -> bool:
    """Whether a restarted worker runs. SGLang's watchdog knows only the schedulers it launched first: once those
    are all replaced, the group lives on in restarted processes that it has never heard of."""
    return any(process.is_alive() for process in list(_RESTARTED.values()))


class WorkerSpawner:
    def __init__(self, order_endpoint: str):
        self.order_endpoint = order_endpoint
        self.processes = _RESTARTED
        self.dropped = Dropped(logger, "sglang-ft worker spawner")
        threading.Thread(target=self._run, name="ft-spawner", daemon=True).start()

    def _run(self) -> None:
        socket = connect_socket(zmq.SUB, self.order_endpoint, process_keys())
        while True:
            self.on_order(socket.recv())

    def on_order(self, frame: bytes) -> None:
        """One frame of the order stream: a `Respawn` of a worker this launcher started is carried out; anything
        not an order, or a restart of a worker it never had, is counted and dropped."""
        order = decode_order(frame)
        if order is None:
            self.dropped.refused("not an order")
        elif isinstance(order, Respawn) and _LAUNCH is not None and order.worker >= _LAUNCH.server_args.tp_size:
            self.dropped.refused(f"a restart of worker {order.worker} of {_LAUNCH.server_args.tp_size}")
        elif isinstance(order, Respawn):
            try:
                self.spawn(order)
            except Exception:  # a failed start is the controller's to notice (the worker never beats)
                logger.exception("sglang-ft: could not restart worker %d", order.worker)

    def spawn(self, order: Respawn) -> None:
        from sglang_ft.elastic_tp.joiner import run_joiner_process

        if _LAUNCH is None:
            raise RuntimeError("SGLang's scheduler launch arguments were not recorded")
        old = self.processes.get(order.worker)
        if old is not None and old.is_alive():  # the supervisor of a restart that died: it exits right after
            old.join(timeout=10)
            if old.is_alive():
                logger.warning("sglang-ft: stopping worker %d's previous restart (pid %d)", order.worker, old.pid)
                old.kill()
                old.join(timeout=10)
        context = mp.get_context("spawn")
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(
            target=run_joiner_process,
            args=(order.worker, order.kv_slots, _LAUNCH.server_args, _LAUNCH.port_args,
                  _LAUNCH.gpu_id(order.worker), writer, _LAUNCH.run_scheduler_process),
            name=f"sglang-ft-worker-{order.worker}",
        )
        process.start()
        writer.close()
        self.processes[order.worker] = process
        logger.warning("sglang-ft: restarted worker %d as pid %d (attempt %d)", order.worker, process.pid,
                       order.attempt)
        threading.Thread(target=self._reap, args=(order.worker, process, reader), daemon=True).start()

    @staticmethod
    def _reap(worker: int, process: mp.Process, reader) -> None:
        """Read the scheduler's start-up report, then wait for the process so it never lingers as a zombie."""
        try:
            if reader.poll(None):
                reader.recv()
                logger.info("sglang-ft: restarted worker %d initialised", worker)
        except (EOFError, OSError):
            pass
        process.join()
        logger.warning("sglang-ft: restarted worker %d (pid %d) exited with %s", worker, process.pid,
                       process.exitcode)
