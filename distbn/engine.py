"""The sync layers' collective engine: Gloo contexts that the C++ all-reduce
(``csrc/allreduce.cc``) runs on from inside MXNet's engine, set up once per communicator.

Bootstrap through Horovod, so any launcher Horovod supports works unchanged: every worker opens
a Gloo TCP device on its own address, makes a pair for every peer of a group, the pairs'
addresses are all-gathered with Horovod, and every worker connects its pairs. The group of all
workers is made when the communicator starts (:func:`distbn.comm.get_comm`); a process set
(:meth:`distbn.comm.Comm.group`) gets a context of its own on the same device.

Which address: the interface Horovod's Gloo uses (``HOROVOD_GLOO_IFACE``, set by horovodrun:
the interface every host shares), else ``DISTBN_IFACE``, else the loopback when every worker is
on this host, else the address this host's name resolves to.

``DISTBN_SYNC_TIMEOUT`` (seconds, default none): an exchange that hears nothing from a peer for
that long fails naming it; without it a silent worker is left to the trainer's stall guard.

Several devices in one process (a layer whose parameters live on ``mx.cpu(0)``, ``mx.cpu(1)``
or several GPUs): the layer's exchange is then :data:`DEVICES_OP`, an asynchronous MXNet
operator (a ``CustomOp``: it holds no MXNet resource and waits on a thread of its own, never on
a device's engine thread) whose devices meet in the C++ engine (``distbn_devices_allreduce``):
the last device to arrive sums the devices' statistics and runs the one cross-process
all-reduce. ``DISTBN_DEVICE_TIMEOUT`` (seconds, default 60): how long a device waits for the
others to reach the same layer before the exchange fails naming the layer.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import re
import socket
import struct

import mxnet as mx
import numpy as np

from . import native

_SIOCGIFADDR = 0x8915
_ERR = 1024
_world: dict = {"size": 1}
_trace = {"capacity": 0}  # what distbn_engine_trace holds room for
_device_error: dict = {}  # the newest failure of a devices' exchange (MXNet's error hides it)
DEVICES_OP = "distbn_devices_allreduce"


class EngineError(RuntimeError):
    pass


def interface_address(iface: str) -> str:
    """The IPv4 address of a network interface (``ioctl SIOCGIFADDR``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", iface[:15].encode()))
        except OSError as e:
            raise EngineError(f"network interface {iface!r} has no IPv4 address: {e}") from None
    return socket.inet_ntoa(packed[20:24])


def local_address(all_local: bool) -> str:
    iface = os.environ.get("HOROVOD_GLOO_IFACE") or os.environ.get("DISTBN_IFACE")
    if iface:
        return interface_address(iface)
    if all_local:
        return "127.0.0.1"
    return socket.gethostbyname(os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname())


def _call(fn, *args) -> None:
    err = ctypes.create_string_buffer(_ERR)
    if fn(*args, err, _ERR):
        raise EngineError(err.value.decode())


def group_key(ranks) -> str:
    """The name of a group in the C++ engine (and the operator's ``ranks`` attr): "" for all."""
    ranks = tuple(ranks)
    return "" if len(ranks) in (0, _world["size"]) else ",".join(map(str, ranks))


def start(rank: int, size: int, all_local: bool, allgather) -> None:
    """Opens this worker's device and connects the group of all workers. ``allgather(obj)``
    returns every rank's obj; every worker must call this at the same point."""
    timeout = float(os.environ.get("DISTBN_SYNC_TIMEOUT", "0") or 0)
    _call(native.clib().distbn_engine_init, rank, size, local_address(all_local).encode(),
          ctypes.c_double(timeout))
    _world["size"] = size
    add_group(rank, tuple(range(size)), allgather, key="")


def add_group(rank: int, ranks: tuple, allgather, key=None) -> None:
    """Connects the workers of ``ranks`` (sorted world ranks) among themselves. Every worker
    calls it, members or not (the addresses travel in one all-gather over all workers)."""
    lib = native.clib()
    key = group_key(ranks) if key is None else key
    blob = None
    if rank in ranks:
        room = 256 * len(ranks)
        out, width = ctypes.create_string_buffer(room), ctypes.c_int(0)
        members = (ctypes.c_int * len(ranks))(*ranks)
        _call(lib.distbn_group_listen, key.encode(), members, len(ranks), out, room,
              ctypes.byref(width))
        blob = out.raw[:width.value * len(ranks)]
    blobs = allgather(blob)
    if rank not in ranks:
        return
    me, width = ranks.index(rank), len(blob) // len(ranks)
    # Peer i made blobs[rank of i][me-th slot] for its pair with this worker.
    peers = b"".join(blobs[r][me * width:(me + 1) * width] if r != rank else bytes(width)
                     for r in ranks)
    _call(lib.distbn_group_connect, key.encode(), peers, width)


def count() -> int:
    """Collectives the engine has run in this process."""
    lib = native.clib()
    lib.distbn_engine_count.restype = ctypes.c_longlong
    return lib.distbn_engine_count()


def seconds() -> float:
    """Seconds this process has spent inside the engine's collectives."""
    lib = native.clib()
    lib.distbn_engine_seconds.restype = ctypes.c_double
    return lib.distbn_engine_seconds()


def trace(capacity: int) -> None:
    """Starts recording this process's layer exchanges afresh, up to ``capacity`` of them
    (0: stops): see :func:`traced`."""
    native.clib().distbn_engine_trace(ctypes.c_longlong(capacity))
    _trace["capacity"] = capacity


def traced() -> list:
    """The exchanges recorded since :func:`trace`, in the order they ran: (collective name,
    ns when the operator asked for it, ns when it returned), on the steady clock that every
    process of a host shares (``time.monotonic_ns``)."""
    lib = native.clib()
    lib.distbn_engine_trace_read.restype = ctypes.c_longlong
    out = np.zeros((_trace["capacity"], 3), np.int64)
    n = lib.distbn_engine_trace_read(out.ctypes.data_as(ctypes.POINTER(ctypes.c_longlong)),
                                     ctypes.c_longlong(len(out)))
    names, buf = {}, ctypes.create_string_buffer(256)
    for tag in set(out[:n, 0].tolist()):
        unknown = lib.distbn_engine_tag_name(ctypes.c_longlong(tag), buf, len(buf))
        names[tag] = f"tag {tag}" if unknown else buf.value.decode()  # one process: no names
    return [(names[tag], asked, returned) for tag, asked, returned in out[:n].tolist()]


def last() -> str:
    """The name of the newest collective of the engine."""
    buf = ctypes.create_string_buffer(256)
    native.clib().distbn_engine_last(buf, len(buf))
    return buf.value.decode()


def failure(exc: BaseException):
    """The exchange's own message when ``exc`` (an MXNetError raised by a graph) came from a
    failed sync-layer collective -- a lost or out-of-step worker, a device that never came --
    else None."""
    found = re.search(r"distbn all-reduce: ([^\n]*)", str(exc))
    if found:
        return found.group(1).strip()
    if isinstance(exc, mx.base.MXNetError) and "CustomOp" in str(exc):
        return _device_error.get("message")  # MXNet's text of a failed CustomOp does not say
    return None


def name(key: str, n: int) -> None:
    """Makes collective ``key`` of ``n`` values known to out-of-step messages before its first
    use (layers' names are known once their graph is built)."""
    native.clib().distbn_engine_name(key.encode(), ctypes.c_longlong(n))


def allreduce(data, key: str, ranks: tuple = ()):
    """Sum of a float64 numpy array over the workers of ``ranks`` (all when empty), through the
    same exchange as the operator (for tests and benchmarks; raises EngineError)."""
    import numpy as np
    src = np.ascontiguousarray(data, dtype=np.float64)
    if len(ranks) == 1:  # a group of one: nothing to exchange
        return src.copy()
    out = np.empty_like(src)
    dp = ctypes.POINTER(ctypes.c_double)
    _call(native.clib().distbn_engine_allreduce, src.ctypes.data_as(dp), out.ctypes.data_as(dp),
          ctypes.c_longlong(src.size), key.encode(), group_key(ranks).encode())
    return out


def allreduce_op(F, x, probe, key: str, ranks: tuple = (), devices: tuple = ()):
    """The graph operator: sum of the packed statistics ``x`` (float64) over the workers of
    ``ranks`` (all when empty) and the ``devices`` of this process (the layer's parameters'
    contexts) in training, per ``probe`` (:func:`distbn.stats.mode_probe`), and of their gradient
    in backward; ``x`` itself in prediction. Collectives are named ``distbn.<key>fwd`` /
    ``distbn.<key>bwd``: keys must be the same on every worker and unique per layer (the layers
    use their Gluon prefix)."""
    if len(devices) > 1:
        return F.Custom(x, probe, op_type=DEVICES_OP, key=f"distbn.{key}",
                        ranks=group_key(ranks), devices=",".join(map(str, devices)))
    return F.distbn_allreduce(x, probe, key=f"distbn.{key}", ranks=group_key(ranks))


def devices_allreduce(data, key: str, ranks: str, device: int, n_devices: int):
    """Sum of a float64 numpy array over the ``n_devices`` devices of this process (this call
    is ``device``'s) and the workers of the group ``ranks`` (:func:`group_key`); blocks until
    every device has made the same call (raises EngineError after ``DISTBN_DEVICE_TIMEOUT``)."""
    src = np.ascontiguousarray(data, dtype=np.float64)
    out = np.empty_like(src)
    dp = ctypes.POINTER(ctypes.c_double)
    timeout = float(os.environ.get("DISTBN_DEVICE_TIMEOUT", "60") or 60)
    _call(native.clib().distbn_devices_allreduce, src.ctypes.data_as(dp), out.ctypes.data_as(dp),
          ctypes.c_longlong(src.size), key.encode(), ranks.encode(), device, n_devices,
          ctypes.c_double(timeout))
    return out


class _DevicesAllreduce(mx.operator.CustomOp):
    """One device's exchange (see the module docstring). Its body runs on MXNet's custom-operator
    threads; the C++ call releases the GIL while it waits."""

    def __init__(self, key: str, ranks: str, device: int, n_devices: int):
        super().__init__()
        self._key, self._ranks, self._device, self._n = key, ranks, device, n_devices
        self._training = False

    def forward(self, is_train, req, in_data, out_data, aux):
        self._training = is_train  # prediction: the data pass through, no exchange
        x = in_data[0]
        self.assign(out_data[0], req[0], self._sum(x, "fwd") if is_train else x)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        dy = out_grad[0]
        self.assign(in_grad[0], req[0], self._sum(dy, "bwd") if self._training else dy)
        self.assign(in_grad[1], req[1], mx.nd.zeros_like(in_data[1]))

    def _sum(self, x, phase: str):
        try:
            total = devices_allreduce(x.asnumpy(), self._key + phase, self._ranks, self._device,
                                      self._n)
        except EngineError as e:
            msg = str(e)
            if x.context.device_type == "cpu" and "waited" in msg:
                msg += (f"; on the CPU, MXNet's devices draw temporary space from one pool of "
                        f"MXNET_CPU_TEMP_COPY copies (now {os.environ.get('MXNET_CPU_TEMP_COPY', 4)}"
                        f"): a device's operators queued after its exchange hold copies that the "
                        f"others need before theirs; set MXNET_CPU_TEMP_COPY higher (more than the "
                        f"operators of one device's training graph: the book's LeNet needs 256) "
                        f"before MXNet starts (docs/layer.md, several devices)")
            _device_error["message"] = msg.replace("distbn all-reduce: ", "", 1)
            raise EngineError(msg) from None
        return mx.nd.array(total, ctx=x.context, dtype="float64")


@mx.operator.register(DEVICES_OP)
class _DevicesAllreduceProp(mx.operator.CustomOpProp):
    def __init__(self, key, ranks, devices):
        super().__init__(need_top_grad=True)
        self._key, self._ranks, self._devices = key, ranks, devices.split(",")

    def list_arguments(self):
        return ["data", "probe"]

    def list_outputs(self):
        return ["sum"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def create_operator(self, ctx, in_shapes, in_dtypes):
        return _DevicesAllreduce(self._key, self._ranks, self._devices.index(str(ctx)),
                                 len(self._devices))
