"""Write a ShareGPT-format conversation file from the tiny model's corpus, for SGLang's load generator offline.

`python -m sglang.bench_serving` samples prompts from ShareGPT and would download it; this file has the same
shape (`[{"id", "conversations": [{"from": "human"|"gpt", "value"}, ...]}]`), so both `--dataset-name sharegpt`
and `--dataset-name random` read it with `--dataset-path` and nothing is downloaded.

    python -m sglang_ft.tools.make_sharegpt OUT.json [--conversations N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from sglang_ft.tools.make_tiny_model import build_corpus


def conversations(count: int, seed: int) -> list[dict]:
    """`count` two- to four-turn conversations with mixed lengths (1 to 12 corpus sentences a turn)."""
    rng = random.Random(seed)
    sentences = build_corpus(seed)
    out = []
    for i in range(count):
        turns = []
        for turn in range(2 * rng.randint(1, 2)):
            text = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 12)))
            turns.append({"from": "human" if turn % 2 == 0 else "gpt", "value": text})
        out.append({"id": f"sglang-ft-{seed}-{i}", "conversations": turns})
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m sglang_ft.tools.make_sharegpt", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--conversations", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.conversations < 1:
        parser.error("--conversations must be at least 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(conversations(args.conversations, args.seed)))
    print(f"wrote {args.conversations} ShareGPT-format conversations to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
