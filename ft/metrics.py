"""The FT controller's state as Prometheus metrics (`sglang_ft_*`), served on SGLang's own `/metrics`.

With `--enable-metrics` SGLang runs prometheus_client in multiprocess mode: every process writes its metrics to
files under PROMETHEUS_MULTIPROC_DIR and the HTTP server's MultiProcessCollector merges them. The controller is one
more such process; `FtMetrics.observe` maps its state to metrics once per controller step. With metrics off (no
PROMETHEUS_MULTIPROC_DIR) `ft_metrics()` is None: prometheus_client is not even imported.

Under `--dp-size` every replica has its own controller writing the same metrics: each series then carries the
replica's `dp_rank` label (SGLang's own label for it), or the replicas' gauges would overwrite each other.
"""

from __future__ import annotations

import functools
import glob
import os
import time

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
CAUSE_KINDS = ("failure", "drain", "rejoin")
RECOVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DETECTION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def prepare_multiproc_dir(runtime_dir: str) -> None:
    """Called in the launcher before it spawns the controller, under `--enable-metrics`.

    SGLang sets PROMETHEUS_MULTIPROC_DIR only in `Engine._launch_subprocesses`, after our hook on `launch_server`
    has spawned the controller, which would then not inherit it. So set it first, as a user may: SGLang then
    keeps it for every process of its own. It lives in the FT runtime directory and goes with it.
    """
    if MULTIPROC_DIR not in os.environ:
        path = os.environ.get("prometheus_multiproc_dir") or os.path.join(runtime_dir, "prometheus")  # legacy name
        os.makedirs(path, exist_ok=True)
        os.environ[MULTIPROC_DIR] = path


def ft_metrics(dp_rank: int | None = None) -> FtMetrics | None:
    """The controller's metrics when SGLang's metrics are on (the variable is inherited from the launcher)."""
    return FtMetrics(dp_rank) if os.environ.get(MULTIPROC_DIR) else None


def cause_kind(cause: str) -> str:
    """The label of a recovery's cause (the controller's `Regroup.cause`): failure, drain or rejoin."""
    if cause.startswith("drain of"):
        return "drain"
    if cause.startswith("rejoin of"):
        return "rejoin"
    return "failure"


class _OfReplica:
    """A metric whose every series also carries `dp_rank=<replica>`, used as the metric itself would be: with the
    caller's own label values, or none."""

    def __init__(self, metric, dp_rank: str):
        self.metric, self.dp_rank = metric, dp_rank

    def labels(self, *values):
        return self.metric.labels(*values, self.dp_rank)

    def __getattr__(self, name):  # set / inc / observe of a metric without labels of its own
        return getattr(self.metric.labels(self.dp_rank), name)


def _metric(kind, name: str, text: str, labels, dp_rank: int | None, **kwargs):
    if dp_rank is None:
        return kind(name, text, labels, registry=None, **kwargs)
    return _OfReplica(kind(name, text, [*labels, "dp_rank"], registry=None, **kwargs), str(dp_rank))


def _gauge(name: str, text: str, labels=(), dp_rank: int | None = None):
    from prometheus_client import Gauge

    # one writer (the replica's controller): its latest value is the value
    return _metric(Gauge, f"sglang_ft_{name}", text, labels, dp_rank, multiprocess_mode="mostrecent")


def _counter(name: str, text: str, labels=(), dp_rank: int | None = None):
    from prometheus_client import Counter

    return _metric(Counter, f"sglang_ft_{name}", text, labels, dp_rank)  # exposed as sglang_ft_{name}_total


def _histogram(name: str, text: str, buckets, labels=(), dp_rank: int | None = None):
    from prometheus_client import Histogram

    return _metric(Histogram, f"sglang_ft_{name}", text, labels, dp_rank, buckets=buckets)


