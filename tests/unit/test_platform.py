"""The torch_cpu platform plugin: activation rules, thread binding, CPU defaults."""

import pytest
from sglang_ft.platforms import activate_torch_cpu


def test_activates_only_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert activate_torch_cpu() == "sglang_ft.platforms.torch_cpu.TorchCpuPlatform"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert activate_torch_cpu() is None


def test_sglang_resolves_it_as_its_current_platform():
    from sglang.srt.platforms import current_platform
    from sglang_ft.platforms.torch_cpu import TorchCpuPlatform

    assert isinstance(current_platform, TorchCpuPlatform)
    assert current_platform.is_out_of_tree()
    assert current_platform.get_default_attention_backend() == "torch_native"
    assert current_platform.get_torch_distributed_backend_str() == "gloo"


@pytest.mark.parametrize(
    "ranks, cpus, expected",
    [
        (4, [0, 1], "0|1|0|1"),
        (2, [0, 1], "0|1"),
        (1, [0, 1], "0,1"),
        (2, [0, 1, 2, 3, 4], "0,1|2,3"),
        (3, [4, 5, 6, 7, 8, 9], "4,5|6,7|8,9"),
        (8, [0, 1], "0|1|0|1|0|1|0|1"),
    ],
)
def test_thread_binding_gives_every_rank_cores(ranks, cpus, expected):
    from sglang_ft.platforms.torch_cpu import thread_binding

    assert thread_binding(ranks, cpus) == expected


def test_default_kv_budget_fits_memory(tiny_model):
    from sglang_ft.platforms.torch_cpu import MAX_DEFAULT_TOKENS, default_max_total_tokens

    tokens = default_max_total_tokens(tiny_model, "float32")
    assert 1024 <= tokens <= MAX_DEFAULT_TOKENS
    assert default_max_total_tokens("/nonexistent", "float32") is None


def test_emptying_the_cache_collects_only_young_generations(monkeypatch):
    """A full collection under SGLang holds the GIL for over a second on CPU: an `--ft` worker's heartbeats stop."""
    import gc

    from sglang.srt.platforms import current_platform  # SGLang resolves the platform module first

    generations = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: generations.append(generation) or 0)
    current_platform.empty_cache()
    assert generations == [1]


def test_idle_schedulers_sleep_unless_a_short_collective_timeout_would_fail_the_others_broadcast(tiny_model,
                                                                                              monkeypatch):
    """On CPU every server sleeps between requests (rank 0 in a poll of its sockets, the others in the request
    broadcast); under `--ft` only where the broadcast's bound outlasts that sleep twice over."""
    import argparse

    from sglang.srt.arg_groups.overrides import resolution_result
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs
    from sglang_ft.server_args import FT_ENV, ft_args

    load_plugins()
    monkeypatch.delenv(FT_ENV, raising=False)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)

    def sleeps(*flags: str) -> bool:
        server_args = ServerArgs.from_cli_args(parser.parse_args(["--model-path", tiny_model, *flags]))
        server_args.resolve_once()  # what the launcher does: the platform's defaults are applied here
        return resolution_result(server_args, "sleep_on_idle")

    try:
        assert sleeps() and sleeps("--ft") and sleeps("--ft", "--ft-collective-timeout-s", "2")
        assert not sleeps("--ft", "--ft-collective-timeout-s", "1")
        assert not sleeps("--ft", "--ft-collective-timeout-s", "1", "--sleep-on-idle")
    finally:
        ft_args.cache_clear()


def test_sglangs_idle_sleep_lasts_what_the_surface_says_and_the_wake_pipe_ends_it():
    """SGLang's IdleSleeper polls its sockets IDLE_SLEEP_POLL_S (the bound the FT check above relies on); the FT
    worker's wake pipe, registered in that poll, ends it at once, and a drained pipe lets it sleep again."""
    import threading
    import time

    import zmq
    from sglang.srt.managers.scheduler_components.idle_sleeper import IdleSleeper
    from sglang_ft.managers.scheduler_components.idle_wake import IdleWake
    from sglang_ft.sglang_surface import IDLE_SLEEP_POLL_S

    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    try:
        sleeper = IdleSleeper([socket])
        sleeper.empty_cache_interval = 0
        wake = IdleWake()
        wake.attach(type("Scheduler", (), {"idle_sleeper": sleeper})())
        assert wake.attached

        def slept() -> float:
            start = time.monotonic()
            sleeper.maybe_sleep()
            return time.monotonic() - start

        assert IDLE_SLEEP_POLL_S * 0.9 <= slept() <= IDLE_SLEEP_POLL_S * 1.5
        threading.Timer(0.1, wake.wake).start()
        assert slept() < IDLE_SLEEP_POLL_S / 2
        assert slept() < 0.05  # not drained yet: the wake is still there
        wake.drain()
        assert slept() >= IDLE_SLEEP_POLL_S * 0.9
    finally:
        socket.close(0)
        context.term()


