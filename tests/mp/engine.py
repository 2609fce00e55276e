"""Worker: the sync layers' collective engine (distbn/engine.py, csrc/allreduce.cc: Gloo) on
raw arrays.

    horovodrun -np N python tests/mp/engine.py [--lose-rank R | --silent-rank R | --other-length]

Sums (small and 8 MB), bitwise the same result on every rank, a group of some ranks only (a
sub-communicator made by every worker), the collective count, the exchange trace, and
out-of-step workers 0 and 1
(two collectives of the same length), which must both fail with both names rather than mix
them. With --lose-rank R, rank R then exits without a word and every other rank's next
collective must fail at once, naming a lost rank (R, for those connected to it). With --silent-rank R and DISTBN_SYNC_TIMEOUT=2,
rank R skips a collective and the others' must fail after about 2 s. With --other-length,
ranks 0 and 1 are out of step in collectives of different lengths: one must fail as out of
step, the other at once too (out of step, or its connection to the first closed).
"""
import argparse
import hashlib
import os
import sys
import time

import numpy as np

from distbn import engine
from distbn.comm import get_comm

ap = argparse.ArgumentParser()
ap.add_argument("--lose-rank", type=int)
ap.add_argument("--silent-rank", type=int, help="skips one collective (run with DISTBN_SYNC_TIMEOUT=2)")
ap.add_argument("--other-length", action="store_true")
args = ap.parse_args()
comm = get_comm()
assert comm.engine, "the engine is not up"
fails = []


def check(what, ok):
    if not ok:
        fails.append(what)
        print(f"MISMATCH rank {comm.rank}: {what}", flush=True)


n = comm.size
got = engine.allreduce(np.full(33, comm.rank + 1.0), "small")
check("small sum", np.array_equal(got, np.full(33, n * (n + 1) / 2)))

# The same bits on every rank, under the engine's ring (2 workers, short) and halving-doubling.
odd = engine.allreduce(np.random.RandomState(100 + comm.rank).randn(4097), "odd")
digests = comm.allgather_object(hashlib.sha256(odd.tobytes()).hexdigest())
check("same bits on every rank (short)", len(set(digests)) == 1)
rs = np.random.RandomState(comm.rank)
big = rs.randn(1 << 20)  # 8 MB: larger than the socket buffers
want = sum(np.random.RandomState(r).randn(1 << 20) for r in range(n))
got = engine.allreduce(big, "big")
check("big sum", np.allclose(got, want, rtol=0, atol=1e-12))
digests = comm.allgather_object(hashlib.sha256(got.tobytes()).hexdigest())
check("same bits on every rank", len(set(digests)) == 1)

group = comm.group(range(0, n, 2))  # 0, 2, ...: every worker makes it; the others sit it out
before = comm.collectives
if comm.rank in group.ranks:
    got = engine.allreduce(np.full(5, float(comm.rank)), "group", group.ranks)
    check("group sum", np.array_equal(got, np.full(5, float(sum(group.ranks)))))
exchanged = comm.rank in group.ranks and len(group.ranks) > 1  # a group of one exchanges nothing
check("count", comm.collectives == before + exchanged)
check("last name", comm.last_collective.startswith("'group'" if exchanged else "'big'"))

# The exchange trace: one record per collective, in order, named; a worker that comes late
# shows as the others' time inside the exchange, not as its own (bench/exchange_wait.py).
engine.trace(10)
for i in range(3):
    if i == 1 and comm.rank == n - 1:
        time.sleep(0.3)  # the stimulus: the last rank reaches the second collective late
    engine.allreduce(np.ones(4), f"traced{i}")
records = engine.traced()
engine.trace(0)
check("trace names", [r[0] for r in records] == [f"traced{i} (4 values)" for i in range(3)])
check("trace order", all(a <= r <= b for (_, a, r), (_, b, _) in zip(records, records[1:])))
inside = records[1][2] - records[1][1]
check("late peer: the others wait inside", inside >= 0.25e9 if comm.rank < n - 1 else inside < 0.2e9)

pair = comm.group([0, 1])
if comm.rank < 2:  # ranks 0 and 1 disagree about which collective comes next
    for other in (0, 1):
        engine.name(f"layer{other}", 3)  # every layer's name is known once its graph is built
    t = time.monotonic()
    try:
        engine.allreduce(np.zeros(3 + 2 * comm.rank * args.other_length), f"layer{comm.rank}",
                         pair.ranks)
        check("out of step detected", False)
    except engine.EngineError as e:
        msg = str(e)
        print(f"rank {comm.rank} out of step: {msg}", flush=True)
        if args.other_length:
            ok = ("out of step" in msg and f"layer{comm.rank}" in msg) or f"rank {1 - comm.rank}" in msg
        else:
            ok = "out of step" in msg and "layer0" in msg and "layer1" in msg
        check(f"out-of-step message: {msg}", ok)
        check("out of step detected at once", time.monotonic() - t < 10)
if args.other_length:  # the pair's connections are closed now; nothing more to test
    print(f"rank {comm.rank}/{n}: {'OK' if not fails else 'FAILED'}", flush=True)
    os._exit(1 if fails else 0)
comm.allgather_object(None)  # everyone past the checks before anyone leaves

if args.silent_rank is not None:  # a worker alive but silent: the others give up after the timeout
    if comm.rank != args.silent_rank:
        t = time.monotonic()
        try:
            engine.allreduce(np.zeros(3), "silence")
            check("silence detected", False)
        except engine.EngineError as e:
            waited = time.monotonic() - t
            print(f"rank {comm.rank} silence: {e}", flush=True)
            check(f"silence message: {e}", "silence" in str(e) and "timeout" in str(e).lower())
            check(f"silence detected after the timeout ({waited:.1f} s)", 1.5 < waited < 10)
    comm.allgather_object(None)  # the silent one waits here for the others' verdicts

if args.lose_rank is not None:
    if comm.rank == args.lose_rank:
        os._exit(0)  # a worker gone without a word (its sockets close with it)
    t = time.monotonic()
    try:
        engine.allreduce(np.zeros(3), "after-loss")
        check("loss detected", False)
    except engine.EngineError as e:
        # Those that exchange with it directly name it; the others (3+ workers) may name a
        # worker that closed its connections after its own failure: the test reads them all.
        print(f"rank {comm.rank} loss: {e}", flush=True)
        check(f"loss message: {e}", "lost the connection to rank" in str(e))
        check("loss detected at once", time.monotonic() - t < 10)

print(f"rank {comm.rank}/{n}: {'OK' if not fails else 'FAILED'}", flush=True)
sys.exit(1 if fails else 0)
