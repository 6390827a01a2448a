"""SGLang's router (sglang-router) in front of an `--ft` server A and a plain SGLang server B (no `--ft`: the
torch_cpu platform alone), both TP 2; deploy/k8s/router.yaml runs it in front of `--ft` servers.

First, B alone: unmodified SGLang through the platform plugin equals `transformers` at TP 2 (several ranks over
gloo), without the elastic model. The router is `python -m sglang_router.launch_router --worker-urls A B`,
unchanged. Its probe endpoints answer, every request through it equals `transformers`' greedy output, both servers
serve a share, and after server A loses a TP worker (kill, regroup TP 2 -> 1) the router keeps sending it requests,
still equal. Last, server B dies whole under load: no non-streaming request is lost (the router retries them on A),
a stream running on B ends short.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

import pytest
import requests
import yaml

from tests.conftest import MAX_NEW_TOKENS, PROMPTS
from tests.client import GREEDY, generate, generate_concurrently, start_together, wait_for
from tests.server.test_ecosystem import kill_worker, wait_for_epoch
from tests.unit.test_k8s import K8S

pytestmark = pytest.mark.server
FT_FLAGS = ["--ft-enable-fault-injection", "--ft-heartbeat-interval-ms", "100", "--ft-heartbeat-timeout-ms", "1500",
            "--ft-collective-timeout-s", "4", "--enable-metrics"]


@pytest.fixture(scope="module")
def backends(servers, tiny_model):
    servers.close()  # A is degraded by a fault here: never shared with the pool
    started = [servers.process(tiny_model, tp_size=2, ft=True, extra_args=FT_FLAGS),
               servers.process(tiny_model, tp_size=2, ft=False, extra_args=["--enable-metrics"])]
    try:
        start_together(started)
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def router(backends):
    from ft.ports import free_port

    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="sglang-router-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *(s.url for s in backends),
         "--policy", "round_robin", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, open(log.name).read()[-4000:]
        try:
            return requests.get(f"{url}/readiness", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for(ready, timeout_s=120, what="the router's /readiness", poll_s=0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def requests_served(server) -> float:
    """SGLang's own count of the requests this server finished (its Prometheus metrics)."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sglang:num_requests_total"))


def test_the_plain_server_equals_transformers_without_the_elastic_model(backends, tiny_model, hf_outputs):
    plain = backends[1]
    outputs = generate_concurrently(plain.url, PROMPTS, MAX_NEW_TOKENS)
    assert [o["output_ids"] for o in outputs] == hf_outputs(tiny_model)
    assert "sglang-ft: TP rank" not in plain.log_text()  # the elastic model is not in play without --ft
    assert "sglang-ft: TP rank" in backends[0].log_text()


def test_router_answers_the_probes_of_its_manifest(router):
    docs = yaml.safe_load_all((K8S / "router.yaml").read_text())
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sglang-ft-router"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for kind in ("livenessProbe", "readinessProbe"):
        path = container[kind]["httpGet"]["path"]
        assert requests.get(f"{router}{path}", timeout=10).status_code == 200, f"{kind} {path}"


def test_requests_through_the_router_reach_both_servers_and_equal_transformers(router, backends, tiny_model,
                                                                               hf_outputs):
    before = [requests_served(s) for s in backends]
    outputs = [generate(router, p, MAX_NEW_TOKENS)["output_ids"] for p in PROMPTS]
    assert outputs == hf_outputs(tiny_model)
    after = [requests_served(s) for s in backends]
    assert all(a > b for a, b in zip(after, before)), f"requests finished per server: {before} -> {after}"
    assert sum(after) - sum(before) >= len(PROMPTS)


def test_a_server_that_lost_a_worker_keeps_serving_behind_the_router(router, backends, tiny_model, hf_outputs):
    degraded = backends[0]
    kill_worker(degraded, 1)
    status = wait_for_epoch(degraded, 1)
    assert status["tp_size"] == 1
    before = requests_served(degraded)
    outputs = [generate(router, p, MAX_NEW_TOKENS)["output_ids"] for p in PROMPTS]
    assert outputs == hf_outputs(tiny_model)
    assert requests_served(degraded) > before  # the router did not drop it: it regrouped and stayed healthy


LONG_TOKENS = 64  # long enough that every request is still decoding when the server dies


def _stream(url: str, prompt: str, outcome: dict) -> None:
    """One streamed request through the router: its tokens so far, error chunks, whether [DONE] came, how it ended."""
    body = {"text": prompt, "sampling_params": {**GREEDY, "max_new_tokens": LONG_TOKENS}, "stream": True}
    outcome.update(output_ids=[], errors=[], done=False, exception=None)
    try:
        with requests.post(f"{url}/generate", json=body, stream=True, timeout=(10, 60)) as response:
            outcome["status"] = response.status_code
            for line in response.iter_lines():
                if line == b"data: [DONE]":
                    outcome["done"] = True
                elif line.startswith(b"data:"):
                    chunk = json.loads(line[5:])
                    if "output_ids" in chunk:
                        outcome["output_ids"] = chunk["output_ids"]
                    else:
                        outcome["errors"].append(chunk)
    except requests.RequestException as exc:
        outcome["exception"] = type(exc).__name__


def test_a_whole_server_sigkilled_under_load_costs_no_request_through_the_router(router, backends, tiny_model):
    """Last: server B (full width, plain) is SIGKILLed whole, every process of it, while requests run on both servers.
    Every non-streaming request completes through the router's retry on A and equals transformers. A stream that
    was running on B is not replayed by the router (its first bytes were sent): it ends short, without [DONE]."""
    from sglang_ft.tools.hf_reference import greedy_token_ids

    victim = backends[1]
    expected = greedy_token_ids(tiny_model, PROMPTS, LONG_TOKENS)
    results: list = [None] * len(PROMPTS) * 2
    streams = [{}, {}]

    def one(i):
        results[i] = generate(router, PROMPTS[i % len(PROMPTS)], LONG_TOKENS)["output_ids"]

    threads = []
    for k in range(2):  # one after the other, so round robin puts one on each server
        threads.append(threading.Thread(target=_stream, args=(router, PROMPTS[k], streams[k])))
        threads[-1].start()
        wait_for(lambda: streams[k].get("output_ids"), timeout_s=300, what=f"stream {k} to start")
    threads += [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for thread in threads[2:]:
        thread.start()
    wait_for(lambda: all(len(s["output_ids"]) >= 4 for s in streams), timeout_s=300, what="both streams decoding")
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the launcher and its schedulers: all at once
    for thread in threads:
        thread.join(timeout=600)
    assert results == expected * 2  # no request lost: those on B were retried on A from the start
    finished = [k for k, s in enumerate(streams) if len(s["output_ids"]) == LONG_TOKENS]
    assert len(finished) == 1, streams  # the stream on A finished, the one on B ended where B died
    assert streams[finished[0]]["output_ids"] == expected[finished[0]] and streams[finished[0]]["done"]
    (cut,) = [s for k, s in enumerate(streams) if k not in finished]
    assert 4 <= len(cut["output_ids"]) < LONG_TOKENS
    print(f"a stream cut by its server's death: {len(cut['output_ids'])} of {LONG_TOKENS} tokens, HTTP "
          f"{cut.get('status')}, error chunks {cut['errors']}, [DONE] {cut['done']}, then "
          f"{cut['exception'] or 'the stream closed'}")
