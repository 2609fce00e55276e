"""The communication facade: the only module of distbn that imports Horovod.

Everything else asks ``get_comm()`` for rank, size and collectives. When Horovod is missing,
or the job runs as one process, a size-1 path does no collective at all: an all-reduce of one
worker is the identity, so it returns its input unchanged.

Two kinds of collectives: Horovod's (gradients, broadcasts, metrics), and the sync layers'
all-reduce, which runs on Gloo contexts of distbn's own (:mod:`distbn.engine`) that this module
sets up through Horovod when it starts. Groups: a :class:`Group` made by :meth:`Comm.group` from a
list of ranks is a sub-communicator of that engine (no Horovod process set is involved).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from . import engine as _engine, native
from .placement import pin_local_worker

try:  # Horovod is optional: without it distbn runs as one process.
    import horovod.mxnet as _hvd
except ImportError:  # pragma: no cover - exercised only on machines without Horovod
    _hvd = None


@dataclass(frozen=True)
class Group:
    """A subset of workers whose sync layers share statistics (a communicator of the engine)."""
    ranks: tuple

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass
class Comm:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    engine: bool = False  # whether the sync layers' engine is up (distbn.engine; set by get_comm)
    cores: list = field(default_factory=list)  # the cores this worker was pinned to ([]: not)
    _issued_count: int = 0
    _last_issued: str = ""
    _groups: dict = field(default_factory=dict, repr=False)  # ranks -> Group, made once each

    # --- collectives -------------------------------------------------------------------
    def allreduce_sum(self, x, name: str):
        """Element-wise sum of ``x`` over all workers, through Horovod.

        Asynchronous: returns an NDArray that MXNet's engine fills in when the collective is
        done, so the caller's next ops queue behind it. ``name`` must be identical on every
        rank and unique among collectives in flight.
        """
        if self.size == 1:
            return x
        self._issued(name)
        return _hvd.allreduce(x, name=name, op=_hvd.Sum)

    def allreduce_max(self, x, name: str):
        """Element-wise maximum of ``x`` over all workers."""
        if self.size == 1:
            return x
        self._issued(name)
        return _hvd.allreduce(x, name=name, op=_hvd.Max)

    def broadcast(self, x, name: str, root: int = 0):
        """Root's ``x`` on every worker (a new array; ``x`` is left as it was)."""
        if self.size == 1:
            return x
        self._issued(name)
        return _hvd.broadcast(x, root_rank=root, name=name)

    def broadcast_parameters(self, params, root: int = 0, prefix: str = "bcast"):
        """Overwrite Gluon parameters (a ParameterDict or dict) with root's values; see
        :func:`broadcast_parameters` for what it checks and accepts.

        One out-of-place broadcast per parameter, in name order, then ``set_data``: a CI run
        once crashed (segfault on rank 0) inside Horovod's in-place broadcast_parameters, so
        distbn does not use it. Each value goes through a copy in MXNet's default layout:
        after a hybridized (static_alloc) network ran on the CPU, convolution weights can sit
        in oneDNN's blocked layout, which Horovod cannot read ("We can't generate TBlob for
        MKLDNN data"). Pending writes (initialization) finish first.
        """
        _check_shapes(params)
        if self.size == 1:
            return
        import mxnet as mx
        mx.nd.waitall()
        for name, param in sorted(params.items()):
            self._issued(f"{prefix}.{name}")
            value = param.data()
            numpy_mode = isinstance(value, mx.np.ndarray)  # Horovod takes legacy NDArrays
            value = value.as_nd_ndarray() if numpy_mode else value
            plain = value.copyto(mx.nd.empty(value.shape, ctx=value.context, dtype=value.dtype))
            got = _hvd.broadcast(plain, root_rank=root, name=f"{prefix}.{name}")
            param.set_data(got.as_np_ndarray() if numpy_mode else got)
        mx.nd.waitall()

    def trainer(self, params, optimizer: str, optimizer_params: dict):
        """A Gluon trainer whose gradients are summed over this process's devices and averaged
        over all workers before each step (one process: Gluon's, whose kvstore sums the
        devices' gradients)."""
        import mxnet as mx
        if self.size == 1:
            return mx.gluon.Trainer(params, optimizer, optimizer_params)
        return _DistributedTrainer(params, optimizer, optimizer_params)

    def group(self, ranks: Sequence[int]) -> Group:
        """A group of the given ranks for the sync layers (``process_set=``). Every worker
        must call this with the same ranks in the same order, members or not: it connects the
        group's engine context (one all-gather through Horovod)."""
        ranks = tuple(sorted(int(r) for r in ranks))
        if any(not 0 <= r < self.size for r in ranks) or len(set(ranks)) != len(ranks) or not ranks:
            raise ValueError(f"ranks {ranks} are not distinct ranks of a world of size {self.size}")
        if ranks not in self._groups:
            if 1 < len(ranks) < self.size:  # all workers: the engine's first context; one: none
                _engine.add_group(self.rank, ranks, self.allgather_object)
            self._groups[ranks] = Group(ranks)
        return self._groups[ranks]

    def allgather_object(self, obj) -> list:
        """Every worker's ``obj`` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        self._issued("allgather_object")
        return _hvd.allgather_object(obj, name="distbn.allgather_object")

    @property
    def collectives(self) -> int:
        """Collectives issued so far, through Horovod and by the engine (tests count them)."""
        return self._issued_count + (_engine.count() if self.engine else 0)

    @property
    def last_collective(self) -> str:
        """The newest collectives' names, quoted (the stall guard reports them): the sync
        layers' engine and Horovod run apart, so a stall may sit in either."""
        horovod = repr(self._last_issued) if self._last_issued else "none"
        synced = _engine.last() if self.engine else ""
        if not synced:
            return horovod
        return f"{synced!r} on the sync layers' engine, {horovod} through Horovod"

    # --- helpers -----------------------------------------------------------------------
    def _issued(self, name: str) -> None:
        self._issued_count += 1
        self._last_issued = name

    def group_size(self, group: Optional[Group]) -> int:
        if group is None:
            return self.size
        if self.rank not in group.ranks:
            raise ValueError(f"rank {self.rank} is not a member of the group {group.ranks}")
        return group.size


