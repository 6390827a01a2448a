"""Graph-safe regroup (elastic_tp/graph_refresh.py) against fake graph runners: the re-capture schedule is the
same on every rank, batches run eagerly until a captured size fits them, and nothing is captured inside a step.

On CPU SGLang captures no CUDA graphs, so the capture itself is SGLang's (`capture_decode_graph`) replaced by a
fake that records the sizes SGLang's config asked for; what runs for real is everything around it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_ft.elastic_tp import graph_refresh as gr
from tests.thread_ranks import ThreadGroup, on_every_rank

SGLANG_DEFAULT_DECODE_SIZES = (1, 2, 4, 8, 12, *range(16, 65, 8))  # SGLang's list below 64 (cuda_graph_hook.py)


class FakeChunkRunner:
    """A decode graph runner as SGLang builds one per capture: it pads a batch to its smallest size that fits
    (or, with padding off, runs only its exact sizes)."""

    def __init__(self, sizes, padding=True):
        self.capture_bs, self.padding = sorted(sizes), padding
        self.replayed: list[int] = []

    def bucket(self, bs):
        return next((s for s in self.capture_bs if s >= bs), None) if self.padding else (
            bs if bs in self.capture_bs else None)

    def can_run_graph(self, batch):
        return self.bucket(batch.batch_size) is not None

    def execute(self, batch, **_):
        self.replayed.append(self.bucket(batch.batch_size))
        self.bs = self.bucket(batch.batch_size)
        return ("graph", self.bs)


def sglang_forward(model_runner, batch):
    """What SGLang's ModelRunner._forward_raw does with its decode graph runner (model_runner.py, decode mode)."""
    can_run_graph = bool(model_runner.decode_cuda_graph_runner
                         and model_runner.decode_cuda_graph_runner.can_run_graph(batch))
    if can_run_graph:
        return model_runner.decode_cuda_graph_runner.execute(batch)
    return ("eager", batch.batch_size)


@pytest.fixture
def sglang_capture(monkeypatch):
    """SGLang's decode graph runner replaced by a fake that captures as it is built, the sizes SGLang's config
    asks for at that moment (as `get_batch_sizes_to_capture` reads them). Yields the captures made."""
    every = [1, 2, 4, 8]
    config = SimpleNamespace(decode=SimpleNamespace(bs=every))
    exec_state = SimpleNamespace(graph=SimpleNamespace(cuda_graph_config=config))
    monkeypatch.setattr("sglang.srt.runtime_context.get_exec", lambda: exec_state)
    monkeypatch.setattr("sglang.srt.runtime_context.get_parallel", lambda: SimpleNamespace(attn_tp_size=2))
    captures, backends = [], []

    class FakeDecodeGraphRunner(FakeChunkRunner):
        def __init__(self, model_runner, *, attn_backend):
            assert not model_runner.in_forward, "a capture ran during a forward pass"
            captures.append(tuple(sorted(config.decode.bs)))
            backends.append(attn_backend)
            super().__init__(config.decode.bs, model_runner.padding)

    monkeypatch.setattr(FakeModelRunner, "_decode_cuda_graph_runner_cls", lambda self: FakeDecodeGraphRunner,
                        raising=False)
    yield SimpleNamespace(captures=captures, backends=backends, config=config, every=every)
    assert config.decode.bs is every  # SGLang's own list is back after every capture


