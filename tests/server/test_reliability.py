"""What users throw at an `--ft` server besides faults, on one live TP 2 server: malformed bodies, a flood beyond
its queue, a client that hangs up mid-stream, forged and stale messages on the controller's socket, and at the end
a SIGTERM while requests stream (drained up to --ft-drain-timeout-s, then every process gone).

The server admits 2 running and 3 queued requests, so a flood of 24 overflows it at once.
"""

import functools
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
import schemathesis
import zmq
from hypothesis import HealthCheck, given, settings

from ft.messages import Heartbeat, WorkerFailed, encode
from sglang_ft.tools.load import server_load
from tests.client import GREEDY, generate, still_running, worker_start_methods
from tests.client import wait_for as client_wait_for

pytestmark = pytest.mark.server
LIMITS = ["--max-running-requests", "2", "--max-queued-requests", "3", "--ft-drain-timeout-s", "4"]


@pytest.fixture(scope="module")
def server(servers, tiny_model):
    import sglang.srt.platforms  # noqa: F401  (SGLang's platforms first: the plugin's module imports from them)
    from sglang_ft.platforms.torch_cpu import START_METHOD_ENV

    servers.close()  # this module's last test stops its server: never shared with the pool
    # SGLang's own `spawn`, as on GPUs (the other CPU servers fork their children): each child loads sglang-ft's
    # plugin and hooks by itself here, in a fresh interpreter that imports `sglang.launch_server` as its main module
    process = servers.process(tiny_model, tp_size=2, ft=True, extra_args=LIMITS,
                            extra_env={START_METHOD_ENV: "spawn"}).start()
    yield process
    process.stop()


wait_for = functools.partial(client_wait_for, poll_s=0.2)  # this module's polling pace


BAD_BODIES = [
    ("/generate", b"not json"),
    ("/generate", {}),
    ("/generate", {"text": 5}),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": "many"}}),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -1}}),
    ("/generate", {"text": "x", "sampling_params": {"temperature": -1}}),
    ("/generate", {"text": "x", "sampling_params": {"top_p": 2}}),
    ("/generate", {"text": "x", "sampling_params": {"top_k": 0}}),
    ("/generate", {"text": "x", "sampling_params": {"stop": 5}}),
    ("/generate", {"text": "x", "sampling_params": {"n": 0}}),  # upstream: 200 with one completion
    ("/generate", {"text": "x " * 5000, "sampling_params": {"max_new_tokens": 4}}),  # beyond the context
    ("/generate", {"input_ids": [10**9], "sampling_params": {"max_new_tokens": 2}}),  # upstream: 200, garbage
    ("/generate", {"input_ids": [-1], "sampling_params": {"max_new_tokens": 2}}),  # upstream: 200, garbage
    ("/generate", {"text": "", "sampling_params": {"max_new_tokens": 2}}),  # upstream: every worker crashes
    ("/v1/completions", {"model": "m", "prompt": ["x", ""], "max_tokens": 2}),  # upstream: every worker crashes
    ("/v1/detokenize", {"tokens": [-1]}),  # upstream: 500
    ("/v1/completions", {"model": "m", "prompt": 7}),
    ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": -5}),
    ("/v1/chat/completions", {"model": "m", "messages": "hi"}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "bogus", "content": "x"}]}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
    ("/ft/inject_fault", {"rank": "x", "kind": "kill"}),
    ("/ft/drain", {"worker": -1}),
    ("/ft/rejoin", {"worker": 0, "extra": 1}),
]


def test_this_servers_workers_were_spawned_as_on_gpus(server):
    assert worker_start_methods(server) == ["spawn", "spawn"]