if _hvd is not None:
    class _DistributedTrainer(_hvd.DistributedTrainer):
        """horovod.mxnet's trainer, with the gradients of parameters that live on several
        devices of a process summed over them first: Horovod 0.28.1 all-reduces only each
        parameter's first gradient (``param.list_grad()[0]``), and the other devices would
        update with their own. Summed into the first, all-reduced by Horovod, copied to the
        others (engine operations, ordered after Horovod's in-place write by its variable)."""

        def _allreduce_grads(self):
            several = [p.list_grad() for p in self._params
                       if p.grad_req != "null" and len(p.list_ctx()) > 1]
            for grads in several:
                for g in grads[1:]:
                    grads[0] += g.as_in_context(grads[0].context)
            super()._allreduce_grads()
            for grads in several:
                for g in grads[1:]:
                    grads[0].copyto(g)


def _check_shapes(params) -> None:
    """Raises when a parameter has no value to send yet, saying what to do first."""
    for name, param in sorted(params.items()):
        if param._data is not None:
            continue
        if param._deferred_init:
            raise RuntimeError(
                f"parameter {name} has no shape yet (deferred initialization: shape "
                f"{param.shape}); run one forward pass first, e.g. net(x) on a batch, or give "
                f"the layers their input sizes (in_channels=...)")
        raise RuntimeError(f"parameter {name} is not initialized: call net.initialize() first")


def broadcast_parameters(params_or_block, root: int = 0, prefix: str = "distbn.bcast") -> None:
    """Every worker's parameters set to ``root``'s values: a Gluon ``Block`` (all its
    parameters, BN running statistics included), a ``ParameterDict`` or a dict of name to
    ``Parameter``. Call it on every worker at the same point, after ``initialize`` (and after
    loading pretrained weights on root), before training.

    Works whatever layout MXNet left the arrays in (after a hybridized network ran on the CPU,
    oneDNN's); a network whose shapes are still deferred raises, naming the parameter and
    what to do first (one forward pass). One process: only the checks."""
    params = params_or_block
    if hasattr(params_or_block, "collect_params"):
        params = params_or_block.collect_params()
    get_comm().broadcast_parameters(params, root=root, prefix=prefix)


_COMM: Optional[Comm] = None


def get_comm() -> Comm:
    """The process's communicator; initializes Horovod on first use when it is installed."""
    global _COMM
    if _COMM is None:
        if _hvd is None:
            _COMM = Comm()
        else:
            _hvd.init()
            _COMM = Comm(rank=_hvd.rank(), size=_hvd.size(),
                         local_rank=_hvd.local_rank(), local_size=_hvd.local_size())
            _COMM.cores = pin_local_worker(_COMM.local_rank, _COMM.local_size)
            _COMM.engine = _start_engine(_COMM)
    return _COMM


def _start_engine(comm: Comm) -> bool:
    """Connects the sync layers' engine (:mod:`distbn.engine`) when there are several workers.
    Without distbn's C++ library (no compiler) it stays down, and a synced layer says so when
    it is first built."""
    if comm.size == 1:
        return False
    up = native.available()
    if not all(comm.allgather_object(up)):
        return False
    _engine.start(comm.rank, comm.size, comm.local_size == comm.size, comm.allgather_object)
    return True
