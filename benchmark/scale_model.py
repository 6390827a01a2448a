"""Project sglang-ft's recovery against restart-and-reload on an 8-GPU H100 server, with the planner the server runs.

    python -m benchmark.scale_model [--full] [--disk vm-disk|nvme|page-cache] [--weights-host pinned|pageable|off]
        [--failure process-exit|hang] [--detect-s S] [--rebuild-s 0.17] [--warmup-s 0] [--requests 64]
        [--tokens 2048] [--mfu 0.4] [--kv-host pinned|pageable] [--lose worst|W,W,W] [--out-dir benchmark/results]

Arithmetic only (no GPU, no sglang; it runs in well under a second). Four public models in bf16 are served at TP 8
and lose one, two, then three GPUs, each loss planned from the layout the previous one left, by the same
`ft.planner.plan_migration` and `schedule_transfers` the FT controller runs. By default the worker lost at each step
is the one whose loss takes sglang-ft longest to recover (worst case, lowest id on ties); `--lose` names them.

Each side is charged its own stages, and both the same detection and the same CUDA graph capture:
- sglang-ft, in place: detection + installing the standby groups + parking + weights by the planner's schedule (per
  link queues: peer moves over NVLink, the slices only the lost GPU held read by the survivors whose new spans cover
  them from the node's host copy of the checkpoint, or from disk with `--weights-host off`) + KV restore (the lost
  heads' KV from the host backup store). Serving resumes here, eagerly; it is back at full speed when the CUDA graphs
  are captured again, one batch size between two steps.
- restart-and-reload: detection + a new process with its CUDA context + reading the whole checkpoint (every rank its
  shard) + warm-up beyond the capture (`--warmup-s`, none by default) + CUDA graph capture + re-prefill of every
  in-flight token, at the widest TP plain SGLang accepts on the survivors (8 KV heads on 7 GPUs restart at TP 4).
  Serving resumes and full speed coincide: SGLang captures before it serves.
The headline is the 'serving resumes' ratio; the 'full speed' ratio sets the same capture on both sides.
The KV backup's cost per decode step is projected from the measured rates for Llama-3-70B (`backup_step_cost`).

Every figure is measured (benchmark/results/device_bandwidth.json: one H100 80GB HBM3 lent to this project, in a
VM; the standby-group and hang-detection stages on this project's CPU servers, docs/architecture.md), cited
(datasheets, an SGLang log), or a parameter stated as an assumption; `sources_and_assumptions()` lists them, and the
results (benchmark/results/scale_model.json, .md) carry the list.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ft.partition import ModelShape, TPLayout
from ft.planner import Bandwidth, bytes_per_unit, plan_migration, schedule_transfers

GB = 1e9
RESULTS = Path(__file__).resolve().parent / "results"
TP = 8
LOSSES = 3


@dataclass(frozen=True)
class Model:
    """A decoder's sizes, with the values of its public config.json (bf16 weights)."""

    name: str
    config: str  # where the values come from
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_local_experts: int = 1  # MoE: experts per layer
    num_experts_per_tok: int = 1  # MoE: experts each token uses (top-k)
    qkv_bias: bool = False  # Qwen2: q, k and v projections have biases
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def shape(self) -> ModelShape:
        """The planner's shape: an MoE layer's unit of MLP columns is that column of every expert (the router is
        replicated and never moves), as the elastic model partitions it."""
        experts = self.num_local_experts if self.num_local_experts > 1 else 0
        return ModelShape(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.hidden_size,
                          self.intermediate_size, self.vocab_size, self.num_hidden_layers, self.dtype_bytes,
                          num_experts=experts)

    def parameters(self, active: bool = False) -> int:
        """Every parameter (or, with `active`, those one token uses: its top-k experts only)."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = 2 * h * q + 2 * h * kv + ((q + 2 * kv) if self.qkv_bias else 0)
        experts = self.num_experts_per_tok if active else self.num_local_experts
        router = h * self.num_local_experts if self.num_local_experts > 1 else 0
        mlp = experts * 3 * h * self.intermediate_size + router
        layer = attention + mlp + 2 * h  # two RMSNorms
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * h
        return self.num_hidden_layers * layer + h + embeddings

    def kv_bytes_per_head(self, tokens: int) -> int:
        """K and V of one KV head over every layer for `tokens` tokens."""
        return tokens * self.num_hidden_layers * 2 * self.head_dim * self.dtype_bytes


MODELS = (
    Model("Llama-3-8B", "meta-llama/Meta-Llama-3-8B config.json", hidden_size=4096, intermediate_size=14336,
          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    Model("Llama-3-70B", "meta-llama/Meta-Llama-3-70B config.json", hidden_size=8192, intermediate_size=28672,
          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    Model("Qwen2-72B", "Qwen/Qwen2-72B config.json", hidden_size=8192, intermediate_size=29568,
          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, qkv_bias=True),
    Model("Mixtral-8x7B", "mistralai/Mixtral-8x7B-v0.1 config.json", hidden_size=4096, intermediate_size=14336,
          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
          num_local_experts=8, num_experts_per_tok=2),
)

# Cited figures (datasheets; not measured here)
NVLINK_PER_DIRECTION_GBPS = 450.0  # NVIDIA H100 SXM datasheet: NVLink 900 GB/s total bidirectional
PCIE_GEN5_X16_GBPS = 64.0  # PCIe 5.0 x16, per direction (32 GT/s x 16 lanes); the ceiling of host <-> device copies
NVME_GBPS = 7.0  # PCIe Gen4 x4 datacenter NVMe class (e.g. Samsung PM9A3 U.2: up to 6.9 GB/s sequential read)
H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM datasheet: 989 TFLOPS bf16 dense (1,979 with sparsity)
H100_HBM_GBPS = 3350.0  # NVIDIA H100 SXM datasheet: HBM3 3.35 TB/s
# Documented capture cost: SGLang's log in sgl-project/sglang#10088 (2025-09-05), a TP-8 target model with FA3:
# "Capture cuda graph end. Time elapsed: 12.11 s". Spread over SGLang's decode batch sizes up to 256
# (`generate_decode_cuda_graph_batch_sizes`: 1, 2, 4, 8, 12, then every 8 to 256), an assumption about that run.
CAPTURE_LOG_S = 12.11
CAPTURE_SIZES = (1, 2, 4, 8, 12, *range(16, 257, 8))
CAPTURE_SOURCE = "sgl-project/sglang#10088"
PAPERS = ("AnchorTP: TFS up to 11x lower, TTP up to 59% lower than restart-and-reload; "
          "FailSafe: ~100x lower recovery latency, up to 2x throughput")


@dataclass(frozen=True)
class Disk:
    """Where a checkpoint is read from: its rate to the device, and whether the node's ranks share one link."""

    name: str
    gbps: float
    shared: bool
    source: str


