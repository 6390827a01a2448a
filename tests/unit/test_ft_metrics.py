"""The FT controller's Prometheus metrics (`ft/metrics.py`), without a server.

A real FtController runs in a child process with PROMETHEUS_MULTIPROC_DIR set, as under SGLang's `--enable-metrics`
(prometheus_client picks multiprocess mode at import); this process reads the values back the way SGLang's
`/metrics` does, through a MultiProcessCollector on that directory.
"""

import json
import os
import subprocess
import sys
import time
import types

import pytest
from ft.metrics import MULTIPROC_DIR, cause_kind, prepare_multiproc_dir


def drive(sockets: str, dp_rank: int | None = None, fail: bool = True) -> dict:
    """Three workers beat with KV backup counters, worker 1 dies, the survivors regroup, the store goes down (or,
    without `fail`, nothing happens after the first beats)."""
    from ft.controller import FtController

    from ft.messages import Heartbeat, RegroupDone, WorkerLoad
    from ft.partition import ModelShape

    def load(kv_heads: int, outstanding: int) -> WorkerLoad:  # 10 tokens of 32 KV bytes per head each
        return WorkerLoad(2 * kv_heads, kv_heads, 10, 90, 32 * kv_heads, 1, 0, outstanding, 5.0)

    controller = FtController(f"ipc://{sockets}/hb", f"ipc://{sockets}/ctl", 3, interval_s=0.05, timeout_s=30,
                              parent_pid=os.getpid(), enable_fault_injection=False,
                              shape=ModelShape(8, 4, 8, 64, 160, 512, 2), dp_rank=dp_rank)
    store = types.SimpleNamespace(alive=True, check=lambda: False, status=lambda: {}, events=[])
    controller.state.kv_backup = store
    controller.state.weight_cache_dir = _weight_cache(sockets)
    for worker in range(3):
        beat = Heartbeat(worker, os.getpid(), 0, 0, (10, 0, 1000), kv_backup_queued=5 + worker, serving=True,
                         load=load((2, 1, 1)[worker], 40))
        controller._on_message(beat, time.monotonic())
    controller.step()
    first = _values(controller)
    if not fail:
        return {"first": first}
    controller._record(controller.state.detector.declare_dead(1, time.monotonic()), "process exit")
    for worker in (0, 2):
        controller._on_message(RegroupDone(worker, 1, {}, 0, 0, 40 * worker, 7, kv_blocks_restored=5,
                                           bytes_from_host_cache=300 + worker), time.monotonic())
    controller._on_message(Heartbeat(0, os.getpid(), 1, 1, (15, 2, 1500), kv_backup_queued=3, serving=True,
                                     load=load(3, 7)), time.monotonic())  # (heads 3 + 1: a spread to see)
    restarted = os.getppid()  # another live process: worker 2's counters start again
    controller._on_message(Heartbeat(2, restarted, 1, 0, (1, 0, 200), kv_backup_queued=4, serving=True,
                                     load=load(1, 7)), time.monotonic())
    store.alive = False
    controller.step()
    workers = controller.state.status(time.monotonic())["workers"]
    return {"first": first, "gaps_ms": {w["worker"]: w["max_beat_gap_ms"] for w in workers if w["state"] != "dead"}, "recoveries": controller.state.recoveries, "metrics_on": controller.metrics is not None,
            "prometheus_imported": "prometheus_client" in sys.modules}


def _weight_cache(sockets: str) -> str:
    """A copy of a one-file checkpoint of 1234 bytes (the copy never parses it)."""
    from ft.weight_cache import make_copy

    os.makedirs(f"{sockets}/checkpoint")
    with open(f"{sockets}/checkpoint/model.safetensors", "wb") as f:
        f.write(b"w" * 1234)
    make_copy(f"{sockets}/checkpoint", f"{sockets}/cache")
    return f"{sockets}/cache"


def _values(controller) -> dict:
    status = controller.state.status(time.monotonic())
    return {key: status[key] for key in ("epoch", "tp_size", "live_workers")}


