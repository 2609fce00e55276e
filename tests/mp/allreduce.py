"""Worker: the facade's collectives. Sum: every rank contributes (rank + 1) * ones, the sum
must be size * (size + 1) / 2. Parameter broadcast: every rank starts from rank + 1, all must
end with rank 0's value, 1."""
import sys

import mxnet as mx

from distbn.comm import get_comm

comm = get_comm()
got = comm.allreduce_sum(mx.nd.ones((2, 16)) * (comm.rank + 1), name="test.sum").asnumpy()
want = comm.size * (comm.size + 1) / 2
ok = (got == want).all()
params = mx.gluon.ParameterDict()
for name in ("a", "b"):
    params.get(name, shape=(3,), init=mx.init.Constant(comm.rank + 1)).initialize()
comm.broadcast_parameters(params, prefix="test.bcast")
ok = ok and all((p.data().asnumpy() == 1).all() for p in params.values())
print(f"rank {comm.rank}/{comm.size}: sum {got[0, 0]} want {want}, broadcast "
      f"{[float(p.data()[0].asscalar()) for p in params.values()]}: {'OK' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
