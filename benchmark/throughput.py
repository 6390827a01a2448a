"""Output tokens/s of SGLang with and without `--ft` (and `--ft` without KV backup), at batch 1, 8 and 32 for TP
1..4, beside HuggingFace.

    python benchmark/throughput.py [--tp 1 2 3 4] [--batches 1 8 32] [--max-new-tokens 64] [--out results/]

Every configuration runs in this one process, one server at a time, so the ratios (FT on vs off, SGLang vs
transformers batch 1) are measured side by side on the same noisy machine. Writes a Markdown table and JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.server_process import ServerProcess

PROMPT = "The model server sends a heartbeat to every worker in the tensor parallel group"


def sglang_tokens_per_s(url: str, batch: int, max_new_tokens: int) -> float:
    body = {"text": PROMPT, "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": max_new_tokens}}

    def one(i: int) -> int:
        r = requests.post(f"{url}/generate", json={**body, "text": f"{PROMPT} {i}"}, timeout=600)
        r.raise_for_status()
        return r.json()["meta_info"]["completion_tokens"]

    one(-1)  # warm-up
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=batch) as pool:
        tokens = sum(pool.map(one, range(batch)))
    return tokens / (time.monotonic() - started)


def hf_tokens_per_s(model_path: str, max_new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(ids, **kwargs)  # warm-up
        started = time.monotonic()
        out = model.generate(ids, **kwargs)
    return (out.shape[1] - ids.shape[1]) / (time.monotonic() - started)


def run(args) -> dict:
    model = make_tiny_model.ensure_model(args.model_dir)
    results = {"date": dt.date.today().isoformat(), "machine": machine(), "model": str(model),
               "max_new_tokens": args.max_new_tokens, "hf_batch1_tok_s": hf_tokens_per_s(str(model), args.max_new_tokens),
               "rows": []}
    print(f"transformers batch 1: {results['hf_batch1_tok_s']:.1f} tok/s", flush=True)
    variants = [(False, []), (True, ["--ft-kv-backup", "off"]), (True, [])]  # plain, FT without and with backup
    for tp in args.tp:
        for ft, extra in variants:
            row = {"tp": tp, "ft": ft, "kv_backup": ft and not extra}
            try:
                with ServerProcess(str(model), tp_size=tp, ft=ft, extra_args=extra) as server:
                    row["startup_s"] = server.startup_s
                    for batch in args.batches:
                        row[f"batch{batch}_tok_s"] = sglang_tokens_per_s(server.url, batch, args.max_new_tokens)
            except (RuntimeError, TimeoutError, requests.RequestException) as exc:
                row["error"] = str(exc).splitlines()[0]
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
    return results


def machine() -> str:
    import os

    import psutil

    return f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python {sys.version.split()[0]}"


def markdown(results: dict, batches: list[int]) -> str:
    hf = results["hf_batch1_tok_s"]
    head = "| TP | --ft | launch to healthy (s) | " + " | ".join(f"batch {b} tok/s" for b in batches)
    head += f" | batch {batches[-1]} / HF batch 1 | --ft / plain (batch {batches[-1]}) |"
    lines = [f"Measured {results['date']} on {results['machine']}; tiny Llama ({results['model']}), "
             f"{results['max_new_tokens']} new tokens per request; transformers batch 1: {hf:.1f} tok/s.", "",
             head, "|" + "---|" * (len(batches) + 5)]
    plain = {r["tp"]: r for r in results["rows"] if not r["ft"]}
    for row in results["rows"]:
        label = ("on" if row.get("kv_backup", True) else "on, KV backup off") if row["ft"] else "off"
        if "error" in row:
            lines.append(f"| {row['tp']} | {label} | failed: {row['error'][:60]} |")
            continue
        last = row[f"batch{batches[-1]}_tok_s"]
        ratio = ""
        base = plain.get(row["tp"], {}).get(f"batch{batches[-1]}_tok_s")
        if row["ft"] and base:
            ratio = f"{last / base:.2f}"
        cells = " | ".join(f"{row[f'batch{b}_tok_s']:.1f}" for b in batches)
        lines.append(f"| {row['tp']} | {label} | {row['startup_s']:.1f} | {cells} | "
                     f"{last / hf:.1f}x | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/sglang-ft/models/tiny-llama")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    results = run(args)
    table = markdown(results, args.batches)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(results, indent=1))
    (args.out / "throughput.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
