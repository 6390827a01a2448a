"""Which model class SGLang builds: under `--ft` the elastic model for every Llama-family checkpoint, without
SGLang's model registry (resolving through it imports every SGLang model module first, about 4 s of CPU in each
scheduler); without `--ft`, SGLang's own class through its registry. Each mode in a fresh interpreter of its own
(both at once), so what was imported is its own."""

from __future__ import annotations

import json
import sys

import pytest

from tests.early import Background, taken

RESOLVE = """
import json, sys
from sglang.srt.plugins import load_plugins
from sglang_ft.server_args import FtArgs, publish
publish(FtArgs(enabled=sys.argv[1] == "ft"))
load_plugins()
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.utils import get_model_architecture, get_resolved_model_impl
for path in sys.argv[2:]:
    config = ModelConfig(path)
    model_class, arch = get_model_architecture(config)
    print(json.dumps([model_class.__name__, arch, "sglang.srt.models.registry" in sys.modules,
                      get_resolved_model_impl(config).value]))
"""


def start_early(request) -> dict[str, Background]:
    """Both interpreters, started with the test session (tests/early.py)."""
    models = [request.getfixturevalue("tiny_model"), request.getfixturevalue("tiny_moe_model")]
    return {mode: Background([sys.executable, "-W", "ignore", "-c", RESOLVE, mode, *models])
            for mode in ("ft", "plain")}


@pytest.fixture(scope="module")
def resolved(request) -> dict[str, list]:
    """mode -> one [class, architecture, registry imported, implementation] per model (the dense, then the MoE)."""
    results = {}
    for mode, job in taken(request, start_early).items():
        done = job.result()
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = [json.loads(line) for line in done.stdout.strip().splitlines()[-2:]]
    return results


def test_ft_builds_the_elastic_model_without_sglangs_registry(resolved):
    assert resolved["ft"] == [["ElasticLlamaForCausalLM", "LlamaForCausalLM", False, "sglang"],
                              ["ElasticLlamaForCausalLM", "MixtralForCausalLM", False, "sglang"]]


def test_without_ft_sglang_resolves_its_own_class_through_its_registry(resolved):
    assert resolved["plain"] == [["LlamaForCausalLM", "LlamaForCausalLM", True, "sglang"],
                                 ["MixtralForCausalLM", "MixtralForCausalLM", True, "sglang"]]
