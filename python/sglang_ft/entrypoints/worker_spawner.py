"""Restart dead TP workers from the launcher process, with the arguments SGLang used to start them.

An AROUND hook on SGLang's `Engine._launch_scheduler_processes` keeps those arguments. The spawner listens to the
controller's orders and, on a `Respawn`, starts a fresh scheduler process for that worker on the same device
through `sglang_ft.elastic_tp.joiner.run_joiner_process`. On GPUs it is spawned, as SGLang spawns every scheduler.
On the torch_cpu platform it is forked from a fork server that has imported SGLang once (`restart_context`): a
spawned restart imported SGLang again, about 15 s of CPU that, under load on a small machine, made a restarted
worker take about 50 s to start. The fork server imports during the launch when automatic restarts come soon, else
(under `--ft-respawn`) at the first regroup, when a restart has become likely; without `--ft-respawn`, at the first
operator's rejoin.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from dataclasses import dataclass
from multiprocessing import forkserver

import zmq

from ft.messages import Regroup, Respawn, decode_order
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


# What a restarted worker runs, imported once by the fork server (on the torch_cpu platform)
RESTART_PRELOAD = ["sglang.srt.managers.scheduler", "sglang_ft.elastic_tp.joiner"]


def restart_context():
    """How restarted workers start: SGLang's `spawn`, or where the platform forks SGLang's children (torch_cpu),
    from a fork server that imported what a worker runs. Not a fork of the launcher itself: by the time a worker
    dies it runs the HTTP server's threads, and a fork copies none of them and whatever locks they held."""
    from sglang_ft.platforms.torch_cpu import children_start_method

    if children_start_method() != "fork":
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(RESTART_PRELOAD)
    return context


RESTART_SOON_S = 30.0  # a restart this soon after a death should not wait for the fork server's imports


def restarts_come_soon(respawn: bool, respawn_delay_s: float) -> bool:
    """Whether the fork server should import SGLang while the server starts: automatic restarts that come sooner
    after a death than its imports take under load. Otherwise it starts at the first regroup under `--ft-respawn`
    (`WorkerSpawner`), or with the first restart, which then pays one import, as a spawned restart does."""
    return respawn and respawn_delay_s < RESTART_SOON_S


def prepare_restarts() -> None:
    """Start the fork server now (it imports SGLang in the background). Called once SGLang has set the launcher's
    environment, which the fork server's children inherit."""
    if restart_context().get_start_method() == "forkserver":
        forkserver.ensure_running()


_RESTARTED: dict[int, mp.Process] = {}  # worker -> the process of its latest restart
_STARTING: set[int] = set()  # workers whose restart is being started (the fork server may still be importing)


def restarted_worker_alive() -> bool:
    """Whether a restarted worker runs, or is being started. SGLang's watchdog knows only the schedulers it launched
    first: once those are all gone, the group lives on in restarted processes that it has never heard of, or will
    once the one being started exists (a first restart waits for the fork server's import, seconds)."""
    return bool(_STARTING) or any(process.is_alive() for process in list(_RESTARTED.values()))


class WorkerSpawner:
    def __init__(self, order_endpoint: str, prepare_at_first_regroup: bool = False):
        self.order_endpoint = order_endpoint
        # under --ft-respawn with a long repair delay: a failure makes a restart (delayed, or an operator's rejoin)
        # likely, so the fork server imports then, in its own process, not when the restart is ordered
        self.prepare_at_first_regroup = prepare_at_first_regroup
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
        elif isinstance(order, Regroup) and self.prepare_at_first_regroup:
            self.prepare_at_first_regroup = False
            try:
                prepare_restarts()
            except Exception:  # the restart itself starts it again, or reports why it cannot
                logger.exception("sglang-ft: could not start the fork server for restarts")

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
        context = restart_context()
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(
            target=run_joiner_process,
            args=(order.worker, order.kv_slots, _LAUNCH.server_args, _LAUNCH.port_args,
                  _LAUNCH.gpu_id(order.worker), writer, _LAUNCH.run_scheduler_process),
            name=f"sglang-ft-worker-{order.worker}",
        )
        _STARTING.add(order.worker)
        try:
            process.start()
            self.processes[order.worker] = process
        finally:
            _STARTING.discard(order.worker)
        writer.close()
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