class FakeModelRunner(SimpleNamespace):
    def _get_attention_backend(self):
        # built with this rank's heads: 3 KV heads (of 8) at TP 2, 24 query heads, SGLang's division says 32
        return ("backend", self.model_config.num_attention_heads // 2)


def fake_model_runner(padding=True):
    config = SimpleNamespace(num_attention_heads=64, get_total_num_kv_heads=lambda: 8,
                             get_num_kv_heads=lambda tp, *a: 3)
    bound = []
    return FakeModelRunner(decode_cuda_graph_runner=None, prefill_cuda_graph_runner=None, eager_runner=object(),
                           in_forward=False, padding=padding, _kernel_warmed_up=True, device="cuda",
                           init_prefill_cuda_graph=lambda: None, model_config=config,
                           kv_index_translator=SimpleNamespace(bound=bound, bind_and_verify_backends=bound.extend))


def schedule_for(model_runner, sizes, *, prefill=False, agree=lambda i: None, per_step=1, done=None):
    capture = gr.SglangCapture(model_runner, sizes)
    return gr.GraphRecapture(7, gr.DroppedGraphs(tuple(sizes), prefill), capture.decode, capture.prefill, agree,
                             done or (lambda summary: None), per_step=per_step)


def test_every_batch_runs_eagerly_until_a_captured_size_fits_it(sglang_capture):
    runner = fake_model_runner()
    schedule = schedule_for(runner, SGLANG_DEFAULT_DECODE_SIZES)
    batches = [SimpleNamespace(batch_size=bs) for bs in (1, 3, 8, 20, 64)]
    assert [sglang_forward(runner, b)[0] for b in batches] == ["eager"] * 5  # nothing captured yet
    seen = []
    while not schedule.finished:
        schedule.between_steps()
        captured = set(schedule.captured)
        for batch in batches:
            kind, size = sglang_forward(runner, batch)
            # a graph exactly when a captured size fits it, and then the smallest captured size that does
            fits = [s for s in captured if s >= batch.batch_size]
            assert (kind, size) == (("graph", min(fits)) if fits else ("eager", batch.batch_size))
        seen.append(len(captured))
    assert seen == list(range(1, len(SGLANG_DEFAULT_DECODE_SIZES) + 1))  # one size per step
    # largest first (SGLang's order), each through SGLang's capture with the decode sizes set to that chunk alone
    assert sglang_capture.captures == [(s,) for s in sorted(SGLANG_DEFAULT_DECODE_SIZES, reverse=True)]
    assert runner._kernel_warmed_up is False  # the first capture warms the new model up again
    # every chunk's graphs have their own attention backend (a runner resets its backend's graph buffers), each
    # built for this rank's 24 query heads
    backends = sglang_capture.backends
    assert len({id(b) for b in backends}) == len(backends) and {b[1] for b in backends} == {24}
    assert runner.kv_index_translator.bound == backends  # each bound to the runner's KV index translator
    assert runner.model_config.num_attention_heads == 64


def test_without_padding_each_size_switches_to_its_own_graph(sglang_capture):
    runner = fake_model_runner(padding=False)
    schedule = schedule_for(runner, (1, 2, 3, 4), per_step=2)
    schedule.between_steps()  # 4 and 3
    kinds = {bs: sglang_forward(runner, SimpleNamespace(batch_size=bs)) for bs in (1, 2, 3, 4)}
    assert kinds == {1: ("eager", 1), 2: ("eager", 2), 3: ("graph", 3), 4: ("graph", 4)}
    schedule.between_steps()
    assert all(sglang_forward(runner, SimpleNamespace(batch_size=bs)) == ("graph", bs) for bs in (1, 2, 3, 4))
    assert schedule.finished and sglang_capture.captures == [(3, 4), (1, 2)]


def test_every_rank_captures_the_same_sizes_at_the_same_iteration(sglang_capture):
    group = ThreadGroup(3)
    logs = {rank: [] for rank in range(3)}

    def rank_loop(rank):
        captured = []

        def agree(values):
            logs[rank].append(("agree", values, group.all_reduce_for(rank)(torch.tensor(values)).tolist()))

        schedule = gr.GraphRecapture(3, gr.DroppedGraphs((1, 2, 4, 8, 16), True),
                                     lambda sizes: captured.append(sizes), lambda: captured.append("prefill"),
                                     agree, lambda s: None, per_step=2)
        for iteration in range(6):
            before = len(captured)
            schedule.between_steps()
            logs[rank].append((iteration, tuple(captured[before:])))
        return captured

    everyone = on_every_rank(3, rank_loop)
    assert everyone[0] == everyone[1] == everyone[2] == [(16, 8), (4, 2), (1,), "prefill"]
    assert logs[0] == logs[1] == logs[2]
    # each chunk's agreement: the three ranks pass the same (index, chunks, sizes' sum), summed by the collective
    assert [entry[1:] for entry in logs[0] if entry[0] == "agree"] == [
        ((i, 4, key), [3 * i, 12, 3 * key]) for i, key in enumerate((24, 6, 1, -1))]


def _agree_on_gloo(rank, size, path, skip_rank, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=size)
    agree = gr.agree_on_chunk(dist.group.WORLD)
    result = []
    for index in range(3):
        mine = index + 1 if (rank == skip_rank and index == 2) else index  # one rank a chunk ahead at the end
        try:
            agree((mine, 3, 8))
            result.append("ok")
        except RuntimeError as exc:
            result.append(str(exc))
    out.put((rank, result))
    dist.destroy_process_group()


def test_a_rank_out_of_step_fails_the_agreement_on_every_rank(tmp_path):
    """The agreement is a real gloo all-reduce over the TP group's CPU group (three processes)."""
    from tests.rank_processes import rank_context

    ctx = rank_context()
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree_on_gloo, args=(r, 3, tmp_path / "store", 1, out)) for r in range(3)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    for rank in range(3):
        assert results[rank][:2] == ["ok", "ok"]
        assert "graph re-capture out of step" in results[rank][2] and "between (2, 3, 8) and (3, 3, 8)" in results[
            rank][2]


