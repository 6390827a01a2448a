"""SGLang's own clients against an `--ft` server, unchanged: the openai client, frontend programs
(`sgl.function` + `RuntimeEndpoint`), `bench_serving`, and the control CLI; `make demo`'s load, kill and report
(`python -m sglang_ft.demo --url`), then the frontend program and a streaming chat keep going across a worker
failure.

One TP 4 server serves the whole module; the tests that need no failure run first, then each failure test
takes one worker away (TP 4 -> 3 -> 2 -> 1).
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.client import still_running

pytestmark = pytest.mark.server
# Hybrid attention with round-robin owners: TP 3 after the first failure runs 1 KV head per worker by TP and each
# request's fourth head on its owner, so `n` > 1 and shared prompts reuse cached rows across owners.
FT_FLAGS = ["--ft-enable-fault-injection", "--ft-heartbeat-interval-ms", "100", "--ft-heartbeat-timeout-ms", "1500",
            "--ft-collective-timeout-s", "4", "--ft-attention", "hybrid", "--ft-routing", "round_robin"]


@pytest.fixture(scope="module")
def server(servers, tiny_model):
    from sglang_ft.tools.server_process import ServerProcess

    servers.close()  # this module's server is degraded by its faults: never shared with the pool
    process = ServerProcess(tiny_model, tp_size=4, ft=True, extra_args=FT_FLAGS).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    return client, client.models.list().data[0].id


def kill_worker(server, rank: int) -> None:
    response = requests.post(f"{server.url}/ft/inject_fault", json={"rank": rank, "kind": "kill"}, timeout=30)
    assert response.status_code == 200, response.text


def wait_for_epoch(server, epoch: int, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = requests.get(f"{server.url}/ft/status", timeout=30).json()
        if status["epoch"] == epoch and len(status["recoveries"]) == epoch:
            return status
        time.sleep(0.2)
    raise AssertionError(f"no recovery to epoch {epoch}")


def test_openai_completions_n_stop_usage_logprobs(openai_client):
    client, model = openai_client
    prompt = "Tell me about the radix cache"
    base = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert base.usage.completion_tokens == 12 and base.usage.prompt_tokens > 0
    assert base.usage.total_tokens == base.usage.prompt_tokens + 12

    several = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, n=3,
                                        extra_body={"ignore_eos": True})
    assert sorted(c.index for c in several.choices) == [0, 1, 2]
    assert all(c.text == base.choices[0].text for c in several.choices)  # greedy: n copies of one answer

    stop_at = base.choices[0].text.split()[2]  # a word in the middle of the greedy answer
    stopped = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stop=[stop_at])
    assert stopped.choices[0].finish_reason == "stop" and stop_at not in stopped.choices[0].text
    assert base.choices[0].text.startswith(stopped.choices[0].text)

    scored = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True})
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    # greedy: the chosen token is the most likely one, so its logprob is the best of the top 2
    assert all(len(top) >= 1 and max(top.values()) == pytest.approx(lp, abs=1e-4)
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))


def test_openai_chat_logprobs_and_streaming_usage(openai_client):
    client, model = openai_client
    messages = [{"role": "user", "content": "Write about a quiet river"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 8 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-4) for c in content)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8


def multi_step_program():
    import sglang as sgl

    @sgl.function
    def plan(s, topic):
        s += "Topic: " + topic + "\n"
        s += "Kind: " + sgl.select("kind", choices=["story", "list", "question"]) + "\n"
        forks = s.fork(2)
        for i, fork in enumerate(forks):
            fork += f"Point {i}: " + sgl.gen("point", max_tokens=12, temperature=0, ignore_eos=True)
        s += "Points: " + forks[0]["point"] + " | " + forks[1]["point"] + "\n"
        for step in range(3):
            s += f"Step {step}: " + sgl.gen(f"step{step}", max_tokens=16, temperature=0, ignore_eos=True) + "\n"

    return plan


TOPICS = [{"topic": t} for t in ("the radix cache", "a quiet river", "heartbeats", "seven mountains",
                                 "tensor parallel groups", "a bright city")]


def program_results(states) -> list[dict]:
    return [{k: s[k] for k in ("kind", "step0", "step1", "step2")} | {"text": s.text()} for s in states]


def test_the_demo_survives_the_kill_with_nothing_lost_and_leaves_a_plot(server, tiny_model, tmp_path):
    """`make demo`'s run on this server (TP 4 -> 3, into hybrid attention): its clients' every output equal to
    transformers, nothing lost, the lost KV from the backup store, the plot written. The demo's own launch is
    `ServerProcess`, as this module's; stopping with no process left behind is the SIGTERM test's
    (test_reliability.py)."""
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "sglang_ft.demo", "--url", server.url, "--model-dir", tiny_model, "--before-s", "4",
         "--after-s", "8", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lost"] == 0 and summary["mismatched"] == 0 and summary["served"] > 0
    assert summary["recovered"] and summary["tp_after"] == 3 and summary["leftover_processes"] == []
    # the lost heads' KV from the backup store; a SIGKILL between a step's end and that step's copy to the store
    # takes the step's rows with it, at most one token of each of the 6 clients' requests to compute again
    # (test_failover's kill_uncopied pins that instant down)
    assert summary["kv_blocks_restored"] > 0 and summary["kv_tokens_recomputed"] <= 6
    assert summary["tokens_per_s_after"] > 0
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SIGKILL -> worker 2" in run.stdout and "regrouped in place to TP 3" in run.stdout
    assert wait_for_epoch(server, 1)["tp_size"] == 3
    # bad flags are refused by name, before anything starts
    for argv, flag in ((["--kill-rank", "9"], "--kill-rank"), (["--url", "http://127.0.0.1:9"], "--url")):
        bad = subprocess.run([sys.executable, "-m", "sglang_ft.demo", *argv], capture_output=True, text=True)
        assert bad.returncode == 2 and flag in bad.stderr, bad.stderr


def test_frontend_program_runs_across_a_worker_failure(server):
    import sglang as sgl

    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    plan = multi_step_program()
    before = program_results(plan.run_batch(TOPICS, num_threads=len(TOPICS)))
    assert all(r["kind"] in ("story", "list", "question") and r["step2"] for r in before)

    during: list = []
    runner = threading.Thread(target=lambda: during.extend(plan.run_batch(TOPICS, num_threads=len(TOPICS))))
    runner.start()
    time.sleep(2.0)  # the programs are on their first steps; each has five more round trips to go
    kill_worker(server, 2)
    runner.join(timeout=600)
    assert wait_for_epoch(server, 2)["tp_size"] == 2
    assert all(state.error() is None for state in during)
    assert program_results(during) == before  # same selections, same greedy text, TP 3 and across the failure


def test_streaming_chat_keeps_streaming_across_a_worker_failure(server, openai_client):
    client, model = openai_client
    messages = [{"role": "user", "content": "Tell me a long story about heartbeats and epochs"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].message.content
    pieces = []
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    for n, chunk in enumerate(stream):
        if n == 5:
            kill_worker(server, 1)
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == whole
    assert wait_for_epoch(server, 3)["tp_size"] == 1


def test_bench_serving_runs_against_the_ft_server(server, tiny_model, tmp_path):
    """SGLang's own load generator, on the random and the ShareGPT datasets from a local file (no download)."""
    from sglang_ft.tools import make_sharegpt

    dataset = make_sharegpt.main([str(tmp_path / "sharegpt.json"), "--conversations", "64"])
    runs = {}
    for name, extra in (("random", ["--random-input-len", "32", "--random-output-len", "8"]),
                        ("sharegpt", ["--sharegpt-output-len", "8"])):  # both at once: most of each is its import
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", server.url,
             "--dataset-name", name, "--dataset-path", str(dataset), "--tokenizer", tiny_model,
             "--num-prompts", "12", "--request-rate", "8", "--disable-tqdm", "--seed", "1",
             "--output-file", str(tmp_path / f"{name}.jsonl"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, run in runs.items():
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output[-6000:]
        result = json.loads((tmp_path / f"{name}.jsonl").read_text().splitlines()[-1])
        assert result["completed"] == 12 and result["output_throughput"] > 0, result


def test_ctl_status_reads_the_live_server(server):
    run = subprocess.run([sys.executable, "-m", "sglang_ft.ctl", "--url", server.url, "status", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tp_size"] == requests.get(f"{server.url}/ft/status", timeout=30).json()["tp_size"]
    table = subprocess.run([sys.executable, "-m", "sglang_ft.ctl", "--url", server.url, "status"],
                           capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="140"))
    assert table.returncode == 0 and "healthy" in table.stdout and "dead" in table.stdout


def test_sigkill_of_the_servers_main_process_leaves_no_orphan(server):
    """Last in this module: the launcher (HTTP server, tokenizer) dies without a chance to clean up; its workers,
    detokenizer, FT controller and backup store notice and exit on their own (the launcher stays unreaped, a
    zombie, as under a careless parent: they must not wait for it to vanish)."""
    import signal

    import psutil

    launcher = psutil.Process(server.proc.pid)
    family = launcher.children(recursive=True)
    family = [p for p in family if p.status() != psutil.STATUS_ZOMBIE]  # workers killed by the tests above
    names = " ".join(p.name() + " " + " ".join(p.cmdline()[:4]) for p in family)
    assert "ft.controller" in names and "kv_store" in names and names.count("scheduler") >= 1, names
    os.kill(launcher.pid, signal.SIGKILL)
    alive = still_running(family, timeout_s=30)
    assert not alive, [(p.pid, p.name()) for p in alive]
