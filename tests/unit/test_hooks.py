"""The plugin's hooks on SGLang: every target exists in the pinned SGLang with the parameters its handler expects,
every handler lives in the adapter of the module it extends (`--help` is in test_cli_errors)."""

import inspect
import pkgutil
from importlib.metadata import entry_points, version

import pytest
from sglang_ft.hooks import HOOKS, PARAMETERS


def test_sglang_is_the_pinned_version():
    assert version("sglang") == "0.5.23"


@pytest.mark.parametrize("target", sorted({t for t, _, _ in HOOKS}))
def test_every_hook_target_resolves(target):
    owner, attr = target.rsplit(".", 1)
    assert hasattr(pkgutil.resolve_name(owner), attr), f"{target} is gone from this SGLang"


def test_every_hook_target_has_its_parameters_pinned():
    assert sorted(t.removeprefix("sglang.srt.") for t, _, _ in HOOKS) == sorted(PARAMETERS)


@pytest.mark.parametrize("target", sorted(PARAMETERS))
def test_every_hook_target_takes_the_parameters_its_handler_expects(target):
    """A signature SGLang changed fails here, naming the target, before a handler meets the new arguments."""
    owner, attr = f"sglang.srt.{target}".rsplit(".", 1)
    found = list(inspect.signature(getattr(pkgutil.resolve_name(owner), attr)).parameters)
    assert found == PARAMETERS[target].split(), (f"sglang.srt.{target} now takes ({', '.join(found)}); the "
                                                 f"handler expects ({', '.join(PARAMETERS[target].split())})")


@pytest.mark.parametrize("target, handler", [(t, h) for t, _, h in HOOKS])
def test_every_handler_lives_in_the_adapter_of_the_module_it_extends(target, handler):
    """`sglang.srt.<path>.<name>.<attr>` is extended in `sglang_ft.<path>.<name>`, the module of the same path."""
    owner, _ = target.rsplit(".", 1)
    while not inspect.ismodule(pkgutil.resolve_name(owner)):
        owner = owner.rsplit(".", 1)[0]
    assert handler.__module__ == owner.replace("sglang.srt.", "sglang_ft.", 1)


def test_both_entry_points_are_registered():
    assert "torch_cpu" in {ep.name for ep in entry_points(group="sglang.srt.platforms")}
    assert "ft" in {ep.name for ep in entry_points(group="sglang.srt.plugins")}


def test_parsing_carries_ft_to_subprocesses(monkeypatch):
    """`--ft` is not a ServerArgs field; the plugin publishes it in the environment the schedulers inherit."""
    import argparse

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs
    from sglang_ft.server_args import FT_ENV, ft_args

    load_plugins()
    monkeypatch.delenv(FT_ENV, raising=False)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    try:
        ServerArgs.from_cli_args(parser.parse_args(["--model-path", "dummy"]))
        assert ft_args().enabled is False
        args = parser.parse_args(["--model-path", "dummy", "--ft"])
        with pytest.raises(SystemExit):  # "dummy" is no model directory, so --ft refuses it
            ServerArgs.from_cli_args(args)
        assert ft_args().enabled is True
    finally:
        ft_args.cache_clear()  # monkeypatch restores the environment; the cached value must not outlive it


class _Process:
    def __init__(self, alive: bool):
        self.alive, self.exitcode, self.pid = alive, None if alive else -9, 1

    def is_alive(self) -> bool:
        return self.alive


@pytest.mark.parametrize("restarted_alive, checked", [(True, ["detokenizer"]),
                                                      (False, ["scheduler_0", "scheduler_1", "detokenizer"])])
def test_the_watchdog_counts_restarted_workers_as_the_group(monkeypatch, restarted_alive, checked):
    """Found by the chaos soak: once every scheduler SGLang launched had been replaced by a restart, its watchdog
    took the server for dead and SIGQUIT it while the restarted workers served."""
    from types import SimpleNamespace

    from sglang_ft.entrypoints import worker_spawner
    from sglang_ft.utils import watchdog as watchdog_adapter

    monkeypatch.setattr(watchdog_adapter, "ft_enabled", lambda: True)
    monkeypatch.setattr(worker_spawner, "_RESTARTED", {1: _Process(restarted_alive)})
    watchdog = SimpleNamespace(_processes=[_Process(False), _Process(False), _Process(True)],
                               _names=["scheduler_0", "scheduler_1", "detokenizer"])
    seen = []
    watchdog_adapter.around_watchdog_check(lambda w: seen.extend(w._names), watchdog)
    assert seen == checked
    assert watchdog._names == ["scheduler_0", "scheduler_1", "detokenizer"]  # restored after the check