def test_malformed_bodies_get_4xx_with_a_message_and_change_nothing(server):
    before = server_load(server.url)
    for path, body in BAD_BODIES:
        kwargs = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
            {"json": body}
        response = requests.post(f"{server.url}{path}", timeout=60, **kwargs)
        assert 400 <= response.status_code < 500, (path, body, response.status_code, response.text[:200])
        assert response.text.strip(), (path, body)  # a message, not an empty error
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    after = server_load(server.url)
    assert after["num_used_tokens"] == before["num_used_tokens"] and after["num_running_reqs"] == 0
    status = requests.get(f"{server.url}/ft/status", timeout=30).json()
    assert status["epoch"] == 0 and status["tp_size"] == 2  # no worker was hurt by any of it


def test_a_flood_gets_503_with_retry_after_and_everything_accepted_completes(server):
    def send(i: int) -> requests.Response:
        body = {"text": f"flood {i}", "sampling_params": {**GREEDY, "max_new_tokens": 12}}
        return requests.post(f"{server.url}/generate", json=body, timeout=300)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(send, range(24)))
    codes = Counter(a.status_code for a in answers)
    # at least the 3 queue places are taken (more when some arrive after the first were admitted to run)
    assert set(codes) == {200, 503} and codes[200] >= 3, codes
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["Retry-After"] == "1" and "queue is full" in answer.text
        else:
            assert answer.json()["meta_info"]["completion_tokens"] == 12
    accepted = [i for i, a in enumerate(answers) if a.status_code == 200]
    alone = generate(server.url, f"flood {accepted[0]}", 12)  # the same greedy answer when not under a flood
    assert alone["output_ids"] == answers[accepted[0]].json()["output_ids"]
    wait_for(lambda: server_load(server.url)["num_running_reqs"] == 0, 30, "the queue drained")


def test_a_client_hanging_up_mid_stream_frees_its_kv(server):
    """SGLang aborts the request of a client that left; under --ft that abort used to be dropped (the ledger took
    it for a re-send of the request it names) and the request decoded to its end into a closed socket."""
    baseline = server_load(server.url)["num_used_tokens"]
    body = {"text": "a long answer", "stream": True, "sampling_params": {**GREEDY, "max_new_tokens": 1500}}
    with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=60) as response:
        chunks = response.iter_lines()
        for _ in range(8):
            next(chunks)
        wait_for(lambda: (lambda load: load["num_used_tokens"] > baseline and load["num_running_reqs"] == 1)(
            server_load(server.url)), 20, "the streaming request's KV in use")
    hung_up = time.monotonic()  # the connection is closed here, long before 1500 tokens
    wait_for(lambda: (lambda load: load["num_used_tokens"] == baseline and load["num_running_reqs"] == 0)(
        server_load(server.url)), 20, f"the aborted request's KV freed (back to {baseline} tokens in use)")
    assert time.monotonic() - hung_up < 20


def runtime_dir(server) -> str:
    return re.search(r"runtime dir (\S+)", server.log_text()).group(1)


def test_forged_and_stale_messages_on_the_controller_socket_change_nothing(server):
    """A process on this machine that is not a member sends beats and failure reports: counted as fenced or
    ignored; no regroup follows and the members stay healthy."""
    status = requests.get(f"{server.url}/ft/status", timeout=30).json()
    fenced = status["fenced_messages"]
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(f"ipc://{runtime_dir(server)}/heartbeat")
    try:
        socket.send(encode(Heartbeat(7, os.getpid(), 0, 1)))  # a worker that does not exist
        socket.send(encode(Heartbeat(1, os.getpid(), 99, 1)))  # a member's id from a future epoch
        socket.send(encode(WorkerFailed(0, -1, "stale report", os.getpid())))  # an epoch long gone
        socket.send(b"\x00garbage")
    finally:
        socket.close()
    wait_for(lambda: requests.get(f"{server.url}/ft/status", timeout=30).json()["fenced_messages"] >= fenced + 2,
             10, "the forged beats fenced")
    time.sleep(3.5)  # well past the heartbeat timeout (1 s) + 0.5 s a real failure report would trigger a regroup after
    status = requests.get(f"{server.url}/ft/status", timeout=30).json()
    assert status["epoch"] == 0 and status["regrouping"] is None and status["recoveries"] == []
    assert [w["state"] for w in status["workers"]] == ["healthy", "healthy"]
    assert generate(server.url, "still serving", 4)["meta_info"]["completion_tokens"] == 4


