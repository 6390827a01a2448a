"""The reshard executes the planner's transfer schedule over real gloo processes: TP 4 -> 3 after worker 3 died,
so the survivors take slices from each other and the dead worker's from the checkpoint.

Each rank records what it hands to torch.distributed (isend/irecv: peer and tag, in call order) and which
checkpoint tensors it reads. Checked: every rank receives in its inbound queue's order (longest first), every
sender sends a link's moves in the order its receiver takes them, the kept slices are copied and the disk queue is
read in the schedule's order after every peer transfer was started (so they overlap), and the weights equal the checkpoint's slices read here
with safetensors alone, bit for bit, as the former all-at-once path's do.
"""

from __future__ import annotations

import glob

import pytest
import torch

from benchmark.reshard_schedule import NEW_WORKERS, join_as_survivor, planned
from ft.planner import Bandwidth, schedule_transfers
from tests.early import niced, taken
from tests.rank_processes import rank_context


def _rank(rank: int, model_dir: str, init_file: str, out: str) -> None:
    """One survivor: its old TP 4 shard loaded from the checkpoint, resharded by both paths, recorded."""
    import torch.distributed as dist

    from sglang_ft.elastic_tp.reshard import reshard
    from sglang_ft.model_loader.lazy_safetensors import LazyTensor

    events: list[tuple] = []
    real_isend, real_irecv = dist.isend, dist.irecv
    dist.isend = lambda tensor, group=None, tag=0, group_dst=None: (
        events.append(("send", group_dst, tag)) or real_isend(tensor, group=group, tag=tag, group_dst=group_dst))
    dist.irecv = lambda tensor, group=None, tag=0, group_src=None: (
        events.append(("recv", group_src, tag)) or real_irecv(tensor, group=group, tag=tag, group_src=group_src))
    from sglang_ft.elastic_tp import reshard as reshard_module

    real_copy = reshard_module._copy
    reshard_module._copy = lambda src, dst: events.append(("keep", None, None)) or real_copy(src, dst)
    for read in ("read_rows", "read_cols"):
        real = getattr(LazyTensor, read)
        setattr(LazyTensor, read, lambda self, a, b, real=real: events.append(("disk", self.name)) or real(self, a, b))
    held, plan, me, build, old = join_as_survivor(rank, model_dir, init_file)
    results = {}
    for scheduled in (True, False):
        new = build(plan.layout, rank)
        events.clear()
        stats = reshard(old, new, plan, me, model_dir, held[me], scheduled=scheduled)
        dist.barrier()
        results[scheduled] = ({n: p.detach().clone() for n, p in new.named_parameters()}, list(events), stats)
    dist.destroy_process_group()
    torch.save(results, out)


def start_early(request) -> tuple[list, list[str]]:
    """The three gloo processes, started with the test session (tests/early.py), and their output files."""
    tmp = request.getfixturevalue("tmp_path_factory").mktemp("reshard-schedule")
    model = request.getfixturevalue("tiny_model")
    context = rank_context()
    outs = [str(tmp / f"rank{r}.pt") for r in range(len(NEW_WORKERS))]
    ranks = [context.Process(target=niced, args=(_rank, r, model, str(tmp / "init"), outs[r]))
             for r in range(len(NEW_WORKERS))]
    for process in ranks:
        process.start()
    return ranks, outs


@pytest.fixture(scope="module")
def resharded(request):
    """{rank: {scheduled: (parameters, events, stats)}} from three gloo processes."""
    ranks, outs = taken(request, start_early)
    for process in ranks:
        process.join(timeout=300)
    assert all(p.exitcode == 0 for p in ranks), [p.exitcode for p in ranks]
    return {r: torch.load(outs[r], weights_only=False) for r in range(len(NEW_WORKERS))}


@pytest.fixture(scope="module")
def plan_and_schedule(tiny_model):
    from transformers import AutoConfig

    _, _, plan = planned(AutoConfig.from_pretrained(tiny_model))
    return plan, schedule_transfers(plan, Bandwidth(p2p=1e9, disk=1e9))


def test_the_plan_has_peer_moves_disk_reloads_and_queues_longer_than_one(plan_and_schedule):
    plan, schedule = plan_and_schedule
    assert plan.bytes_p2p > 0 and plan.bytes_reloaded > 0
    assert any(len(queue) > 1 for queue in schedule.p2p_queues.values())
    assert any(r in schedule.p2p_queues for r in NEW_WORKERS if any(m.src == r for m in plan.moves))  # both roles


def test_every_link_runs_its_queue_in_the_schedules_order(resharded, plan_and_schedule):
    plan, schedule = plan_and_schedule
    tag_of = {move: tag for tag, move in enumerate(plan.moves)}
    sent: dict[tuple[int, int], list[int]] = {}
    for rank, results in resharded.items():
        _, events, _ = results[True]
        me = NEW_WORKERS[rank]
        queue = schedule.p2p_queues.get(me, ())
        assert [m.nbytes for m in queue] == sorted((m.nbytes for m in queue), reverse=True)  # longest first
        assert [(op, peer, tag) for op, peer, tag in (e for e in events if e[0] == "recv")] == \
            [("recv", NEW_WORKERS.index(m.src), tag_of[m]) for m in queue]
        for op, peer, tag in (e for e in events if e[0] == "send"):
            sent.setdefault((me, NEW_WORKERS[peer]), []).append(tag)
    expected = {}
    for dst, queue in schedule.p2p_queues.items():
        for move in queue:
            expected.setdefault((move.src, dst), []).append(tag_of[move])
    assert sent == expected  # each sender sends a link's moves in the order its receiver takes them


