"""`--ft --dp-size 2 --tp-size 2` on a real server (a Mistral config): two TP groups of two, each with its own FT
controller and backup store, requests routed between them by sglang-ft (prefix- and load-aware, through SGLang's
own `routed_dp_rank`). Killing both workers of one replica mid-decode loses no request: the journal moves its
unfinished ones to the other replica, each going on from the tokens its client already has, and every output
equals transformers."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import requests
from client import GREEDY, assert_ranks_read_only_their_slices, generate, generate_concurrently, wait_for
from conftest import PROMPTS

pytestmark = pytest.mark.server
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def server(servers, tiny_mistral):
    from sglang_ft.tools.server_process import ServerProcess

    servers.close()  # its replica is lost by the last test: never shared with the pool
    process = ServerProcess(tiny_mistral, tp_size=2, ft=True,
                            extra_args=["--dp-size", "2", "--ft-enable-fault-injection"]).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def expected(tiny_mistral):
    from sglang_ft.tools.hf_reference import greedy_token_ids

    return greedy_token_ids(tiny_mistral, PROMPTS, NEW_TOKENS)


def status(url: str) -> dict:
    response = requests.get(f"{url}/ft/status", timeout=30)
    response.raise_for_status()
    return response.json()


def test_both_replicas_serve_and_outputs_equal_transformers(server, expected):
    outputs = generate_concurrently(server.url, PROMPTS, NEW_TOKENS)
    assert [o["output_ids"] for o in outputs] == expected
    assert {o["meta_info"]["dp_rank"] for o in outputs} == {0, 1}
    assert "sglang-ft: TP rank" in server.log_text()  # served by the elastic model
    assert_ranks_read_only_their_slices(server.log_text(), 2)
    state = status(server.url)
    assert state["dp_size"] == 2 and [r["tp_size"] for r in state["replicas"]] == [2, 2]
    assert all(r["serving"] for r in state["replicas"]) and state["routing"]["lost"] == []


def test_requests_sharing_a_prefix_go_where_it_is_cached(server):
    system = "You are a careful assistant who answers about rivers, forests and mountain cities. " * 2
    first = generate(server.url, system + "one", 4)
    later = [generate(server.url, system + tail, 4) for tail in ("two", "three", "four")]
    assert {o["meta_info"]["dp_rank"] for o in later} == {first["meta_info"]["dp_rank"]}
    assert all(o["meta_info"]["cached_tokens"] >= 16 for o in later)


def test_inject_fault_names_an_existing_replica(server):
    response = requests.post(f"{server.url}/ft/inject_fault", json={"rank": 0, "dp_rank": 2, "kind": "kill"},
                             timeout=30)
    assert response.status_code == 400 and "dp_rank 2" in response.json()["error"]


def test_killing_both_workers_of_a_replica_loses_no_request(server, expected):
    """Both workers of replica 1 SIGKILLed once a request streamed from it has 8 tokens; the other requests are
    in flight on both replicas. Every request completes equal to transformers (the streamed one with each token
    once), replica 1's unfinished requests moved to replica 0, and replica 0 serves what comes next."""
    pids = [w["pid"] for w in status(server.url)["replicas"][1]["workers"]]
    streamed: dict = {}
    decoding = threading.Event()

    def stream_from_replica_1():
        body = {"text": PROMPTS[0], "sampling_params": {**GREEDY, "max_new_tokens": NEW_TOKENS}, "stream": True,
                "routed_dp_rank": 1}
        with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith(b"data:") and line != b"data: [DONE]":
                    streamed.update(json.loads(line[5:]))
                    if len(streamed.get("output_ids", [])) >= 8:
                        decoding.set()
        decoding.set()

    stream = threading.Thread(target=stream_from_replica_1)
    stream.start()
    others: list = []
    rest = threading.Thread(target=lambda: others.extend(generate_concurrently(server.url, PROMPTS[1:], NEW_TOKENS)))
    rest.start()
    assert decoding.wait(timeout=300), "the streamed request never started decoding"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stream.join(timeout=600)
    rest.join(timeout=600)
    assert streamed["output_ids"] == expected[0]
    assert [o["output_ids"] for o in others] == expected[1:]
    routing = status(server.url)["routing"]
    assert routing["lost"] == [1] and routing["moved_requests"] >= 1
    assert routing["moved_tokens_recomputed"] > 0  # their KV is prefilled again, not taken from the backup store
    state = status(server.url)
    assert not state["replicas"][1]["serving"] and state["replicas"][0]["serving"]
    assert "moved here from a lost replica, going on after its" in server.log_text()
    after = generate_concurrently(server.url, PROMPTS, NEW_TOKENS)
    assert [o["output_ids"] for o in after] == expected
    assert {o["meta_info"]["dp_rank"] for o in after} == {0}
    wait_for(lambda: requests.get(f"{server.url}/health_generate", timeout=30).status_code == 200, 60,
             "the server healthy after losing a replica")
