"""Worker: every rank contributes (rank + 1) * ones; the sum must be size * (size + 1) / 2."""
import sys

import mxnet as mx

from distbn.comm import get_comm

comm = get_comm()
got = comm.allreduce_sum(mx.nd.ones((2, 16)) * (comm.rank + 1), name="test.sum").asnumpy()
want = comm.size * (comm.size + 1) / 2
ok = (got == want).all()
print(f"rank {comm.rank}/{comm.size}: sum {got[0, 0]} want {want}: {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
