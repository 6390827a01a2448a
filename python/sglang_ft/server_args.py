"""Adapter of `sglang.srt.server_args`: the `--ft` flags on SGLang's command line, carried into its subprocesses.

`ServerArgs.from_cli_args` keeps only dataclass fields, and the scheduler processes are spawned, so the FT options
travel in one environment variable (JSON) that every child inherits and reads back with `ft_args()`.
Over 400 lines because it is the table of every `--ft-*` flag (declaration, help, and the check that names the flag
when its value is refused), which reads best in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from functools import lru_cache

from ft.options import AgentOptions, ControllerOptions
from ft.remainder_routing import POLICIES
from ft.sockets import read_secret, use_secret_file
from sglang_ft.sglang_surface import IDLE_SLEEP_POLL_S

logger = logging.getLogger(__name__)
FT_ENV = "SGLANG_FT_ARGS"
# SGLang's --max-queued-requests when --ft is on and it is not given: beyond it new requests get 503 (a few MB of
# queued prompts at most, where upstream's default queues without bound)
FT_DEFAULT_MAX_QUEUED_REQUESTS = 4096
CONTROLLER_PORT_OFFSET = 40  # past SGLang's own ports derived from --dist-init-addr (its port + 1 .. + 7)


@dataclasses.dataclass(frozen=True)
class FtArgs:
    """Options of the `ft` plugin. Every CLI flag is `--ft` or starts with `--ft-`."""

    enabled: bool = False
    heartbeat_interval_ms: int = 200
    heartbeat_timeout_ms: int = 1000  # 5 beats; 4x the worst serving gap measured here (README)
    enable_fault_injection: bool = False
    collective_timeout_s: int = 10
    kv_backup: bool = True
    kv_backup_queue: int = 1024
    respawn: bool = False
    respawn_delay_s: float = 5.0
    drain_timeout_s: float = 60.0
    attention: str = "tp"  # or "hybrid": the KV heads that do not divide evenly run as data-parallel attention
    routing: str = "prefix_load"  # which worker owns a request's remainder heads under hybrid attention
    kv_placement: str = "contiguous"  # or "cyclic": the remainder heads' KV rotates over the workers by block
    runtime_dir: str = ""  # where the FT controller's sockets live; set by the launcher
    # Across nodes (SGLang's --nnodes): the controller and the backup store run on node 0 and every node's workers
    # reach them over TCP at this host, on CONTROLLER_PORT_OFFSET + 0..4 past SGLang's --dist-init-addr port.
    nnodes: int = 1
    node_rank: int = 0
    controller_host: str = ""
    controller_port: int = 0
    # The deployment secret keying those TCP sockets (CURVE, ft/sockets.py); the same file on every node.
    secret_file: str = ""
    # Under SGLang's --dp-size M: M TP groups, each with a controller and a backup store of its own, in
    # runtime_dir/dp<k> (see `for_replica`).
    dp_size: int = 1
    dp_rank: int | None = None  # this replica's, in the options `for_replica` gives it (its metrics' label)
    events_endpoint: str = ""  # where the HTTP server also publishes fault events (ZMQ PUB), "" for nowhere
    weight_cache: str = "host"  # or "off": the node's copy of the checkpoint in host memory (ft/weight_cache.py)
    weight_cache_max_gb: float = 0.0  # its bound besides the node's free memory; 0 for none of its own
    weight_cache_dir: str = ""  # where the copy is (set by the launcher), "" when off

    def _endpoint(self, name: str, offset: int) -> str:
        if self.controller_port:
            return f"tcp://{self.controller_host}:{self.controller_port + offset}"
        return f"ipc://{self.runtime_dir}/{name}"

    @property
    def heartbeat_endpoint(self) -> str:
        return self._endpoint("heartbeat", 0)

    @property
    def control_endpoint(self) -> str:
        return self._endpoint("control", 1)

    @property
    def order_endpoint(self) -> str:
        """The controller publishes regroup and fencing orders here (ZMQ PUB)."""
        return self._endpoint("orders", 2)

    @property
    def kv_backup_endpoint(self) -> str:
        """Workers stream their KV to the backup store here (ZMQ PUSH -> PULL)."""
        return self._endpoint("kv-backup", 3)

    @property
    def kv_fetch_endpoint(self) -> str:
        """A regroup fetches lost heads' KV from the backup store here (ZMQ REQ -> REP)."""
        return self._endpoint("kv-fetch", 4)

    @property
    def rendezvous_host(self) -> str:
        """Where a regroup's TCPStore listens (hosted by the new rank 0, reached by every member)."""
        return self.controller_host or "127.0.0.1"

    def problems(self) -> list[str]:
        """Inconsistent FT flags, as messages naming the flag."""
        found = []
        if self.heartbeat_interval_ms <= 0:
            found.append(f"--ft-heartbeat-interval-ms must be positive, got {self.heartbeat_interval_ms}")
        if self.collective_timeout_s <= 0:
            found.append(f"--ft-collective-timeout-s must be positive, got {self.collective_timeout_s}")
        if self.kv_backup_queue <= 0:
            found.append(f"--ft-kv-backup-queue must be positive, got {self.kv_backup_queue}")
        if self.respawn_delay_s < 0:
            found.append(f"--ft-respawn-delay-s must not be negative, got {self.respawn_delay_s}")
        if self.drain_timeout_s < 0:
            found.append(f"--ft-drain-timeout-s must not be negative, got {self.drain_timeout_s}")
        if not self.weight_cache_max_gb >= 0:  # (NaN too)
            found.append(f"--ft-weight-cache-max-gb must not be negative, got {self.weight_cache_max_gb}")
        if self.nnodes > 1 and self.respawn:
            found.append("--ft-respawn is not supported with --nnodes > 1 yet (a node restarts its own workers)")
        if self.dp_size > 1 and self.respawn:
            found.append("--ft-respawn is not supported with --dp-size > 1 yet (a replica's workers are started by "
                         "SGLang's data-parallel controller)")
        if self.kv_placement == "cyclic" and self.attention == "hybrid":
            found.append("--ft-kv-placement cyclic and --ft-attention hybrid both place the remainder heads (by "
                         "block over every worker, or whole per request on one): choose one")
        found += self._secret_problems()
        if self.events_endpoint and not self.events_endpoint.startswith(("tcp://", "ipc://")):
            found.append(f"--ft-events-endpoint must be tcp://HOST:PORT or ipc://PATH, got {self.events_endpoint}")
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms:
            found.append(
                f"--ft-heartbeat-timeout-ms ({self.heartbeat_timeout_ms}) must exceed "
                f"--ft-heartbeat-interval-ms ({self.heartbeat_interval_ms})"
            )
        return found

    def _secret_problems(self) -> list[str]:
        if self.secret_file:
            try:
                read_secret(self.secret_file)
            except ValueError as exc:
                return [f"--ft-secret-file {self.secret_file}: {exc}"]
            return []
        if self.nnodes > 1 and not is_loopback(self.controller_host):
            return [f"--nnodes {self.nnodes} with --ft needs --ft-secret-file: the FT controller's sockets on "
                    f"{self.controller_host} are reachable from other hosts, and only holders of the secret may "
                    "use them (a file of at least 16 random bytes, the same on every node, e.g. "
                    "`openssl rand -hex 32 > FILE`)"]
        return []

    def for_replica(self, dp_rank: int | None) -> "FtArgs":
        """The options of data-parallel replica `dp_rank`: its own runtime directory, so its own controller, orders
        and backup store (the same options when there is one replica)."""
        if self.dp_size <= 1:
            return self
        return dataclasses.replace(self, runtime_dir=os.path.join(self.runtime_dir, f"dp{dp_rank or 0}"),
                                   dp_rank=dp_rank or 0)

    @property
    def splits_remainder(self) -> bool:
        """Layouts keep H // W KV heads per worker by TP and serve the H % W remainder heads apart."""
        return self.attention == "hybrid" or self.kv_placement == "cyclic"

    def controller_options(self, tp_size: int, model_path: str) -> ControllerOptions:
        """What this group's FT controller is started with (ft/options.py)."""
        return ControllerOptions(
            tp_size=tp_size, model_path=model_path, heartbeat_endpoint=self.heartbeat_endpoint,
            control_endpoint=self.control_endpoint, order_endpoint=self.order_endpoint,
            heartbeat_interval_s=self.heartbeat_interval_ms / 1e3, heartbeat_timeout_s=self.heartbeat_timeout_ms / 1e3,
            runtime_dir=self.runtime_dir, enable_fault_injection=self.enable_fault_injection,
            hybrid=self.splits_remainder, respawn=self.respawn, respawn_delay_s=self.respawn_delay_s,
            nnodes=self.nnodes, dp_rank=self.dp_rank, kv_backup=self.kv_backup,
            kv_backup_endpoint=self.kv_backup_endpoint, kv_fetch_endpoint=self.kv_fetch_endpoint,
            secret_file=self.secret_file, weight_cache_dir=self.weight_cache_dir)

    def agent_options(self, worker: int) -> AgentOptions:
        """What worker `worker`'s FT agent (ft/agent.py) is started with."""
        return AgentOptions(worker, self.heartbeat_endpoint, self.order_endpoint, self.heartbeat_interval_ms / 1e3)

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "FtArgs":
        return cls(
            enabled=bool(getattr(args, "ft", False)),
            heartbeat_interval_ms=getattr(args, "ft_heartbeat_interval_ms", cls.heartbeat_interval_ms),
            heartbeat_timeout_ms=getattr(args, "ft_heartbeat_timeout_ms", cls.heartbeat_timeout_ms),
            enable_fault_injection=bool(getattr(args, "ft_enable_fault_injection", False)),
            collective_timeout_s=getattr(args, "ft_collective_timeout_s", cls.collective_timeout_s),
            kv_backup=getattr(args, "ft_kv_backup", "on") == "on",
            kv_backup_queue=getattr(args, "ft_kv_backup_queue", cls.kv_backup_queue),
            respawn=bool(getattr(args, "ft_respawn", False)),
            respawn_delay_s=getattr(args, "ft_respawn_delay_s", cls.respawn_delay_s),
            drain_timeout_s=getattr(args, "ft_drain_timeout_s", cls.drain_timeout_s),
            attention=getattr(args, "ft_attention", cls.attention),
            routing=getattr(args, "ft_routing", cls.routing),
            kv_placement=getattr(args, "ft_kv_placement", cls.kv_placement),
            secret_file=os.path.abspath(secret) if (secret := getattr(args, "ft_secret_file", None)) else "",
            events_endpoint=getattr(args, "ft_events_endpoint", None) or "",
            weight_cache=getattr(args, "ft_weight_cache", cls.weight_cache),
            weight_cache_max_gb=getattr(args, "ft_weight_cache_max_gb", cls.weight_cache_max_gb),
        )


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface (nothing from another host reaches it)."""
    return host == "localhost" or host.startswith("127.")


def add_ft_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the sglang-ft group to SGLang's parser (an AFTER hook on `ServerArgs.add_cli_args`)."""
    if any(a.dest == "ft" for a in parser._actions):
        return
    group = parser.add_argument_group("sglang-ft (fault-tolerant tensor parallelism)")
    group.add_argument(
        "--ft",
        action="store_true",
        help="Serve with sglang-ft: elastic unequal-width TP for Llama-family models (Llama, Mistral, Qwen2, "
        "Mixtral, Qwen2-MoE).",
    )
    group.add_argument(
        "--ft-heartbeat-interval-ms",
        type=int,
        default=FtArgs.heartbeat_interval_ms,
        help="How often each TP worker sends a heartbeat to the FT controller.",
    )
    group.add_argument(
        "--ft-heartbeat-timeout-ms",
        type=int,
        default=FtArgs.heartbeat_timeout_ms,
        help="Silence after which a serving worker is declared dead (suspect after two missed beats; a worker that "
        "has not finished a batch yet gets 5x this, at least 10 s). Keep it a few times the largest gap a live worker "
        "shows (max_beat_gap_ms in /ft/status, sglang_ft_max_heartbeat_gap_seconds).",
    )
    group.add_argument(
        "--ft-collective-timeout-s",
        type=int,
        default=FtArgs.collective_timeout_s,
        help="Once serving, a TP collective waiting longer than this fails, so survivors blocked on a dead or "
        "hung peer leave it and regroup (start-up keeps SGLang's --dist-timeout).",
    )
    group.add_argument(
        "--ft-kv-backup",
        choices=("on", "off"),
        default="on",
        help="Stream every KV row the workers write to a backup store in host memory, so a regroup restores the "
        "lost heads' KV instead of recomputing it (default on).",
    )
    group.add_argument(
        "--ft-kv-backup-queue",
        type=int,
        default=FtArgs.kv_backup_queue,
        help="Messages (one per layer and forward) a worker queues for the backup store; when the queue is full "
        "the newest is dropped rather than blocking the forward pass, and that worker's backup is marked "
        "incomplete (its blocks are recomputed after a failure).",
    )
    group.add_argument(
        "--ft-weight-cache",
        choices=("host", "off"),
        default=FtArgs.weight_cache,
        help="host: every node keeps one copy of the checkpoint's safetensors files in shared host memory (/dev/shm), "
        "so after a failure the survivors read the lost worker's slices from RAM, and from disk only what the copy "
        "lacks (still copying, or off). The copy is made only if it fits in half the node's available memory, the "
        "free space of /dev/shm and --ft-weight-cache-max-gb; otherwise the log says so and the cache is off. Its "
        "size and state are in /ft/status (weight_cache). Default host.",
    )
    group.add_argument(
        "--ft-weight-cache-max-gb",
        type=float,
        default=FtArgs.weight_cache_max_gb,
        help="With --ft-weight-cache host, the most GiB the copy may take (default 0: bounded by the node's memory "
        "only); a checkpoint larger than the bound is not copied.",
    )
    group.add_argument(
        "--ft-respawn",
        action="store_true",
        help="Restart what dies: a dead TP worker is restarted after --ft-respawn-delay-s and planned back into the "
        "group (full width again, its weights and KV heads from the survivors); a dead KV backup store is restarted "
        "at once and every worker re-sends the KV it holds. Without it, the group stays narrower (until "
        "POST /ft/rejoin) and serving goes on with the backup degraded.",
    )
    group.add_argument(
        "--ft-respawn-delay-s",
        type=float,
        default=FtArgs.respawn_delay_s,
        help="With --ft-respawn, how long after a worker's death it is restarted (a repair time; at most 3 automatic "
        "attempts per failure).",
    )
    group.add_argument(
        "--ft-drain-timeout-s",
        type=float,
        default=FtArgs.drain_timeout_s,
        help="On SIGTERM the server stops admitting and drains the requests in flight; those still running this "
        "long after are aborted (their clients get an abort, nothing is left hanging) and the shutdown completes.",
    )
    group.add_argument(
        "--ft-attention",
        choices=("tp", "hybrid"),
        default=FtArgs.attention,
        help="How KV heads that do not divide evenly over the TP workers are served. tp: unequal spans (4 KV heads "
        "over 3 workers = 2+1+1), so one worker stores and computes more. hybrid: every worker runs H // W heads "
        "as tensor-parallel attention and the H %% W remainder heads run as data-parallel attention, each request's "
        "whole on one worker (its owner, by --ft-routing), so KV memory and attention work even out over requests "
        "(FailSafe's hybrid attention; --ft-kv-placement cyclic evens KV out to within a block instead). Applies to "
        "the group formed at launch.",
    )
    group.add_argument(
        "--ft-routing",
        choices=POLICIES,
        default=FtArgs.routing,
        help="With --ft-attention hybrid, which worker owns a request's remainder heads; with --dp-size, which "
        "replica serves a request: in turn; the one with the fewest outstanding tokens; or the one holding its "
        "cached prefix unless that one is overloaded (SGLang's cache-aware balance rule), else the least loaded.",
    )
    group.add_argument(
        "--ft-kv-placement",
        choices=("contiguous", "cyclic"),
        default=FtArgs.kv_placement,
        help="Where the KV of heads that do not divide evenly over the TP workers lives (with --ft-attention tp). "
        "contiguous: on the workers whose spans hold them (4 KV heads over 3 workers = 2+1+1). cyclic: every worker "
        "runs H // W heads as tensor-parallel attention and the H %% W remainder heads' KV rotates over all workers "
        "token by token (each request from the worker holding the fewest rows), so every worker stores the same KV "
        "bytes to within a block; their attention runs where the rows are and the partials are merged across "
        "workers (one more all-reduce per layer).",
    )
    group.add_argument(
        "--ft-secret-file",
        default=None,
        metavar="PATH",
        help="Across nodes (--nnodes > 1), a file holding the deployment secret (at least 16 bytes, the same file on "
        "every node, e.g. `openssl rand -hex 32`): the FT controller's and the KV backup store's TCP sockets are "
        "authenticated and encrypted with keys derived from it (ZMQ CURVE), and refuse any peer without it. "
        "Required with --nnodes > 1 unless --dist-init-addr is a loopback address.",
    )
    group.add_argument(
        "--ft-events-endpoint",
        default=None,
        metavar="tcp://HOST:PORT",
        help="Also publish the fault events of GET /ft/events on a ZMQ PUB socket bound here (frames: topic "
        "'sglang_ft', then the event's JSON); off by default. Over TCP with --ft-secret-file it is CURVE-encrypted "
        "like the other sglang-ft sockets.",
    )
    group.add_argument(
        "--ft-enable-fault-injection",
        action="store_true",
        help="Enable POST /ft/inject_fault (kill or hang a TP worker); protected by --api-key when one is set.",
    )