def _run_driver(tmp_path, env: dict, cwd, args: str = "") -> dict:
    sockets = tmp_path / f"sockets{abs(hash(args))}"
    sockets.mkdir(exist_ok=True)
    code = f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_ft_metrics as t; " \
           f"print(json.dumps(t.drive({str(sockets)!r}{args})))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() != MULTIPROC_DIR.lower()}
    return {**env, **extra}


def _collect(path) -> dict:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples}


def test_controller_state_reaches_the_multiprocess_collector(tmp_path):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    run = _run_driver(tmp_path, _env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)), cwd=tmp_path)
    assert run["metrics_on"] and run["first"] == {"epoch": 0, "tp_size": 3, "live_workers": 3}
    (recovery,) = run["recoveries"]
    values = _collect(metrics_dir)
    failure, drain = (("cause_kind", "failure"),), (("cause_kind", "drain"),)

    assert values[("sglang_ft_epoch", ())] == 1
    assert values[("sglang_ft_tp_size", ())] == 2 and values[("sglang_ft_live_workers", ())] == 2
    assert values[("sglang_ft_capacity_ratio", ())] == pytest.approx(2 / 3)  # 2 live of the 3 launched
    assert values[("sglang_ft_recoveries_total", failure)] == 1 and values[("sglang_ft_recoveries_total", drain)] == 0
    assert values[("sglang_ft_recovery_seconds_count", failure)] == 1
    seconds = (recovery["detect_ms"] + recovery["recover_ms"]) / 1e3
    assert values[("sglang_ft_recovery_seconds_sum", failure)] == pytest.approx(seconds)
    assert values[("sglang_ft_recovery_seconds_bucket", failure + (("le", "0.05"),))] == (seconds <= 0.05)
    assert values[("sglang_ft_recovery_seconds_bucket", failure + (("le", "+Inf"),))] == 1
    assert values[("sglang_ft_detection_seconds_count", ())] == 1
    assert values[("sglang_ft_detection_seconds_sum", ())] == pytest.approx(recovery["detect_ms"] / 1e3)
    assert values[("sglang_ft_kv_blocks_restored_total", ())] == 10
    assert values[("sglang_ft_kv_tokens_recomputed_total", ())] == 7
    # worker 0 read 300 weight bytes from the host copy, worker 2 302 and 80 from disk
    assert (recovery["bytes_from_host_cache"], recovery["bytes_reloaded"]) == (602, 80)
    assert values[("sglang_ft_weights_from_host_cache_bytes_total", ())] == 602
    assert values[("sglang_ft_weights_from_disk_bytes_total", ())] == 80
    assert values[("sglang_ft_weight_cache_bytes", ())] == 1234
    assert values[("sglang_ft_weight_cache_bound_bytes", ())] > 0
    # 3 x 1000 bytes, then worker 0 sent 500 more and worker 2's new process 200 (its counters restart at 0)
    assert values[("sglang_ft_kv_backup_bytes_total", ())] == 3700
    assert values[("sglang_ft_kv_backup_dropped_total", ())] == 2
    assert values[("sglang_ft_kv_backup_lag", ())] == 3 + 4  # the live members' latest beats; dead worker 1 not
    assert values[("sglang_ft_kv_backup_store_healthy", ())] == 0
    # worker 0 beat twice, worker 2 from a new process (no gap across processes): the worst live gap is worker 0's
    assert run["gaps_ms"]["2"] == 0 and run["gaps_ms"]["0"] > 0
    assert values[("sglang_ft_max_heartbeat_gap_seconds", ())] == pytest.approx(run["gaps_ms"]["0"] / 1e3, abs=1e-4)
    # each member's load from its latest beat; worker 1, out of the group, reads 0
    kv_bytes = {w: values[("sglang_ft_worker_kv_bytes_used", (("worker", w),))] for w in "012"}
    assert kv_bytes == {"0": 10 * 32 * 3, "1": 0, "2": 10 * 32 * 1}
    assert values[("sglang_ft_kv_bytes_max_min_ratio", ())] == 3.0
    assert values[("sglang_ft_worker_outstanding_tokens", (("worker", "0"),))] == 7
    assert values[("sglang_ft_worker_outstanding_tokens", (("worker", "1"),))] == 0
    assert all(f.startswith(("counter_", "gauge_mostrecent_", "histogram_")) for f in os.listdir(metrics_dir))


