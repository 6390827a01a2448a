"""The options the FT runtime is started with, passed in as values: nothing under ft/ reads a global for them.

The SGLang side builds them from its `--ft` flags (`FtArgs.controller_options` and `FtArgs.agent_options` in
python/sglang_ft/server_args.py). The controller runs as a process of its own and gets its options as JSON in its
environment (`CONTROLLER_OPTIONS_ENV`); the agent lives in the scheduler process and takes them as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

CONTROLLER_OPTIONS_ENV = "FT_CONTROLLER_OPTIONS"


@dataclass(frozen=True)
class ControllerOptions:
    """One TP group's controller: where it listens, how it judges silence, what it may restart."""

    tp_size: int
    model_path: str  # a local directory with the model's config.json: the controller plans by its shape
    heartbeat_endpoint: str
    control_endpoint: str
    order_endpoint: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    runtime_dir: str  # removed by the controller when the launcher is gone
    enable_fault_injection: bool = False
    hybrid: bool = False  # layouts keep H // W KV heads per worker and serve the H % W remainder heads apart
    respawn: bool = False
    respawn_delay_s: float = 5.0
    nnodes: int = 1  # the controller's node holds tp_size // nnodes workers: only their pids mean anything there
    dp_rank: int | None = None  # the data-parallel replica of this group (its metrics' label), None without
    kv_backup: bool = False  # run the node's KV backup store beside the controller
    kv_backup_endpoint: str = ""
    kv_fetch_endpoint: str = ""
    secret_file: str = ""  # the deployment secret keying TCP sockets (ft/sockets.py)
    weight_cache_dir: str = ""  # the node's copy of the checkpoint in host memory (ft/weight_cache.py), "" if off

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str) -> "ControllerOptions":
        return msgspec.json.decode(text, type=cls)


@dataclass(frozen=True)
class AgentOptions:
    """One worker's agent: its identity, where the controller hears it, where the orders come from."""

    worker: int  # the worker id: its TP rank at launch
    heartbeat_endpoint: str
    order_endpoint: str
    heartbeat_interval_s: float
    order_wait_s: float = 120.0  # after a failure, how long to wait for the controller's order before giving up