def test_no_capture_inside_a_step_through_the_scheduler_hooks(sglang_capture, monkeypatch):
    """SGLang's loop through sglang-ft's hooks: the re-capture runs at the top of an iteration
    (`before_ingest_requests`), never inside `run_batch`, whose forward is where the fake runner is busy."""
    from sglang_ft.managers import scheduler as scheduler_hooks
    from sglang_ft.managers import ft_worker as ft_worker_module

    runner = fake_model_runner()
    order = []
    worker = SimpleNamespace(
        check_orders=lambda: order.append("orders"), begin_iteration=lambda: order.append("begin"),
        batch_started=lambda: None, record_step=lambda *a: None, step_failed=lambda batch: None,
        injected_step_failure=lambda batch: False, kv_stream=None, maps_requests=False, die_before_next_copy=False)
    monkeypatch.setattr(ft_worker_module, "_WORKER", worker)
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=runner))
    gr.start_recapture(schedule_for(runner, (1, 2, 4)))
    monkeypatch.setattr(gr, "_OWED", gr.DroppedGraphs((1, 2, 4)))

    def run_batch(_scheduler, batch):
        runner.in_forward = True
        try:
            order.append(sglang_forward(runner, batch)[0])
        finally:
            runner.in_forward = False

    for _ in range(5):
        scheduler_hooks.before_ingest_requests(scheduler)
        scheduler_hooks.around_run_batch(run_batch, scheduler, SimpleNamespace(batch_size=2))
    assert sglang_capture.captures == [(4,), (2,), (1,)]
    # iteration by iteration: the graph is used from the step after its capture; the schedule ends by itself
    assert order == ["orders", "begin", "graph"] * 5
    assert gr._SCHEDULE is None and not gr._OWED


def test_the_recapture_is_reported_once_with_its_time(sglang_capture):
    runner = fake_model_runner()
    reports = []
    schedule = schedule_for(runner, (8, 16), prefill=True, done=reports.append)
    ticks = iter([100.0, 100.25])
    schedule.clock = lambda: next(ticks)
    for _ in range(5):
        schedule.between_steps()
    assert reports == [gr.GraphsRecaptured(7, 250.0, 2, True, 3)]


