"""`make demo`: make the tiny model, serve it with `--ft` at TP 3 (unequal widths), check it against transformers.

    python -m sglang_ft.demo [--tp-size N] [--requests N] [--max-new-tokens N]

It launches `python -m sglang.launch_server --ft` exactly as a user would, shows how the heads were split,
sends concurrent requests, compares every greedy output with HuggingFace transformers, prints throughput, and
stops the server (no process is left behind).
"""

from __future__ import annotations

import argparse
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.hf_reference import greedy_token_ids
from sglang_ft.tools.server_process import ServerProcess

DEMO_PROMPTS = [
    "The model server",
    "Heartbeat epoch recover restart reload weights",
    "Tell me a story about a quiet river",
    "rank tensor parallel group heads cache prefix radix failure",
    "one two three",
    "The worker sends a heartbeat to the store",
    "Seven blue mountains and a bright city",
    "What is the next token",
]


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        make_tiny_model.main([str(path)])
    return path


def _generate(url: str, prompt: str, max_new_tokens: int) -> dict:
    body = {"text": prompt, "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": max_new_tokens}}
    response = requests.post(f"{url}/generate", json=body, timeout=300)
    response.raise_for_status()
    return response.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglang_ft.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/sglang-ft/models/tiny-llama")
    parser.add_argument("--tp-size", type=int, default=3)
    parser.add_argument("--requests", type=int, default=len(DEMO_PROMPTS))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_new_tokens < 1:
        parser.error("--requests and --max-new-tokens must be positive")

    model = ensure_model(args.model_dir)
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(args.requests)]
    print(f"[demo] launching: python -m sglang.launch_server --ft --model-path {model} --tp-size {args.tp_size}")
    with ServerProcess(str(model), tp_size=args.tp_size, ft=True) as server:
        print(f"[demo] healthy in {server.startup_s:.1f}s at {server.url} (log: {server.log_path})")
        for line in server.log_text().splitlines():
            if match := re.search(r"sglang-ft: (TP rank .*)", line):
                print(f"[demo]   {match.group(1)}")
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            outputs = list(pool.map(lambda p: _generate(server.url, p, args.max_new_tokens), prompts))
        elapsed = time.monotonic() - started
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    print(f"[demo] {len(outputs)} concurrent requests, {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tok/s)")
    reference = greedy_token_ids(str(model), prompts, args.max_new_tokens)
    matches = sum(o["output_ids"] == ref for o, ref in zip(outputs, reference))
    for prompt, out in list(zip(prompts, outputs))[:3]:
        print(f"[demo]   {prompt!r} -> {out['text'][:60]!r}")
    print(f"[demo] greedy outputs equal to transformers: {matches}/{len(outputs)}")
    return 0 if matches == len(outputs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
