"""Serving through worker failures (TP 4): nothing lost, same tokens, status and fencing.

Servers take a minute or more to start on CPU, so the first three tests share one and each takes it one failure
further (TP 4 -> 3 -> 2 -> 1, then a rejoin by hand); they run in file order and each checks the state it starts
from. That server serves the tiny Mixtral-style mixture of experts (its experts' columns regroup like a dense
MLP's); the rank-0 test has a server of its own, on the dense tiny Llama (test_ft_endpoints fails over without a KV
backup).
"""

import glob
import json
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests
from tests import client
from tests.client import GREEDY, assert_kv_came_from_the_store, generate, wait_for
from tests.conftest import PROMPTS
from ft.failure_detector import declared_for_silence
from sglang_ft.tools.hf_reference import greedy_references, greedy_token_ids
from sglang_ft.tools.load import Load, server_load

pytestmark = pytest.mark.server
NEW_TOKENS = 64
LONG_TOKENS = 150  # a closed loop of requests this long is decoding at a rejoin sent once one of them streams
FAILOVER_PROMPTS = PROMPTS + ["Tell me about heartbeats", "The worker rank"]  # 8 concurrent requests
CACHED_PROMPT = "A prefix served before the failure stays in the radix cache through the regroup"


FT_FLAGS = ["--ft-enable-fault-injection", "--ft-heartbeat-interval-ms", "100", "--ft-heartbeat-timeout-ms", "1500",
            "--enable-metrics",  # SGLang's /metrics, which shows sglang_ft_* too (test_sigkill_mid_decode_...)
            "--ft-collective-timeout-s", "4"]
# The shared server restarts its dead backup store (the second test) but no worker by itself: the last test's rejoin
# is an operator's
RESPAWN = ["--ft-respawn", "--ft-respawn-delay-s", "3600"]


SHARED: list = []  # the first three tests' server, stopped before any other server of this module starts


def stop_others(servers) -> None:
    """Free the cores and memory for a new server: the pool's and this module's shared one."""
    servers.close()
    for server in SHARED:
        server.stop()


def start_tp4(servers, model_path, *extra: str):
    """A TP 4 server with fault injection."""
    stop_others(servers)
    return servers.process(model_path, tp_size=4, ft=True, extra_args=FT_FLAGS + list(extra)).start()


@pytest.fixture(scope="module")
def ft_server(servers, tiny_moe_model):
    """The module's shared server (MoE), taken one failure further by each of the first three tests."""
    server = start_tp4(servers, tiny_moe_model, *RESPAWN)
    SHARED.append(server)
    yield server
    server.stop()


@pytest.fixture
def fresh_ft_server(servers, tiny_model, tmp_path):
    """A fresh TP 4 server that also publishes its fault events on a PUB socket, CURVE-keyed by a secret. No
    `--ft-respawn`: its one restart, at the end, is an operator's rejoin (the fork server for restarts starts then)."""
    from ft.ports import free_port

    secret = tmp_path / "secret"
    secret.write_text("a deployment secret of enough bytes")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = start_tp4(servers, tiny_model, "--ft-events-endpoint", endpoint, "--ft-secret-file", str(secret))
    server.events_endpoint, server.secret_file = endpoint, str(secret)
    yield server
    server.stop()


def status(server) -> dict:
    return requests.get(f"{server.url}/ft/status", timeout=30).json()


