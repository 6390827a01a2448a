"""`--ft` across nodes: TP 4 over two "nodes" (network namespaces, tools/netns.py), two workers each, with SGLang's
own multi-node launch (`--nnodes 2 --node-rank R --dist-init-addr`). The FT controller and the KV backup store run
on node 0; node 1's workers beat, take orders and stream their KV there over TCP, so their backup is off their
node. Node 1 is killed whole (every process at once) mid-decode."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import requests
from client import generate, wait_for
from conftest import PROMPTS

from sglang_ft.tools.netns import NetnsNodes

WHY_NOT = NetnsNodes.unavailable()
pytestmark = [pytest.mark.server,
              pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces here: {WHY_NOT}")]
NEW_TOKENS = 48
PORT = 30000


def launch(nodes: NetnsNodes, model: str, log_dir) -> list[subprocess.Popen]:
    head = nodes.nodes[0].address
    procs = []
    for node in nodes.nodes:
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--tp-size", "4",
                "--nnodes", "2", "--node-rank", str(node.index), "--dist-init-addr", f"{head}:5757",
                "--host", node.address, "--port", str(PORT), "--ft", "--ft-collective-timeout-s", "4"]
        log = open(log_dir / f"node{node.index}.log", "w")
        procs.append(nodes.popen(node.index, argv, stdout=log, stderr=subprocess.STDOUT))
    return procs


def healthy(url: str, procs) -> bool:
    assert all(p.poll() is None for p in procs), "a node's launcher exited"
    try:
        return requests.get(f"{url}/health_generate", timeout=20).status_code == 200
    except requests.RequestException:
        return False


def test_a_whole_node_killed_mid_decode_loses_nothing_and_its_kv_comes_from_the_other_node(servers, tiny_model,
                                                                                         tmp_path):
    from sglang_ft.tools.hf_reference import greedy_token_ids

    servers.close()  # two nodes' processes start here: free the pooled server's cores and memory first
    expected = greedy_token_ids(tiny_model, PROMPTS, NEW_TOKENS)
    with NetnsNodes(2) as nodes:
        procs = launch(nodes, tiny_model, tmp_path)
        url = f"http://{nodes.nodes[0].address}:{PORT}"
        try:
            wait_for(lambda: healthy(url, procs), timeout_s=300, poll_s=2, what="the two-node server")
            status = requests.get(f"{url}/ft/status", timeout=30).json()
            assert status["tp_size"] == 4 and [w["state"] for w in status["workers"]] == ["healthy"] * 4

            results: list = [None] * len(PROMPTS)
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(
                i, generate(url, PROMPTS[i], NEW_TOKENS))) for i in range(len(PROMPTS))]
            for thread in threads:
                thread.start()
            wait_for(lambda: requests.get(f"{url}/ft/status", timeout=30).json()["workers"][2].get(
                "running_requests"), timeout_s=120, poll_s=0.05, what="node 1 to decode")
            killed = nodes.kill(1)  # the whole node at once: its launcher, schedulers and detokenizer-less rest
            assert len(killed) >= 3
            for thread in threads:
                thread.join(timeout=300)
            assert [r["output_ids"] for r in results] == expected

            status = wait_for(lambda: (s := requests.get(f"{url}/ft/status", timeout=30).json())["recoveries"] and s)
            assert status["tp_size"] == 2 and [w["rank"] for w in status["workers"]] == [0, 1, None, None]
            (recovery,) = status["recoveries"]  # the node's two workers leave in one regroup
            assert recovery["workers"] == [0, 1] and "heartbeat timeout" in recovery["cause"]
            # node 1's heads' KV came from the backup store, which runs on node 0
            assert recovery["kv_blocks_restored"] > 0 and recovery["kv_tokens_recomputed"] == 0
            assert [generate(url, p, NEW_TOKENS)["output_ids"] for p in PROMPTS[:2]] == expected[:2]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            time.sleep(1)
