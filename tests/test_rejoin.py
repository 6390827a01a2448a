"""Restarted workers rejoin a serving group (TP 4 on the tiny model) under steady load: back to full width with
the running requests intact, every output equal to transformers, nothing recomputed."""

import functools
import re
import threading
import time

import pytest
import requests
from client import generate
from client import wait_for as client_wait_for
from conftest import PROMPTS

pytestmark = pytest.mark.server
NEW_TOKENS = 48


class SteadyLoad:
    """Clients that send greedy requests back to back and check every answer against transformers."""

    def __init__(self, url: str, prompts: list[str], expected: list[list[int]]):
        self.url, self.prompts, self.expected = url, prompts, expected
        self.served, self.wrong, self.errors = 0, [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(len(prompts))]

    def _client(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                output = generate(self.url, self.prompts[i], NEW_TOKENS)["output_ids"]
            except requests.RequestException as exc:
                self.errors.append(repr(exc))
                continue
            self.served += 1
            if output != self.expected[i]:
                self.wrong.append((i, output[:8]))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)


def status(server) -> dict:
    return requests.get(f"{server.url}/ft/status", timeout=60).json()


wait_for = functools.partial(client_wait_for, poll_s=0.5)  # this module's polling pace


def kill(server, rank: int) -> int:
    """SIGKILL the worker at TP rank `rank`, wait for the group to regroup without it; its worker id."""
    epoch = status(server)["epoch"]
    reply = requests.post(f"{server.url}/ft/inject_fault", json={"rank": rank, "kind": "kill"}, timeout=30)
    assert reply.status_code == 200, reply.text
    wait_for(lambda: status(server)["epoch"] > epoch and status(server)["tp_size"] < 4, 60, f"rank {rank}'s regroup")
    return reply.json()["worker"]


def full_width(server):
    st = status(server)
    return st["tp_size"] == 4 and all(w["state"] == "healthy" for w in st["workers"]) and st


def test_dead_workers_are_restarted_and_rejoin_with_the_running_batch_intact(servers, tiny_model, hf_outputs):
    from sglang_ft.tools.hf_reference import greedy_token_ids
    from sglang_ft.tools.server_process import ServerProcess

    servers.close()
    expected = greedy_token_ids(tiny_model, PROMPTS, NEW_TOKENS)
    server = ServerProcess(tiny_model, tp_size=4, ft=True, extra_args=[
        "--ft-enable-fault-injection", "--ft-respawn", "--ft-respawn-delay-s", "1",
        "--ft-heartbeat-interval-ms", "100", "--ft-heartbeat-timeout-ms", "1500", "--ft-collective-timeout-s", "4",
    ]).start()
    try:
        with SteadyLoad(server.url, PROMPTS, expected) as load:
            time.sleep(2)
            killed = [kill(server, 2)]
            first = wait_for(lambda: full_width(server), 300, "worker 2 to rejoin")
            served_at_rejoin = load.served
            for rank in (3, 1, 0):  # three failures, TP 4 -> 1 (the rejoined worker first), all three come back
                killed.append(kill(server, rank))
            final = wait_for(lambda: full_width(server), 400, "three workers to rejoin")
            time.sleep(3)
        assert load.errors == [] and load.wrong == []
        assert served_at_rejoin > 0 and load.served > served_at_rejoin

        rejoin = [r for r in first["recoveries"] if r["joined"]][0]
        assert rejoin["joined"] == [2] and rejoin["cause"] == "rejoin of worker 2"
        assert rejoin["kv_tokens_recomputed"] == 0 and rejoin["bytes_reloaded"] == 0 and rejoin["bytes_p2p"] > 0
        # requests were running when worker 2 came back: parked, handed to it with their KV, and resumed
        epoch = rejoin["epoch"]
        synced = re.findall(rf"recovery to epoch {epoch}: sync_scheduler_state done in [\d.]+ ms \((\d+) waiting "
                            rf"requests, (\d+) cached tokens", server.log_text())
        assert len(synced) == 4 and len(set(synced)) == 1 and int(synced[0][0]) > 0 and int(synced[0][1]) > 0
        assert rejoin["kv_bytes_p2p"] > 0  # the joiner's KV heads came from the survivors

        assert killed[0] == 2 and killed[1] == 2  # joiners take the last ranks, so rank 3 was worker 2 again
        joined = sorted(w for r in final["recoveries"] for w in r["joined"])
        assert joined == sorted(killed)
        assert all(r["kv_tokens_recomputed"] == 0 for r in final["recoveries"] if r["joined"])
        assert sorted(r["worker"] for r in final["respawns"]) == sorted(killed)
        assert [generate(server.url, p, NEW_TOKENS)["output_ids"] for p in PROMPTS] == expected
    finally:
        server.stop()