def inject(server, rank: int, kind: str) -> dict:
    response = requests.post(f"{server.url}/ft/inject_fault", json={"rank": rank, "kind": kind}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def run_with_fault(server, fault, prompts=FAILOVER_PROMPTS, after_tokens: int = 8) -> list[dict]:
    """The prompts at once, `fault()` mid-decode (see client.run_with_fault); every final response."""
    return client.run_with_fault(server.url, fault, prompts, NEW_TOKENS, after_tokens)


def _reference(model_path: str):
    return lambda prompts: greedy_token_ids(model_path, prompts, NEW_TOKENS)


@pytest.fixture
def reference(tiny_model):
    return _reference(tiny_model)


@pytest.fixture
def moe_reference(tiny_moe_model):
    return _reference(tiny_moe_model)


def planned_expert_bytes(model_path: str, dead: int) -> int:
    """Bytes of MLP-column (expert) moves the planner orders for TP 4 -> 3 when worker `dead` dies."""
    from transformers import AutoConfig

    from ft.model_config import model_shape_of
    from ft.partition import TPLayout
    from ft.planner import plan_migration

    shape = model_shape_of(AutoConfig.from_pretrained(model_path))
    plan = plan_migration(shape, dict(enumerate(TPLayout.even(shape, 4).shards)), [w for w in range(4) if w != dead])
    return sum(m.nbytes for m in plan.moves if m.dim == "mlp_columns")


def one_worker_share_bytes(server) -> int:
    import re

    reads = re.findall(r"sglang-ft: read (\d+) of", server.log_text())
    return int(reads[0])  # rank 0's slices at launch (TP 4): one worker's share, norms included


def checkpoint_bytes(model_path: str) -> int:
    return sum(os.path.getsize(path) for path in glob.glob(os.path.join(model_path, "*.safetensors")))


def test_sigkill_mid_decode_restores_kv_without_reprefill(ft_server, moe_reference):
    expected = moe_reference(FAILOVER_PROMPTS + [CACHED_PROMPT])
    before = generate(ft_server.url, CACHED_PROMPT, NEW_TOKENS)  # finished: its KV stays in the radix cache
    cache = status(ft_server)["weight_cache"]  # the node's copy of the checkpoint (--ft-weight-cache host, default)
    assert cache["state"] == "complete" and cache["bytes"] == checkpoint_bytes(ft_server.model_path)
    victim = status(ft_server)["workers"][2]["pid"]
    results = run_with_fault(ft_server, lambda: inject(ft_server, 2, "kill"))
    assert [r["output_ids"] for r in results] == expected[:-1]
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    st = status(ft_server)
    assert st["epoch"] == 1 and st["tp_size"] == 3
    (recovery,) = st["recoveries"]
    assert recovery["cause"].startswith("worker 2")
    # the slices only the dead worker held came from the copy in host memory, none from disk
    assert recovery["bytes_reloaded"] == 0 and 0 < recovery["bytes_from_host_cache"] < one_worker_share_bytes(ft_server)
    assert recovery["bytes_p2p"] > 0 and recovery["detect_ms"] >= 0 and recovery["recover_ms"] > 0
    # the experts' columns moved exactly as the planner's MLP-column moves say (every expert's slice of them)
    assert recovery["expert_bytes_moved"] == planned_expert_bytes(ft_server.model_path, dead=2) > 0
    # The dead worker's KV heads came back from the backup store; nothing was prefilled again: every in-flight
    # request was re-admitted with its whole prompt (and more) matched in the radix cache.
    assert_kv_came_from_the_store(recovery, len(FAILOVER_PROMPTS))
    assert (st["kv_blocks_restored"], st["kv_tokens_recomputed"]) == (recovery["kv_blocks_restored"],
                                                                     recovery["kv_tokens_recomputed"])
    live = [w for w in st["workers"] if w["rank"] is not None]
    assert all(w["kv_backup_sent"] > 0 and w["kv_backup_dropped"] == 0 for w in live)  # from their heartbeats
    # SGLang's own /metrics shows the same, beside SGLang's sglang:* metrics
    from prometheus_client.parser import text_string_to_metric_families

    metrics = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for family in
               text_string_to_metric_families(requests.get(f"{ft_server.url}/metrics", timeout=30).text)
               for sample in family.samples}
    assert any(name.startswith("sglang:") for name, _ in metrics)
    assert (metrics[("sglang_ft_epoch", ())], metrics[("sglang_ft_tp_size", ())]) == (1, 3)
    assert metrics[("sglang_ft_live_workers", ())] == 3 and metrics[("sglang_ft_kv_backup_store_healthy", ())] == 1
    failure = (("cause_kind", "failure"),)
    assert metrics[("sglang_ft_recoveries_total", failure)] == 1
    assert metrics[("sglang_ft_recovery_seconds_count", failure)] == 1
    assert metrics[("sglang_ft_recovery_seconds_sum", failure)] * 1e3 == pytest.approx(
        recovery["detect_ms"] + recovery["recover_ms"], abs=0.5)
    assert metrics[("sglang_ft_kv_blocks_restored_total", ())] == recovery["kv_blocks_restored"]
    assert metrics[("sglang_ft_kv_backup_bytes_total", ())] >= sum(w["kv_backup_bytes"] for w in live) > 0
    # SGLang's own log: the first prefill after the regroup computes one token per request, the rest is cached.
    resumed = ft_server.log_text().split("epoch 1 recovered")[1]
    first_prefill = re.search(r"Prefill batch, #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+)", resumed)
    assert first_prefill and int(first_prefill[1]) == int(first_prefill[2]) == len(FAILOVER_PROMPTS)
    for stage in ("rebuild_process_groups", "park_requests", "lockstep_check", "reshard_weights", "restore_kv",
                  "recreate_attention_backend"):
        assert f"recovery to epoch 1: {stage} done" in ft_server.log_text()
    # SGLang's attention backend was built again on each survivor for its new (uneven) heads: 3 ranks share the
    # config's KV heads, each with its GQA groups' query heads; CPU has no graphs, so none is re-captured
    config = json.loads((Path(ft_server.model_path) / "config.json").read_text())
    rebuilt = re.findall(r"recovery to epoch 1: recreate_attention_backend done in [\d.]+ ms \((\w+) re-created for "
                         r"(\d+) query heads, (\d+) KV heads here\)", ft_server.log_text())
    assert len(rebuilt) == 3 and {name for name, _, _ in rebuilt} == {"TorchNativeAttnBackend"}
    assert sum(int(kv) for _, _, kv in rebuilt) == config["num_key_value_heads"]
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    assert all(int(q) == int(kv) * group for _, q, kv in rebuilt)
    assert "recreate_attention_backend" in recovery["stage_ms"] and "recapture_graphs" not in recovery["stage_ms"]
    assert ft_server.log_text().count("no device graphs to re-capture for epoch 1 (graphs off on cpu)") == 3
    # The survivors' groups were connected before the failure (standby_groups.py): every survivor installed them,
    # and the stage no longer pays a store and a full gloo connect (it took 0.36-0.45 s that way on this machine).
    installed = re.findall(r"epoch 1: rebuild_process_groups done in ([\d.]+) ms \(rank \d of 3, from standby groups",
                           ft_server.log_text())
    assert len(installed) == 3 and recovery["stage_ms"]["rebuild_process_groups"] < 300, installed
    # A prefix cached before the failure is still cached after it, with the restored heads' KV correct.
    after = generate(ft_server.url, CACHED_PROMPT, NEW_TOKENS)
    assert after["meta_info"]["cached_tokens"] >= before["meta_info"]["prompt_tokens"] - 1
    assert after["output_ids"] == before["output_ids"] == expected[-1]


