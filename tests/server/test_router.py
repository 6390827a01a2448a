"""SGLang's router (sglang-router) in front of two `--ft` servers, as deploy/k8s/router.yaml runs it.

The router is `python -m sglang_router.launch_router --worker-urls A B`, unchanged. Its probe endpoints answer,
every request through it equals `transformers`' greedy output, both servers serve a share, and after server A loses a
TP worker (kill, regroup TP 2 -> 1) the router keeps sending it requests, still equal.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest
import requests
import yaml

from tests.conftest import MAX_NEW_TOKENS, PROMPTS
from tests.client import generate, start_together, wait_for
from tests.server.test_ecosystem import kill_worker, wait_for_epoch
from tests.unit.test_k8s import K8S

pytestmark = pytest.mark.server
FT_FLAGS = ["--ft-enable-fault-injection", "--ft-heartbeat-interval-ms", "100", "--ft-heartbeat-timeout-ms", "1500",
            "--ft-collective-timeout-s", "4", "--enable-metrics"]


@pytest.fixture(scope="module")
def backends(servers, tiny_model):
    from sglang_ft.tools.server_process import ServerProcess

    servers.close()  # A is degraded by a fault here: never shared with the pool
    started = [ServerProcess(tiny_model, tp_size=2, ft=True, extra_args=FT_FLAGS) for _ in range(2)]
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
