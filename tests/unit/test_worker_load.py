"""A worker's load for `/ft/status` (managers/scheduler_components/worker_load.py): what it holds and does, carried on its heartbeats.
The live numbers on an unequal TP 3 server are checked in test_serving_ft.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from ft.heartbeat import HeartbeatSender, MessageReceiver
from ft.messages import Heartbeat, WorkerLoad
from sglang_ft.managers.scheduler_components.worker_load import kv_bytes_per_token, outstanding_tokens


def req(prompt: int, output: int, max_new: int):
    return SimpleNamespace(origin_input_ids=[0] * prompt, output_ids=[0] * output,
                           sampling_params=SimpleNamespace(max_new_tokens=max_new))


def test_outstanding_tokens_count_what_is_left_to_compute():
    running = [req(10, 3, 8), req(5, 8, 8)]  # 5 and 0 tokens left to decode
    waiting = [req(20, 0, 4)]  # its whole prompt and output
    assert outstanding_tokens(running, waiting) == 5 + 0 + 20 + 4


def test_kv_bytes_per_token_follow_the_heads_held():
    def pool(heads: int):
        shape = (64, heads, 16)  # slots, KV heads, head dim
        return SimpleNamespace(k_buffer=[torch.zeros(shape, dtype=torch.float16) for _ in range(3)],
                               v_buffer=[torch.zeros(shape, dtype=torch.float16) for _ in range(3)])

    assert kv_bytes_per_token(pool(3)) == 3 * 16 * 2 * 3 * 2  # heads x dim x bytes x layers x (K, V)
    assert kv_bytes_per_token(pool(3)) * 2 == kv_bytes_per_token(pool(2)) * 3


def test_heartbeats_carry_the_load_and_survive_a_failing_probe(tmp_path):
    endpoint = f"ipc://{tmp_path}/beats"
    receiver = MessageReceiver(endpoint)
    load = WorkerLoad(q_heads=6, kv_heads=3, kv_tokens_used=10, kv_tokens_free=90, kv_bytes_per_token=384,
                      running_requests=1, waiting_requests=0, outstanding_tokens=7, last_step_ms=3.5,
                      last_step_collective_ms=1.25, steps=4, busy_ms_total=9.0)
    probes = iter([load])

    def probe():
        return next(probes)  # then StopIteration: a probe racing the scheduler must not stop the beats

    sender = HeartbeatSender(endpoint, worker=1, interval_s=0.02)
    sender.load_probe = probe
    sender.start()
    try:
        beats = []
        deadline = time.monotonic() + 10
        while len(beats) < 3 and time.monotonic() < deadline:
            beats += [m for m in receiver.poll(0.1) if isinstance(m, Heartbeat)]
    finally:
        sender.stop()
        receiver.close()
    assert len(beats) >= 3
    assert beats[0].load == load and all(b.load is None for b in beats[1:])