def test_the_disk_queue_is_read_in_order_while_the_peer_transfers_are_in_flight(resharded, plan_and_schedule):
    _, schedule = plan_and_schedule
    dim_of = lambda name: ("kv_heads" if "self_attn" in name else "mlp_columns" if ".mlp." in name  # noqa: E731
                           else "vocab_rows")
    readers = 0
    for rank, results in resharded.items():
        _, events, stats = results[True]
        queue = schedule.disk_queues.get(NEW_WORKERS[rank], ())
        reads = [i for i, e in enumerate(events) if e[0] == "disk"]
        assert stats.bytes_reloaded == sum(m.nbytes for m in queue)
        if not queue:
            assert not reads
            continue
        readers += 1
        assert max(i for i, e in enumerate(events) if e[0] not in ("disk", "keep")) < reads[0]  # transfers first
        dims = [dim_of(events[i][1]) for i in reads]
        assert [d for i, d in enumerate(dims) if i == 0 or dims[i - 1] != d] == [m.dim for m in queue]
    assert readers


def test_the_kept_slices_are_copied_while_the_peer_moves_are_on_the_wire(resharded):
    """The scheduled path posts every peer move, then copies what each rank keeps, then reads its disk queue; the
    former path copied first."""
    for results in resharded.values():
        events = results[True][1]
        kinds = [kind for kind, *_ in events]
        keeps = [i for i, kind in enumerate(kinds) if kind == "keep"]
        transfers = [i for i, kind in enumerate(kinds) if kind in ("send", "recv")]
        assert keeps and transfers and max(transfers) < min(keeps)
        assert all(i < min(keeps) or kind == "disk" or kind == "keep" for i, kind in enumerate(kinds))
        assert not [i for i, kind in enumerate(kinds) if kind == "disk" and i < max(keeps)]
        former = [kind for kind, *_ in results[False][1]]
        assert former.index("keep") < min(i for i, kind in enumerate(former) if kind in ("send", "recv"))


def _expected_weights(model_dir: str, shard, shape) -> dict[str, torch.Tensor]:
    """This rank's parameters cut from the checkpoint with safetensors alone (fused q/k/v and gate/up rows)."""
    from safetensors.torch import load_file

    ckpt = {}
    for path in glob.glob(f"{model_dir}/*.safetensors"):
        ckpt.update(load_file(path))
    (h0, h1), (c0, c1), (v0, v1) = shard.kv_heads, shard.mlp_columns, shard.vocab_rows
    q_rows, kv_rows = shape.group_size * shape.head_dim, shape.head_dim
    expected = {"model.embed_tokens.weight": ckpt["model.embed_tokens.weight"][v0:v1],
                "lm_head.weight": ckpt["lm_head.weight"][v0:v1], "model.norm.weight": ckpt["model.norm.weight"]}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        expected[f"{p}.self_attn.qkv_proj.weight"] = torch.cat([
            ckpt[f"{p}.self_attn.q_proj.weight"][h0 * q_rows : h1 * q_rows],
            ckpt[f"{p}.self_attn.k_proj.weight"][h0 * kv_rows : h1 * kv_rows],
            ckpt[f"{p}.self_attn.v_proj.weight"][h0 * kv_rows : h1 * kv_rows]])
        expected[f"{p}.self_attn.o_proj.weight"] = ckpt[f"{p}.self_attn.o_proj.weight"][:, h0 * q_rows : h1 * q_rows]
        expected[f"{p}.mlp.gate_up_proj.weight"] = torch.cat([ckpt[f"{p}.mlp.gate_proj.weight"][c0:c1],
                                                             ckpt[f"{p}.mlp.up_proj.weight"][c0:c1]])
        expected[f"{p}.mlp.down_proj.weight"] = ckpt[f"{p}.mlp.down_proj.weight"][:, c0:c1]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected[f"{p}.{norm}.weight"] = ckpt[f"{p}.{norm}.weight"]
    return expected


@pytest.mark.parametrize("scheduled", [True, False], ids=["scheduled", "all_at_once"])
def test_the_weights_equal_the_checkpoints_slices(resharded, plan_and_schedule, tiny_model, scheduled):
    plan, _ = plan_and_schedule
    for rank, results in resharded.items():
        params, _, stats = results[scheduled]
        expected = _expected_weights(tiny_model, plan.layout.shards[rank], plan.layout.shape)
        assert sorted(params) == sorted(expected)
        for name, value in params.items():
            assert torch.equal(value, expected[name]), (rank, name)
        me = NEW_WORKERS[rank]
        assert stats.bytes_p2p_in == sum(m.nbytes for m in plan.moves if m.dst == me and m.src is not None)
