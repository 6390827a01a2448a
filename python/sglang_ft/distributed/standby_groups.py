"""Process groups for the likely next memberships, connected in the background before any failure.

A regroup's most expensive stage on CPU was connecting SGLang's gloo groups for the new world (a fresh store and a
full mesh per group). After startup and after every regroup, a background thread connects, for every membership
that loses one worker (N <= 8), the gloo backends SGLang's groups will need; when a single failure (or a drain)
leaves exactly such a membership, the survivors build SGLang's groups from those backends instead of connecting new
ones (`installing`); the gloo backends of one member the build also creates (PP's at TP only, about 1 ms each on
CPU) are formed in advance too, one shared lot for whichever set is taken. Anything else (no ready set, a second
failure, a rejoin, another order of ranks, a member whose set is not fully formed, a superseded or fenced process)
falls back to the full rebuild.

Each set lives on a store prefix keyed by the epoch it was formed in and its members, and is dropped when a newer
epoch's sets replace it. Before a set is used, its members meet once on a small agreement backend of the set:
only members holding the complete set join it, so the meeting completes only when every member holds it.
On a GPU the NCCL backends are shrunk to the survivors instead (`standby_nccl.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import timedelta

logger = logging.getLogger(__name__)
MAX_GROUP = 8  # sets are formed for groups of at most this many workers (N subsets of N - 1 each)
AGREE_TIMEOUT_S = 1.0  # how long the members of a set wait for each other before falling back to the rebuild
PREFIX = "sglang-ft-standby"


@dataclasses.dataclass
class StandbySet:
    """The gloo backends one membership needs, connected in advance (none for a membership of one)."""

    epoch: int  # the epoch whose group formed it
    members: tuple[int, ...]  # worker ids, in the new group's rank order
    rank: int  # this worker's rank among them
    agreement: object | None  # the backend the members meet on before using the set
    backends: list  # in the order SGLang's build asks for its gloo backends of the members' size
    connections: set  # the TCP connections they opened (shut by an interrupt once the set is the group)
    cpu_s: float = 0.0  # this thread's CPU time forming it
    singles: list = dataclasses.field(default_factory=list)  # gloo backends of one member, handed over by `take`

    def release(self) -> None:
        for backend in ([self.agreement] if self.agreement is not None else []) + self.backends + self.singles:
            try:
                backend.shutdown()
            except Exception as exc:  # a peer already gone: nothing left to close cleanly
                logger.debug("sglang-ft: shutting a standby backend down: %s", exc)
        self.backends, self.agreement, self.singles = [], None, []

    @classmethod
    def loose(cls, backends=(), singles=()) -> StandbySet:
        """Backends of no membership (left over, or of one member), held only to be shut down by `discard`."""
        return cls(-1, (), 0, None, list(backends), set(), singles=list(singles))


def _sglang_gloo_sizes() -> list[int]:
    """The sizes of the gloo backends of this process's SGLang groups, from torch's registry."""
    import torch
    import torch.distributed as dist

    sizes = []
    for group in list(dist.distributed_c10d._world.pg_map):
        desc = getattr(group, "group_desc", "")
        if desc != "default_pg" and not desc.endswith((":device", ":cpu")):
            continue  # not one of SGLang's groups
        try:
            backend = group._get_backend(torch.device("cpu"))
        except RuntimeError:
            continue  # no CPU backend (an NCCL-only group)
        if isinstance(backend, dist.ProcessGroupGloo):
            sizes.append(backend.size())
    return sizes


def gloo_backends_needed(size: int) -> int | None:
    """How many gloo backends of the group's full size this process's SGLang groups hold (the count its next
    build asks for at any width), read from torch's registry; None when a gloo group has a size other than 1 or
    `size` (a layout whose groups do not all scale with the TP width: no standby)."""
    sizes = _sglang_gloo_sizes()
    if any(s not in (1, size) for s in sizes):
        return None
    return sum(1 for s in sizes if s == size and size > 1)


def gloo_singletons_held() -> int:
    """How many gloo backends of one member (PP's groups at TP only) SGLang's groups hold: its next build creates
    as many (about 1 ms each on CPU), which the standby sets create in advance too."""
    return sum(1 for s in _sglang_gloo_sizes() if s == 1)


def next_memberships(workers: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every membership one worker's loss leaves, in an order every member computes alike."""
    if not 2 <= len(workers) <= MAX_GROUP:
        return []
    return [tuple(w for w in workers if w != lost) for lost in workers]


class StandbyGroups:
    """This process's standby sets: formed by a background thread, taken by the regroup that matches one."""

    def __init__(self, connections=None):
        self._lock = threading.Lock()
        self.own_store_port: int | None = None  # after an install from a set: the port the next sets' store takes
        self._generation = 0  # bumped whenever the sets in hand are superseded
        self._epoch = -1  # the epoch the sets in hand were formed in
        self._ready: dict[tuple[int, ...], StandbySet] = {}
        self._singles: list = []  # gloo backends of one member, for whichever set is taken (none is per membership)
        self._store = None  # a store this process opened for the sets (kept alive while they are formed)
        self.formed_cpu_s = 0.0  # CPU time of the latest generation's formation, for the log and tests
        self._connections = connections  # records the TCP connections a set opens (group_interrupt's)

    def prepare(self, epoch: int, workers: tuple[int, ...], me: int, open_store, timeout_s: float,
                count: int | None, singles: int = 0) -> threading.Thread | None:
        """Drop the sets of older epochs and form this epoch's in a background thread. Call between steps.

        `open_store(superseded)` returns the store the members share (run in the thread: it may wait for the others
        until `superseded()`);
        `count` is `gloo_backends_needed` of the group now (None: nothing to form), `singles` its
        `gloo_singletons_held`."""
        self.drop()
        memberships = [m for m in next_memberships(tuple(workers)) if me in m]
        if count is None or not memberships:
            return None
        with self._lock:
            self._epoch, generation = epoch, self._generation
        thread = threading.Thread(target=self._form, name=f"ft-standby-{epoch}", daemon=True,
                                  args=(generation, epoch, memberships, me, open_store, timeout_s, count, singles))
        thread.start()
        return thread

    def drop(self) -> None:
        """Supersede every set in hand (a newer epoch is coming): they are shut down and never used."""
        with self._lock:
            self._generation += 1
            dropped, self._ready = list(self._ready.values()), {}
            dropped.append(StandbySet.loose(singles=self._singles))
            self._store, self._singles = None, []
        discard(dropped)

    def ready(self, members: tuple[int, ...]) -> bool:
        with self._lock:
            return tuple(members) in self._ready

    def peek(self, members: tuple[int, ...]) -> StandbySet | None:
        """The set for `members` if one is ready, left in place (the NCCL shrink meets on its agreement backend)."""
        with self._lock:
            return self._ready.get(tuple(members))

    def _current(self, generation: int) -> bool:
        with self._lock:
            return generation == self._generation

    def _form(self, generation, epoch, memberships, me, open_store, timeout_s, count, singles) -> None:
        import torch.distributed as dist

        started, cpu = time.monotonic(), time.thread_time()
        try:
            formed = [dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=timeout_s))
                      for _ in range(singles)]  # no peer to reach: no store shared, no connection
            with self._lock:
                current = generation == self._generation
                if current:
                    self._singles = formed
            if not current:
                discard([StandbySet.loose(singles=formed)])
                return
            store = open_store(lambda: not self._current(generation))
            with self._lock:
                if generation != self._generation:
                    return
                self._store = store
            for members in memberships:
                if not self._current(generation):
                    return
                standby = StandbySet(epoch, members, members.index(me), None, [], set())
                set_cpu = time.thread_time()
                with self._opened() as standby.connections:
                    if len(members) > 1:
                        key = f"{PREFIX}/{epoch}/{'-'.join(map(str, members))}"
                        timeout = timedelta(seconds=timeout_s)
                        standby.agreement, *standby.backends = [
                            dist.ProcessGroupGloo(dist.PrefixStore(f"{key}/{i}/", store), standby.rank, len(members),
                                                  timeout)
                            for i in range(count + 1)]
                        standby.agreement.set_timeout(timedelta(seconds=AGREE_TIMEOUT_S))
                standby.cpu_s = time.thread_time() - set_cpu
                with self._lock:
                    superseded = generation != self._generation
                    if not superseded:
                        self._ready[members] = standby
                if superseded:
                    standby.release()  # in this background thread already
                    return
        except Exception as exc:  # a member died or moved on while forming: the regroup rebuilds instead
            logger.info("sglang-ft: standby groups of epoch %d not formed: %s", epoch, str(exc).splitlines()[0][:200])
            return
        self.formed_cpu_s = time.thread_time() - cpu
        logger.info("sglang-ft: standby groups of epoch %d ready for memberships %s (%d gloo backends each, %d of "
                    "one member for any) in %.0f ms, %.0f ms CPU", epoch, [list(m) for m in memberships],
                    count + 1 if len(memberships[0]) > 1 else 0, singles, (time.monotonic() - started) * 1e3,
                    self.formed_cpu_s * 1e3)

    def _opened(self):
        import contextlib

        return contextlib.nullcontext(set()) if self._connections is None else self._connections.opened()

    def take(self, me: int, epoch: int, order_epoch: int, workers: tuple[int, ...], latest_epoch: int):
        """The set for the ordered membership, if every member of it holds it complete; else None (rebuild).

        Only a worker of the newest order that regroups from the epoch the sets were formed in may use one: a
        fenced (outside the group) or superseded (a newer order exists) process, a worker whose last regroup
        failed half way (its epoch moved on), or a membership no set was formed for gets None."""
        workers = tuple(workers)
        with self._lock:
            standby = self._ready.pop(workers, None)
            formed_in = self._epoch
            self._generation += 1  # nothing more is formed for this epoch: the group is changing
            rest, self._ready = list(self._ready.values()), {}
            singles, self._singles = self._singles, []
        usable = (standby is not None and me in workers and formed_in == epoch == standby.epoch
                  and order_epoch > epoch and latest_epoch == order_epoch)
        if usable:
            standby.singles = singles
        else:
            rest.append(StandbySet.loose(singles=singles))
        discard(rest)
        if usable and (standby.agreement is None or agree(standby.agreement)):
            return standby
        discard([standby] if standby is not None else [])
        return None


