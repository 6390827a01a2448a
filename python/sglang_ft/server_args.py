"""The `--ft` flags on SGLang's own command line, and their carrier into SGLang's subprocesses.

`ServerArgs.from_cli_args` keeps only dataclass fields, and the scheduler processes are spawned, so the FT options
travel in one environment variable (JSON) that every child inherits and reads back with `ft_args()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from functools import lru_cache

FT_ENV = "SGLANG_FT_ARGS"


@dataclasses.dataclass(frozen=True)
class FtArgs:
    """Options of the `ft` plugin. Every CLI flag is `--ft` or starts with `--ft-`."""

    enabled: bool = False

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "FtArgs":
        return cls(enabled=bool(getattr(args, "ft", False)))


def add_ft_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the sglang-ft group to SGLang's parser (an AFTER hook on `ServerArgs.add_cli_args`)."""
    if any(a.dest == "ft" for a in parser._actions):
        return
    group = parser.add_argument_group("sglang-ft (fault-tolerant tensor parallelism)")
    group.add_argument(
        "--ft",
        action="store_true",
        help="Serve with sglang-ft: elastic unequal-width TP for Llama-family models (Llama, Mistral, Qwen2).",
    )


def publish(ft: FtArgs) -> None:
    """Make `ft` visible to this process and every subprocess spawned after this call."""
    os.environ[FT_ENV] = ft.to_env()
    ft_args.cache_clear()


@lru_cache(maxsize=1)
def ft_args() -> FtArgs:
    """The FT options of this server (defaults, i.e. FT off, where `--ft` was not given)."""
    raw = os.environ.get(FT_ENV)
    return FtArgs(**json.loads(raw)) if raw else FtArgs()


def ft_enabled() -> bool:
    return ft_args().enabled


def cli_error(message: str) -> None:
    """Exit like argparse does: usage-style message on stderr, status 2."""
    print(f"sglang serve: error: {message}", file=sys.stderr)
    raise SystemExit(2)