def test_cpu_children_fork_unless_the_variable_asks_for_sglangs_spawn(monkeypatch):
    from sglang_ft.platforms.torch_cpu import START_METHOD_ENV, children_start_method, cpu_start_method

    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    assert cpu_start_method() == "fork"
    assert children_start_method() == "fork"  # this machine has no GPU: the torch_cpu platform is SGLang's
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert children_start_method() == "spawn"
    monkeypatch.setenv(START_METHOD_ENV, "forkserver")
    with pytest.raises(ValueError, match=f"{START_METHOD_ENV}='forkserver': use one of fork, spawn"):
        cpu_start_method()


def test_a_launch_sets_the_platforms_start_method_after_sglang_set_spawn(monkeypatch):
    """SGLang's launcher forces `spawn` before it launches the schedulers; the adapter of that launch sets the
    platform's method, which SGLang's `mp.Process` children (schedulers, DP controller, detokenizer) then use."""
    import multiprocessing as mp

    from sglang_ft.entrypoints.engine import around_launch_scheduler_processes
    from sglang_ft.platforms.torch_cpu import START_METHOD_ENV

    seen = []
    before = mp.get_start_method(allow_none=True)
    try:
        for method in ("fork", "spawn"):
            monkeypatch.setenv(START_METHOD_ENV, method)
            mp.set_start_method("spawn" if method == "fork" else "fork", force=True)
            around_launch_scheduler_processes(lambda *a, **k: seen.append(mp.get_start_method()), None, None, None,
                                              None)
        assert seen == ["fork", "spawn"]
    finally:
        mp.set_start_method(before, force=True)


def test_restarted_workers_start_from_a_fork_server_that_imported_sglang_or_spawned_as_on_gpus(monkeypatch):
    """A restart (entrypoints/worker_spawner.py) comes after the HTTP server's threads started, so it is never a
    fork of the launcher: on the torch_cpu platform it forks from a fork server that preloads what a worker runs,
    and where SGLang's children are spawned (GPUs, or the variable asking for it) it is spawned too."""
    from multiprocessing import forkserver

    import sglang  # noqa: F401  (SGLang first, as its plugin loader imports the platform)
    from sglang_ft.entrypoints.worker_spawner import restart_context
    from sglang_ft.platforms.torch_cpu import START_METHOD_ENV

    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    context = restart_context()
    assert context.get_start_method() == "forkserver"
    assert "sglang.srt.managers.scheduler" in forkserver._forkserver._preload_modules  # what a worker imports
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert restart_context().get_start_method() == "spawn"


@pytest.mark.parametrize("spec, cores", [("0", [0]), ("0-3", [0, 1, 2, 3]), ("0-1,8", [0, 1, 8]), ("2, 5", [2, 5])])
def test_a_ranks_binding_entry_reads_as_its_cores(spec, cores):
    from sglang_ft.platforms.torch_cpu import cpu_ids_of

    assert cpu_ids_of(spec) == cores


@pytest.mark.parametrize("spec", ["", "a", "3-1", "0-", "0|1"])
def test_a_malformed_binding_entry_is_refused_by_name(spec):
    from sglang_ft.platforms.torch_cpu import OMP_BIND_ENV, cpu_ids_of

    with pytest.raises(ValueError, match=OMP_BIND_ENV):
        cpu_ids_of(spec)


@pytest.mark.parametrize("entry, threads", [("0", 1), ("0-1", 2)])
def test_sglangs_cpu_thread_setup_gives_the_rank_one_torch_thread_per_core(entry, threads):
    """SGLang binds a rank's threads only through sgl_kernel's CPU ops: without them every rank ran the machine's
    thread count (TP 4 on 2 cores: 8 spinning threads; a decode step 257 ms against 53 with one per rank). Through
    SGLang's own function, hooked as `load_plugins` hooks it in every scheduler; torch's count read back."""
    import torch
    from sglang.srt.distributed import bootstrap
    from sglang.srt.plugins import load_plugins

    load_plugins()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(5)
        bootstrap._init_cpu_threads_env(local_omp_cpuid=entry, dist_init_method="tcp://127.0.0.1:1")
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
