"""Worker (-np 4): two groups {0,1} and {2,3}, each a communicator of the sync engine.

Each rank holds a batch whose mean depends on its group. Within a group the statistics (and
so the moving mean) must be those of the group's joint batch, identical on both members and
equal to the expectation computed here from rank and size; the two groups must differ.
"""
import sys

import numpy as np
from mxnet import autograd, nd

import distbn
from distbn.comm import get_comm

comm = get_comm()
assert comm.size == 4, "run with -np 4"
groups = [comm.group([0, 1]), comm.group([2, 3])]  # every rank registers both, same order
mine = groups[comm.rank // 2]

def batch(rank):  # per-rank data, known to every rank: (rank + 1) * 10 + small noise
    rs = np.random.RandomState(rank)
    return ((rank + 1) * 10 + rs.randn(6, 3)).astype(np.float32)

layer = distbn.SyncBatchNorm(3, num_dims=2, process_set=mine)
layer.initialize()
layer.hybridize(static_alloc=True)  # the process set travels into the compiled graph
with autograd.record():
    y = layer(nd.array(batch(comm.rank)))
y.backward()
joint = np.concatenate([batch(r) for r in mine.ranks]).astype(np.float64)
want_mean = 0.1 * joint.mean(axis=0)
want_var = 0.9 + 0.1 * joint.var(axis=0)
got_mean = layer.running_mean.data().asnumpy().ravel()
got_var = layer.running_var.data().asnumpy().ravel()
ok = np.allclose(got_mean, want_mean, rtol=1e-5) and np.allclose(got_var, want_var, rtol=1e-5)
# The other group's statistics differ (its data sit 20 higher).
other = np.concatenate([batch(r) for r in groups[1 - comm.rank // 2].ranks]).mean(axis=0) * 0.1
ok = ok and np.abs(other - got_mean).min() > 1.0
# Output normalized over the group's joint batch: check against numpy.
lo = mine.ranks.index(comm.rank) * 6
want_y = (joint - joint.mean(0)) / np.sqrt(joint.var(0) + 1e-5)
ok = ok and np.allclose(y.asnumpy(), want_y[lo:lo + 6], atol=1e-4)
# Horovod coordinates process-set collectives through rank 0: no rank may leave while another
# still has one in flight, so all finish with one global collective.
comm.allreduce_sum(nd.ones(1), name="test.done").wait_to_read()
print(f"rank {comm.rank} group {mine.ranks}: running_mean {got_mean.round(3)}: {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
