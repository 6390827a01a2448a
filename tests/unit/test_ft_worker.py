"""The FT agent's state after a regroup it took part in (ft/agent.py, the engine-agnostic half of the FT worker)."""

from __future__ import annotations

from types import SimpleNamespace

from ft.agent import Engine, FtAgent
from ft.messages import Regroup
from ft.options import AgentOptions


def test_a_joiner_is_judged_by_the_heartbeat_timeout_once_its_join_completes():
    """Before, a restarted worker kept the startup bound (10 s) until its first batch: one hung right after its
    join stalled the whole group that long."""
    order = Regroup(epoch=6, workers=(0, 1), store_port=0, cause="rejoin of worker 1",
                    joining=(1,))
    worker = FtAgent.__new__(FtAgent)
    worker.options = AgentOptions(1, "", "", 0.2)
    worker.engine = Engine(regroup=lambda o: f"done {o.epoch}", is_collective_failure=lambda exc: False)
    worker.worker, worker.epoch, worker.joining, worker.regrouping = 1, -1, True, False
    worker.heartbeat = SimpleNamespace(joining=True, serving=False, epoch=-1)
    worker.orders = SimpleNamespace(wait_newer_than=lambda epoch, timeout: order if epoch < 6 else None)
    reports = []
    worker.report = reports.append

    worker._regroup_when_ordered(None)
    assert reports == ["done 6"] and worker.epoch == 6 and worker.heartbeat.epoch == 6
    assert not worker.joining and not worker.heartbeat.joining
    assert worker.heartbeat.serving
