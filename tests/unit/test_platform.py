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
