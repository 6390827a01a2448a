"""Hybrid attention (`--ft-attention hybrid`) on a real server: 4 KV heads at TP 4, a SIGKILL mid-decode, then 1
head per worker by TP plus 1 remainder head per request on its owner (prefix_load routing), then a second kill
down to TP 2 (even again). Every output equals transformers; no KV is recomputed at either failure."""

import threading
import time

import pytest
import requests
from tests.client import assert_kv_came_from_the_store, generate, generate_concurrently, run_with_fault, wait_for
from tests.conftest import MAX_NEW_TOKENS, PROMPTS

pytestmark = pytest.mark.server

SYSTEM = "You are a patient assistant who explains how a radix cache shares prompt prefixes. "


@pytest.fixture
def server(servers, tiny_model):
    return servers.get(tiny_model, 4, True, "--ft-attention", "hybrid", "--ft-enable-fault-injection")


@pytest.fixture(scope="module")
def shared_outputs(tiny_model):
    from sglang_ft.tools.hf_reference import greedy_token_ids

    return greedy_token_ids(tiny_model, [SYSTEM + p for p in PROMPTS], MAX_NEW_TOKENS)


def status(url):
    return requests.get(f"{url}/ft/status", timeout=30).json()


KV_FIELDS = ("kv_tokens_used", "kv_tokens_free", "remainder_kv_tokens_used")
HEARTBEAT_INTERVAL_S = 0.2  # the default: each worker's KV use reaches /ft/status with its heartbeats


def workers(url):
    """The serving workers' status by rank, as their latest heartbeats reported it."""
    return sorted((w for w in status(url)["workers"] if w.get("rank") is not None), key=lambda w: w["rank"])


def settled_workers(url, timeout_s: float = 10.0):
    """`workers` once their KV use has settled, for checks after a load: each worker reports it with its
    heartbeats, so a reading right after the last response can hold one worker's from a few steps earlier (its
    last beat came before them; a clean run read workers 28 rows apart that way). Two readings a beat and a half
    apart must agree."""
    def kv(found):
        return [tuple(w.get(field) for field in KV_FIELDS) for w in found]

    last, deadline = workers(url), time.monotonic() + timeout_s
    while True:
        time.sleep(1.5 * HEARTBEAT_INTERVAL_S)
        now = workers(url)
        if kv(now) == kv(last):
            return now
        assert time.monotonic() < deadline, f"the workers' KV use did not settle: {kv(last)} then {kv(now)}"
        last = now


def kill_and_wait(url, rank, tp_after, prompts):
    fault = lambda: requests.post(f"{url}/ft/inject_fault", json={"rank": rank, "kind": "kill"},  # noqa: E731
                                  timeout=30).raise_for_status()
    outputs = run_with_fault(url, fault, prompts, MAX_NEW_TOKENS)
    wait_for(lambda: (s := status(url))["tp_size"] == tp_after and s["regrouping"] is None, 120,
             f"the regroup to TP {tp_after}")
    return outputs, status(url)["recoveries"][-1]


def fail_into_a_remainder_layout(server, expected) -> list[dict]:
    """SIGKILL rank 1 of 4 (4 KV heads) mid-decode: the survivors run 1 head each by TP and head 3 as the remainder;
    the requests in flight finish equal to `expected`, no KV recomputed. The workers' status after."""
    assert [w["remainder_kv_heads"] for w in workers(server.url)] == [0, 0, 0, 0]
    outputs, recovery = kill_and_wait(server.url, 1, 3, PROMPTS)
    assert [o["output_ids"] for o in outputs] == expected
    assert_kv_came_from_the_store(recovery, len(PROMPTS))
    after = settled_workers(server.url)
    assert [w["kv_heads"] for w in after] == [1, 1, 1] and [w["remainder_kv_heads"] for w in after] == [1, 1, 1]
    assert "remainder heads' rows of" in server.log_text()
    return after