def discard(sets: list[StandbySet]) -> None:
    """Shut sets down off the critical path: a gloo backend's teardown joins its threads (tens of ms each)."""
    if sets:
        threading.Thread(target=lambda: [s.release() for s in sets], name="ft-standby-discard", daemon=True).start()


def agree(backend) -> bool:
    """Meet every member of the set on its agreement backend: True when all came within AGREE_TIMEOUT_S."""
    import torch
    import torch.distributed as dist

    flag = torch.ones(1, dtype=torch.int32)
    try:
        backend.allreduce([flag], dist.AllreduceOptions()).wait()
    except Exception as exc:  # a member without the set never comes: its timeout, or a closed connection
        logger.warning("sglang-ft: a member of the new group has no standby groups (%s); rebuilding them",
                       str(exc).splitlines()[0][:120])
        return False
    return int(flag.item()) == backend.size()


class installing:
    """While active, torch's gloo backends of the standby's size come from the standby, in order (and the NCCL ones
    from `nccl`, the shrunk communicators, on a GPU); the others (a group of one) are created as usual. SGLang's
    build then wraps them in its process groups and coordinators exactly as if it had connected them itself."""

    def __init__(self, standby: StandbySet, nccl: list | None = None):
        self.left = {"GLOO": list(standby.backends)}
        self.singles = list(standby.singles)
        if nccl is not None:
            self.left["NCCL"] = list(nccl)
        self._plugins: dict = {}

    def __enter__(self):
        from torch.distributed.distributed_c10d import Backend

        for name in self.left:
            self._plugins[name] = Backend._plugins[name]
            Backend._plugins[name] = Backend._BackendPlugin(lambda o, b, name=name: self._create(name, o, b), True)
        return self

    def __exit__(self, *exc) -> None:
        from torch.distributed.distributed_c10d import Backend

        for name, plugin in self._plugins.items():
            Backend._plugins[name] = plugin
        discard([StandbySet.loose([b for left in self.left.values() for b in left], self.singles)])

    def _create(self, name: str, opts, backend_options):
        creator, extended = self._plugins[name]
        if opts.group_size == 1 and not (name == "GLOO" and self.singles):
            return creator(opts, backend_options) if extended else creator(opts.store, opts.group_rank, 1,
                                                                               opts.timeout)
        if opts.group_size == 1:
            return self._fitted(self.singles.pop(0), opts)
        if not self.left[name]:
            raise StandbyMismatch(f"the build asked for more {name.lower()} backends than were formed in advance")
        backend = self.left[name].pop(0)
        if (backend.size(), backend.rank()) != (opts.group_size, opts.group_rank):
            raise StandbyMismatch(f"the build asked for rank {opts.group_rank} of {opts.group_size}; the standby "
                                  f"{name.lower()} backend is rank {backend.rank()} of {backend.size()}")
        return self._fitted(backend, opts) if name == "GLOO" else backend

    @staticmethod
    def _fitted(backend, opts):
        """A gloo backend formed in advance, given the timeout and names the build asks for."""
        backend.set_timeout(opts.timeout)
        backend.options.global_ranks_in_group = opts.global_ranks_in_group
        backend.options.group_name = opts.group_id
        return backend


