"""Which model class SGLang builds: under `--ft` the elastic model for every Llama-family checkpoint, without
SGLang's model registry (resolving through it imports every SGLang model module first, about 4 s of CPU in each
scheduler); without `--ft`, SGLang's own class through its registry. Each mode in a fresh interpreter of its own
(both at once), so what was imported is its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


@pytest.fixture(scope="module")
def resolved(tiny_model, tiny_moe_model) -> dict[str, list]:
    """mode -> one [class, architecture, registry imported, implementation] per model (the dense, then the MoE)."""
    procs = {mode: subprocess.Popen([sys.executable, "-W", "ignore", "-c", RESOLVE, mode, tiny_model, tiny_moe_model],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("ft", "plain")}
    results = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results[mode] = [json.loads(line) for line in stdout.strip().splitlines()[-2:]]
    return results


def test_ft_builds_the_elastic_model_without_sglangs_registry(resolved):
    assert resolved["ft"] == [["ElasticLlamaForCausalLM", "LlamaForCausalLM", False, "sglang"],
                              ["ElasticLlamaForCausalLM", "MixtralForCausalLM", False, "sglang"]]


def test_without_ft_sglang_resolves_its_own_class_through_its_registry(resolved):
    assert resolved["plain"] == [["LlamaForCausalLM", "LlamaForCausalLM", True, "sglang"],
                                 ["MixtralForCausalLM", "MixtralForCausalLM", True, "sglang"]]
