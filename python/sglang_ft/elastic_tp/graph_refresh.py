"""Graph-safe regroup: SGLang's attention backend and device graphs rebuilt for this rank's new heads.

A regroup changes the heads each rank holds, and the model object itself. What SGLang built for the old ones is
wrong afterwards: its CUDA attention backends plan with the head counts they were built for (flashinfer's
`num_qo_heads`, triton's `num_head` and the buffers sized by it), and a captured CUDA graph replays the old
model's kernels on the old weights' addresses. So, through SGLang's own initialisers:

- `drop_device_graphs` at the start of the regroup: the decode and prefill graph runners are released (SGLang's
  `drop_elastic_cuda_graph_state`, what its elastic EP re-capture does), and the runner runs eagerly;
- `recreate_attention_backend` after the KV restore: `ModelRunner.init_attention_backends()` builds a new backend
  for the new heads (a stage of the recovery, in the log and in /ft/status);
- `GraphRecapture`, after serving resumed: the dropped graphs' batch sizes are captured again between steps, one
  chunk of sizes per scheduler iteration at its top (never inside a step, never during a forward), every rank the
  same chunk at the same iteration (capture runs the model's collectives, so the ranks must capture together; the
  ranks check they agree before each chunk). A batch runs a graph as soon as a captured size fits it
  (`CapturedGraphs`), eagerly until then. When the last chunk is in, the worker reports the re-capture's wall time
  to the controller, which adds it to that recovery's stages as `recapture_graphs`.

Elastic TP splits heads unevenly (8 KV heads over 3 ranks: 3, 3, 2), while SGLang's backends size per-rank heads
as `num_attention_heads // attn_tp_size`. `per_rank_heads` makes that division give this rank's count while SGLang's
initialisers run, at startup (the hook on `init_attention_backends`) and after every regroup.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger(__name__)

SIZES_PER_STEP = 1  # decode batch sizes captured between two steps: the smallest pause a step can see
STAGE = "recapture_graphs"


# --- the attention backend --------------------------------------------------------------------------------------


def rank_heads(model_config) -> tuple[int, int]:
    """(query heads, KV heads) this rank computes: `get_num_kv_heads` answers with the elastic layout's count
    under `--ft` (hooks.py); the query heads are its GQA groups."""
    from sglang_ft.sglang_surface import get_parallel

    parallel = get_parallel()
    kv = model_config.get_num_kv_heads(parallel.attn_tp_size)
    return kv * (model_config.num_attention_heads // model_config.get_total_num_kv_heads()), kv


@contextlib.contextmanager
def per_rank_heads(model_config):
    """While SGLang builds per-head state, its `num_attention_heads // attn_tp_size` is this rank's query heads.

    Nothing inside asks the (hooked) `get_num_attention_heads`, which derives the group size from the true total;
    the true total is back before this returns, whatever happens inside.
    """
    from sglang_ft.sglang_surface import get_parallel

    total = model_config.num_attention_heads
    q_heads, _ = rank_heads(model_config)
    model_config.num_attention_heads = q_heads * get_parallel().attn_tp_size
    try:
        yield
    finally:
        model_config.num_attention_heads = total


def around_init_attention_backends(original, runner, *args, **kwargs):
    """Under `--ft`, SGLang's attention backends are built for this rank's (possibly uneven) share of heads."""
    from sglang_ft.server_args import ft_enabled

    if not ft_enabled() or runner.is_draft_worker:
        return original(runner, *args, **kwargs)
    with per_rank_heads(runner.model_config):
        return original(runner, *args, **kwargs)


@dataclass(frozen=True)
class BackendRebuilt:
    name: str
    q_heads: int
    kv_heads: int
    planned: dict  # the head counts the backend itself keeps, where it keeps any (triton, flashinfer)

    def describe(self) -> str:
        planned = "".join(f", {k} {v}" for k, v in self.planned.items())
        return f"{self.name} re-created for {self.q_heads} query heads, {self.kv_heads} KV heads here{planned}"


def recreate_attention_backend(runner) -> BackendRebuilt:
    """A new attention backend for the new model and heads, by SGLang's own initialiser (the hook on it applies
    `per_rank_heads`); graph runners built later take it from the runner."""
    old = runner.attn_backend
    runner.init_attention_backends()
    backend = runner.attn_backend
    if backend is old:
        raise RuntimeError("sglang-ft: SGLang's init_attention_backends kept the old attention backend")
    q_heads, kv_heads = rank_heads(runner.model_config)
    planned = {key: getattr(holder, attr) for key, holder, attr in (
        ("planned query heads", backend, "num_head"), ("planned KV heads", backend, "num_kv_head"),
        ("planned query heads", getattr(backend, "indices_updater_decode", None), "num_qo_heads"),
        ("planned KV heads", getattr(backend, "indices_updater_decode", None), "num_kv_heads"),
    ) if isinstance(getattr(holder, attr, None), int)}
    return BackendRebuilt(type(backend).__name__, q_heads, kv_heads, planned)


# --- dropping the graphs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DroppedGraphs:
    decode_sizes: tuple[int, ...] = ()  # every decode batch size the runner had (or was re-capturing)
    prefill: bool = False

    def __bool__(self) -> bool:
        return bool(self.decode_sizes) or self.prefill


def is_graph_runner(runner, model_runner) -> bool:
    return runner is not None and runner is not getattr(model_runner, "eager_runner", None)


_OWED = DroppedGraphs()  # dropped and not yet all captured again (a regroup may interrupt the re-capture)


def drop_device_graphs(model_runner) -> DroppedGraphs:
    """Release this runner's decode and prefill graphs (the model they replay is about to be replaced) and run
    eagerly; what is owed, to capture again: these graphs, and those of an earlier regroup not yet re-captured (a
    re-capture under way is cancelled, a regroup that failed half way left none to find on the runner)."""
    global _OWED
    cancel_recapture()
    decode, prefill = model_runner.decode_cuda_graph_runner, model_runner.prefill_cuda_graph_runner
    sizes = set(_OWED.decode_sizes)
    if isinstance(decode, CapturedGraphs):
        sizes |= set(decode.target_sizes)
    elif is_graph_runner(decode, model_runner):
        sizes |= set(decode.capture_bs)
    dropped = _OWED = DroppedGraphs(tuple(sorted(sizes)), _OWED.prefill or is_graph_runner(prefill, model_runner))
    if is_graph_runner(decode, model_runner) or is_graph_runner(prefill, model_runner):
        from sglang_ft.sglang_surface import drop_elastic_cuda_graph_state

        if is_graph_runner(prefill, model_runner):
            prefill.backend.cleanup()
        for runner in decode.runners if isinstance(decode, CapturedGraphs) else [decode]:
            drop_elastic_cuda_graph_state(decode_runner=runner, eager_runner=model_runner.eager_runner)
        model_runner.decode_cuda_graph_runner = None
        model_runner.prefill_cuda_graph_runner = None
        logger.warning("sglang-ft: dropped the device graphs (%d decode sizes%s): eager until re-captured",
                       len(dropped.decode_sizes), ", prefill" if dropped.prefill else "")
    return dropped


# --- capturing them again, between steps -------------------------------------------------------------------------


class CapturedGraphs:
    """Stands in SGLang's model runner for its decode graph runner while sizes are captured chunk by chunk.

    SGLang asks `can_run_graph(batch)`, then `execute(batch)`: the answer comes from the chunk runner holding the
    smallest captured size that fits the batch (each pads the batch to its own sizes, or with padding off runs
    only its exact sizes), so a size switches to its graph once captured; a batch no captured size fits runs
    eagerly.
    """

    def __init__(self, target_sizes):
        self.target_sizes = tuple(sorted(target_sizes))
        self.runners: list = []
        self._chosen = None

    def add(self, runner) -> None:
        self.runners.append(runner)
        self.runners.sort(key=lambda r: max(r.capture_bs))

    @property
    def capture_bs(self) -> list[int]:
        return sorted({bs for runner in self.runners for bs in runner.capture_bs})

    @property
    def bs(self):
        return getattr(self._chosen, "bs", None)

    def can_run_graph(self, forward_batch) -> bool:
        self._chosen = next((r for r in self.runners if r.can_run_graph(forward_batch)), None)
        return self._chosen is not None

    def execute(self, forward_batch, **kwargs):
        return self._chosen.execute(forward_batch, **kwargs)


class SglangCapture:
    """Captures through SGLang's own initialisers: its decode graph runner class, built (it captures as it is
    built) with the decode sizes set to one chunk (the sizes-to-capture path SGLang's PD role switch takes) and an
    attention backend of its own from SGLang's `get_attention_backend`: a graph runner resets its backend's graph
    state (`init_cuda_graph_state`) to its sizes, which would pull the buffers from under the graphs of the chunks
    captured before; `init_prefill_cuda_graph` for prefill."""

    def __init__(self, model_runner, target_sizes):
        self.model_runner = model_runner
        self.graphs = CapturedGraphs(target_sizes)
        self.first = True

    def decode(self, sizes: tuple[int, ...]) -> None:
        from sglang_ft.sglang_surface import get_exec

        runner = self.model_runner
        if self.first:  # the model changed: SGLang's warm-up (which may communicate) runs again on every rank
            runner._kernel_warmed_up = False
            self.first = False
        config = get_exec().graph.cuda_graph_config
        every = config.decode.bs
        config.decode.bs = list(sizes)  # rebound, never mutated (cuda_graph_config.with_phase)
        try:
            with per_rank_heads(runner.model_config):
                backend = runner._get_attention_backend()
            runner.kv_index_translator.bind_and_verify_backends([backend])  # as init_attention_backends does
            graphs = runner._decode_cuda_graph_runner_cls()(runner, attn_backend=backend)
        finally:
            config.decode.bs = every
        self.graphs.add(graphs)
        runner.decode_cuda_graph_runner = self.graphs

    def prefill(self) -> None:
        self.model_runner.init_prefill_cuda_graph()


@dataclass(frozen=True)
class GraphsRecaptured:
    epoch: int
    ms: float
    decode_sizes: int
    prefill: bool
    steps: int


@dataclass
class GraphRecapture:
    """The schedule: decode sizes largest first (SGLang's order: smaller graphs reuse the larger ones' memory),
    `per_step` of them at the top of each scheduler iteration, then prefill's graphs in one more.

    `agree((chunk index, chunks, chunk key))` runs a collective that fails unless every rank passes the same: the
    same chunk of the same schedule (a rank with another size list fails at the first chunk); `capture_decode`
    and `capture_prefill` do the capturing; `done` gets the summary once the last chunk is in.
    """

    epoch: int
    dropped: DroppedGraphs
    capture_decode: Callable[[tuple[int, ...]], None]
    capture_prefill: Callable[[], None]
    agree: Callable[[tuple[int, int, int]], None]
    done: Callable[[GraphsRecaptured], None]
    per_step: int = SIZES_PER_STEP
    clock: Callable[[], float] = time.monotonic
    chunks: list = field(init=False)
    captured: list = field(init=False, default_factory=list)
    steps: int = field(init=False, default=0)
    started: float | None = field(init=False, default=None)

    def __post_init__(self):
        if self.per_step < 1:
            raise ValueError(f"per_step must be at least 1, got {self.per_step}")
        largest_first = sorted(self.dropped.decode_sizes, reverse=True)
        self.chunks = [tuple(largest_first[i:i + self.per_step]) for i in range(0, len(largest_first), self.per_step)]
        if self.dropped.prefill:
            self.chunks.append("prefill")

    @property
    def target_sizes(self) -> tuple[int, ...]:
        return self.dropped.decode_sizes

    @property
    def finished(self) -> bool:
        return self.steps >= len(self.chunks)

    def between_steps(self) -> None:
        """Capture the next chunk; called at the top of a scheduler iteration, outside any step."""
        if self.finished:
            return
        if self.started is None:
            self.started = self.clock()
        chunk = self.chunks[self.steps]
        self.agree((self.steps, len(self.chunks), -1 if chunk == "prefill" else sum(chunk)))
        if chunk == "prefill":
            self.capture_prefill()
        else:
            self.capture_decode(chunk)
            self.captured.extend(chunk)
        self.steps += 1
        if self.finished:
            self.done(GraphsRecaptured(self.epoch, round((self.clock() - self.started) * 1e3, 2),
                                       len(self.captured), self.dropped.prefill, self.steps))


_SCHEDULE: GraphRecapture | None = None


def start_recapture(schedule: GraphRecapture | None) -> None:
    """The schedule the next scheduler iterations run (None: nothing to capture)."""
    global _SCHEDULE
    _SCHEDULE = schedule if schedule is not None and not schedule.finished else None


def cancel_recapture() -> None:
    """A new regroup: the schedule under way stops (what it had left stays owed)."""
    global _SCHEDULE
    _SCHEDULE = None


def between_steps() -> None:
    """Top of every scheduler iteration (hooks.before_ingest_requests): the next chunk of a re-capture, if any."""
    global _SCHEDULE, _OWED
    if _SCHEDULE is not None:
        _SCHEDULE.between_steps()
        if _SCHEDULE.finished:
            _SCHEDULE, _OWED = None, DroppedGraphs()


def agree_on_chunk(cpu_group) -> Callable[[tuple[int, ...]], None]:
    """A collective over the TP group's CPU group: every rank must pass the same values (one all-reduce of each
    value and its negation: the maxima and minima)."""

    def agree(values: tuple[int, ...]) -> None:
        import torch
        import torch.distributed as dist

        bounds = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=cpu_group)
        highest, lowest = bounds[:len(values)].tolist(), [-v for v in bounds[len(values):].tolist()]
        if highest != lowest:
            raise RuntimeError(f"sglang-ft: graph re-capture out of step: this rank is at (chunk, chunks, sizes) "
                               f"{tuple(values)}, the group between {tuple(lowest)} and {tuple(highest)}")

    return agree


def schedule_recapture(ft_worker, dropped: DroppedGraphs, epoch: int) -> GraphRecapture | None:
    """After a regroup: capture what `drop_device_graphs` dropped, between the next steps (None: nothing); the
    worker reports the re-capture's time to the controller as a late stage of this recovery."""
    import os

    from ft.messages import LateStageDone

    model_runner = ft_worker.scheduler.tp_worker.model_runner
    if not dropped:
        logger.info("sglang-ft: no device graphs to re-capture for epoch %d (graphs off on %s)", epoch,
                    model_runner.device)
        start_recapture(None)
        return None
    capture = SglangCapture(model_runner, dropped.decode_sizes)

    def done(summary: GraphsRecaptured) -> None:
        logger.warning("sglang-ft: recovery to epoch %d: %s done in %.1f ms (%d decode batch sizes%s in %d steps, "
                       "serving eagerly meanwhile)", summary.epoch, STAGE, summary.ms, summary.decode_sizes,
                       " and prefill" if summary.prefill else "", summary.steps)
        ft_worker.report(LateStageDone(ft_worker.worker, summary.epoch, STAGE, summary.ms, os.getpid()))

    schedule = GraphRecapture(epoch, dropped, capture.decode, capture.prefill,
                              agree_on_chunk(ft_worker.scheduler.tp_cpu_group), done)
    start_recapture(schedule)
    logger.warning("sglang-ft: re-capturing %d decode batch sizes%s between the next %d steps",
                   len(dropped.decode_sizes), " and prefill" if dropped.prefill else "", len(schedule.chunks))
    return schedule