def load_measured(path: Path = RESULTS / "device_bandwidth.json") -> dict:
    return json.loads(Path(path).read_text())


def disks(measured: dict) -> dict[str, Disk]:
    reads = measured["checkpoint_reads"]
    return {
        "vm-disk": Disk("vm-disk", reads["cold_to_device"], True,
                        "measured: safetensors read cold (pages dropped) to the device, the lent VM's virtio disk"),
        "nvme": Disk("nvme", NVME_GBPS, True,
                     "datasheet: one PCIe Gen4 datacenter NVMe drive per node, sequential read, assuming the loader "
                     "keeps up (the measured page-cache-to-device path is slower; a pinned or GPUDirect path is "
                     "not measured)"),
        "page-cache": Disk("page-cache", reads["page_cache_to_device"], False,
                           "measured: safetensors from the page cache to the device, one process; each rank "
                           "copies at this rate in parallel (host memory is not the limit)"),
    }


@dataclass(frozen=True)
class Failure:
    """How the worker is lost, which sets how soon the controller knows (charged to both systems alike)."""

    name: str
    detect_s: float
    source: str


FAILURES = {f.name: f for f in (
    Failure("process-exit", 0.1,
            "a SIGKILLed or crashed worker: the controller's pidfd watch (ft/process_watch.py) wakes at the exit on "
            "the same node; 0.1 s also covers the order to the survivors (issue 26: 80-180 ms before the pidfd "
            "watch)"),
    Failure("hang", 0.6,
            "a hung worker: the hang rule (ft/failure_detector.py) declares it when silent two beats (400 ms) while "
            "a peer is blocked 500 ms at the defaults; 368-491 ms measured at a 400 ms bound "
            "(docs/architecture.md), 600 ms issue 26's target"),
)}
# rebuild_process_groups with standby groups, CPU gloo TP 4 -> 3 at a SIGKILL: 38-70 ms (median 45) in
# benchmark/results/stream_stall_2026-12-03_groups.json; the largest, rounded up (136-168 ms before 2026-12-03)
STANDBY_STAGE_S = 0.07
WEIGHTS_HOST = ("pinned", "pageable", "off")


@dataclass(frozen=True)
class Params:
    disk: Disk
    kv_host_gbps: float  # host backup store -> device, KV rows scattered into slots
    process_start_s: float  # python + torch + CUDA context of a fresh process
    weights_host: str = "pinned"  # the node's host copy of the checkpoint: pinned, pageable or off (read from disk)
    weights_host_gbps: float = 0.0  # host copy -> device per rank (each GPU its own PCIe link)
    failure: str = "process-exit"
    detect_s: float = FAILURES["process-exit"].detect_s
    rebuild_s: float = STANDBY_STAGE_S  # installing the standby groups: the whole measured stage (docs/architecture)
    park_s: float = 0.085  # parking in-flight requests, on CPU: 50-85 ms (docs/architecture.md); 19-48 ms median in
    #                        the 2026-12-03 stream-stall runs: the larger kept
    warmup_s: float = 0.0  # restart's warm-up beyond the graph capture: unsourced, so none unless given
    capture_per_size_s: float = CAPTURE_LOG_S / len(CAPTURE_SIZES)  # one decode batch size's graph
    capture_sizes: int = len(CAPTURE_SIZES)
    mfu: float = 0.4  # assumption: prefill reaches 40% of the bf16 dense peak
    requests: int = 64
    tokens: int = 2048  # per in-flight request
    nvlink_gbps: float = NVLINK_PER_DIRECTION_GBPS

    @property
    def in_flight_tokens(self) -> int:
        return self.requests * self.tokens

    @property
    def capture_s(self) -> float:
        """Capturing every decode batch size's CUDA graph, for either system."""
        return self.capture_per_size_s * self.capture_sizes

    def lost_share_link(self) -> tuple[str, float, bool]:
        """Where the slices only the lost GPU held come from: the host copy (every rank over its own PCIe link, in
        parallel) or, with the copy off, the disk. Returns (name, GB/s, one link for the whole node)."""
        if self.weights_host == "off":
            return self.disk.name, self.disk.gbps, self.disk.shared
        return f"host copy ({self.weights_host})", self.weights_host_gbps, False