def across_nodes(ft: FtArgs, server_args) -> FtArgs:
    """`ft` for SGLang's multi-node launch: the controller's TCP address, from `--dist-init-addr` (node 0)."""
    if (server_args.nnodes or 1) <= 1:
        return ft
    host, port = server_args.dist_init_addr.rsplit(":", 1)
    return dataclasses.replace(ft, nnodes=server_args.nnodes, node_rank=server_args.node_rank or 0,
                               controller_host=host.strip("[]"), controller_port=int(port) + CONTROLLER_PORT_OFFSET)


def publish(ft: FtArgs) -> None:
    """Make `ft` visible to this process and every subprocess spawned after this call."""
    os.environ[FT_ENV] = ft.to_env()
    ft_args.cache_clear()
    use_secret_file(ft.secret_file)  # this process's sockets across nodes carry the deployment's keys


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


def after_add_cli_args(_result, parser, *_args, **_kwargs):
    """List the `--ft` flags in SGLang's own parser (`--help` included)."""
    add_ft_cli_args(parser)


def around_from_cli_args(original, cls, args, *rest, **kwargs):
    """Carry the FT options to the subprocesses and refuse a bad `--ft` launch before anything starts."""
    from sglang_ft.launch_checks import check_ft_launch

    ft = FtArgs.from_namespace(args)
    publish(ft)
    server_args = original(cls, args, *rest, **kwargs)
    if ft.enabled:
        problems = check_ft_launch(server_args)
        if not problems:
            ft = dataclasses.replace(across_nodes(ft, server_args), dp_size=server_args.dp_size or 1)
            publish(ft)
        problems = ft.problems() + problems
        if problems:
            cli_error("; ".join(problems))
        # Recovery re-enters SGLang's plain loop; overlap scheduling buys nothing without an accelerator stream.
        server_args.disable_overlap_schedule = True
        # SGLang's custom all-reduce spins on flags in a peer's memory and has no abort: a survivor would spin for
        # ever on a dead peer. NCCL (pynccl) is aborted by the interrupt (group_interrupt.py).
        server_args.disable_custom_all_reduce = True
        if ft.splits_remainder:  # which rows a worker computes changes with every batch's placement
            server_args.disable_cuda_graph = True
        if server_args.max_queued_requests is None:  # a flood gets 503 + Retry-After, not unbounded memory
            server_args.max_queued_requests = FT_DEFAULT_MAX_QUEUED_REQUESTS
        if server_args.sleep_on_idle and not idle_sleep_fits(ft.collective_timeout_s):
            server_args.sleep_on_idle = False
            logger.warning("sglang-ft: --sleep-on-idle off: an idle rank 0 sleeps up to %.0f s while the others wait "
                           "for it in a request broadcast that --ft-collective-timeout-s %d would fail",
                           IDLE_SLEEP_POLL_S, ft.collective_timeout_s)
    return server_args


def idle_sleep_fits(collective_timeout_s: float) -> bool:
    """Whether the other ranks' request broadcast (bounded by the collective timeout, at most
    REQUEST_BROADCAST_TIMEOUT_S) outlasts an idle rank 0's sleep with room to spare."""
    from sglang_ft.elastic_tp.groups import REQUEST_BROADCAST_TIMEOUT_S

    return min(collective_timeout_s, REQUEST_BROADCAST_TIMEOUT_S) >= 2 * IDLE_SLEEP_POLL_S
