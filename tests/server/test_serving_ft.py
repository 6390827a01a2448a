"""With `--ft` at TP 3, where widths are unequal: a Qwen2-MoE config (q/k/v biases, 12 query heads, 4 KV heads:
6+3+3 and 2+1+1, the experts' 160 columns 54+53+53, a gated shared expert) equals transformers and each rank reads
only its slices of the checkpoint; SGLang's features then work on that same server (radix cache, per-worker status,
streaming, the OpenAI API); last, on it still, two SIGKILLs take it to TP 2 and TP 1, equal to transformers at each
width.

Servers are expensive (about a minute each here), so this module has one, launched with fault injection for the
last test (the Qwen2 attention and the Qwen2-MoE ladder once had a server each). Other widths and models are
compared with transformers elsewhere (see MATRIX).
"""

import json

import pytest
import requests
from tests.client import (GREEDY, assert_ranks_read_only_their_slices, generate, generate_concurrently, wait_for,
                          worker_start_methods)
from tests.conftest import MAX_NEW_TOKENS, PROMPTS

pytestmark = pytest.mark.server

# An unequal split at TP 3 for a Qwen2-MoE config of 12 heads and 4 KV heads (q/k/v biases), whose server the
# feature tests then reuse. A Mistral config is compared with transformers at TP 2 (and TP 1 after a failure) on
# test_ft_endpoints's data-parallel server, the default Llama at TP 4 by the failover, ecosystem and demo tests, at
# TP 3 by the failover tests (contiguous) and test_hybrid_attention (hybrid), at TP 2 after the hybrid and cyclic
# tests' second failures, the MoE down to TP 1 by the last failover test.
MATRIX = [("qwen2-moe-12h", 3)]
TP3_FLAGS = ("--ft-enable-fault-injection",)  # for the last test's SIGKILLs


@pytest.fixture
def models(tiny_model, tiny_qwen2_moe_12h):
    return {"8h": tiny_model, "qwen2-moe-12h": tiny_qwen2_moe_12h}


@pytest.mark.parametrize("model, tp", MATRIX, ids=[f"{m}-tp{t}" for m, t in MATRIX])
def test_greedy_equals_transformers_and_ranks_read_only_their_slices(servers, models, hf_outputs, model, tp):
    server = servers.get(models[model], tp, True, *TP3_FLAGS)
    assert "sglang-ft: TP rank" in server.log_text()  # served by the elastic model
    outputs = generate_concurrently(server.url, PROMPTS, MAX_NEW_TOKENS)
    assert [o["output_ids"] for o in outputs] == hf_outputs(models[model])

    assert_ranks_read_only_their_slices(server.log_text(), tp)


@pytest.fixture
def tp3(servers, tiny_qwen2_moe_12h):
    return servers.get(tiny_qwen2_moe_12h, 3, True, *TP3_FLAGS)


def test_on_cpu_the_launcher_forks_its_workers(tp3):
    """The torch_cpu platform's children are forks of the launcher, which has imported SGLang already (a spawned
    child imports it again; test_reliability's server is launched that way, as GPU servers are)."""
    assert worker_start_methods(tp3) == ["fork"] * 3


def test_radix_prefix_cache_hits_and_keeps_output(tp3):
    prompt = " ".join(PROMPTS)
    first = generate(tp3.url, prompt, 8)
    second = generate(tp3.url, prompt, 8)
    assert second["meta_info"]["cached_tokens"] > 0
    assert second["output_ids"] == first["output_ids"]


