"""sglang_surface.py against the pinned SGLang: every name it imports resolves, every SGLang callable it (or its
callers) use takes the parameters listed, every attribute sglang-ft reads or sets on SGLang's objects is assigned
in its class. An SGLang upgrade that moves one fails here with its name."""

import ast
import dataclasses
import functools
import inspect
import pkgutil
import textwrap

import pytest
from sglang_ft import sglang_surface


def _resolve(dotted: str):
    owner, attr = dotted.rsplit(".", 1)
    return getattr(pkgutil.resolve_name(owner), attr)


@pytest.mark.parametrize("name", sorted(sglang_surface.NAMES))
def test_every_name_resolves(name):
    assert _resolve(sglang_surface.NAMES[name]) is getattr(sglang_surface, name), f"{sglang_surface.NAMES[name]}"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchName"):
        sglang_surface.NoSuchName  # noqa: B018


@pytest.mark.parametrize("target", sorted(sglang_surface.PARAMETERS))
def test_every_callable_takes_the_parameters_listed(target):
    found = list(inspect.signature(_resolve(target)).parameters)
    expected = sglang_surface.PARAMETERS[target].split()
    assert found == expected, f"{target} now takes ({', '.join(found)}); sglang-ft expects ({', '.join(expected)})"


@functools.lru_cache(maxsize=None)
def _assigned_on_self(klass: type) -> frozenset[str]:
    """The `self.<name>` that the code of `klass` assigns (plain, annotated, augmented or unpacked)."""
    try:
        source = inspect.getsource(klass)
    except (OSError, TypeError):
        return frozenset()
    names = set()
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            for leaf in ast.walk(target) if target is not None else ():
                if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                    names.add(leaf.attr)
    return frozenset(names)


def assigned_in(owner, attr: str) -> bool:
    """Is `attr` an attribute of instances of the class `owner` (or of the module `owner`)? A class attribute,
    slot, property, dataclass or msgspec field, or a `self.<attr> = ...` in the code of a class of its MRO."""
    if hasattr(owner, attr):
        return True
    if inspect.ismodule(owner):
        return False
    if dataclasses.is_dataclass(owner) and attr in {f.name for f in dataclasses.fields(owner)}:
        return True
    if attr in getattr(owner, "__struct_fields__", ()):
        return True
    return any(attr in _assigned_on_self(klass) for klass in owner.__mro__)


@pytest.mark.parametrize("owner, attr", [(o, a) for o, names in sorted(sglang_surface.ATTRIBUTES.items())
                                         for a in names.split()])
def test_every_attribute_is_assigned_in_its_class(owner, attr):
    assert assigned_in(pkgutil.resolve_name(owner), attr), f"{owner} no longer has `{attr}`"


def test_the_attribute_check_is_not_vacuous():
    from sglang.srt.managers.scheduler import Scheduler

    assert assigned_in(Scheduler, "waiting_queue") and not assigned_in(Scheduler, "waiting_queues")


def test_recreated_kv_buffers_have_the_new_heads_on_every_layer():
    """On SGLang's own MHA pool (CPU): the buffers and the row widths its copy kernels use follow the new heads."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(8, 1, torch.float32, head_num=2, head_dim=4, layer_num=2, device="cpu",
                            enable_memory_saver=False)
    old_k = pool.k_buffer
    sglang_surface.recreate_kv_buffers(pool, 3)
    assert [tuple(pool.get_key_buffer(layer).shape) for layer in range(2)] == [(9, 3, 4)] * 2
    assert [tuple(pool.get_value_buffer(layer).shape) for layer in range(2)] == [(9, 3, 4)] * 2
    assert (pool.row_dim, pool.v_row_dim) == (12, 12) and tuple(old_k[0].shape) == (9, 2, 4)


def test_the_joiner_launch_binds_to_sglangs_scheduler_process_by_name():
    """The restarted worker's scheduler starts through SGLang's `run_scheduler_process`, every argument by name."""
    from sglang.srt.managers.scheduler import run_scheduler_process

    calls = []
    sglang_surface.run_scheduler_process(lambda **kwargs: calls.append(kwargs), server_args="args", port_args="ports",
                                         gpu_id=3, tp_rank=0, pp_rank=0, dp_rank=None, pipe_writer="pipe")
    bound = inspect.signature(run_scheduler_process).bind(**calls[0]).arguments
    assert bound == {"server_args": "args", "port_args": "ports", "gpu_id": 3, "tp_rank": 0, "pp_rank": 0,
                     "dp_rank": None, "pipe_writer": "pipe"}


@pytest.mark.parametrize("need_sort", [False, True])
def test_the_free_slots_end_in_ascending_order_whatever_order_they_were_freed_in(need_sort):
    """SGLang's own allocator, slots freed in a shuffled order (with `need_sort` they wait in `release_pages`): the
    list it hands out next is every free slot in ascending order, against Python's sort of the same slots."""
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    from sglang_ft.sglang_surface import sort_free_slots

    allocator = TokenToKVPoolAllocator(4096, torch.float32, "cpu", None, need_sort=need_sort)
    taken = allocator.alloc(1000)
    allocator.free(taken[torch.randperm(len(taken), generator=torch.Generator().manual_seed(3))])
    slots = sorted(torch.cat([allocator.free_pages, allocator.release_pages]).tolist())
    dtype = allocator.free_pages.dtype
    sort_free_slots(allocator)
    assert allocator.free_pages.tolist() == slots and len(allocator.release_pages) == 0
    assert allocator.free_pages.dtype == dtype and allocator.alloc(5).tolist() == slots[:5]
