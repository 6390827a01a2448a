"""Shared fixtures: tiny models made once per session, real SGLang servers shared per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sglang_ft.tools import make_tiny_model

PROMPTS = [
    "The model server",
    "Heartbeat epoch recover restart reload weights bytes memory batch decode prefill latency",
    "one",
    "Tell me a story about a quiet river and a bright city in the mountain forest",
    "rank tensor parallel group heads cache prefix radix failure",
    "Seven blue",
]
MAX_NEW_TOKENS = 24


def kind(item) -> str:
    """"server" for a test under tests/server/ (it launches SGLang), else "unit"."""
    return "server" if item.module.__name__.startswith("tests.server.") else "unit"


def pytest_collection_modifyitems(config, items):
    """The unit tests first (those whose subprocesses start early, `tests/early.py`, last among them), then the
    server tests. GPU tests are skipped where no CUDA device exists; every CPU path runs."""
    import torch

    items.sort(key=lambda item: (kind(item) == "server", hasattr(item.module, "start_early")))  # stable
    if any(kind(item) == "server" for item in items):
        _start_the_launcher_fork_server()  # its imports run beside the unit tests
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _unit_test(request):
    """Around each unit test: its changes to the environment undone. At the first one: start the slow subprocesses
    of the modules that ask for it (`tests/early.py`), to run beside the unit tests before them (not beside the
    server tests, whose timing they would disturb: tried with the unit tests on a second pytest-xdist worker, at a
    lower priority, the server tests took longer and a chaos soak's workers missed heartbeats)."""
    if kind(request.node) != "unit":
        yield
        return
    from tests import early

    early.start_once(request)
    environment = dict(os.environ)
    yield
    # what a unit test set in this process's environment (the platform's thread binding, published --ft arguments)
    # must not reach the servers the server tests launch after it
    os.environ.clear()
    os.environ.update(environment)


def _make(tmp_path_factory, name: str, *flags: str) -> str:
    out = tmp_path_factory.mktemp(name)
    make_tiny_model.main([str(out), *flags])
    return str(out)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """8 attention heads, 4 KV heads (the default tiny model)."""
    return _make(tmp_path_factory, "tiny-8h")


@pytest.fixture(scope="session")
def tiny_qwen2_moe_12h(tmp_path_factory) -> str:
    """A Qwen2-MoE config (q/k/v biases, 4 routed experts of 160 columns, top 2, a gated shared expert twice as
    wide) with 12 attention heads, 4 KV heads."""
    return _make(tmp_path_factory, "tiny-qwen2-moe-12h", "--moe", "--architecture", "qwen2", "--hidden-size", "96",
                 "--num-attention-heads", "12", "--seed", "4")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> str:
    """A Mistral config: 8 attention heads, 4 KV heads."""
    return _make(tmp_path_factory, "tiny-mistral", "--architecture", "mistral", "--seed", "2")


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory) -> str:
    """A Mixtral-style mixture of experts: 8 heads, 4 KV heads, 4 experts of 160 columns, top 2."""
    return _make(tmp_path_factory, "tiny-mixtral", "--moe", "--seed", "3")


@pytest.fixture(scope="session")
def hf_outputs():
    """transformers greedy outputs, computed once per model."""
    from sglang_ft.tools.hf_reference import greedy_token_ids

    cache: dict[str, list[list[int]]] = {}

    def get(model_path: str) -> list[list[int]]:
        if model_path not in cache:
            cache[model_path] = greedy_token_ids(model_path, PROMPTS, MAX_NEW_TOKENS)
        return cache[model_path]

    return get


_LAUNCHER_FORK_SERVER = []


def _start_the_launcher_fork_server():
    from tests.launcher_fork_server import LauncherForkServer

    if not _LAUNCHER_FORK_SERVER:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"sglang-ft-launcher-fork-server-{os.getpid()}.log"
        _LAUNCHER_FORK_SERVER.append(LauncherForkServer(log))
    return _LAUNCHER_FORK_SERVER[0]


class ServerPool:
    """One live SGLang server at a time, reused by consecutive tests that ask for the same configuration; and the
    launcher of every server test's server but those about the real command (`tests/launcher_fork_server.py`)."""

    def __init__(self):
        self.key = None
        self.server = None

    def process(self, model_path: str, **kwargs):
        """A `ServerProcess` (not started) launched through the fork server that imported SGLang's launcher."""
        from sglang_ft.tools.server_process import ServerProcess

        return ServerProcess(model_path, launcher=_start_the_launcher_fork_server(), **kwargs)

    def get(self, model_path: str, tp_size: int, ft: bool, *extra: str):
        key = (model_path, tp_size, ft, extra)
        if key != self.key:
            self.close()
            self.server = self.process(model_path, tp_size=tp_size, ft=ft, extra_args=list(extra)).start()
            self.key = key
        return self.server

    def close(self):
        if self.server is not None:
            self.server.stop()
        self.key = self.server = None


@pytest.fixture(scope="session")
def servers():
    pool = ServerPool()
    yield pool
    pool.close()
    if _LAUNCHER_FORK_SERVER:
        _LAUNCHER_FORK_SERVER.pop().close()


@pytest.fixture(autouse=True, scope="session")
def _quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