def test_each_data_parallel_replicas_controller_writes_its_own_series(tmp_path):
    """Under --dp-size two controllers write the same metrics to one directory: every series carries its replica's
    dp_rank, so replica 0's failure does not overwrite replica 1's healthy gauges."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = _env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    _run_driver(tmp_path, env, cwd=tmp_path, args=", dp_rank=0")
    _run_driver(tmp_path, env, cwd=tmp_path, args=", dp_rank=1, fail=False")
    values = _collect(metrics_dir)
    of = lambda replica, *labels: tuple(sorted((*labels, ("dp_rank", replica))))  # noqa: E731
    assert values[("sglang_ft_epoch", of("0"))] == 1 and values[("sglang_ft_epoch", of("1"))] == 0
    assert values[("sglang_ft_tp_size", of("0"))] == 2 and values[("sglang_ft_tp_size", of("1"))] == 3
    assert values[("sglang_ft_recoveries_total", of("0", ("cause_kind", "failure")))] == 1
    assert values[("sglang_ft_recoveries_total", of("1", ("cause_kind", "failure")))] == 0
    assert values[("sglang_ft_detection_seconds_count", of("0"))] == 1
    assert values[("sglang_ft_worker_kv_bytes_used", of("0", ("worker", "1")))] == 0  # out of replica 0's group
    assert values[("sglang_ft_worker_kv_bytes_used", of("1", ("worker", "1")))] == 10 * 32 * 1
    assert not [key for key in values if key[0].startswith("sglang_ft_") and "dp_rank" not in dict(key[1])]


def test_without_the_multiprocess_dir_metrics_are_off_and_write_nothing(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = _run_driver(tmp_path, _env(), cwd=cwd)
    assert run["first"] == {"epoch": 0, "tp_size": 3, "live_workers": 3}
    assert not run["metrics_on"] and not run["prometheus_imported"]
    assert os.listdir(cwd) == []


def test_the_launcher_sets_the_directory_before_the_controller_is_spawned(tmp_path, monkeypatch):
    monkeypatch.delenv(MULTIPROC_DIR, raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    prepare_multiproc_dir(str(tmp_path))
    assert os.environ[MULTIPROC_DIR] == str(tmp_path / "prometheus") and (tmp_path / "prometheus").is_dir()
    monkeypatch.setenv(MULTIPROC_DIR, "/a/users/own")
    prepare_multiproc_dir(str(tmp_path / "other"))
    assert os.environ[MULTIPROC_DIR] == "/a/users/own" and not (tmp_path / "other").exists()


@pytest.mark.parametrize("cause, kind", [
    ("worker 1: process exit", "failure"), ("worker 2: heartbeat timeout", "failure"),
    ("collective failure with every worker alive", "failure"), ("drain of worker 2", "drain"),
    ("rejoin of worker 1", "rejoin"), ("rejoin of workers 1, 3", "rejoin")])
def test_cause_kinds_are_few(cause, kind):
    assert cause_kind(cause) == kind


def test_a_workers_kv_bytes_count_its_remainder_rows_under_hybrid_attention():
    """Status and metrics read the same number: TP heads' rows plus the remainder rows the worker owns."""
    from ft.messages import WorkerLoad
    from ft.controller_state import _load_fields

    load = WorkerLoad(4, 2, 100, 900, 256, 1, 0, 10, 5.0, remainder_kv_heads=2, remainder_kv_tokens_used=30,
                      remainder_kv_bytes_per_token=256)
    assert load.kv_bytes_used == 100 * 256 + 30 * 256 == _load_fields(load)["kv_bytes_used"]
