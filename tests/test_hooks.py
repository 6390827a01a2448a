"""The plugin's surface on SGLang: every hook target exists in the pinned SGLang (`--help` is in test_cli_errors)."""

import pkgutil
from importlib.metadata import entry_points, version

import pytest
from sglang_ft.hooks import HOOKS


def test_sglang_is_the_pinned_version():
    assert version("sglang") == "0.5.23"


@pytest.mark.parametrize("target", sorted({t for t, _, _ in HOOKS}))
def test_every_hook_target_resolves(target):
    owner, attr = target.rsplit(".", 1)
    assert hasattr(pkgutil.resolve_name(owner), attr), f"{target} is gone from this SGLang"


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

    from sglang_ft import hooks
    from sglang_ft.entrypoints import worker_spawner

    monkeypatch.setattr(hooks, "ft_enabled", lambda: True)
    monkeypatch.setattr(worker_spawner, "_RESTARTED", {1: _Process(restarted_alive)})
    watchdog = SimpleNamespace(_processes=[_Process(False), _Process(False), _Process(True)],
                               _names=["scheduler_0", "scheduler_1", "detokenizer"])
    seen = []
    hooks.around_watchdog_check(lambda w: seen.extend(w._names), watchdog)
    assert seen == checked
    assert watchdog._names == ["scheduler_0", "scheduler_1", "detokenizer"]  # restored after the check
