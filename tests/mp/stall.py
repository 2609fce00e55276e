"""Worker: rank 1 stops taking part (sleeps); rank 0, blocked in a collective, must give up
through the stall watchdog within its timeout and name the collective."""
import time

from mxnet import nd

from distbn.comm import get_comm
from distbn.watchdog import Watchdog

comm = get_comm()
dog = Watchdog(5.0, lambda: f"rank {comm.rank} (last collective {comm.last_collective})")
comm.allreduce_sum(nd.ones(3), name="test.warm").asnumpy()
dog.beat("warm-up")
if comm.rank == 1:
    time.sleep(600)  # alive but gone: a stopped or stuck worker
comm.allreduce_sum(nd.ones(3), name="test.never").asnumpy()
print(f"rank {comm.rank}: collective completed (unexpected)", flush=True)