def test_status_shows_each_workers_unequal_share_and_its_load(tp3):
    """4 KV heads over 3 workers: 2 + 1 + 1, so the same cached tokens cost rank 0 twice the KV bytes (the
    imbalance `--ft-attention hybrid` removes: test_hybrid_attention)."""
    import threading

    def workers():
        return requests.get(f"{tp3.url}/ft/status", timeout=30).json()["workers"]

    running = threading.Thread(target=generate, args=(tp3.url, "a long request " * 8, 200))
    running.start()
    # (each worker's load is its own heartbeat's snapshot: wait for one where all of them caught it mid-decode)
    wait_for(lambda: (w := workers()) and all(x.get("running_requests") == 1 and 0 < x["outstanding_tokens"] < 200
                                              for x in w), what="every worker to report the request decoding")
    running.join()
    settled = wait_for(lambda: (w := workers()) and all(x["running_requests"] == 0 for x in w) and w,
                       what="every worker to report it finished")
    assert [x["kv_heads"] for x in settled] == [2, 1, 1] and [x["q_heads"] for x in settled] == [6, 3, 3]
    assert [x["remainder_kv_heads"] for x in settled] == [0, 0, 0]
    used = {x["kv_tokens_used"] for x in settled}
    assert len(used) == 1 and used.pop() > 0  # the same tokens (the radix cache keeps them) on every worker
    assert len({x["kv_tokens_used"] + x["kv_tokens_free"] for x in settled}) == 1
    per_token = [x["kv_bytes_per_token"] for x in settled]
    assert per_token[0] == 2 * per_token[1] == 2 * per_token[2]
    assert [x["kv_bytes_used"] for x in settled] == [x["kv_tokens_used"] * p for x, p in zip(settled, per_token)]
    assert all(x["last_step_ms"] > 0 and x["outstanding_tokens"] == 0 for x in settled)
    assert all(0 < x["last_step_collective_ms"] < x["last_step_ms"] for x in settled)  # gloo: blocking, timed


def test_streaming_yields_the_same_tokens(tp3, hf_outputs, tiny_qwen2_moe_12h):
    body = {"text": PROMPTS[0], "sampling_params": {**GREEDY, "max_new_tokens": MAX_NEW_TOKENS}, "stream": True}
    chunks = []
    with requests.post(f"{tp3.url}/generate", json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                chunks.append(json.loads(line[5:]))
    assert len(chunks) > 1
    ids = [c["output_ids"] for c in chunks]  # each chunk carries every token so far
    assert all(later[: len(earlier)] == earlier and len(later) > len(earlier) for earlier, later in zip(ids, ids[1:]))
    assert ids[-1] == hf_outputs(tiny_qwen2_moe_12h)[0]


def test_openai_completions_and_chat(tp3):
    from openai import OpenAI

    client = OpenAI(base_url=f"{tp3.url}/v1", api_key="none")
    model = client.models.list().data[0].id
    native = generate(tp3.url, PROMPTS[3], 12)
    completion = client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.choices[0].text == native["text"]
    assert completion.usage.completion_tokens == 12

    messages = [{"role": "user", "content": "Tell me about the radix cache"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == chat.choices[0].message.content


def test_qwen2_moe_with_a_shared_expert_equals_transformers_from_tp3_down_to_tp1(servers, tp3, tiny_qwen2_moe_12h,
                                                                                 hf_outputs):
    """Last on the module's server: the Qwen2-MoE model (q/k/v biases, 4 routed experts, a gated shared expert twice
    as wide) launched at TP 3 with unequal widths (the experts' 160 columns as 54+53+53, 4 KV heads as 2+1+1), then
    at TP 2 and 1 after SIGKILLs, its experts' columns regrouped each time. The radix cache is flushed at each width
    so every prompt is computed at that width."""
    server, model = tp3, tiny_qwen2_moe_12h
    status = lambda: requests.get(f"{server.url}/ft/status", timeout=30).json()  # noqa: E731
    try:
        for tp in (3, 2, 1):
            assert status()["tp_size"] == tp
            assert requests.post(f"{server.url}/flush_cache", timeout=30).status_code == 200
            outputs = generate_concurrently(server.url, PROMPTS, MAX_NEW_TOKENS)
            assert [o["output_ids"] for o in outputs] == hf_outputs(model), f"at TP {tp}"
            if tp > 1:  # a middle rank where there is one, so the survivors' spans shift both ways
                fault = {"rank": min(1, tp - 1), "kind": "kill"}
                assert requests.post(f"{server.url}/ft/inject_fault", json=fault, timeout=30).status_code == 200
                wait_for(lambda: (s := status())["tp_size"] == tp - 1 and s["regrouping"] is None, 120,
                         f"the regroup to TP {tp - 1}")
        recoveries = status()["recoveries"]
        assert len(recoveries) == 2 and all(r["expert_bytes_moved"] > 0 for r in recoveries)
    finally:
        servers.close()  # this server ends at TP 1: no other test may reuse it
