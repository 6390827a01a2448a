"""benchmark/chaos.py's live TP 4 `--ft` server (dead workers restarted 1 s after their death): first a scripted rejoin
(TP 4 -> 3 -> 4 under a steady greedy load), then the short soak (one round of kill, hang, stall, store kill and torn
step, with their rejoins) on the same server. Its criteria and fault rules without a server: tests/unit/test_chaos.py."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
import requests

from benchmark import chaos
from ft.process_watch import ProcessWatch
from sglang_ft.tools.hf_reference import greedy_references, greedy_token_ids
from sglang_ft.tools.load import Load
from tests.client import LongStream, assert_kv_came_from_the_store, generate, wait_for

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def chaos_server(servers, tiny_model, tmp_path_factory):
    """chaos.py's server, launched once for the scripted rejoin and then the soak (which stops it): TP 4, hybrid
    attention with load routing (TP 3 runs 4 KV heads over 3: remainder heads), `--ft-respawn` after 1 s."""
    servers.close()  # its own server: the faults leave it unfit for the pool
    args = chaos.parse_args(["--model-dir", tiny_model, "--out", str(tmp_path_factory.mktemp("chaos")), "--seed", "0",
                             "--interval-s", "4", "--attention", "hybrid", "--routing", "load"])
    server = chaos.launch(args, servers.process)
    yield server, args
    server.stop()


AFTER_REJOIN = "A request sent once the restarted worker is back in the group"
SPANNING = "A long request that begins at TP 4 and is still decoding when the restarted worker rejoins"


def ft_status(url: str) -> dict:
    return requests.get(f"{url}/ft/status", timeout=30).json()


def worker_of(st: dict, worker: int) -> dict:
    return next(w for w in st["workers"] if w["worker"] == worker)


def idle_report(url: str, worker: int) -> dict | None:
    """`worker`'s load in /ft/status once it computes nothing: no request, and its step count the same in two
    reports more than two heartbeats apart; None while it is not."""
    first = worker_of(ft_status(url), worker)
    time.sleep(0.5)
    second = worker_of(ft_status(url), worker)
    quiet = second.get("running_requests") == 0 and second.get("waiting_requests") == 0
    return second if quiet and first.get("steps") == second["steps"] else None


def test_a_killed_worker_is_restarted_and_rejoins_under_load_then_serves(chaos_server):
    """TP 4 -> 3 -> 4 under a steady greedy load: worker 1 is SIGKILLed; the group regroups without it (its KV heads
    from the backup store, nothing recomputed), the server restarts it 1 s later and plans it back in as rank 3
    while requests run, its weights from its peers and its KV head from the backup store. Every output, before,
    between and after, equals transformers; no attempt failed, none is lost. Then it serves: it holds a KV head, and
    its own step count and KV slots grow across a request sent after the rejoin."""
    server, args = chaos_server
    url, n = server.url, args.max_new_tokens
    expected = greedy_references(str(args.model_dir), chaos.PROMPTS, n)
    start = ft_status(url)
    assert (start["epoch"], start["tp_size"], start["recoveries"]) == (0, 4, [])
    victim = next(w for w in start["workers"] if w["rank"] == 1)
    served = {}
    load = Load(url, chaos.PROMPTS, n, expected=expected, stagger_tokens=5).start(args.clients)
    spanning = LongStream(url, SPANNING)
    try:
        wait_for(lambda: load.completed >= args.clients, 120, "requests served at TP 4")
        served["TP 4"] = load.completed
        spanning.start()
        wait_for(lambda: len(spanning.output_ids) >= 4, 60, "the spanning request to decode at TP 4")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: (s := ft_status(url))["tp_size"] == 3 and s["regrouping"] is None, 60, "the regroup to TP 3")
        served["regroup"] = load.completed
        rejoined = wait_for(lambda: (s := ft_status(url))["tp_size"] == 4 and s["regrouping"] is None
                            and worker_of(s, victim["worker"])["rank"] is not None and s, 300,
                            f"worker {victim['worker']} to rejoin")
        served["rejoin"] = load.completed
        at_rejoin = len(spanning.output_ids)
        wait_for(lambda: load.completed >= served["rejoin"] + args.clients, 120, "requests served after the rejoin")
        wait_for(lambda: len(spanning.output_ids) >= at_rejoin + 8, 60, "the spanning request's tokens at TP 4 again")
    finally:
        spanning.hang_up.set()
        load.finish()
    spanning.join(timeout=60)
    # it began at TP 4, decoded at TP 3 (its rows of head 3 held by a remainder owner) and at TP 4 again (head 3
    # from the backup store in the joiner): every token so far is transformers'
    assert spanning.error is None and 0 < at_rejoin < spanning.max_new_tokens, (spanning.error, at_rejoin)
    assert spanning.output_ids == greedy_token_ids(str(args.model_dir), [SPANNING],
                                                   len(spanning.output_ids))[0]
    assert (load.mismatched, load.failed_attempts, load.unfinished) == (0, 0, 0), \
        (load.failures, load.mismatches)
    assert 0 < served["TP 4"] <= served["regroup"] < served["rejoin"] < load.completed  # served at TP 4, 3, 4

    failure, rejoin = rejoined["recoveries"]
    assert failure["cause"].startswith(f"worker {victim['worker']}") and failure["joined"] == []
    assert_kv_came_from_the_store(failure, args.clients + 1)  # the load and the spanning stream in flight
    assert rejoin["cause"] == f"rejoin of worker {victim['worker']}" and rejoin["joined"] == [victim["worker"]]
    assert rejoin["kv_tokens_recomputed"] == 0 and rejoin["bytes_reloaded"] == 0 and rejoin["bytes_p2p"] > 0
    # its KV head (head 3, a remainder head at TP 3 that no peer holds as a TP head) came from the backup store
    assert rejoin["kv_blocks_restored"] > 0
    parked = {epoch: re.findall(rf"recovery to epoch {epoch}: park_requests done in [\d.]+ ms \((\d+) requests",
                                server.log_text()) for epoch in (failure["epoch"], rejoin["epoch"])}
    assert all(max(map(int, counts)) > 0 for counts in parked.values()), parked  # requests in flight at both
    # the server's total is the two recoveries' (the failure's at most its last step's rows, the rejoin's none)
    assert rejoined["kv_tokens_recomputed"] == failure["kv_tokens_recomputed"] + rejoin["kv_tokens_recomputed"]
    (respawn,) = rejoined["respawns"]
    assert respawn["worker"] == victim["worker"]
    joined = worker_of(rejoined, victim["worker"])
    assert joined["rank"] == 3 and joined["state"] == "healthy" and joined["pid"] != victim["pid"]
    # started from the fork server that imported SGLang during the launch (--ft-respawn): not a fork of the
    # launcher, whose HTTP threads it would not have, and not spawned to import SGLang again
    supervisor = psutil.Process(joined["pid"]).parent()
    assert "from multiprocessing.forkserver import main" in " ".join(supervisor.parent().cmdline())
    assert supervisor.parent().parent().pid == server.proc.pid
    assert ProcessWatch().gone(victim["pid"])

    # The joined worker serves: it holds its share of the heads, and a request sent now (a prompt no cache holds)
    # makes it compute. (No /flush_cache here: on CPU it runs gc.collect(), which can starve a heartbeat past 1 s.)
    before = wait_for(lambda: idle_report(url, victim["worker"]), 60, "the joined worker to report idle")
    assert (before["q_heads"], before["kv_heads"], before["remainder_kv_heads"]) == (2, 1, 0)
    reply = generate(url, AFTER_REJOIN, n)
    assert reply["output_ids"] == greedy_token_ids(str(args.model_dir), [AFTER_REJOIN], n)[0]
    after = wait_for(lambda: (w := worker_of(ft_status(url), victim["worker"]))["steps"] >= before["steps"] + n
                     and w, 30, "the joined worker's steps for the request")  # one forward per output token
    computed = reply["meta_info"]["prompt_tokens"] - reply["meta_info"]["cached_tokens"] + n - 1
    assert after["kv_tokens_used"] - before["kv_tokens_used"] >= computed > n  # its KV rows, kept in the cache
    assert after["busy_ms_total"] > before["busy_ms_total"]
    assert ft_status(url)["epoch"] == rejoin["epoch"]  # served by the group it joined


def test_short_soak_survives_every_fault_kind_with_nothing_lost(chaos_server):
    """One round of kill, hang, stall, store kill and a torn step under three streaming clients on a TP 4 server
    that restarts its dead workers itself; the soak waits until both are back. Each rejoin takes its weights from the
    survivors and the requests' KV from them or the backup store: nothing read from disk, nothing recomputed. With hybrid attention and
    load routing, so the group passes through TP 3 with remainder heads (4 KV heads over 3) and back. Only the
    soak's own recoveries and restarts are reported (the rejoin test ran on this server first)."""
    server, args = chaos_server
    report = chaos.run(server, args)
    assert report["failures"] == [], report["failures"]
    assert report["faults"] == {k: 1 for k in chaos.AUTO_KINDS} == report["survived"]
    assert report["served"] > 0 and report["tp_size_at_end"] == 4
    joins = [r for r in report["recoveries"] if r["joined"]]
    assert sorted(w for r in joins for w in r["joined"]) == sorted(r["worker"] for r in report["respawns"])
    assert len(report["respawns"]) == 2  # the killed and the hung worker
    assert all(r["bytes_p2p"] > 0 for r in joins)  # weights from the survivors
    # the requests' KV: a joiner at TP 3 -> 4 takes head 3, hybrid attention's remainder head at TP 3, which no
    # survivor holds whole, from the backup store; one joining with another worker still down (TP 2 -> 3) takes a
    # survivor's head from it (whether that happens depends on how fast restarts are: the hand-over from a peer is
    # test_failover's rejoin by hand)
    assert all(r["kv_bytes_p2p"] + r["kv_blocks_restored"] > 0 and r["kv_tokens_recomputed"] == 0 for r in joins), \
        joins
    assert (args.out / "chaos.json").exists()