def test_a_regroup_during_the_recapture_owes_the_whole_target_again(sglang_capture, monkeypatch):
    runner = fake_model_runner()
    monkeypatch.setattr(gr, "_OWED", gr.DroppedGraphs())
    startup = FakeChunkRunner((1, 2, 4, 8))
    runner.decode_cuda_graph_runner = startup
    dropped = []
    monkeypatch.setattr("sglang.srt.model_executor.model_runner_components.cuda_graph_setup."
                        "drop_elastic_cuda_graph_state",
                        lambda *, decode_runner, eager_runner: dropped.append(decode_runner))
    first = gr.drop_device_graphs(runner)
    assert first == gr.DroppedGraphs((1, 2, 4, 8), False) and dropped == [startup]
    assert runner.decode_cuda_graph_runner is None
    gr.start_recapture(schedule_for(runner, first.decode_sizes))
    gr.between_steps()  # 8 captured: the runner holds SGLang's captures of it
    assert isinstance(runner.decode_cuda_graph_runner, gr.CapturedGraphs)
    partial = runner.decode_cuda_graph_runner.runners
    second = gr.drop_device_graphs(runner)  # another failure: every size again, the schedule stopped
    assert second == first and gr._SCHEDULE is None and dropped[1:] == partial
    # a regroup that failed before its schedule started leaves nothing on the runner: the debt is still there
    assert gr.drop_device_graphs(runner) == first


def test_per_rank_heads_gives_sglang_s_division_this_rank_s_uneven_share(monkeypatch):
    """8 KV heads, 64 query heads over 3 ranks: this rank holds 3 KV heads (24 query heads), which SGLang's
    backends compute as num_attention_heads // attn_tp_size (64 // 3 = 21 without the view)."""
    from sglang.srt.configs.model_config import ModelConfig

    monkeypatch.setattr("sglang.srt.runtime_context.get_parallel", lambda: SimpleNamespace(attn_tp_size=3))
    config = SimpleNamespace(num_attention_heads=64, hf_text_config=SimpleNamespace(),
                             get_total_num_kv_heads=lambda: 8, get_num_kv_heads=lambda tp, *a: 3)
    assert config.num_attention_heads // 3 == 21
    with pytest.raises(KeyError):
        with gr.per_rank_heads(config):
            assert config.num_attention_heads // 3 == 24
            assert ModelConfig.get_max_num_attention_heads(config) // 3 == 24  # triton's and flashinfer's planning
            raise KeyError("whatever SGLang raises inside")
    assert config.num_attention_heads == 64


def test_recreate_attention_backend_builds_a_new_one_through_sglang(monkeypatch):
    monkeypatch.setattr("sglang.srt.runtime_context.get_parallel", lambda: SimpleNamespace(attn_tp_size=2))
    config = SimpleNamespace(num_attention_heads=8, get_total_num_kv_heads=lambda: 4, get_num_kv_heads=lambda tp: 3)

    class Backend:
        def __init__(self):
            self.num_head, self.num_kv_head = config.num_attention_heads // 2, config.get_num_kv_heads(2)

    runner = SimpleNamespace(model_config=config, attn_backend=Backend(), is_draft_worker=False)
    runner.init_attention_backends = lambda: setattr(runner, "attn_backend", Backend())
    monkeypatch.setattr("sglang_ft.server_args.ft_enabled", lambda: True)
    original = runner.init_attention_backends
    runner.init_attention_backends = lambda: gr.around_init_attention_backends(lambda r: original(), runner)
    rebuilt = gr.recreate_attention_backend(runner)
    assert (rebuilt.q_heads, rebuilt.kv_heads) == (6, 3)
    assert rebuilt.planned == {"planned query heads": 6, "planned KV heads": 3}
    runner.init_attention_backends = lambda: None  # an initialiser that keeps the old backend is an error
    with pytest.raises(RuntimeError, match="kept the old attention backend"):
        gr.recreate_attention_backend(runner)


@pytest.fixture(autouse=True)
def _no_schedule_left():
    yield
    gr.start_recapture(None)
    gr._OWED = gr.DroppedGraphs()