def default_params(measured: dict, disk: str = "nvme", kv_host: str = "pinned", weights_host: str = "pinned",
                   failure: str = "process-exit", **overrides) -> Params:
    rows, copies = measured["kv_rows"], measured["copies"]
    kv_host_gbps = rows["scatter_from_pinned_host"] if kv_host == "pinned" else rows["scatter_from_pageable_host"]
    host_gbps = {"pinned": copies["h2d_pinned"], "pageable": copies["h2d_pageable"], "off": 0.0}[weights_host]
    return replace(Params(disks(measured)[disk], kv_host_gbps,
                          measured["process_start"]["python_import_torch_cuda_context_s"], weights_host, host_gbps,
                          failure, FAILURES[failure].detect_s), **overrides)


def sglang_ft_recovery(model: Model, held: dict, dead: int, p: Params) -> dict:
    """Recover in place from losing worker `dead`, given what every worker holds (in rank order)."""
    shape = model.shape()
    plan = plan_migration(shape, held, [w for w in held if w != dead],
                          bytes_per_unit(shape, model.tie_word_embeddings))
    nvlink = p.nvlink_gbps * GB
    source, gbps, shared = p.lost_share_link()
    if shared:  # one disk for the node: its reads are one link, whoever they are for
        p2p_s = schedule_transfers(plan, Bandwidth(nvlink, math.inf)).estimated_s
        weights_s = max(p2p_s, plan.bytes_reloaded / (gbps * GB))
    else:  # the planner's schedule as it is: every rank's peer and read queues at once, the busiest link's time
        weights_s = schedule_transfers(plan, Bandwidth(nvlink, gbps * GB)).estimated_s
    # KV follows its head: a head only the dead worker held comes from the host store, one moving between
    # survivors comes peer to peer; every link at once, like the weights
    per_head = model.kv_bytes_per_head(p.in_flight_tokens)
    host_in: dict[int, int] = {}
    peer_in: dict[int, int] = {}
    peer_out: dict[int, int] = {}
    for m in plan.moves:
        if m.dim != "kv_heads":
            continue
        nbytes = (m.end - m.start) * per_head
        if m.src is None:
            host_in[m.dst] = host_in.get(m.dst, 0) + nbytes
        else:
            peer_in[m.dst] = peer_in.get(m.dst, 0) + nbytes
            peer_out[m.src] = peer_out.get(m.src, 0) + nbytes
    kv_s = max([b / (p.kv_host_gbps * GB) for b in host_in.values()]
               + [b / nvlink for b in (*peer_in.values(), *peer_out.values())], default=0.0)
    terms = {"detect": p.detect_s, "groups": p.rebuild_s, "park": p.park_s, "weights": weights_s,
             "kv_restore": kv_s}
    serving_s = sum(terms.values())  # serving resumes here, eagerly
    # not what the planner does: every survivor reads an equal share of the missing slices and forwards it over
    # NVLink, so no rank's read link carries more than its share (the same as the schedule for a shared disk)
    fanout_s = max(schedule_transfers(plan, Bandwidth(nvlink, math.inf)).estimated_s,
                   plan.bytes_reloaded / (gbps * GB) / (1 if shared else len(plan.workers)))
    from_host = p.weights_host != "off"
    return {"plan": plan, "tp": len(plan.workers), "bytes_kept": plan.bytes_kept, "bytes_p2p": plan.bytes_p2p,
            "bytes_reloaded": plan.bytes_reloaded, "lost_share_from": source,
            "bytes_from_host_copy": plan.bytes_reloaded if from_host else 0,
            "bytes_from_disk": 0 if from_host else plan.bytes_reloaded, "kv_bytes_restored": sum(host_in.values()),
            "kv_bytes_p2p": sum(peer_in.values()), "kv_heads_per_rank": [s.num_kv_heads for s in plan.layout.shards],
            "terms_s": terms | {"graph_capture": p.capture_s}, "serving_resumes_s": serving_s,
            "full_speed_s": serving_s + p.capture_s, "weights_s_reads_fanned_out": fanout_s}


def restart_width(model: Model, gpus: int) -> int:
    """The widest TP plain SGLang serves on `gpus` GPUs without KV-head replication: a divisor of the heads."""
    return max(t for t in range(1, gpus + 1)
               if model.num_key_value_heads % t == 0 and model.num_attention_heads % t == 0)


def prefill_flops(model: Model, requests: int, tokens: int) -> float:
    """Matmuls of every token through its active weights (the LM head once per request, as prefill computes
    logits for the last token only) plus causal attention scores and values."""
    h, v = model.hidden_size, model.vocab_size
    body = model.parameters(active=True) - (1 if model.tie_word_embeddings else 2) * v * h
    attention = 2 * model.num_hidden_layers * model.num_attention_heads * model.head_dim * tokens * (tokens + 1)
    return requests * (2 * body * tokens + attention + 2 * v * h)


def prefill_rate(model: Model, p: Params) -> float:
    """Prefill tokens per second of one GPU at the assumed utilisation."""
    return p.in_flight_tokens * p.mfu * H100_BF16_DENSE_FLOPS / prefill_flops(model, p.requests, p.tokens)


