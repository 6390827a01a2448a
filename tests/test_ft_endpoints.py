"""A real `--ft` server at TP 2 without KV backup: greedy equals transformers, `/ft/status` and `/ft/inject_fault`
(contract, API key), a step torn between the two ranks, and a worker hung mid-decode: detected in time, its lost
heads' KV recomputed."""

import time

import psutil
import pytest
import requests
from client import assert_ranks_read_only_their_slices, generate_concurrently, run_with_fault, wait_for
from conftest import MAX_NEW_TOKENS, PROMPTS

pytestmark = pytest.mark.server
KEY = "test-key"
TIMEOUT_MS = 1500


@pytest.fixture
def server(servers, tiny_model):
    return servers.get(tiny_model, 2, True, "--ft-enable-fault-injection", "--api-key", KEY,
                       "--ft-heartbeat-interval-ms", "100", "--ft-heartbeat-timeout-ms", str(TIMEOUT_MS),
                       "--ft-kv-backup", "off", "--ft-collective-timeout-s", "4")


def _get(server, path, key=KEY):
    return requests.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def _inject(server, body, key=KEY):
    return requests.post(f"{server.url}/ft/inject_fault", json=body,
                         headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def test_greedy_equals_transformers_at_tp2_and_ranks_read_half(server, tiny_model, hf_outputs):
    outputs = generate_concurrently(server.url, PROMPTS, MAX_NEW_TOKENS, api_key=KEY)
    assert [o["output_ids"] for o in outputs] == hf_outputs(tiny_model)
    assert_ranks_read_only_their_slices(server.log_text(), 2)


def test_status_lists_every_worker(server):
    assert _get(server, "/ft/status", key=None).status_code == 401
    status = _get(server, "/ft/status").json()
    assert status["epoch"] == 0 and status["tp_size"] == 2 and status["recoveries"] == []
    assert [w["rank"] for w in status["workers"]] == [0, 1]
    for worker in status["workers"]:
        assert worker["state"] == "healthy"
        assert "scheduler" in " ".join(psutil.Process(worker["pid"]).cmdline())  # a real SGLang TP worker


@pytest.mark.parametrize("body", [{"rank": 9, "kind": "kill"}, {"rank": 0, "kind": "melt"}, {"rank": -1, "kind": "kill"},
                                  {"kind": "kill"}, {"rank": 0, "kind": "kill", "extra": 1}])
def test_bad_fault_requests_get_4xx_and_change_nothing(server, body):
    response = _inject(server, body)
    assert 400 <= response.status_code < 500
    assert all(w["state"] == "healthy" for w in _get(server, "/ft/status").json()["workers"])


def test_fault_injection_needs_the_api_key(server):
    assert _inject(server, {"rank": 1, "kind": "hang"}, key="wrong").status_code == 401


def test_a_step_finished_on_one_rank_and_failed_on_the_other_is_finished_on_both(server, tiny_model, hf_outputs):
    """`fail_step` on rank 1 mid-decode: rank 0 finishes the step (and streams its tokens), rank 1 takes it as
    failed, and the group regroups with both workers. Rank 1 takes the step's tokens from rank 0 (torn_step.py);
    without that the ranks' requests differ by a token and the next batch's collectives mismatch."""
    epoch = _get(server, "/ft/status").json()["epoch"]
    outputs = run_with_fault(server.url, lambda: _inject(server, {"rank": 1, "kind": "fail_step"}).raise_for_status(),
                             PROMPTS, MAX_NEW_TOKENS, api_key=KEY)
    assert [o["output_ids"] for o in outputs] == hf_outputs(tiny_model)
    (recovery,) = wait_for(lambda: _get(server, "/ft/status").json()["recoveries"], what="the recovery")
    assert recovery["epoch"] == epoch + 1 and recovery["cause"] == "collective failure with every worker alive"
    assert _get(server, "/ft/status").json()["tp_size"] == 2
    assert "take its tokens here" in server.log_text()


def test_a_worker_hung_mid_decode_is_declared_dead_in_time_and_its_lost_kv_is_recomputed(server, tiny_model,
                                                                                           hf_outputs):
    """No KV backup here: the survivor recomputes the KV of the heads it takes over, and every output still equals
    transformers."""
    assert _get(server, "/ft/status").json()["kv_backup"] == {"state": "off"}
    seen, detected = [], []

    def hang_and_watch():
        assert _inject(server, {"rank": 1, "kind": "hang"}).json()["injected"] == "hang"
        hung_at = time.monotonic()
        try:
            while time.monotonic() - hung_at < 10:
                state = _get(server, "/ft/status").json()["workers"][1]["state"]
                if not seen or seen[-1] != state:
                    seen.append(state)
                if state == "dead":
                    break
                time.sleep(0.05)
            detected.append(time.monotonic() - hung_at)
        finally:
            _inject(server, {"rank": 1, "kind": "resume"})

    outputs = run_with_fault(server.url, hang_and_watch, PROMPTS, MAX_NEW_TOKENS, api_key=KEY)
    assert [o["output_ids"] for o in outputs] == hf_outputs(tiny_model)
    assert seen[-2:] == ["suspect", "dead"]
    assert detected[0] < TIMEOUT_MS / 1000 + 1.0
    detections = _get(server, "/ft/status").json()["detections"]
    assert [d["worker"] for d in detections if d["cause"] == "heartbeat timeout"] == [1]
    recovery = wait_for(lambda: [r for r in _get(server, "/ft/status").json()["recoveries"]
                                 if "heartbeat timeout" in r["cause"]], what="the recovery")[0]
    assert recovery["kv_tokens_recomputed"] > 0 and recovery["kv_blocks_restored"] == 0
    assert "tokens to recompute" in server.log_text()