def test_a_failure_regroups_into_hybrid_attention_with_every_kv_row_kept(server, tiny_model, hf_outputs):
    """4 heads over 3 survivors: 1 each by TP, head 3 the remainder; the cached slots' remainder rows are spread
    over the workers from the backup store, and the requests in flight finish equal to transformers."""
    after = fail_into_a_remainder_layout(server, hf_outputs(tiny_model))
    rows = [w["remainder_kv_tokens_used"] for w in after]
    # spread over the owners, not on one worker: every worker holds some, none most (a resumed request's rows stay
    # whole on one owner, so requests of unequal lengths can leave one owner twice another: 64, 119, 56 in a run)
    assert 0 < min(rows) and max(rows) < sum(rows) / 2


def test_hybrid_outputs_equal_transformers_computed_from_scratch(server, tiny_model, hf_outputs):
    assert requests.post(f"{server.url}/flush_cache", timeout=30).status_code == 200
    outputs = generate_concurrently(server.url, PROMPTS, MAX_NEW_TOKENS)
    assert [o["output_ids"] for o in outputs] == hf_outputs(tiny_model)
    used = [w["remainder_kv_tokens_used"] for w in settled_workers(server.url)]
    assert sum(1 for u in used if u > 0) >= 2  # the requests' remainder heads ran on more than one worker


def test_prefix_load_sends_a_request_where_its_prefix_is_cached(server, shared_outputs):
    requests.post(f"{server.url}/flush_cache", timeout=30).raise_for_status()
    prompts = [SYSTEM + p for p in PROMPTS]
    first = generate(server.url, prompts[0], MAX_NEW_TOKENS)
    copied = [w["remainder_rows_copied"] for w in settled_workers(server.url)]
    rest = [generate(server.url, p, MAX_NEW_TOKENS) for p in prompts[1:]]
    assert [o["output_ids"] for o in [first] + rest] == shared_outputs
    assert all(o["meta_info"]["cached_tokens"] >= 16 for o in rest)  # the shared system prompt
    assert [w["remainder_rows_copied"] for w in settled_workers(server.url)] == copied  # served where it was cached


def test_a_flood_of_one_prefix_spreads_past_the_load_threshold_and_still_reuses_it(server, shared_outputs):
    """Twelve requests on one cached prefix at once: its holder takes them until it is overloaded (SGLang's
    cache-aware rule), the others go to less loaded workers, which receive the prefix's remainder rows instead of
    recomputing it."""
    prompts = [SYSTEM + p for p in PROMPTS] * 2
    owners_seen = set()
    done = threading.Event()

    def sample():
        while not done.is_set():
            owners_seen.update(w["rank"] for w in workers(server.url) if w["remainder_requests"] > 0)
            done.wait(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outputs = generate_concurrently(server.url, prompts, MAX_NEW_TOKENS * 2)
    finally:
        done.set()
        sampler.join()
    assert [o["output_ids"][:MAX_NEW_TOKENS] for o in outputs] == shared_outputs * 2
    assert all(o["meta_info"]["cached_tokens"] >= 16 for o in outputs)
    assert len(owners_seen) >= 2
    assert sum(w["remainder_rows_copied"] for w in settled_workers(server.url)) > 0


def test_a_second_failure_leaves_hybrid_attention_with_the_remainder_rows_from_the_backup(servers, server,
                                                                                          tiny_model, hf_outputs):
    """TP 3 -> TP 2: 4 heads divide evenly again; the remainder head's rows, written by their owners, come back
    from the backup store."""
    leave_the_remainder_layout(servers, server, hf_outputs(tiny_model))


def leave_the_remainder_layout(servers, server, expected) -> None:
    """SIGKILL rank 0 of 3: 4 heads over 2 divide evenly again, the remainder rows come back from the backup store
    as TP heads' KV; outputs equal `expected`, nothing recomputed. The server is closed after (it ends at TP 2)."""
    try:
        outputs, recovery = kill_and_wait(server.url, 0, 2, PROMPTS)
        assert [o["output_ids"] for o in outputs] == expected
        assert_kv_came_from_the_store(recovery, len(PROMPTS))
        after = workers(server.url)
        assert [w["kv_heads"] for w in after] == [2, 2] and [w["remainder_kv_heads"] for w in after] == [0, 0]
    finally:
        servers.close()  # this server ends at TP 2: no other test may reuse it