def restart_and_reload(model: Model, gpus: int, p: Params, from_host_copy: bool = False) -> dict:
    """A fresh server on `gpus` GPUs. It reads the checkpoint from `p.disk` (plain SGLang's loader; `page-cache` is
    the checkpoint already in host memory, which a tmpfs host copy gives it too), or with `from_host_copy` at the
    host copy's rate per rank, as if its loader read sglang-ft's copy (a sensitivity: SGLang has no such loader)."""
    width = restart_width(model, gpus)
    checkpoint = model.parameters() * model.dtype_bytes
    if from_host_copy and p.weights_host != "off":
        read_s = checkpoint / (p.weights_host_gbps * GB) / width
    else:
        read_s = checkpoint / (p.disk.gbps * GB) / (1 if p.disk.shared else width)
    prefill_s = prefill_flops(model, p.requests, p.tokens) / (width * p.mfu * H100_BF16_DENSE_FLOPS)
    terms = {"detect": p.detect_s, "process_start": p.process_start_s, "checkpoint_read": read_s,
             "warmup": p.warmup_s, "graph_capture": p.capture_s, "re_prefill": prefill_s}
    total = sum(terms.values())  # SGLang captures before it serves: serving resumes at full speed
    return {"tp": width, "bytes_reloaded": checkpoint, "terms_s": terms, "serving_resumes_s": total,
            "full_speed_s": total, "prefill_tokens_per_s_per_gpu": prefill_rate(model, p)}


LAUNCH_US = 5.0  # assumption: CPU time of one CUDA kernel or copy launch (a few microseconds; not measured here)
BACKUP_MODEL = "Llama-3-70B"


def backup_step_cost(model: Model, measured: dict, batch: int, context_tokens: int, tp: int = TP,
                     launch_us: float = LAUNCH_US) -> dict:
    """The KV backup's work per decode step on the rank holding the most KV heads: the step's new rows (one token
    per request, every layer, K and V of this rank's heads) gathered on the compute stream (`index_select`, one
    per layer and K/V) and copied to pinned host memory on a copy stream (one per layer and K/V), at the measured
    rates; next to the step itself, bounded below by reading this rank's weights and the batch's KV once from HBM.

    The gather lengthens the step; the copy overlaps the next step (its stream waits for nothing of the step); the
    launches are CPU time between two steps, when SGLang's scheduler has nothing else queued on the device."""
    kv_heads = max(s.num_kv_heads for s in TPLayout.even(model.shape(), tp).shards)
    rows_bytes = model.kv_bytes_per_head(batch) * kv_heads
    rates = measured["kv_rows"]
    gather_s = rows_bytes / (rates["gather_on_device"] * GB)
    copy_s = rows_bytes / (rates["gather_to_pinned_host"] * GB)
    launches = 2 * 2 * model.num_hidden_layers  # gather and copy, K and V, per layer
    launch_s = launches * launch_us * 1e-6
    step_s = (model.parameters() * model.dtype_bytes / tp
              + model.kv_bytes_per_head(batch * context_tokens) * kv_heads) / (H100_HBM_GBPS * GB)
    return {"model": model.name, "tp": tp, "batch": batch, "context_tokens": context_tokens, "kv_heads": kv_heads,
            "bytes_per_step": rows_bytes, "gather_on_device_us": gather_s * 1e6,
            "copy_to_pinned_host_us": copy_s * 1e6, "launches": launches, "launch_us_each": launch_us,
            "launches_ms": launch_s * 1e3, "decode_step_ms_memory_bound": step_s * 1e3,
            "on_the_step_share": gather_s / step_s, "with_launches_share": (gather_s + launch_s) / step_s,
            "copy_share_of_step": copy_s / step_s, "host_gbps_per_rank": rows_bytes / step_s / GB}


def backup_lines(cost: dict) -> list[str]:
    return [
        f"{cost['model']} at TP {cost['tp']}, decode batch {cost['batch']} ({cost['context_tokens']} tokens of "
        f"context each), {cost['kv_heads']} KV head(s) on the busiest rank: {cost['bytes_per_step'] / 1e6:.2f} MB "
        f"of new KV rows per step",
        f"gathered on the device in {cost['gather_on_device_us']:.1f} us (measured index_select rate), copied to "
        f"pinned host memory in {cost['copy_to_pinned_host_us']:.1f} us on the copy stream (measured "
        "gather-to-pinned rate), overlapping the next step",
        f"the step itself: at least {cost['decode_step_ms_memory_bound']:.2f} ms (this rank's weights and the batch's "
        "KV read once at the H100's 3.35 TB/s); the gather adds "
        f"{cost['on_the_step_share']:.2%} to it; the host link carries {cost['host_gbps_per_rank']:.2f} GB/s per rank",
        f"the {cost['launches']} launches (gather and copy of K and V per layer) take {cost['launches_ms']:.2f} ms of "
        f"CPU time between steps at an assumed {cost['launch_us_each']:g} us each: with them the backup adds "
        f"{cost['with_launches_share']:.1%} to a decode step; batching the gathers into one kernel per step (not "
        "done) would remove most of it",
    ]


