"""The sync layers' mesh: one TCP connection between every pair of workers, made once when the
communicator starts (:func:`distbn.comm.get_comm`) and then used only by the C++ all-reduce
(``csrc/allreduce.cc``) from inside MXNet's engine.

Set-up: every worker listens on an ephemeral port of its own address, the addresses are
all-gathered through Horovod, each worker connects to the lower ranks and accepts the higher
ones (a hello carries the rank), and the connected sockets are handed to the C++ side.

Which address: the interface Horovod's Gloo uses (``HOROVOD_GLOO_IFACE``, set by horovodrun:
the interface every host shares), else ``DISTBN_MESH_IFACE``, else the loopback when every
worker is on this host, else the address this host's name resolves to.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import re
import socket
import struct

from . import native

_HELLO = struct.Struct("!II")  # magic, rank
_MAGIC = 0x44424E4D  # "DBNM"
_SIOCGIFADDR = 0x8915
_sockets: list = []  # open for the process's life: the C++ side holds their descriptors


class MeshError(RuntimeError):
    pass


def interface_address(iface: str) -> str:
    """The IPv4 address of a network interface (``ioctl SIOCGIFADDR``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", iface[:15].encode()))
        except OSError as e:
            raise MeshError(f"network interface {iface!r} has no IPv4 address: {e}") from None
    return socket.inet_ntoa(packed[20:24])


def local_address(all_local: bool) -> str:
    iface = os.environ.get("HOROVOD_GLOO_IFACE") or os.environ.get("DISTBN_MESH_IFACE")
    if iface:
        return interface_address(iface)
    if all_local:
        return "127.0.0.1"
    return socket.gethostbyname(os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname())


def connect(rank: int, size: int, all_local: bool, allgather, want: bool,
            timeout: float = 60.0) -> bool:
    """Connects this worker to every other one when every worker ``want``s the mesh (decided
    together, so that a worker without the C++ operators turns it off for all); returns
    whether it did. ``allgather(obj)`` returns every rank's obj; every worker must call this at
    the same point. Raises :class:`MeshError` naming the worker that could not be reached."""
    if not want:
        allgather(None)
        return False
    addr = local_address(all_local)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((addr, 0))
        listener.listen(size)
        peers = allgather((addr, listener.getsockname()[1]))
        if any(p is None for p in peers):
            return False
        socks = [None] * size
        for r in range(rank):  # connect to the lower ranks
            try:
                s = socket.create_connection(tuple(peers[r]), timeout=timeout)
                s.sendall(_HELLO.pack(_MAGIC, rank))
            except OSError as e:
                raise MeshError(f"rank {rank} cannot connect to rank {r} at "
                                f"{peers[r][0]}:{peers[r][1]}: {e}") from None
            socks[r] = s
        listener.settimeout(timeout)
        for _ in range(size - 1 - rank):  # accept the higher ones
            try:
                s, _ = listener.accept()
                s.settimeout(timeout)
                magic, r = _HELLO.unpack(_recv_exact(s, _HELLO.size))
            except OSError as e:
                missing = [r for r in range(rank + 1, size) if socks[r] is None]
                raise MeshError(f"rank {rank} at {addr} heard from no rank of {missing}: {e}") from None
            if magic != _MAGIC or not rank < r < size or socks[r] is not None:
                raise MeshError(f"rank {rank} got an unexpected connection (rank {r}) at {addr}")
            socks[r] = s
    finally:
        listener.close()
    for s in socks:
        if s is not None:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(None)
    _sockets.extend(s for s in socks if s is not None)
    fds = (ctypes.c_int * size)(*[-1 if s is None else s.fileno() for s in socks])
    wait = float(os.environ.get("DISTBN_MESH_TIMEOUT", "0"))
    err = native.clib().distbn_mesh_attach(rank, size, fds, ctypes.c_double(wait))
    if err:
        raise MeshError(f"cannot use the mesh sockets: {os.strerror(err)}")
    return True


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed during the hello")
        buf += chunk
    return buf


def count() -> int:
    """Collectives the mesh has done in this process."""
    lib = native.clib()
    lib.distbn_mesh_count.restype = ctypes.c_longlong
    return lib.distbn_mesh_count()


def times() -> tuple:
    """Seconds this process has spent inside mesh collectives, and of those blocked waiting
    for the other workers' messages (the rest: copying, sending, summing)."""
    inside, waiting = ctypes.c_longlong(), ctypes.c_longlong()
    native.clib().distbn_mesh_times(ctypes.byref(inside), ctypes.byref(waiting))
    return inside.value * 1e-9, waiting.value * 1e-9


def last() -> str:
    """The name of the newest collective over the mesh."""
    buf = ctypes.create_string_buffer(256)
    native.clib().distbn_mesh_last(buf, len(buf))
    return buf.value.decode()


def failure(exc: BaseException):
    """The exchange's own message when ``exc`` (an MXNetError raised by a graph) came from a
    failed mesh collective -- a lost or out-of-step worker -- else None."""
    found = re.search(r"distbn all-reduce: ([^\n]*)", str(exc))
    return found.group(1).strip() if found else None


def allreduce(data, key: str, ranks: tuple = ()):
    """Sum of a float64 numpy array over the workers of ``ranks`` (all when empty), through the
    same exchange as the operator (for tests and benchmarks; raises MeshError)."""
    import numpy as np
    src = np.ascontiguousarray(data, dtype=np.float64)
    out = np.empty_like(src)
    err = ctypes.create_string_buffer(512)
    dp = ctypes.POINTER(ctypes.c_double)
    if native.clib().distbn_mesh_allreduce(src.ctypes.data_as(dp), out.ctypes.data_as(dp),
                                           ctypes.c_longlong(src.size), key.encode(),
                                           ",".join(map(str, ranks)).encode(), err, len(err)):
        raise MeshError(err.value.decode())
    return out
