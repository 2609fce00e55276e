"""Worker: the sync layers' mesh (distbn/mesh.py, csrc/allreduce.cc) on raw arrays.

    horovodrun -np N python tests/mp/mesh.py [--lose-rank R]

Sums (small and 8 MB, whose sends and receives must interleave), bitwise the same result on
every rank, a group of some ranks only, the collective count, and an out-of-step pair of
workers, which must fail on both with both names rather than mix them. With --lose-rank R, rank
R then exits without a word and every other rank's next collective must fail at once, naming
rank R. With --silent-rank R and DISTBN_MESH_TIMEOUT=2, rank R skips a collective and the
others' must fail after 2 s, naming rank R.
"""
import argparse
import hashlib
import os
import sys
import time

import numpy as np

from distbn import mesh
from distbn.comm import get_comm

ap = argparse.ArgumentParser()
ap.add_argument("--lose-rank", type=int)
ap.add_argument("--silent-rank", type=int, help="skips one collective (run with DISTBN_MESH_TIMEOUT=2)")
args = ap.parse_args()
comm = get_comm()
assert comm.mesh, "the mesh is not up"
fails = []


def check(what, ok):
    if not ok:
        fails.append(what)
        print(f"MISMATCH rank {comm.rank}: {what}", flush=True)


n = comm.size
got = mesh.allreduce(np.full(33, comm.rank + 1.0), "small")
check("small sum", np.array_equal(got, np.full(33, n * (n + 1) / 2)))

rs = np.random.RandomState(comm.rank)
big = rs.randn(1 << 20)  # 8 MB: larger than the socket buffers
want = sum(np.random.RandomState(r).randn(1 << 20) for r in range(n))
got = mesh.allreduce(big, "big")
check("big sum", np.allclose(got, want, rtol=0, atol=1e-12))
digests = comm.allgather_object(hashlib.sha256(got.tobytes()).hexdigest())
check("same bits on every rank", len(set(digests)) == 1)

group = tuple(range(0, n, 2))  # 0, 2, ...: the others sit this one out
before = comm.collectives
if comm.rank in group:
    got = mesh.allreduce(np.full(5, float(comm.rank)), "group", group)
    check("group sum", np.array_equal(got, np.full(5, float(sum(group)))))
check("count", comm.collectives == before + (comm.rank in group))
check("last name", comm.last_collective.startswith("group" if comm.rank in group else "big"))

if n >= 2 and comm.rank < 2:  # ranks 0 and 1 disagree about which collective comes next
    try:
        mesh.allreduce(np.zeros(3), f"layer{comm.rank}", (0, 1))
        check("out of step detected", False)
    except mesh.MeshError as e:
        msg = str(e)
        check(f"out-of-step message: {msg}", "out of step" in msg and "layer0" in msg
              and "layer1" in msg)
comm.allgather_object(None)  # everyone past the checks before anyone leaves

if args.silent_rank is not None:  # a worker alive but silent: the others give up after the timeout
    if comm.rank != args.silent_rank:
        t = time.monotonic()
        try:
            mesh.allreduce(np.zeros(3), "silence")
            check("silence detected", False)
        except mesh.MeshError as e:
            waited = time.monotonic() - t
            check(f"silence message: {e}", f"no answer within 2 s from rank(s) {args.silent_rank}"
                  in str(e) and "silence" in str(e))
            check(f"silence detected after the timeout ({waited:.1f} s)", 1.5 < waited < 10)
    comm.allgather_object(None)  # the silent one waits here for the others' verdicts

if args.lose_rank is not None:
    if comm.rank == args.lose_rank:
        os._exit(0)  # a worker gone without a word (its sockets close with it)
    t = time.monotonic()
    try:
        mesh.allreduce(np.zeros(3), "after-loss")
        check("loss detected", False)
    except mesh.MeshError as e:
        check(f"loss message: {e}", f"rank {args.lose_rank}" in str(e))
        check("loss detected at once", time.monotonic() - t < 10)

print(f"rank {comm.rank}/{n}: {'OK' if not fails else 'FAILED'}", flush=True)
sys.exit(1 if fails else 0)