# ---------------------------------------------------------------- schemathesis on the server's OpenAPI schema

# /v1/chat/completions is left out: drawing one body from its schema (unions of message types and content parts)
# takes schemathesis 15-100 s of CPU here. Its malformed bodies are in BAD_BODIES above; the OpenAI client tests
# (test_serving_ft, test_ecosystem) send valid ones.
FUZZED = ["/generate", "/v1/completions", "/v1/tokenize", "/v1/detokenize", "/ft/status", "/ft/inject_fault",
          "/ft/drain", "/ft/rejoin"]
SLOW_TO_NEGATE = {"/v1/completions"}  # 15-30 s per invalid draw; its invalid bodies are in BAD_BODIES
CLAMPS = {"max_new_tokens": 8, "max_tokens": 8, "max_completion_tokens": 8, "n": 2}  # keep each call short on CPU


def clamp(body):
    """Cap generation lengths and sample counts in a generated body (the budget is time, not the input space)."""
    if isinstance(body, dict):
        for key, value in body.items():
            if key in CLAMPS and isinstance(value, int) and not isinstance(value, bool) and value > CLAMPS[key]:
                body[key] = CLAMPS[key]
            else:
                clamp(value)
    elif isinstance(body, list):
        for item in body:
            clamp(item)


@pytest.fixture(scope="module")
def openapi_operations(server) -> dict:
    """(method, path) -> schemathesis's operation, from the live server's own /openapi.json."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in FUZZED and operation.method.upper() in ("GET", "POST"):
            operations[(operation.method.upper(), operation.path)] = operation
    return operations


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(server, openapi_operations, mode):
    """Requests drawn by schemathesis from the server's own OpenAPI schema (SGLang's endpoints and /ft/*), valid
    (positive) and invalid (negative) ones: never a 5xx (but the 503 of a full queue), always a message with a
    4xx. Fault injection is off here, so /ft/inject_fault, /ft/drain and /ft/rejoin answer 403 or 422."""
    assert {path for _, path in openapi_operations} == set(FUZZED)  # every endpoint is in the schema
    generation_mode = getattr(schemathesis.GenerationMode, mode.upper())
    for (method, path), operation in sorted(openapi_operations.items()):
        if mode == "negative" and (method == "GET" or path in SLOW_TO_NEGATE):
            continue  # nothing to make invalid; or see SLOW_TO_NEGATE
        @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=generation_mode))
        def no_server_error(case):
            clamp(case.body)
            response = case.call(base_url=server.url, timeout=120)
            # this server admits 2 running + 3 queued: a batch of more is turned away by admission, not an error
            overloaded = response.status_code == 503 and "queue is full" in response.text and \
                response.headers.get("Retry-After") == "1"
            assert response.status_code < 500 or overloaded, (method, path, case.body, response.status_code,
                                                               response.text[:300])
            if response.status_code >= 400:
                assert response.text.strip(), (method, path, case.body)

        no_server_error()


def sampling_values():
    """Values of any sampling parameter: in range, at the edges, out of range and of the wrong type."""
    from hypothesis import strategies as st

    return st.one_of(st.none(), st.booleans(), st.integers(-3, 8), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=4), st.lists(st.integers(-2, 600), max_size=3), st.sampled_from(["8", 2.5]))


SAMPLING_KEYS = ["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                 "presence_penalty", "repetition_penalty", "stop", "stop_token_ids", "n", "ignore_eos",
                 "skip_special_tokens", "no_stop_trim", "logit_bias", "regex", "json_schema"]


def test_hypothesis_on_sampling_parameters_finds_no_server_error(server):
    """Sampling parameters with SGLang's own names and any value: a 4xx with a message, or a completion that keeps
    its limits; never a 5xx (but the 503 of a full queue)."""
    from hypothesis import strategies as st

    @settings(max_examples=10, deadline=None, derandomize=True, database=None,  # 25 took up to 96 s of CI here
              suppress_health_check=list(HealthCheck))
    @given(params=st.dictionaries(st.sampled_from(SAMPLING_KEYS), sampling_values(), max_size=4))
    def no_server_error(params):
        limit = params.get("max_new_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool):
            params["max_new_tokens"] = min(limit, 8)  # keep each call short on CPU
        elif limit is None:  # absent or null: SGLang's default runs to the context length (1,470 tokens, 60 s here)
            params["max_new_tokens"] = 8
        payload = json.dumps({"text": "sample", "sampling_params": params})  # NaN and Infinity go out as such
        response = requests.post(f"{server.url}/generate", data=payload, headers={"content-type": "application/json"},
                                 timeout=120)
        overloaded = response.status_code == 503 and "queue is full" in response.text
        assert response.status_code < 500 or overloaded, (params, response.status_code, response.text[:300])
        if 400 <= response.status_code < 500:
            assert response.text.strip(), params
        elif response.status_code == 200:
            body, limit = response.json(), params["max_new_tokens"]
            for out in body if isinstance(body, list) else [body]:  # a list when n > 1
                if isinstance(limit, int) and not isinstance(limit, bool):
                    assert out["meta_info"]["completion_tokens"] <= max(limit, 0), (params, out["meta_info"])

    no_server_error()


def test_after_the_fuzz_the_server_is_whole(server):
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    wait_for(lambda: (lambda load: load["num_used_tokens"] == 0 and load["num_running_reqs"] == 0)(
        server_load(server.url)), 30, "no KV in use once the fuzzed requests are done")
    status = requests.get(f"{server.url}/ft/status", timeout=30).json()
    assert status["epoch"] == 0 and [w["state"] for w in status["workers"]] == ["healthy", "healthy"]


def stream_lines(url: str, max_new_tokens: int, started: threading.Event, out: list) -> None:
    body = {"text": f"finish {max_new_tokens}", "stream": True,
            "sampling_params": {**GREEDY, "max_new_tokens": max_new_tokens}}
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=120) as response:
        for line in response.iter_lines():
            if line:
                out.append(line)
                started.set()


def test_sigterm_drains_what_finishes_in_time_aborts_the_rest_then_every_process_exits(server):
    """Last in this module: it stops the server. A short request in flight at SIGTERM completes whole; one that
    would run far past --ft-drain-timeout-s (4 s here) ends with an abort its client sees; nothing is left."""
    launcher = psutil.Process(server.proc.pid)
    family = [launcher, *launcher.children(recursive=True)]  # schedulers, detokenizer, controller, backup store
    assert len(family) >= 5
    short, long_ = [], []
    events = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=stream_lines, args=(server.url, 24, events[0], short)),
               threading.Thread(target=stream_lines, args=(server.url, 2000, events[1], long_))]
    for thread, event in zip(threads, events):
        thread.start()
        assert event.wait(60)
    signalled = time.monotonic()
    os.kill(launcher.pid, signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=120)
    assert short[-1] == b"data: [DONE]" and json.loads(short[-2][6:])["meta_info"]["completion_tokens"] == 24
    last = json.loads(long_[-2][6:]) if long_[-1] == b"data: [DONE]" else json.loads(long_[-1][6:])
    assert last["meta_info"]["finish_reason"]["type"] == "abort", last["meta_info"]
    assert last["meta_info"]["completion_tokens"] < 2000
    alive = still_running(family, timeout_s=60)
    assert not alive, [p.pid for p in alive]
    assert time.monotonic() - signalled < 60  # bounded: 4 s of drain, SGLang's 5 s polls, the processes' exit