def test_backup_store_death_under_load_then_respawn_and_resync(ft_server, moe_reference):
    """Second on the shared server (TP 3): the store dies under load and is respawned; every worker re-sends what
    it holds, so the next failure (TP 3 -> 2) restores from the new store with nothing recomputed."""
    expected = moe_reference(FAILOVER_PROMPTS)
    st = status(ft_server)
    assert (st["epoch"], st["tp_size"]) == (1, 3)
    first = wait_for(lambda: (s := status(ft_server)["kv_backup"])["store"] and s, what="the backup store")
    assert first["state"] == "healthy" and first["restarts"] == 0
    results = run_with_fault(ft_server, lambda: os.kill(first["pid"], signal.SIGKILL))
    assert [r["output_ids"] for r in results] == expected  # serving went on while the store was gone
    backup = wait_for(lambda: (s := status(ft_server)["kv_backup"])["store"] and s, what="the respawned store")
    assert backup["restarts"] == 1 and backup["pid"] != first["pid"]
    assert [e["event"] for e in backup["events"]] == ["started", "died (exit -9)", "started"]
    generate(ft_server.url, FAILOVER_PROMPTS[0], NEW_TOKENS)
    wait_for(lambda: ft_server.log_text().count("to the restarted backup store") == 3, what="every worker's resync")
    assert status(ft_server)["kv_backup"]["store"]["writes"] > 0  # backup resumed into the new store

    results = run_with_fault(ft_server, lambda: inject(ft_server, 1, "kill"))
    assert [r["output_ids"] for r in results] == expected
    st = wait_for(lambda: (s := status(ft_server))["epoch"] == 2 and len(s["recoveries"]) == 2 and s,
                  what="the recovery")
    assert st["tp_size"] == 2
    assert_kv_came_from_the_store(st["recoveries"][-1], len(FAILOVER_PROMPTS))


