"""Worker: data of mean 1e4 and spread 0.1 in float32, split over the workers. The first
training step must normalize it to mean 0, std 1 over the global batch."""
import sys

import numpy as np
from mxnet import autograd, nd

import distbn
from distbn.comm import get_comm

comm = get_comm()
shape = (64, 6, 24, 24)  # per worker; LeNet's conv1 output at batch 64
rs = np.random.RandomState(10 + comm.rank)
x = nd.array(1e4 + 0.1 * rs.randn(*shape), dtype="float32")
layer = distbn.SyncBatchNorm(6, 4)
layer.initialize()
with autograd.record():
    y = layer(x)
y = y.asnumpy().astype(np.float64)
# Global per-channel moments of y from summed local sums.
sums = np.concatenate([[y[:, 0].size], y.sum(axis=(0, 2, 3)), (y ** 2).sum(axis=(0, 2, 3))])
tot = comm.allreduce_sum(nd.array(sums, dtype="float64"), name="test.stress").asnumpy()
n = tot[0]
mean = tot[1:7] / n
std = np.sqrt(tot[7:] / n - mean ** 2)
ok = np.abs(std - 1).max() < 1e-2 and np.abs(mean).max() < 1e-2
print(f"rank {comm.rank}/{comm.size}: global std {std.round(4)}: {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
