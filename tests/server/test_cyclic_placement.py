"""Cyclic KV placement (`--ft-kv-placement cyclic`) on a real server: 4 KV heads at TP 4, a SIGKILL mid-decode,
then 1 head per worker by TP plus the remainder head's KV rotating over all three workers token by token, its
attention merged across them; then a second kill down to TP 2 (even again). Every output equals transformers, no
KV is recomputed, and the workers' KV bytes stay within one block of each other (the contiguous layout's widest
worker holds twice the others': test_serving_ft.py's TP 3 status test, 2+1+1 heads), each remainder pool allocated
for its share of the slots."""

import re

import pytest
import requests
from tests.client import generate, generate_concurrently
from tests.conftest import MAX_NEW_TOKENS, PROMPTS
from tests.server.test_hybrid_attention import (SYSTEM, fail_into_a_remainder_layout, leave_the_remainder_layout,
                                                settled_workers, status, workers)

from ft.kv_backup import BLOCK_TOKENS

pytestmark = pytest.mark.server


@pytest.fixture
def server(servers, tiny_model):
    return servers.get(tiny_model, 4, True, "--ft-kv-placement", "cyclic", "--ft-enable-fault-injection")


@pytest.fixture(scope="module")
def mixed_outputs(tiny_model):
    """A mixed workload: prompts with and without a shared system prompt, short and long generations."""
    from sglang_ft.tools.hf_reference import greedy_token_ids

    prompts = PROMPTS + [SYSTEM + p for p in PROMPTS]
    return prompts, greedy_token_ids(tiny_model, prompts, 3 * MAX_NEW_TOKENS)


def kv_bytes(worker) -> int:
    return worker["kv_tokens_used"] * worker["kv_bytes_per_token"] + \
        worker["remainder_kv_tokens_used"] * worker["remainder_kv_bytes_per_token"]


def within_one_block(after) -> bool:
    """Every worker's KV bytes (its TP heads' slots and its remainder rows) within one block of the others'."""
    block = BLOCK_TOKENS * after[0]["remainder_kv_bytes_per_token"]
    return max(map(kv_bytes, after)) - min(map(kv_bytes, after)) <= block


def test_a_failure_regroups_into_cyclic_placement_with_every_kv_row_kept(server, tiny_model, hf_outputs):
    after = fail_into_a_remainder_layout(server, hf_outputs(tiny_model))
    assert "cyclic KV placement" in server.log_text()
    dealt = [int(n) for n in re.findall(r"restore_kv done .*remainder heads' rows of (\d+) slots", server.log_text())]
    assert len(dealt) >= 3 and max(dealt[-3:]) - min(dealt[-3:]) <= 1, dealt  # the cached rows dealt in turn
    # then each request in flight goes on rotating from where its rows stopped: its own rows end at most one apart
    # over the workers, so the group at most one per request more
    rows = [w["remainder_kv_tokens_used"] for w in after]
    assert min(rows) > 0 and max(rows) - min(rows) <= 1 + len(PROMPTS), rows
    assert within_one_block(after)
    slots = after[0]["kv_tokens_used"] + after[0]["kv_tokens_free"]  # each pool sized for a third and 1/8 more
    assert all(slots <= 3 * w["remainder_kv_tokens_capacity"] < 3 * slots * 0.38 for w in after)


def test_a_mixed_workload_equals_transformers_and_every_worker_holds_the_same_kv_within_a_block(server,
                                                                                                mixed_outputs):
    requests.post(f"{server.url}/flush_cache", timeout=30).raise_for_status()
    epoch = status(server.url)["epoch"]
    prompts, expected = mixed_outputs
    lengths = [MAX_NEW_TOKENS * (1 + i % 3) for i in range(len(prompts))]
    outputs = generate_concurrently(server.url, prompts, lengths)
    assert [o["output_ids"] for o in outputs] == [e[:n] for e, n in zip(expected, lengths)]
    after = settled_workers(server.url)
    assert all(w["remainder_kv_tokens_used"] > 0 for w in after)
    assert within_one_block(after), [kv_bytes(w) for w in after]
    assert sum(w["remainder_rows_copied"] for w in after) == 0  # nothing copied: attention runs where rows are
    assert status(server.url)["epoch"] == epoch  # served by the same group throughout


def test_a_cached_prefix_is_used_wherever_its_rows_are(server, mixed_outputs):
    requests.post(f"{server.url}/flush_cache", timeout=30).raise_for_status()
    epoch = status(server.url)["epoch"]
    prompts, expected = mixed_outputs
    shared = [i for i, p in enumerate(prompts) if p.startswith(SYSTEM)][:3]
    outputs = [generate(server.url, prompts[i], MAX_NEW_TOKENS) for i in shared]
    assert [o["output_ids"] for o in outputs] == [expected[i][:MAX_NEW_TOKENS] for i in shared]
    assert all(o["meta_info"]["cached_tokens"] >= 16 for o in outputs[1:])
    assert status(server.url)["epoch"] == epoch  # one request at a time: a decode batch smaller than the group


def test_a_second_failure_leaves_cyclic_placement_with_the_remainder_rows_from_the_backup(servers, server,
                                                                                         tiny_model, hf_outputs):
    leave_the_remainder_layout(servers, server, hf_outputs(tiny_model))