def test_the_last_failure_streams_across_down_to_tp1_then_a_rejoin_by_hand(ft_server, moe_reference):
    """Third on the shared server (TP 2): the last failure while a streaming request is in flight, then an
    operator brings the worker back (automatic restarts are off here): TP 1 -> 2."""
    expected = moe_reference(FAILOVER_PROMPTS)
    st = status(ft_server)
    assert (st["epoch"], st["tp_size"]) == (2, 2)
    victim = next(w["worker"] for w in st["workers"] if w["rank"] == 1)
    body = {"text": FAILOVER_PROMPTS[1], "sampling_params": {**GREEDY, "max_new_tokens": NEW_TOKENS}, "stream": True}
    chunks, errors = [], []
    with requests.post(f"{ft_server.url}/generate", json=body, stream=True, timeout=600) as response:
        for n, line in enumerate(response.iter_lines()):
            if n == 5:
                inject(ft_server, 1, "kill")
            if line.startswith(b"data:") and line != b"data: [DONE]":
                chunk = json.loads(line[5:])
                (errors if "error" in chunk else chunks).append(chunk)
    assert errors == []
    assert chunks[-1]["output_ids"] == expected[1]
    st = wait_for(lambda: (s := status(ft_server))["epoch"] == 3 and len(s["recoveries"]) == 3 and s)
    assert st["tp_size"] == 1
    assert [r["output_ids"] for r in [generate(ft_server.url, p, NEW_TOKENS) for p in FAILOVER_PROMPTS[:3]]] == \
        expected[:3]

    survivor = next(w["worker"] for w in st["workers"] if w["rank"] == 0)
    rejoin = lambda worker: requests.post(f"{ft_server.url}/ft/rejoin", json={"worker": worker}, timeout=30)  # noqa
    assert rejoin(survivor).status_code == 409 and rejoin(9).status_code == 400
    # one client in a closed loop of long requests through the rejoin (TP 1 -> 2): the joiner takes half the KV
    # heads of the request in flight from the survivor, peer to peer
    long_prompts = FAILOVER_PROMPTS[:2]
    load = Load(ft_server.url, long_prompts, LONG_TOKENS,
                expected=greedy_references(ft_server.model_path, long_prompts, LONG_TOKENS)).start(1)
    try:
        wait_for(lambda: load.completed >= 1, timeout_s=120, what="a long request at TP 1")
        # the next request decoding, so one is in the scheduler at the rejoin (a clean run ordered it in the gap
        # between two requests of the closed loop: nothing in flight, no KV to move)
        completed_at = time.monotonic()
        wait_for(lambda: load.tokens_between(completed_at, float("inf")) >= 2, timeout_s=60,
                 what="the next long request decoding")
        assert rejoin(victim).json() == {"rejoining": victim}
        st = wait_for(lambda: (s := status(ft_server))["tp_size"] == 2 and len(s["recoveries"]) == 4 and s,
                      timeout_s=300, what=f"worker {victim} to rejoin")
        at_rejoin = load.completed
        wait_for(lambda: load.completed > at_rejoin, timeout_s=120, what="a long request at TP 2")
    finally:
        load.finish()
    assert (load.mismatched, load.failed_attempts, load.unfinished) == (0, 0, 0), (load.failures, load.mismatches)
    joined = st["recoveries"][-1]
    assert joined["joined"] == [victim] and joined["bytes_reloaded"] == 0
    assert joined["kv_bytes_p2p"] > 0 and joined["kv_tokens_recomputed"] == 0  # its KV heads from the survivor
    assert [r["output_ids"] for r in [generate(ft_server.url, p, NEW_TOKENS) for p in FAILOVER_PROMPTS[:3]]] == \
        expected[:3]

    # The backup's worst instant: rank 1 dies right after a step's forward, before that step's KV is copied for the
    # store (the KV backup runs between steps, kv_backup_stream.after_step). Its peers finished the step, so that
    # step's rows of its heads are nowhere: only they are recomputed (the fault lands mid-decode: one token per
    # request in flight, at most), the rest comes from the store, and every output is still transformers'.
    results = run_with_fault(ft_server, lambda: inject(ft_server, 1, "kill_uncopied"))
    assert [r["output_ids"] for r in results] == expected
    assert "dies after a step, before backing up its KV" in ft_server.log_text()
    st = wait_for(lambda: (s := status(ft_server))["tp_size"] == 1 and len(s["recoveries"]) == 5 and s)
    recovery = st["recoveries"][-1]
    assert 0 < recovery["kv_tokens_recomputed"] <= len(FAILOVER_PROMPTS) and recovery["kv_blocks_restored"] > 0


def _metric_values(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for family in
            text_string_to_metric_families(requests.get(f"{server.url}/metrics", timeout=30).text)
            for sample in family.samples}


