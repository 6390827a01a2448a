"""The GPU contract of a regroup, checked on CPU: every tensor the reshard, the KV restore and the holdings
exchange hand to a collective lives on the device of the group it goes over (NCCL takes device tensors only).

The model and the KV pool live on the `meta` device, which stands for the GPU here: a tensor made without a
device (host memory) is told apart from the model's. `torch.distributed` is replaced by `DeviceContract`, which
checks each tensor against its group's device and completes every transfer at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ft.messages import Regroup
from ft.partition import TPLayout
from ft.planner import plan_migration

MODEL_DEVICE = torch.device("meta")
DEVICE_GROUP, CPU_GROUP = object(), object()  # the TP group's device (NCCL on GPUs) and CPU (gloo) groups


class Done:
    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


class DeviceContract:
    """Stands in for torch.distributed's collectives; `None` is torch's default group (NCCL on GPUs too)."""

    def __init__(self, monkeypatch, world_size: int):
        self.devices = {None: MODEL_DEVICE, DEVICE_GROUP: MODEL_DEVICE, CPU_GROUP: torch.device("cpu")}
        self.world_size, self.calls = world_size, []
        for name in ("isend", "irecv", "broadcast", "all_reduce", "all_gather", "get_world_size"):
            monkeypatch.setattr(dist, name, getattr(self, name))

    def _check(self, op: str, tensor: torch.Tensor, group) -> Done:
        assert tensor.device == self.devices[group], \
            f"{op} was handed a tensor on {tensor.device}; its group's device is {self.devices[group]}"
        self.calls.append((op, group))
        return Done()

    def isend(self, tensor, dst=None, group=None, tag=0, group_dst=None):
        return self._check("isend", tensor, group)

    def irecv(self, tensor, src=None, group=None, tag=0, group_src=None):
        return self._check("irecv", tensor, group)

    def broadcast(self, tensor, src=None, group=None, async_op=False, group_src=None):
        return self._check("broadcast", tensor, group)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        return self._check("all_reduce", tensor, group)

    def get_world_size(self, group=None):
        return self.world_size

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        """The regroup's agreements (`rank_agreement.all_gather_object`) pickle onto a host tensor: the contract is
        that they go over the CPU group, never the device group."""
        for out in tensor_list:
            out.copy_(tensor)
        return self._check("all_gather", tensor, group)


@pytest.fixture()
def elastic(tiny_model, monkeypatch):
    """(config, shape, build(layout, rank) -> an elastic model on the meta device)."""
    from transformers import AutoConfig

    from ft.model_config import model_shape_of
    from sglang_ft.distributed_state import install_layout
    from sglang_ft.models import elastic_llama

    # the logits processor holds no weights and reads SGLang's parallel context, absent here
    monkeypatch.setattr(elastic_llama, "LogitsProcessor", lambda *args, **kwargs: torch.nn.Identity())
    config = AutoConfig.from_pretrained(tiny_model)

    def build(layout: TPLayout, rank: int):
        install_layout(layout, rank)
        with torch.device(MODEL_DEVICE):
            return elastic_llama.ElasticLlamaForCausalLM(config).eval()

    yield tiny_model, model_shape_of(config), build
    install_layout(TPLayout.even(model_shape_of(config), 1))


# (old group, new group): a death (worker 3's slices from disk, the rest moving between survivors) and a rejoin
# (worker 2 restarted: slices from peers, the replicated tensors broadcast by rank 0)
SCENARIOS = {"death": ((0, 1, 2, 3), (0, 1, 2)), "rejoin": ((0, 1), (0, 1, 2))}



def planned(scenario: str, shape):
    """The scenario's workers before and after, the old layout, what each old worker holds, and the planner's plan."""
    old_workers, new_workers = SCENARIOS[scenario]
    old_layout = TPLayout.even(shape, len(old_workers))
    held = {w: old_layout.shard(r) for r, w in enumerate(old_workers)}
    return old_workers, new_workers, old_layout, held, plan_migration(shape, held, list(new_workers))

@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("explicit_group", [False, True], ids=["default_group", "device_group"])
def test_the_reshard_hands_collectives_only_tensors_on_the_models_device(elastic, monkeypatch, scenario,
                                                                        explicit_group):
    from sglang_ft.elastic_tp.reshard import reshard

    path, shape, build = elastic
    old_workers, new_workers, old_layout, held, plan = planned(scenario, shape)
    contract = DeviceContract(monkeypatch, len(new_workers))
    for me in new_workers:
        holding = held.get(me)
        old = build(old_layout, old_workers.index(me)) if holding else build(TPLayout.even(shape, 1), 0)
        new = build(plan.layout, new_workers.index(me))
        reshard(old, new, plan, me, path, holding, replicated_from=0 if scenario == "rejoin" else None,
                **({"group": DEVICE_GROUP} if explicit_group else {}))
    ops = {op for op, _ in contract.calls}
    assert {"isend", "irecv"} <= ops and ("broadcast" in ops) == (scenario == "rejoin")
    expected_group = DEVICE_GROUP if explicit_group else None
    assert all(group is expected_group for _, group in contract.calls)


class MetaPool:
    """SGLang's MHA KV pool as the reshape sees it: per-layer K and V buffers [slots, heads, dim] on the device."""

    def __init__(self, layers: int, slots: int, heads: int, head_dim: int):
        self.layers, self.size, self.head_num, self.head_dim, self.v_head_dim = layers, slots, heads, head_dim, head_dim
        self._create_buffers()

    def _create_buffers(self):
        shape = (self.size, self.head_num, self.head_dim)
        self.k_buffer = [torch.empty(shape, device=MODEL_DEVICE) for _ in range(self.layers)]
        self.v_buffer = [torch.empty(shape, device=MODEL_DEVICE) for _ in range(self.layers)]


