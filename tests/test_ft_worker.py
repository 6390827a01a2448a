"""The FT worker's state after a regroup it took part in (managers/ft_worker.py)."""

from __future__ import annotations

from types import SimpleNamespace

from ft.messages import Regroup
from sglang_ft.elastic_tp import regroup
from sglang_ft.managers.ft_worker import FtWorker


def test_a_joiner_is_judged_by_the_heartbeat_timeout_once_its_join_completes(monkeypatch):
    """Before, a restarted worker kept the startup bound (10 s) until its first batch: one hung right after its
    join stalled the whole group that long."""
    order = Regroup(epoch=6, workers=(0, 1), store_port=0, cause="rejoin of worker 1",
                    joining=(1,))
    worker = FtWorker.__new__(FtWorker)
    worker.worker, worker.epoch, worker.joining, worker.regrouping = 1, -1, True, False
    worker.heartbeat = SimpleNamespace(joining=True, serving=False, epoch=-1)
    worker.orders = SimpleNamespace(wait_newer_than=lambda epoch, timeout: order if epoch < 6 else None)
    reports = []
    worker.report = reports.append
    monkeypatch.setattr(regroup, "regroup_in_place", lambda ft_worker, o: f"done {o.epoch}")

    worker._regroup_when_ordered(None)
    assert reports == ["done 6"] and worker.epoch == 6 and worker.heartbeat.epoch == 6
    assert not worker.joining and not worker.heartbeat.joining
    assert worker.heartbeat.serving