def project(model: Model, p: Params, lose: list[int] | None = None) -> list[dict]:
    """TP 8 losing one, two, then three workers; each step planned from the layout the previous one left."""
    held = dict(enumerate(TPLayout.even(model.shape(), TP).shards))
    rows = []
    for step in range(1, LOSSES + 1):
        candidates = [lose[step - 1]] if lose else list(held)
        ft = max((sglang_ft_recovery(model, held, dead, p) | {"dead": dead} for dead in candidates),
                 key=lambda r: r["serving_resumes_s"])  # the first of equals
        plan = ft.pop("plan")
        held = {w: plan.shard_of(w) for w in plan.workers}
        rr = restart_and_reload(model, len(held), p)
        rr_host = restart_and_reload(model, len(held), p, from_host_copy=True)
        rows.append({"model": model.name, "failure": p.failure, "disk": p.disk.name, "weights_host": p.weights_host,
                     "losses": step, "dead_worker": ft.pop("dead"), "sglang_ft": ft, "restart_and_reload": rr,
                     "restart_from_host_copy": rr_host,
                     "ratio": rr["serving_resumes_s"] / ft["serving_resumes_s"],  # the headline
                     "ratio_full_speed": rr["full_speed_s"] / ft["full_speed_s"],
                     "ratio_vs_restart_from_host_copy": rr_host["serving_resumes_s"] / ft["serving_resumes_s"]})
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | failure | disk | lost | TP after | p2p GB | lost share GB | KV restored GB | weights s | KV s "
            "| serving resumes s | full speed s | restart TP | restart s | restart s, host copy | ratio, serving "
            "resumes | ratio, full speed | ratio vs restart from host copy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ft, rr, rh = r["sglang_ft"], r["restart_and_reload"], r["restart_from_host_copy"]
        lines.append(
            f"| {r['model']} | {r['failure']} | {r['disk']} | {r['losses']} | {ft['tp']} | {ft['bytes_p2p'] / GB:.2f} "
            f"| {ft['bytes_reloaded'] / GB:.2f} | {ft['kv_bytes_restored'] / GB:.2f} "
            f"| {ft['terms_s']['weights']:.2f} | {ft['terms_s']['kv_restore']:.2f} | {ft['serving_resumes_s']:.2f} "
            f"| {ft['full_speed_s']:.2f} | {rr['tp']} | {rr['serving_resumes_s']:.1f} | {rh['serving_resumes_s']:.1f} "
            f"| {r['ratio']:.1f}x | {r['ratio_full_speed']:.1f}x | {r['ratio_vs_restart_from_host_copy']:.1f}x |")
    return "\n".join(lines)


TARGET_MODEL, TARGET_RATIO = "Llama-3-70B", 30.0  # issue 26: Llama-3-70B, one GPU lost, >= 30x


def target_table(rows: list[dict]) -> str:
    """Issue 26's target row in every scenario run: both milestones of both sides and their ratios."""
    head = ("| failure | disk | sglang-ft: serving resumes s | sglang-ft: full speed s | restart s | restart s, host "
            "copy | ratio, serving resumes | ratio, full speed | ratio vs restart from host copy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in _target_rows(rows):
        ft = r["sglang_ft"]
        lines.append(f"| {r['failure']} | {r['disk']} | {ft['serving_resumes_s']:.2f} | {ft['full_speed_s']:.2f} "
                     f"| {r['restart_and_reload']['serving_resumes_s']:.1f} "
                     f"| {r['restart_from_host_copy']['serving_resumes_s']:.1f} | {r['ratio']:.1f}x "
                     f"| {r['ratio_full_speed']:.1f}x | {r['ratio_vs_restart_from_host_copy']:.1f}x |")
    return "\n".join(lines)


def _target_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["model"] == TARGET_MODEL and r["losses"] == 1]


def target_verdict(rows: list[dict]) -> list[str]:
    """The target against each ratio, and what dominates where it is missed."""
    target = _target_rows(rows)
    notes = []
    for key, name in (("ratio", "serving resumes"), ("ratio_full_speed", "full speed"),
                      ("ratio_vs_restart_from_host_copy", "serving resumes, restart reading the host copy")):
        values = [r[key] for r in target]
        met = sum(v >= TARGET_RATIO for v in values)
        notes.append(f"ratio, {name}: {min(values):.1f}x-{max(values):.1f}x; >= {TARGET_RATIO:g}x in {met} of "
                     f"{len(values)} scenarios")
    slow = min(target, key=lambda r: r["ratio_full_speed"])
    ft = slow["sglang_ft"]
    notes.append(f"full speed: the graph capture ({ft['terms_s']['graph_capture']:.2f} s, charged to both) is "
                 f"{ft['terms_s']['graph_capture'] / ft['full_speed_s']:.0%} of sglang-ft's {ft['full_speed_s']:.2f} s "
                 f"({slow['failure']}, {slow['disk']}), so no in-place speed-up can reach {TARGET_RATIO:g}x on this "
                 "milestone while capture costs what it costs on a fresh server")
    worst = min(target, key=lambda r: r["ratio_vs_restart_from_host_copy"])
    ft, rh = worst["sglang_ft"], worst["restart_from_host_copy"]
    ft_top = max(ft["terms_s"].items() - {("graph_capture", ft["terms_s"]["graph_capture"])}, key=lambda kv: kv[1])
    rr_top = sorted(rh["terms_s"].items(), key=lambda kv: -kv[1])[:2]
    notes.append(f"lowest serving-resumes ratio ({worst['failure']}, restart reading the host copy, whatever the "
                 f"disk): {worst['ratio_vs_restart_from_host_copy']:.1f}x; sglang-ft's largest stage is "
                 f"{ft_top[0]} ({ft_top[1]:.2f} s of {ft['serving_resumes_s']:.2f} s), restart's "
                 + " and ".join(f"{k} ({v:.1f} s)" for k, v in rr_top) + f" of {rh['serving_resumes_s']:.1f} s")
    return notes