class StandbyMismatch(RuntimeError):
    """SGLang's build asked for gloo backends other than those formed: every member falls back to the rebuild
    (the build is the same on every member, so they all fail alike)."""


def _connections():
    from sglang_ft.distributed.group_interrupt import GROUP_CONNECTIONS

    return GROUP_CONNECTIONS


STANDBY = StandbyGroups(_connections())
FORM_TIMEOUT_S = 60.0  # members reach the formation at different times (startup: model loading)


def _regroup_groups():
    """The module that rebuilds SGLang's groups (imported late: it imports this module's callers)."""
    from sglang_ft.elastic_tp import groups

    return groups


def _on_cpu() -> bool:
    from sglang_ft.sglang_surface import get_device

    return get_device().device == "cpu"


def build_groups(ft_worker, order, superseded) -> bool:
    """SGLang's groups for the ordered group, installed from the standby set for its membership when every member
    holds it, else rebuilt on the order's store; True when installed. Called where the regroup rebuilt them."""
    import torch.distributed as dist

    groups = _regroup_groups()
    me, timeout_s, host = ft_worker.worker, ft_worker.ft.collective_timeout_s, ft_worker.ft.rendezvous_host
    rank, size = order.workers.index(me), len(order.workers)
    # The old groups are destroyed off the critical path: a gloo group's destructor joins its threads and closes
    # its pairs (about 0.2 s for SGLang's groups of TP 4 on CPU). Held here, they outlive the teardown.
    old = list(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else []
    try:
        return _install_or_rebuild(ft_worker, order, superseded, groups, rank, size, timeout_s, host)
    finally:
        threading.Thread(target=old.clear, name="ft-old-groups", daemon=True).start()


def _install_or_rebuild(ft_worker, order, superseded, groups, rank, size, timeout_s, host) -> bool:
    import torch.distributed as dist

    me = ft_worker.worker
    latest = ft_worker.orders.latest
    standby = STANDBY.take(me, ft_worker.epoch, order.epoch, tuple(order.workers),
                           order.epoch if latest is None else latest.epoch)
    nccl = None
    if not _on_cpu():  # the NCCL backends come from the order listener's shrink, or the groups are rebuilt
        from sglang_ft.distributed.standby_nccl import take_shrunk

        nccl = take_shrunk(order.epoch)
        if nccl is None and standby is not None:
            discard([standby])
            standby = None
    if standby is not None:
        try:
            with installing(standby, nccl):
                groups.rebuild_process_groups(rank, size, order.store_port, timeout_s, superseded, host,
                                              store=dist.HashStore(), connections=standby.connections)
            standby.backends = []  # SGLang's groups' now
            discard([standby])  # its agreement backend, shut down off the critical path
            STANDBY.own_store_port = order.store_port  # the order's store was never opened: the next sets' own
            return True
        except StandbyMismatch as exc:
            logger.warning("sglang-ft: standby groups do not fit SGLang's build (%s); rebuilding them", exc)
    groups.rebuild_process_groups(rank, size, order.store_port, timeout_s, superseded, host)
    STANDBY.own_store_port = None  # the group's store is the order's, which the next sets share
    return False


def form_next(ft_worker, workers: tuple[int, ...], epoch: int) -> None:
    """Form the standby sets of the group now in place (after startup and after every regroup, between steps).

    On a GPU the sets hold the CPU groups' gloo backends; the NCCL ones are shrunk at the failure
    (`standby_nccl.py`), so without a torch that shrinks nothing is formed."""
    from sglang_ft.distributed.standby_nccl import shrink_available

    if not _on_cpu() and not shrink_available():
        return
    import torch.distributed as dist

    groups = _regroup_groups()
    me, host, workers = ft_worker.worker, ft_worker.ft.rendezvous_host, tuple(workers)
    port = STANDBY.own_store_port
    if port is None:  # the store the group was built on (SGLang's at startup, the order's after a rebuild)
        open_store = lambda superseded: dist.distributed_c10d._get_default_store()  # noqa: E731
    else:  # the group was installed from a standby set on a store of its own: the sets need a shared one
        open_store = lambda superseded: groups.join_store(  # noqa: E731
            workers.index(me), len(workers), port, FORM_TIMEOUT_S, superseded, host)
    STANDBY.prepare(epoch, workers, me, open_store, FORM_TIMEOUT_S, gloo_backends_needed(len(workers)),
                    gloo_singletons_held())


def interrupt_for(order, group: tuple[int, ...]) -> tuple[int, int]:
    """The order listener's interrupt of the old group: its NCCL communicators shrunk to the survivors where the
    order is a single loss with a standby set ready, else aborted (`group_interrupt.interrupt_old_group`); its
    gloo connections shut either way. Returns (communicators aborted, connections shut)."""
    from sglang_ft.distributed.group_interrupt import GROUP_CONNECTIONS, interrupt_old_group
    from sglang_ft.distributed.standby_nccl import shrink_for

    try:
        shrunk = shrink_for(order, group, STANDBY, agree)
    except Exception as exc:  # never let the listener thread die: abort as before
        logger.warning("sglang-ft: NCCL shrink skipped: %s", exc)
        shrunk = False
    return (0, GROUP_CONNECTIONS.shut_down()) if shrunk else interrupt_old_group()
