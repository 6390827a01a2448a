"""The node's copy of the checkpoint in host memory (`--ft-weight-cache host`): the holder copies, bounds and cleans
up; a reshard reads the lost worker's slices from the copy (no disk read), equal to transformers' weights, counts
the bytes by source, and falls back to the checkpoint for what the copy lacks."""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ft import weight_cache
from ft.partition import TPLayout
from ft.planner import plan_migration


def _checkpoint_bytes(checkpoint_dir) -> int:
    return sum(os.path.getsize(os.path.join(checkpoint_dir, f)) for f in os.listdir(checkpoint_dir)
               if f.endswith(".safetensors"))


def _wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_holder_copies_the_checkpoint_and_removes_it_when_its_owner_exits(tiny_model, tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        cache_dir = weight_cache.cache_dir_for(owner.pid, root=str(tmp_path))
        holder = psutil.Process(weight_cache.spawn_holder(tiny_model, cache_dir, owner.pid))
        assert holder.ppid() != os.getpid()  # detached: SGLang's kill of the launcher's process tree misses it
        _wait_for(lambda: weight_cache.cache_status(cache_dir)["state"] == "complete")
        names = [f for f in os.listdir(tiny_model) if f.endswith(".safetensors")]
        assert names and all(filecmp.cmp(os.path.join(tiny_model, n), os.path.join(cache_dir, n), shallow=False)
                             for n in names)
        status = weight_cache.cache_status(cache_dir)
        assert status["bytes"] == status["checkpoint_bytes"] == _checkpoint_bytes(tiny_model)
        assert status["bytes"] <= status["bound_bytes"]
        assert holder.is_running() and holder.status() != psutil.STATUS_ZOMBIE  # holding the copy: its owner lives
    finally:
        owner.kill()  # (not reaped yet: a zombie owner is gone too)
    _wait_for(lambda: not os.path.exists(cache_dir), timeout_s=30)
    owner.wait()
    _wait_for(lambda: not holder.is_running() or holder.status() == psutil.STATUS_ZOMBIE, timeout_s=30)


def test_a_bound_below_the_checkpoint_turns_the_cache_off_and_says_so(tiny_model, tmp_path, caplog):
    cache_dir = weight_cache.cache_dir_for(os.getpid(), root=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sglang_ft.weight_cache"):
        weight_cache.make_copy(tiny_model, cache_dir, max_bytes=_checkpoint_bytes(tiny_model) - 1)
    assert [r.getMessage() for r in caplog.records if "--ft-weight-cache host is off" in r.getMessage()
            and "--ft-weight-cache-max-gb" in r.getMessage()]
    assert not [f for f in os.listdir(cache_dir) if ".safetensors" in f]
    status = weight_cache.cache_status(cache_dir)
    assert status["state"] == "off" and status["bytes"] == 0 and "exceed the bound" in status["reason"]


def test_the_bound_is_at_most_half_the_available_memory(tmp_path):
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    bound, _ = weight_cache.cache_bound(str(tmp_path))
    assert 0 < bound <= available * 0.5 * 1.05  # (memory moves a little between the two reads)
    assert weight_cache.cache_bound(str(tmp_path), max_bytes=1000) == (1000, "--ft-weight-cache-max-gb")
    # without a GPU the workers' weights are about to take host memory too: the bound leaves room for them
    fs = os.statvfs(tmp_path)
    reserved, _ = weight_cache.cache_bound(str(tmp_path), reserve_bytes=available // 4)
    assert reserved == pytest.approx(min(available * 0.5 - available // 4, fs.f_bavail * fs.f_frsize), rel=0.05)


def test_copies_of_dead_owners_are_removed_and_live_ones_kept(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = weight_cache.cache_dir_for(gone.pid, root=str(tmp_path))  # (its start time is unknown now: "None")
    reused = os.path.join(tmp_path, f"{weight_cache.PREFIX}{os.getpid()}-1")  # this pid, another start time
    live = weight_cache.cache_dir_for(os.getpid(), root=str(tmp_path))
    for path in (dead, reused, live):
        os.makedirs(path)
    assert sorted(weight_cache.remove_stale(str(tmp_path))) == sorted([dead, reused])
    assert os.listdir(tmp_path) == [os.path.basename(live)]


# --- the reshard's reads ---

@pytest.fixture()
def survivors(tiny_model, monkeypatch):
    """TP 4 -> 3 on CPU with worker 3 dead: build(me) -> (old model, new model, plan, what `me` held). The peer
    transfers are left out (their buffers stay unset): only the slices read from files are checked."""
    from transformers import AutoConfig

    from ft.model_config import model_shape_of
    from sglang_ft.distributed_state import install_layout
    from sglang_ft.elastic_tp import reshard
    from sglang_ft.models import elastic_llama

    monkeypatch.setattr(elastic_llama, "LogitsProcessor", lambda *args, **kwargs: torch.nn.Identity())
    for name, fake in (("send", lambda *args: None), ("receive", lambda *args: None), ("arrived", lambda r: True),
                       ("wait", lambda r: None), ("wait_all", lambda requests: None)):
        monkeypatch.setattr(reshard, name, fake)
    config = AutoConfig.from_pretrained(tiny_model)
    shape = model_shape_of(config)
    old_layout = TPLayout.even(shape, 4)
    held = dict(enumerate(old_layout.shards))
    plan = plan_migration(shape, held, [0, 1, 2])

    def model(layout, rank):
        install_layout(layout, rank)
        return elastic_llama.ElasticLlamaForCausalLM(config).eval()

    def build(me: int):
        return model(old_layout, me), model(plan.layout, me), plan, held[me]

    yield build
    install_layout(TPLayout.even(shape, 1))


@pytest.fixture(scope="module")
def hf_weights(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()


@pytest.fixture()
def opened(monkeypatch):
    """The files safetensors opens for the reads (a read counter by path)."""
    from sglang_ft.model_loader import lazy_safetensors

    paths = []

    def recording(path, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return safe_open(path, *args, **kwargs)

    monkeypatch.setattr(lazy_safetensors, "safe_open", recording)
    return paths


def _read_from_files(new, plan, me):
    return [p for m in plan.moves if m.src is None and m.dst == me for p in new.unit_pieces(m.dim, m.start, m.end)]


def _reshard(build, me, checkpoint_dir, cache_dir, monkeypatch):
    """`me`'s reshard in a worker of a deployment whose copy is `cache_dir` (the launcher publishes it so)."""
    from sglang_ft.elastic_tp.reshard import reshard
    from sglang_ft.server_args import FT_ENV, FtArgs, ft_args

    monkeypatch.setenv(FT_ENV, FtArgs(enabled=True, weight_cache_dir=str(cache_dir)).to_env())
    ft_args.cache_clear()
    old, new, plan, held = build(me)
    try:
        return new, plan, reshard(old, new, plan, me, str(checkpoint_dir), held)
    finally:
        monkeypatch.delenv(FT_ENV)
        ft_args.cache_clear()


def _assert_equal_to_transformers(pieces, hf_weights):
    assert pieces
    for p in pieces:
        full = hf_weights[p.name]
        expected = full[p.lo:p.hi] if p.axis == 0 else full[:, p.lo:p.hi]
        assert torch.equal(p.view, expected), p.name


def _nbytes(pieces) -> int:
    return sum(p.view.numel() * p.view.element_size() for p in pieces)


def _copy_of(checkpoint_dir, tmp_path) -> str:
    cache_dir = os.path.join(tmp_path, "cache")
    os.makedirs(cache_dir)
    for name in os.listdir(checkpoint_dir):
        if name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(checkpoint_dir, name), os.path.join(cache_dir, name))
    return cache_dir


LOST = 2  # the survivor whose new span covers worker 3's slices that no survivor held (the planner's plan)


def test_a_survivor_reads_the_lost_slices_from_the_host_copy_only(survivors, tiny_model, hf_weights, opened,
                                                                   tmp_path, monkeypatch):
    me = LOST
    cache_dir = _copy_of(tiny_model, tmp_path)
    new, plan, stats = _reshard(survivors, me, tiny_model, cache_dir, monkeypatch)
    pieces = _read_from_files(new, plan, me)
    _assert_equal_to_transformers(pieces, hf_weights)
    assert opened and all(os.path.dirname(path) == os.path.realpath(cache_dir) for path in opened)  # no disk read
    assert (stats.bytes_from_host_cache, stats.bytes_reloaded) == (_nbytes(pieces), 0)
    assert stats.bytes_from_host_cache == sum(m.nbytes for m in plan.moves if m.src is None and m.dst == me) > 0


def test_without_a_copy_the_slices_come_from_disk(survivors, tiny_model, hf_weights, opened, tmp_path, monkeypatch):
    new, plan, stats = _reshard(survivors, LOST, tiny_model, str(tmp_path / "no-copy"), monkeypatch)
    pieces = _read_from_files(new, plan, LOST)
    _assert_equal_to_transformers(pieces, hf_weights)
    assert opened and all(os.path.dirname(path) == os.path.realpath(tiny_model) for path in opened)
    assert (stats.bytes_from_host_cache, stats.bytes_reloaded) == (0, _nbytes(pieces))


def test_what_the_copy_lacks_or_holds_partly_comes_from_disk(survivors, tiny_model, hf_weights, opened, tmp_path,
                                                             monkeypatch):
    """A checkpoint of three files; the copy holds the first whole, the second cut short (a copy under way, or a
    filled tmpfs) and lacks the third: the first file's tensors come from the copy, the rest from disk."""
    tensors = load_file(os.path.join(tiny_model, "model.safetensors"))
    split = tmp_path / "split"
    split.mkdir()
    names = sorted(tensors)
    parts = [names[i::3] for i in range(3)]
    for i, part in enumerate(parts):
        save_file({n: tensors[n] for n in part}, str(split / f"model-0000{i + 1}-of-00003.safetensors"))
    cache_dir = _copy_of(split, tmp_path)
    os.remove(os.path.join(cache_dir, "model-00003-of-00003.safetensors"))
    with open(os.path.join(cache_dir, "model-00002-of-00003.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    with safe_open(str(split / "model-00001-of-00003.safetensors"), framework="pt") as f:
        in_copy = set(f.keys())
    new, plan, stats = _reshard(survivors, LOST, str(split), cache_dir, monkeypatch)
    pieces = _read_from_files(new, plan, LOST)
    _assert_equal_to_transformers(pieces, hf_weights)
    expected_host = _nbytes([p for p in pieces if p.name in in_copy])
    assert 0 < expected_host < _nbytes(pieces)
    assert (stats.bytes_from_host_cache, stats.bytes_reloaded) == (expected_host, _nbytes(pieces) - expected_host)
    assert {os.path.basename(p) for p in opened if os.path.dirname(p) == os.path.realpath(cache_dir)} == {
        "model-00001-of-00003.safetensors"}
