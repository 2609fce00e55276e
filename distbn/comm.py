"""The communication facade: the only module of distbn that imports Horovod.

Everything else asks ``get_comm()`` for rank, size and collectives. When Horovod is missing,
or the job runs as one process, a size-1 path does no collective at all: an all-reduce of one
worker is the identity, so it returns its input unchanged.

Groups: a ``group`` argument is ``None`` (all workers) or a :class:`Group` made by
:meth:`Comm.group` from a list of ranks (a Horovod process set underneath, added at run
time): ``Comm.group`` needs ``HOROVOD_DYNAMIC_PROCESS_SETS=1`` in every worker's environment,
which Horovod reads in ``hvd.init``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from . import mesh as _mesh, native
from .placement import pin_local_worker

try:  # Horovod is optional: without it distbn runs as one process.
    import horovod.mxnet as _hvd
except ImportError:  # pragma: no cover - exercised only on machines without Horovod
    _hvd = None


@dataclass(frozen=True)
class Group:
    """A subset of workers that communicate among themselves (a Horovod process set)."""
    ranks: tuple
    handle: object = field(compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass
class Comm:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    mesh: bool = False  # whether the sync layers' mesh is up (distbn.mesh; set by get_comm)
    cores: list = field(default_factory=list)  # the cores this worker was pinned to ([]: not)
    _issued_count: int = 0
    _last_issued: str = ""
    _groups: dict = field(default_factory=dict, repr=False)  # ranks -> Group, made once each

    # --- collectives -------------------------------------------------------------------
    def allreduce_sum(self, x, name: str, group: Optional[Group] = None, out=None):
        """Element-wise sum of ``x`` over the workers of ``group`` (all when None).

        Asynchronous: returns an NDArray that MXNet's engine fills in when the collective is
        done, so the caller's next ops queue behind it. ``out`` (same shape and type) receives
        the result instead of a new array. ``name`` must be identical on every rank and
        unique among collectives in flight.
        """
        if self.group_size(group) == 1:
            if out is None:
                return x
            x.copyto(out)
            return out
        self._issued(name)
        if out is None:
            return _hvd.allreduce(x, name=name, op=_hvd.Sum, **self._ps(group))
        return _allreduce_into(x, out, name, group)

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
        """Overwrite Gluon parameters (a ParameterDict or dict) with root's values.

        One out-of-place broadcast per parameter, in name order, then ``set_data``: a CI run
        once crashed (segfault on rank 0) inside Horovod's in-place broadcast_parameters, so
        distbn does not use it. Pending writes (initialization) finish first.
        """
        if self.size == 1:
            return
        import mxnet as mx
        mx.nd.waitall()
        for name, param in sorted(params.items()):
            self._issued(f"{prefix}.{name}")
            param.set_data(_hvd.broadcast(param.data(), root_rank=root, name=f"{prefix}.{name}"))
        mx.nd.waitall()

    def trainer(self, params, optimizer: str, optimizer_params: dict):
        """A Gluon trainer whose gradients are averaged over all workers before each step."""
        import mxnet as mx
        if self.size == 1:
            return mx.gluon.Trainer(params, optimizer, optimizer_params)
        return _hvd.DistributedTrainer(params, optimizer, optimizer_params)

    def group(self, ranks: Sequence[int]) -> Group:
        """A group of the given ranks; every worker must call this with the same ranks."""
        ranks = tuple(sorted(int(r) for r in ranks))
        if any(not 0 <= r < self.size for r in ranks) or len(set(ranks)) != len(ranks) or not ranks:
            raise ValueError(f"ranks {ranks} are not distinct ranks of a world of size {self.size}")
        if self.size == 1 or len(ranks) == self.size:
            return Group(ranks, handle=None)
        if os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") != "1":
            raise RuntimeError("process sets need HOROVOD_DYNAMIC_PROCESS_SETS=1 in the "
                               "environment of every worker (set it before launching)")
        if ranks not in self._groups:  # add_process_set is itself a collective: once per set
            self._groups[ranks] = Group(ranks, handle=_hvd.add_process_set(list(ranks)))
        return self._groups[ranks]

    def allgather_object(self, obj) -> list:
        """Every worker's ``obj`` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        self._issued("allgather_object")
        return _hvd.allgather_object(obj, name="distbn.allgather_object")

    @property
    def collectives(self) -> int:
        """Collectives issued so far, through Horovod and over the mesh (tests count them)."""
        return self._issued_count + (_mesh.count() if self.mesh else 0)

    @property
    def last_collective(self) -> str:
        """The newest collective's name (the stall guard reports it)."""
        synced = _mesh.last() if self.mesh else ""
        if not synced:
            return self._last_issued
        return f"{synced} (over the mesh; newest through Horovod: {self._last_issued or 'none'})"

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

    @staticmethod
    def _ps(group: Optional[Group]) -> dict:
        return {} if group is None or group.handle is None else {"process_set": group.handle}


def _allreduce_into(x, out, name: str, group: Optional[Group]):
    """``hvd.allreduce`` with a given output: Horovod's public call allocates a zeroed output
    array first (one more engine operation, ~0.1 ms when issued from a custom operator's
    thread); its C entry point takes the output directly. Horovod is pinned to 0.28.1."""
    import ctypes
    from horovod.mxnet import mpi_ops
    ps = group.handle if group is not None and group.handle is not None else mpi_ops.global_process_set
    mpi_ops.check_call(mpi_ops.MPI_MXNET_LIB_CTYPES.horovod_mxnet_allreduce_async(
        ctypes.byref(x.handle), ctypes.byref(out.handle), ctypes.c_char_p(name.encode()),
        ctypes.c_int(_hvd.Sum), ctypes.c_int(0), ctypes.c_double(1.0), ctypes.c_double(1.0),
        ctypes.c_int(1), ctypes.c_int(ps.process_set_id)))
    return out


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
            _COMM.mesh = _connect_mesh(_COMM)
    return _COMM


def _connect_mesh(comm: Comm) -> bool:
    """Sets up the sync layers' mesh (:mod:`distbn.mesh`) when there are several workers and
    every one has the C++ operators loaded. ``DISTBN_MESH=0`` (on any worker) keeps the sync
    layers on Horovod."""
    if comm.size == 1:
        return False
    want = os.environ.get("DISTBN_MESH", "1") != "0" and native.available()
    return _mesh.connect(comm.rank, comm.size, comm.local_size == comm.size,
                         comm.allgather_object, want)