def test_rank0_death_then_a_hung_worker_is_fenced_then_a_drain(fresh_ft_server, reference):
    """Also the fault events (SSE and PUB), the probes through a regroup, and the end: every worker lost."""
    from tests.event_stream import EventStream, ProbeWatch, PubEvents, stalled_client
    from ft.sockets import load_keys

    ft_server = fresh_ft_server
    expected = reference(FAILOVER_PROMPTS)
    stream = EventStream(ft_server.url)
    pub = PubEvents(ft_server.events_endpoint, load_keys(ft_server.secret_file))
    stalled = stalled_client(ft_server.url)  # reads nothing through every fault below: slows nobody
    wait_for(lambda: requests.get(f"{ft_server.url}/ft/events/stats", timeout=10).json()["clients"] == 2,
             what="both event clients")
    time.sleep(0.5)  # let the PUB subscription reach the server
    probes = ProbeWatch(ft_server.url, ("/ready", "/ft/ready", "/health_generate"))
    # rank 0 dies at the worst instant: every rank finished a step, rank 0 never sent its tokens (kill_unsent)
    results = run_with_fault(ft_server, lambda: inject(ft_server, 0, "kill_unsent"))
    assert [r["output_ids"] for r in results] == expected  # the streamed one too: no token missing
    log = ft_server.log_text()
    assert "dies before sending the output" in log
    assert re.search(r"the old rank 0 died before sending its last output: [1-9]\d* requests rewound", log)
    st = wait_for(lambda: (s := status(ft_server))["epoch"] == 1 and len(s["recoveries"]) == 1 and s)
    assert st["tp_size"] == 3 and [w["rank"] for w in st["workers"]] == [None, 0, 1, 2]
    codes = probes.stop()
    assert all(c and set(c) == {200} for c in codes.values()), codes  # liveness and readiness through the regroup
    # the events, in order, with ids: worker 0 dead at rank 0, the regroup to epoch 1 started and done at TP 3
    events = stream.wait_for(lambda e: any(x["type"] == "regroup_done" for x in e), what="regroup_done")
    ids = [e["id"] for e in events]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    kinds = [e["type"] for e in events if e["type"] not in ("worker_suspect", "worker_healthy")]
    assert kinds == ["worker_dead", "regroup_started", "regroup_done"], events
    dead, _, done = (e for e in events if e["type"] in kinds)
    assert (dead["worker"], dead["rank"], dead["epoch"], dead["cause"]) == (0, 0, 0, "process exit")
    assert (done["epoch"], done["tp_size"]) == (1, 3) and done["recover_ms"] == st["recoveries"][0]["recover_ms"]
    ready = requests.get(f"{ft_server.url}/ft/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["tp_size"] == 3 and ready.json()["launch_tp_size"] == 4
    assert ready.json()["degraded"] is True
    metrics = _metric_values(ft_server)
    assert metrics[("sglang_ft_capacity_ratio", ())] == 0.75
    # SGLang's own KV gauges come from the new rank 0 (worker 1); the dead rank 0's are gone, not frozen
    gauges = lambda name, m: {dict(k[1]).get("tp_rank"): v for k, v in m.items() if k[0] == name}  # noqa: E731
    new_rank0 = st["workers"][1]
    assert gauges("sglang:max_total_num_tokens", metrics)["1"] == new_rank0["kv_tokens_used"] + \
        new_rank0["kv_tokens_free"]
    assert not [k for k in metrics if k[0].startswith("sglang:") and dict(k[1]).get("tp_rank") == "0"
                and k[0] in ("sglang:max_total_num_tokens", "sglang:token_usage", "sglang:num_used_tokens")]
    wait_for(lambda: "1" in gauges("sglang:num_used_tokens", _metric_values(ft_server)), timeout_s=30,
             what="the new rank 0's sglang:num_used_tokens")
    last_seen = events[-1]["id"]
    stream.close()  # a client goes away; it reconnects after the next two faults with Last-Event-ID
    # the new rank 0 publishes /v1/loads (SGLang gave a snapshot writer only to the rank 0 it started)
    load = server_load(ft_server.url, timeout_s=10)
    assert load["num_running_reqs"] == 0 and load["num_used_tokens"] == 0

    hung = st["workers"][3]["pid"]  # now TP rank 2
    stopped_at = time.monotonic()
    results = run_with_fault(ft_server, lambda: inject(ft_server, 2, "hang"))
    assert [r["output_ids"] for r in results] == expected
    st = status(ft_server)
    detection = [d for d in st["detections"] if d["pid"] == hung and d["state"] == "dead"]
    assert detection and declared_for_silence(detection[0]["cause"])
    assert st["epoch"] == 2 and st["tp_size"] == 2
    assert time.monotonic() - stopped_at < 120
    psutil.Process(hung).resume()  # SIGCONT: the stale worker must notice it was replaced and exit
    wait_for(lambda: not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE,
             timeout_s=30, what="the fenced worker to exit")
    assert [generate(ft_server.url, p, NEW_TOKENS)["output_ids"] for p in FAILOVER_PROMPTS[:2]] == expected[:2]
    assert status(ft_server)["epoch"] == 2

    # an operator drains worker 2 (now rank 1) under load: the group narrows to TP 1 with nothing lost
    drained = status(ft_server)["workers"][2]["pid"]
    drain = lambda worker: requests.post(f"{ft_server.url}/ft/drain", json={"worker": worker}, timeout=30)  # noqa
    assert drain(0).status_code == 409 and drain(7).status_code == 400 and drain(-1).status_code == 400
    results = run_with_fault(ft_server, lambda: drain(2).raise_for_status())
    assert [r["output_ids"] for r in results] == expected
    st = wait_for(lambda: (s := status(ft_server))["epoch"] == 3 and len(s["recoveries"]) == 3 and s)
    assert st["tp_size"] == 1 and st["recoveries"][-1]["cause"] == "drain of worker 2"
    # (a busy machine may add "suspect" records after it, so look the drain's own record up)
    assert [d["pid"] for d in st["detections"] if d["cause"] == "drained"] == [drained]
    wait_for(lambda: not psutil.pid_exists(drained) or psutil.Process(drained).status() == psutil.STATUS_ZOMBIE,
             timeout_s=30, what="the drained worker to exit")
    assert drain(1).status_code == 409  # the last worker of the group stays

    # the client reconnects with Last-Event-ID: every event since, in order, nothing twice
    stream = EventStream(ft_server.url, last_id=last_seen)
    events = stream.wait_for(lambda e: any(x["type"] == "regroup_done" and x["epoch"] == 3 for x in e),
                             what="the drain's regroup_done")
    assert [e["id"] for e in events] == list(range(last_seen + 1, last_seen + 1 + len(events)))
    kinds = [(e["type"], e["epoch"]) for e in events if e["type"] not in ("worker_suspect", "worker_healthy")]
    assert kinds == [("worker_dead", 1), ("regroup_started", 2), ("regroup_done", 2), ("worker_drained", 2),
                     ("regroup_started", 3), ("regroup_done", 3)], events
    last_done = [e for e in events if e["type"] == "regroup_done"][-1]  # a busy machine may add suspect records after
    assert last_done["tp_size"] == 1 and next(e for e in events if e["type"] == "worker_dead")["worker"] == 3
    # the PUB socket carried the same events (ids included) as the stream, from before the first fault
    replay = EventStream(ft_server.url, last_id=0)
    everything = replay.wait_for(lambda e: e and e[-1]["id"] == events[-1]["id"], what="the whole replay")
    replay.close()
    wait_for(lambda: pub.events and pub.events[-1]["id"] == events[-1]["id"], what="the PUB socket's events")
    assert pub.events[0]["id"] <= ids[0] and pub.events == [e for e in everything if e["id"] >= pub.events[0]["id"]]
    stats = requests.get(f"{ft_server.url}/ft/events/stats", timeout=10).json()
    assert stats["pub"]["sent"] >= len(pub.events) and stats["missed_upstream"] == 0

    # every worker that holds the model is lost (a restarted one is still loading): no group can serve
    assert requests.post(f"{ft_server.url}/ft/rejoin", json={"worker": 2}, timeout=30).status_code == 200
    wait_for(lambda: "restarting worker 2" in ft_server.log_text(), what="worker 2's restart")
    inject(ft_server, 0, "kill")
    events = stream.wait_for(lambda e: any(x["type"] == "replica_lost" for x in e), what="replica_lost")
    assert [e["type"] for e in events if e["type"] in ("worker_dead", "replica_lost")][-2:] == ["worker_dead",
                                                                                                 "replica_lost"]
    wait_for(lambda: requests.get(f"{ft_server.url}/ready", timeout=10).status_code == 503, timeout_s=10,
             what="/ready to answer 503")
    ready = requests.get(f"{ft_server.url}/ft/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["ready"] is False and ready.json()["live_workers"] == 0
    assert ready.json()["reason"].startswith("worker 1: process exit")
    stream.close()
    pub.close()
    stalled.close()
