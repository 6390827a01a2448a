"""Without `--ft`: unmodified SGLang, through the torch_cpu platform plugin, equals transformers at TP 2
(several ranks over gloo; TP 1 plain is the same path with one rank, and `--ft` covers TP 1-4)."""

import pytest
from tests.client import generate_concurrently
from tests.conftest import MAX_NEW_TOKENS, PROMPTS

pytestmark = pytest.mark.server


@pytest.mark.parametrize("tp", [2])
def test_greedy_equals_transformers(servers, tiny_model, hf_outputs, tp):
    server = servers.get(tiny_model, tp, False)
    outputs = generate_concurrently(server.url, PROMPTS, MAX_NEW_TOKENS)
    assert [o["output_ids"] for o in outputs] == hf_outputs(tiny_model)
    assert "sglang-ft: TP rank" not in server.log_text()  # the elastic model is not in play without --ft