def test_a_restart_being_started_counts_as_the_group_for_the_watchdog(monkeypatch):
    """Found by a test: the last original worker died while an operator's restart waited for the fork server's
    import; no restarted process existed yet, so the watchdog took the server for dead and SIGQUIT it."""
    import multiprocessing
    import threading
    from types import SimpleNamespace

    from sglang_ft.entrypoints import worker_spawner
    from ft.messages import Respawn

    release, started = threading.Event(), threading.Event()

    class SlowStart(_Process):  # a fork server still importing: start() returns when it is ready
        def __init__(self, **_):
            super().__init__(False)

        def start(self):
            started.set()
            assert release.wait(10)
            self.alive = True

        def join(self, timeout=None):
            pass

    context = SimpleNamespace(Pipe=multiprocessing.Pipe, Process=SlowStart)
    monkeypatch.setattr(worker_spawner, "restart_context", lambda: context)
    monkeypatch.setattr(worker_spawner, "_RESTARTED", {})
    launch = worker_spawner.LaunchArgs(SimpleNamespace(tp_size=2, base_gpu_id=0, gpu_id_step=1), None, None)
    monkeypatch.setattr(worker_spawner, "_LAUNCH", launch)
    spawner = object.__new__(worker_spawner.WorkerSpawner)  # no order socket: its spawn alone
    spawner.processes = worker_spawner._RESTARTED
    assert not worker_spawner.restarted_worker_alive()
    spawning = threading.Thread(target=spawner.spawn, args=(Respawn(1, 2, 64),))
    spawning.start()
    assert started.wait(10)
    assert worker_spawner.restarted_worker_alive()  # being started: the group lives on
    release.set()
    spawning.join(10)
    assert worker_spawner.restarted_worker_alive() and worker_spawner._STARTING == set()  # now its process runs
    worker_spawner._RESTARTED[1].alive = False
    assert not worker_spawner.restarted_worker_alive()


def _inside_forward(target: str) -> str | None:
    """Why `target` runs inside the model's forward pass (None: it does not). Inside: the KV pool's read and write
    path (methods of SGLang's `KVCache` classes that set or get KV buffers), any method of `RadixAttention`,
    attention backends' `forward*` and `init_forward_metadata*`, any `forward*` or `__call__` of an `nn.Module`
    (SGLang's layers and models), the model runner's and graph runners' `forward*`, `replay*`, `capture*`, and
    any function of SGLang's `layers` or `models` packages."""
    import torch
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import KVCache

    owner_name, attr = target.rsplit(".", 1)
    owner = pkgutil.resolve_name(owner_name)
    if not isinstance(owner, type):
        if owner_name.startswith(("sglang.srt.layers", "sglang.srt.models")):
            return "a function of SGLang's layers or models"
        return None
    if issubclass(owner, KVCache) and (attr.startswith("set_") or "buffer" in attr):
        return "the KV pool's read/write path"
    if issubclass(owner, RadixAttention):
        return "RadixAttention"
    if issubclass(owner, AttentionBackend) and attr.startswith(("forward", "init_forward_metadata")):
        return "an attention backend's forward"
    if issubclass(owner, torch.nn.Module) and (attr.startswith("forward") or attr == "__call__"):
        return "an nn.Module's forward"
    if owner.__module__.startswith("sglang.srt.model_executor") and attr.startswith(("forward", "replay", "capture")):
        return "the model runner's or a graph runner's forward"
    return None


def registered_targets() -> list[str]:
    """The targets sglang-ft's plugin registers in SGLang's HookRegistry (its `load()` run on an empty registry)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_ft import plugin

    saved = {target: list(hooks) for target, hooks in HookRegistry._hooks.items()}
    HookRegistry._hooks.clear()
    try:
        plugin.load()
        return [t for t, hooks in HookRegistry._hooks.items() if any(h.__module__.startswith("sglang_ft")
                                                                       for _, h, _ in hooks)]
    finally:
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(saved)


def test_no_hook_runs_inside_the_forward_pass():
    """The GPU contract: under CUDA graph capture Python in the forward cannot copy to the host, and a replay runs
    no Python at all; so no sglang-ft hook may sit on the forward path (the KV backup copies after the step)."""
    targets = registered_targets()
    assert len(targets) == len({t for t, _, _ in HOOKS}) > 20  # the registry holds what hooks.py lists
    inside = {t: why for t in targets if (why := _inside_forward(t)) is not None}
    assert not inside, f"hooks inside the forward pass: {inside}"


@pytest.mark.parametrize("target", ["sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.set_kv_buffer",
                                    "sglang.srt.layers.radix_attention.RadixAttention.forward",
                                    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
                                    ".forward_decode",
                                    "sglang.srt.model_executor.model_runner.ModelRunner.forward",
                                    "sglang.srt.models.llama.LlamaAttention.forward"])
def test_targets_inside_the_forward_pass_are_recognised(target):
    """The check above is not vacuous: the KV backup's old hook (`set_kv_buffer`) and its kin are caught."""
    assert _inside_forward(target) is not None