NOT_CHARGED = "not charged"
STAGES = (  # (label, sglang-ft's term, restart's term, why a side does not pay it)
    ("detect", "detect", "detect", ""),
    ("process start (python, torch, CUDA context)", None, "process_start",
     "sglang-ft: the survivors keep their processes"),
    ("groups", "groups", NOT_CHARGED,
     "restart: a fresh server's NCCL init, not modelled (0 s charged)"),
    ("park in-flight requests", "park", None, "restart: its requests are submitted again"),
    ("weights", "weights", "checkpoint_read", ""),
    ("KV of in-flight tokens", "kv_restore", None, "restart: recomputed by re-prefill"),
    ("warm-up beyond capture", None, "warmup",
     "restart: memory profiling, KV pool, warm-up request: unsourced, 0 s unless `--warmup-s`; sglang-ft: its "
     "memory pool, KV cache and warm server stay (the attention backend it rebuilds is not charged: not measured "
     "on a GPU)"),
    ("CUDA graph capture", "graph_capture", "graph_capture",
     "sglang-ft: after serving resumes (eager meanwhile); restart: before serving"),
    ("re-prefill", None, "re_prefill", "sglang-ft: the KV is kept or restored"),
)


def costs_table(row: dict) -> str:
    """Which costs each side pays, in seconds, for one row."""
    ft, rr = row["sglang_ft"]["terms_s"], row["restart_and_reload"]["terms_s"]
    def cell(terms: dict, key: str | None) -> str:
        return "no" if key is None else "yes, not charged" if key == NOT_CHARGED else f"yes, {terms[key]:.2f} s"

    lines = ["| stage | sglang-ft | restart-and-reload | note |", "|---|---|---|---|"]
    lines += [f"| {label} | {cell(ft, f)} | {cell(rr, r)} | {note} |" for label, f, r, note in STAGES]
    lines.append(f"| **serving resumes** | {row['sglang_ft']['serving_resumes_s']:.2f} s "
                 f"| {row['restart_and_reload']['serving_resumes_s']:.2f} s | ratio {row['ratio']:.1f}x |")
    lines.append(f"| **full speed** (graphs captured) | {row['sglang_ft']['full_speed_s']:.2f} s "
                 f"| {row['restart_and_reload']['full_speed_s']:.2f} s | ratio {row['ratio_full_speed']:.1f}x |")
    return "\n".join(lines)


def observations(rows: list[dict]) -> list[str]:
    """What the rows show beyond the ratio, computed from them."""
    notes = []
    first = [r for r in rows if r["losses"] == 1]
    kept = min(first, key=lambda r: r["sglang_ft"]["bytes_kept"] / _weights(r))
    notes.append(
        f"after one loss the survivors keep as little as {kept['sglang_ft']['bytes_kept'] / _weights(kept):.0%} of "
        f"the weights in these rows ({kept['model']}, worker {kept['dead_worker']} lost), not 7/8: balanced "
        "contiguous spans shift, so the rest of what a survivor needs comes over NVLink, and only the lost GPU's "
        "share from the host copy (or disk)")
    gain = {id(r): r["sglang_ft"]["terms_s"]["weights"] / r["sglang_ft"]["weights_s_reads_fanned_out"]
            for r in rows}
    per_rank = [r for r in rows if gain[id(r)] > 1.01]
    if per_rank:
        r = max(per_rank, key=lambda r: gain[id(r)])
        notes.append(
            f"with a read link per rank ({r['sglang_ft']['lost_share_from']}, {r['disk']}) the schedule reads the "
            f"lost GPU's slices on the one or two ranks whose new spans cover them: {r['model']} with {r['losses']} "
            "GPU(s) lost spends "
            f"{r['sglang_ft']['terms_s']['weights']:.2f} s on weights, "
            f"{r['sglang_ft']['weights_s_reads_fanned_out']:.2f} s if every survivor read an equal share and "
            "forwarded it over NVLink (not implemented)")
    return notes


def _weights(row: dict) -> int:
    ft = row["sglang_ft"]
    return ft["bytes_kept"] + ft["bytes_p2p"] + ft["bytes_reloaded"]