class Allocator:
    size, page_size = 63, 1
    free_pages = torch.arange(20, 64)  # slots 1..19 are handed out
    release_pages = torch.empty(0, dtype=torch.int64)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_kv_restore_hands_collectives_only_tensors_on_the_pools_device(elastic, monkeypatch, scenario):
    from sglang_ft.elastic_tp.kv_restore import restore_kv

    _path, shape, _build = elastic
    old_workers, new_workers, old_layout, held, plan = planned(scenario, shape)
    contract = DeviceContract(monkeypatch, len(new_workers))
    for me in new_workers:
        old_heads = held[me].kv_heads if me in held else None
        new_heads = plan.layout.shard(new_workers.index(me)).kv_heads
        pool = MetaPool(2, 64, (old_heads[1] - old_heads[0]) if old_heads else 1, shape.head_dim)
        stats = restore_kv(pool, Allocator(), old_heads, new_heads, plan, me, epoch=1, fetch_endpoint=None,
                           group=DEVICE_GROUP)
        assert stats.live_slots == 19 and pool.k_buffer[0].shape[1] == new_heads[1] - new_heads[0]
    ops = {op for op, _ in contract.calls}  # after a death the planner keeps every survivor's heads in place
    assert ops == ({"isend", "irecv"} if scenario == "rejoin" else set())
    assert all(group is DEVICE_GROUP for _, group in contract.calls)


def test_the_agreement_before_planning_goes_over_the_cpu_group(elastic, monkeypatch):
    """The holdings, output lengths and committed KV of every member: one gather, over the CPU group."""
    from types import SimpleNamespace

    from sglang_ft.elastic_tp.regroup import agree_before_planning

    _path, shape, build = elastic
    layout = TPLayout.even(shape, 2)
    contract = DeviceContract(monkeypatch, 2)
    order = Regroup(epoch=1, workers=(0, 1), store_port=0, cause="test")
    idle = SimpleNamespace(last_batch=None, running_batch=SimpleNamespace(reqs=[]), chunked_req=None)
    first = agree_before_planning(build(layout, 0), idle, None, False, order, CPU_GROUP)
    assert first.held == {0: layout.shard(0), 1: layout.shard(0)}  # every rank answered with rank 0's (the fake's echo)
    assert first.outputs == first.committed == [{}, {}]
    assert contract.calls == [("all_gather", CPU_GROUP)]


@pytest.mark.parametrize("cuda", [False, True])
def test_checkpoint_reads_are_staged_in_pinned_memory_where_cuda_is_available(tiny_model, monkeypatch, cuda):
    """The reshard's disk reads and the load's reach the GPU by DMA from pinned memory; a CPU-only machine pins
    nothing (pinning needs the CUDA driver)."""
    import glob

    from sglang_ft.model_loader import lazy_safetensors

    pinned = []
    monkeypatch.setattr(lazy_safetensors, "_pinning", lambda: cuda)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor.shape) or tensor)
    files = sorted(glob.glob(f"{tiny_model}/*.safetensors"))
    reads = [(tensor.read_rows(0, 2).shape, tensor.read_all().shape)
             for name, tensor in lazy_safetensors.lazy_safetensors_iterator(files) if name.endswith("q_proj.weight")]
    assert reads and pinned == ([shape for pair in reads for shape in pair] if cuda else [])