class FtMetrics:
    """Gauges follow the state; counters and histograms take each new recovery once, and the deltas of the
    workers' KV backup counters (which restart at 0 with a restarted worker's process)."""

    def __init__(self, dp_rank: int | None = None):
        gauge, counter, histogram = (functools.partial(make, dp_rank=dp_rank) for make in (_gauge, _counter,
                                                                                             _histogram))
        self._gauge = gauge
        self.epoch = gauge("epoch", "Membership epoch (+1 per regroup)")
        self.tp_size = gauge("tp_size", "Workers in the current group")
        self.live_workers = gauge("live_workers", "Group members not declared dead")
        self.capacity_ratio = gauge("capacity_ratio", "Live group members over the TP width at launch (1 at full "
                                    "width, 0 with every worker lost): the share of its compute the server has")
        self.kv_backup_lag = gauge("kv_backup_lag", "KV backup messages queued in the live workers' senders, not "
                                                     "yet written out (sum of their latest heartbeats; a lower bound)")
        self.max_beat_gap = gauge("max_heartbeat_gap_seconds", "Longest heartbeat gap a live group member has "
                                   "recovered from: how close a slow but alive worker came to the timeout")
        self.worker_kv_bytes = gauge("worker_kv_bytes_used", "KV bytes a group member holds (0 outside the group)",
                                      ["worker"])
        self.worker_outstanding = gauge("worker_outstanding_tokens", "Prompt tokens to prefill plus output tokens "
                                         "to decode on a group member (0 outside the group)", ["worker"])
        self.kv_spread = gauge("kv_bytes_max_min_ratio", "KV bytes of the fullest group member over the emptiest "
                                "(unequal heads after a failure make it exceed 1)")
        self.recoveries = counter("recoveries", "Completed regroups", ["cause_kind"])
        self.recovery_seconds = histogram("recovery_seconds", "Detection plus recovery time of each completed "
                                           "regroup", RECOVERY_BUCKETS, ["cause_kind"])
        self.detection_seconds = histogram("detection_seconds", "Silence of a failed worker before the regroup was "
                                            "ordered (failures only)", DETECTION_BUCKETS)
        for kind in CAUSE_KINDS:  # every series exists from the start, at 0
            self.recoveries.labels(kind)
            self.recovery_seconds.labels(kind)
        self.kv_blocks_restored = counter("kv_blocks_restored", "KV blocks regroups restored from the backup store")
        self.kv_tokens_recomputed = counter("kv_tokens_recomputed", "Tokens whose KV regroups had to recompute")
        self.kv_backup_bytes = counter("kv_backup_bytes", "Bytes the workers streamed to the KV backup store")
        self.kv_backup_dropped = counter("kv_backup_dropped", "KV backup messages dropped on a full queue")
        self.weights_from_host_cache = counter("weights_from_host_cache_bytes", "Weight bytes regroups read from "
                                               "the node's copy of the checkpoint in host memory")
        self.weights_from_disk = counter("weights_from_disk_bytes", "Weight bytes regroups read from the checkpoint "
                                         "on disk")
        self.weight_cache_bytes = gauge("weight_cache_bytes", "Host memory the node's copy of the checkpoint takes "
                                        "(--ft-weight-cache host; 0 while off)")
        self.weight_cache_bound = gauge("weight_cache_bound_bytes", "The most host memory the copy may take")
        self._weight_cache_seen = 0.0  # when the copy was last measured (once a second: it reads a directory)
        self.store_healthy = None  # made once a KV backup store exists: with backup off there is no series
        self._recoveries_seen = 0
        self._senders: dict[int, tuple[int, int, int]] = {}  # worker -> (pid, bytes, dropped) already counted

    @staticmethod
    def forget_process(pid: int | None) -> None:
        """A dead worker's gauges (SGLang's, written from its process) describe nothing any more: drop their files,
        which prometheus_client keeps (a `mostrecent` gauge of a dead writer would show for good). Its counters and
        histograms stay: they are totals."""
        directory = os.environ.get(MULTIPROC_DIR)
        dead = directory and pid and pid != os.getpid()  # (tests beat with the controller's own pid)
        for path in glob.glob(os.path.join(directory, f"gauge_*_{pid}.db")) if dead else ():
            try:
                os.remove(path)
            except OSError:
                pass

    def observe(self, state) -> None:
        """Map the controller's `ControllerState` to the metrics (cheap: a few writes to a memory-mapped file)."""
        membership = state.membership
        live = membership.live_members()
        self.epoch.set(membership.epoch)
        self.tp_size.set(len(membership.members()))
        self.live_workers.set(len(live))
        self.capacity_ratio.set(len(live) / len(membership.workers))
        self.max_beat_gap.set(max((membership.workers[w].max_beat_gap_s for w in live), default=0.0))
        for recovery in state.recoveries[self._recoveries_seen:]:
            kind = cause_kind(recovery["cause"])
            self.recoveries.labels(kind).inc()
            self.recovery_seconds.labels(kind).observe((recovery["detect_ms"] + recovery["recover_ms"]) / 1e3)
            if kind == "failure":
                self.detection_seconds.observe(recovery["detect_ms"] / 1e3)
            self.kv_blocks_restored.inc(recovery["kv_blocks_restored"])
            self.kv_tokens_recomputed.inc(recovery["kv_tokens_recomputed"])
            self.weights_from_host_cache.inc(recovery.get("bytes_from_host_cache", 0))
            self.weights_from_disk.inc(recovery["bytes_reloaded"])
        self._recoveries_seen = len(state.recoveries)
        for worker, beat in state.kv_senders.items():
            _, dropped, sent_bytes = beat.kv_backup
            pid, counted_bytes, counted_dropped = self._senders.get(worker, (beat.pid, 0, 0))
            if pid != beat.pid:  # a restarted worker's process counts from 0 again
                counted_bytes = counted_dropped = 0
            if sent_bytes > counted_bytes:
                self.kv_backup_bytes.inc(sent_bytes - counted_bytes)
            if dropped > counted_dropped:
                self.kv_backup_dropped.inc(dropped - counted_dropped)
            self._senders[worker] = (beat.pid, sent_bytes, dropped)
        self._observe_loads(state)
        self._observe_weight_cache(state)
        self.kv_backup_lag.set(sum(state.kv_senders[w].kv_backup_queued for w in live if w in state.kv_senders))
        if state.kv_backup is not None:
            if self.store_healthy is None:
                self.store_healthy = self._gauge("kv_backup_store_healthy", "1 while the KV backup store runs, 0 while "
                                            "it is down (backup degraded)")
            self.store_healthy.set(1 if state.kv_backup.alive else 0)

    def _observe_weight_cache(self, state) -> None:
        from ft.weight_cache import cache_status

        now = time.monotonic()
        if now - self._weight_cache_seen < 1.0:
            return
        self._weight_cache_seen = now
        cache = cache_status(state.weight_cache_dir)
        self.weight_cache_bytes.set(cache["bytes"])
        self.weight_cache_bound.set(cache.get("bound_bytes") or 0)

    def _observe_loads(self, state) -> None:
        """Per-worker load from the members' heartbeats; a worker outside the group reads 0 (a multiprocess gauge
        cannot drop a series)."""
        members = set(state.membership.members())
        for worker in state.membership.workers:
            load = state.loads.get(worker) if worker in members else None
            self.worker_kv_bytes.labels(str(worker)).set(load.kv_bytes_used if load else 0)
            self.worker_outstanding.labels(str(worker)).set(load.outstanding_tokens if load else 0)
        used = [state.loads[w].kv_bytes_used for w in members if w in state.loads]
        if used and min(used) > 0:
            self.kv_spread.set(max(used) / min(used))