def sources_and_assumptions(measured: dict, p: Params) -> list[str]:
    c, kv, reads = measured["copies"], measured["kv_rows"], measured["checkpoint_reads"]
    disk_lines = [f"disk `{d.name}`: {d.gbps:g} GB/s, {'one link per node' if d.shared else 'per rank'} ({d.source})"
                  for d in disks(measured).values()]
    return [
        f"measured on one {measured['device']} lent to this project ({measured['date']}, "
        f"benchmark/results/device_bandwidth.json): host->device pinned {c['h2d_pinned']} GB/s, pageable "
        f"{c['h2d_pageable']} GB/s; KV rows scattered from pinned host {kv['scatter_from_pinned_host']} GB/s, from "
        f"pageable host {kv['scatter_from_pageable_host']} GB/s; checkpoint cold to device {reads['cold_to_device']} "
        f"GB/s (virtio disk of a VM), page cache to device {reads['page_cache_to_device']} GB/s; new process with "
        f"CUDA context {measured['process_start']['python_import_torch_cuda_context_s']} s",
        f"cited: NVLink 4 on H100 SXM 900 GB/s total bidirectional, {NVLINK_PER_DIRECTION_GBPS:g} GB/s per "
        "direction per GPU (NVIDIA H100 datasheet), used as every peer link's rate (a peak; NCCL reaches less)",
        f"cited: PCIe Gen5 x16 {PCIE_GEN5_X16_GBPS:g} GB/s per direction, the ceiling of the measured host<->device "
        f"rates (pinned {c['h2d_pinned']} GB/s is {c['h2d_pinned'] / PCIE_GEN5_X16_GBPS:.0%} of it)",
        f"cited: H100 SXM bf16 dense {H100_BF16_DENSE_FLOPS / 1e12:g} TFLOPS (datasheet); assumption: prefill at "
        f"{p.mfu:.0%} of it for re-prefill of {p.requests} requests x {p.tokens} tokens = {p.in_flight_tokens} "
        "tokens (2 FLOPs per active weight per token plus causal attention; "
        + ", ".join(f"{m.name} {prefill_rate(m, p):,.0f}" for m in MODELS) + " tokens/s per GPU)",
        *disk_lines,
        f"KV restore: the lost heads' KV of the in-flight tokens from the host backup store at {p.kv_host_gbps:g} "
        "GB/s (`--kv-host pinned`, the measured scatter from pinned memory; today the store's rows land in pageable "
        "memory, `--kv-host pageable`); the ZMQ hop from the store process is not modelled",
        "weights (issue 26 item 3, being built): each node keeps one copy of the checkpoint's tensors in shared host "
        "memory; the slices only the lost GPU held are read from it by the survivors whose new spans cover them, "
        "each over its own PCIe link in parallel, at the measured host->device rate: `--weights-host pinned` "
        f"{c['h2d_pinned']} GB/s (the default: the copy pinned where a GPU is present), `pageable` {c['h2d_pageable']} GB/s, `off` "
        "from the disk scenario; this run: "
        + (f"{p.weights_host}, {p.weights_host_gbps:g} GB/s per rank" if p.weights_host != "off" else "off (disk)")
        + ". Assumed: the one or two ranks reading at once do not share a PCIe switch's uplink (HGX boards put GPUs "
        "in pairs under a switch; if they shared it, their reads would take up to twice as long)",
        "weights (issue 26 item 2, being built): by the planner's `schedule_transfers` (per-link queues, longest "
        "first, peer sends and reads at once, the busiest link's bytes over its rate), as the server's reshard is to "
        "run it (before, it posted every peer move at once, then read disk); with one shared disk for the node its "
        "reads are one link. Peer links at the NVLink peak, not a measured NCCL rate",
        "restart-and-reload reads the whole checkpoint with plain SGLang's loader from the disk scenario; the "
        "`page-cache` scenario is a checkpoint already in host memory (which a tmpfs host copy gives it too) at the "
        f"measured page-cache-to-device rate per rank; 'restart s, host copy' is a sensitivity: restart reading at "
        f"the host copy's rate per rank ({p.weights_host_gbps:g} GB/s), as if SGLang's loader read the pinned copy "
        "(it has no such loader)",
        f"detection {p.detect_s:g} s ({p.failure}), charged to both systems: "
        + "; ".join(f"`--failure {f.name}` {f.detect_s:g} s: {f.source}" for f in FAILURES.values()),
        f"groups {p.rebuild_s:g} s: installing the standby groups (issue 26 item 1), the whole measured "
        "`rebuild_process_groups` stage on CPU with gloo, TP 4 -> 3, at most 70 ms in five SIGKILLs (median 45 ms; "
        "`benchmark/results/stream_stall_2026-12-03_groups.json`; 136-168 ms before 2026-12-03's changes; most of it "
        "the members' arrival skew and SGLang's group construction), docs/architecture.md; on NCCL the design shrinks the "
        "communicator (`ProcessGroupNCCL.shrink`), never run here; parking "
        f"{p.park_s:g} s measured on CPU with gloo and a tiny model (README)",
        f"restart-and-reload's warm-up beyond the graph capture (memory profiling, KV pool, SGLang's warm-up "
        f"request): {p.warmup_s:g} s (`--warmup-s`; unsourced, so none by default: the earlier 20 s assumption "
        "is not charged); it restarts at the widest TP dividing the head counts (TP 4 on 5-7 GPUs for 8 KV heads)",
        f"CUDA graph capture {p.capture_s:.2f} s, charged to both systems: SGLang's log in {CAPTURE_SOURCE} "
        f"(\"Capture cuda graph end. Time elapsed: {CAPTURE_LOG_S} s\", a TP-8 target model with FA3), taken as "
        f"{p.capture_sizes} decode batch sizes (SGLang's list up to 256, an assumption about that run) at "
        f"{p.capture_per_size_s:.3f} s each. Restart captures before it serves; sglang-ft serves eagerly from "
        "'serving resumes' and captures one batch size between two steps (elastic_tp/graph_refresh.py), so "
        f"{p.capture_sizes} steps each pause about {p.capture_per_size_s:.2f} s until 'full speed'; eager decode is "
        "slower than graphed decode meanwhile (not modelled)",
        "model shapes: the public config.json of each model, bf16; Mixtral's experts are modelled as "
        "8 x 14336 MLP columns per layer because the planner has no expert dimension yet",
        "8 KV heads at TP 7, 6, 5 split unevenly (one rank holds 2 heads at TP 7): that rank does twice the "
        "attention work of the others; throughput after recovery is not modelled",
        f"papers, as reported (their setups, not this model's): {PAPERS}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="every disk and failure scenario (default: the given)")
    parser.add_argument("--disk", choices=("vm-disk", "nvme", "page-cache"), default="nvme")
    parser.add_argument("--weights-host", choices=WEIGHTS_HOST, default="pinned",
                        help="where the lost GPU's slices are read from: the node's host copy (pinned or pageable) "
                        "or, with off, the disk")
    parser.add_argument("--failure", choices=tuple(FAILURES), default="process-exit",
                        help="sets the detection time charged to both sides")
    parser.add_argument("--detect-s", type=float, default=None, help="overrides the failure's detection time")
    parser.add_argument("--kv-host", choices=("pinned", "pageable"), default="pinned")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per in-flight request")
    parser.add_argument("--rebuild-s", type=float, default=STANDBY_STAGE_S)
    parser.add_argument("--warmup-s", type=float, default=0.0, help="restart's warm-up beyond the graph capture")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--lose", default="worst", help="'worst' or three worker ids lost in order, e.g. 3,5,0")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    lose = None if args.lose == "worst" else [int(w) for w in args.lose.split(",")]
    if lose is not None and (len(lose) != LOSSES or len(set(lose)) != LOSSES or not set(lose) <= set(range(TP))):
        parser.error(f"--lose needs {LOSSES} distinct worker ids in 0..{TP - 1}")
    for flag in ("detect_s", "rebuild_s", "warmup_s"):
        if (getattr(args, flag) or 0.0) < 0:
            parser.error(f"--{flag.replace('_', '-')[:-2]}-s must not be negative")
    if args.mfu <= 0 or args.requests <= 0 or args.tokens <= 0:
        parser.error("--mfu, --requests and --tokens must be positive")
    measured = load_measured()
    overrides = dict(requests=args.requests, tokens=args.tokens, rebuild_s=args.rebuild_s, warmup_s=args.warmup_s,
                     mfu=args.mfu) | ({} if args.detect_s is None else {"detect_s": args.detect_s})
    failures = list(FAILURES) if args.full else [args.failure]
    scenarios = list(disks(measured)) if args.full else [args.disk]
    params = [default_params(measured, d, args.kv_host, args.weights_host, f, **overrides)
              for f in failures for d in scenarios]
    rows = [row for p in params for model in MODELS for row in project(model, p, lose)]
    headline = next(r for r in _target_rows(rows) if r["failure"] == args.failure and r["disk"] == args.disk)
    table = markdown_table(rows)
    notes = sources_and_assumptions(measured, params[0])
    verdict = target_verdict(rows)
    print(target_table(rows) + "\n\n" + "\n".join(f"- {n}" for n in verdict))
    print(f"\n{TARGET_MODEL}, one GPU lost ({args.failure}, {args.disk}, weights host {args.weights_host}):\n"
          + costs_table(headline))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmark.scale_model " + (
        "--full" if args.full else f"--disk {args.disk} --failure {args.failure}") + "".join(
        f" --{flag.replace('_', '-')} {getattr(args, flag)}" for flag, default in (
            ("weights_host", "pinned"), ("detect_s", None), ("rebuild_s", STANDBY_STAGE_S), ("warmup_s", 0.0),
            ("kv_host", "pinned"), ("requests", 64), ("tokens", 2048), ("mfu", 0.4), ("lose", "worst"))
        if getattr(args, flag) != default)
    backup = backup_step_cost(next(m for m in MODELS if m.name == BACKUP_MODEL), measured, params[0].requests,
                              params[0].tokens)
    today = dt.date.today().isoformat()
    (args.out_dir / "scale_model.json").write_text(json.dumps({
        "date": today, "command": command, "lose": args.lose, "headline": {
            "model": TARGET_MODEL, "losses": 1, "failure": args.failure, "disk": args.disk,
            "weights_host": args.weights_host, "ratio_serving_resumes": headline["ratio"],
            "ratio_full_speed": headline["ratio_full_speed"], "target": TARGET_RATIO},
        "target_verdict": verdict, "params": [asdict(p) for p in params], "models": [asdict(m) for m in MODELS],
        "sources_and_assumptions": notes, "observations": observations(rows), "papers": PAPERS,
        "kv_backup_per_step": backup, "rows": rows}, indent=1) + "\n")
    (args.out_dir / "scale_model.md").write_text(
        f"# Scale model: sglang-ft recovery vs restart-and-reload, 8 x H100 at TP 8\n\n`{command}` ({today}): "
        "arithmetic on the project's own planner, not a measurement on 8 GPUs. "
        f"Lost workers: {args.lose} ({'the slowest to recover at each step' if lose is None else 'as given'}); "
        f"in flight: {params[0].requests} requests x {params[0].tokens} tokens; the lost GPU's weights from the "
        f"host copy: `--weights-host {args.weights_host}`. GB = 1e9 bytes. Two milestones per side: 'serving "
        "resumes' (the in-flight streams' next token; the headline ratio) and 'full speed' (CUDA graphs captured, "
        "the same capture charged to both). ratio = restart s / sglang-ft s.\n\n"
        f"## {TARGET_MODEL}, one GPU lost (issue 26's target: >= {TARGET_RATIO:g}x)\n\n{target_table(rows)}\n\n"
        + "\n".join(f"- {n}" for n in verdict) + "\n\n"
        f"### Which costs each side pays ({args.failure}, {args.disk}, weights host {args.weights_host})\n\n"
        f"{costs_table(headline)}\n\n## Every row\n\n{table}\n\n"
        f"Papers, as reported (their setups, not comparable one to one): {PAPERS}.\n\n"
        "## Observations\n\n" + "\n".join(f"- {n}" for n in observations(rows)) + "\n\n"
        "## The KV backup's cost per decode step (H100, projected from measured rates)\n\n"
        + "\n".join(f"- {line}" for line in backup_lines(backup)) + "\n\n"
        "## Assumptions and sources\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(f"\nwrote {args.out_dir / 'scale_model.json'} and scale_model.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
