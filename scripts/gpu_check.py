"""The GPU acceptance check of sglang-ft (issue 27): `--ft` at TP N (N = the GPUs, at most 4) with CUDA graphs on.

For each fault, on a fresh server, mid-decode: one rank SIGKILLed, one rank SIGSTOPped (hung). The outputs must
equal transformers' greedy ones, the cached KV must come back from the backup store with nothing recomputed, the
CUDA graphs must be captured again after the regroup (SGLang's "CUDA graph end" log line), and the recovery's
timeline is printed. Without two CUDA devices and SGLang's CUDA build it says so and exits 0.

    python scripts/gpu_check.py [--model PATH]   (default: a tiny model made here)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tempfile
import threading
import time

SKIP = "skipped: needs >= 2 CUDA devices and SGLang's CUDA build"
PROMPTS = ["The capital of France is", "One, two, three,", "def fibonacci(n):", "In the beginning"]
NEW_TOKENS = 48
GRAPH_CAPTURED = re.compile(r"Capture .*CUDA graph end")


def gpus() -> int:
    """CUDA devices usable by SGLang's CUDA build (0 without it)."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available() or importlib.util.find_spec("sgl_kernel") is None:
        return 0
    return torch.cuda.device_count()


def run_with_fault(url: str, fault) -> list[list[int]]:
    """Every prompt at once; `fault()` once the first has streamed 8 tokens; every request's output ids."""
    import requests

    body = lambda p, stream=False: {"text": p, "stream": stream,  # noqa: E731
                                    "sampling_params": {"temperature": 0.0, "ignore_eos": True,
                                                        "max_new_tokens": NEW_TOKENS}}
    results, decoding = [None] * len(PROMPTS), threading.Event()

    def streamed():
        with requests.post(f"{url}/generate", json=body(PROMPTS[0], True), stream=True, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith(b"data:") and line != b"data: [DONE]":
                    results[0] = json.loads(line[5:])
                    if len(results[0]["output_ids"]) >= 8:
                        decoding.set()

    def one(i):
        results[i] = requests.post(f"{url}/generate", json=body(PROMPTS[i]), timeout=600).json()

    threads = [threading.Thread(target=streamed)] + [threading.Thread(target=one, args=(i,))
                                                     for i in range(1, len(PROMPTS))]
    for thread in threads:
        thread.start()
    if not decoding.wait(timeout=300):
        raise AssertionError("the requests never started decoding")
    fault()
    for thread in threads:
        thread.join(timeout=600)
    return [r["output_ids"] for r in results]


def check(model: str, tp: int, kind: str, expected: list[list[int]]) -> None:
    import requests

    from sglang_ft.tools.server_process import ServerProcess

    victim = tp - 1
    with ServerProcess(model, tp_size=tp, ft=True, extra_args=["--ft-enable-fault-injection"]).start() as server:
        inject = lambda: requests.post(f"{server.url}/ft/inject_fault", json={"rank": victim, "kind": kind},  # noqa
                                       timeout=30).raise_for_status()
        outputs = run_with_fault(server.url, inject)
        deadline = time.monotonic() + 120
        while not (status := requests.get(f"{server.url}/ft/status", timeout=30).json())["recoveries"]:
            if time.monotonic() > deadline:
                raise AssertionError(f"no recovery after the {kind}")
            time.sleep(1)
        recovery = status["recoveries"][0]
        print(f"{kind} of rank {victim} at TP {tp}: detect {recovery['detect_ms']} ms, recover "
              f"{recovery['recover_ms']} ms, stages {json.dumps(recovery.get('stage_ms', {}))}")
        assert outputs == expected, f"outputs after the {kind} differ from transformers'"
        assert recovery["kv_blocks_restored"] > 0 and recovery["kv_tokens_recomputed"] == 0, recovery
        after = server.log_text().split("recovery to epoch 1", 1)[-1]
        assert GRAPH_CAPTURED.search(after), "the CUDA graphs were not captured again after the regroup"
        print(f"{kind}: outputs equal transformers', KV restored, CUDA graphs captured again")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model path (default: a tiny Llama made here)")
    args = parser.parse_args(argv)
    tp = min(gpus(), 4)
    if tp < 2:
        print(SKIP)
        return 0
    from sglang_ft.tools import make_tiny_model
    from sglang_ft.tools.hf_reference import greedy_token_ids

    model = args.model or tempfile.mkdtemp(prefix="sglang-ft-gpu-check-")
    if not args.model:
        make_tiny_model.main([model])
    expected = greedy_token_ids(model, PROMPTS, NEW_TOKENS)
    for kind in ("kill", "hang"):  # SIGKILL, then SIGSTOP (ft/faults.py), each on a fresh server
        check(model, tp, kind, expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
