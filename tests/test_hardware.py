"""distbn.hardware's bfloat16 probe against what MXNet really does, on this CPU and on oneDNN
capped at AVX2 (``DNNL_MAX_CPU_ISA``, which oneDNN reads when it starts: a process of its own),
and the layer's refusal. These run on every CPU: the probe's answer is what they check."""
import pytest

from conftest import NO_AVX512, python

# A conv + BN network converted by MXNet's AMP to bfloat16, trained one step: what the probe
# stands for. Prints the probe's answer, then whether the network ran.
AMP_STEP = """
import mxnet as mx
from mxnet import autograd, gluon
from mxnet.contrib import amp
from distbn import hardware
print("probe:", hardware.bfloat16_unsupported() or "runs", flush=True)
net = gluon.nn.HybridSequential()
net.add(gluon.nn.Conv2D(4, 3), gluon.nn.BatchNorm(), gluon.nn.Dense(3))
net.initialize()
net.hybridize()
x = mx.nd.ones((2, 1, 8, 8))
net(x)
net = amp.convert_hybrid_block(net, target_dtype="bfloat16", ctx=mx.cpu())
try:
    with autograd.record():
        loss = net(x).sum()
    loss.backward()
    mx.nd.waitall()
    print("network: runs")
except mx.base.MXNetError:
    print("network: fails")
"""

LAYER = """
import mxnet as mx, distbn
from mxnet.contrib.amp.amp import bfloat16
layer = distbn.BatchNorm(3)
layer.initialize()
print(layer(mx.nd.amp_cast(mx.nd.ones((2, 3, 4, 4)), dtype=bfloat16)).dtype)
"""


def _answers(env):
    _, out = python(["-c", AMP_STEP], env=env)
    probe = next(line for line in out.splitlines() if line.startswith("probe: "))
    network = next(line for line in out.splitlines() if line.startswith("network: "))
    return probe[len("probe: "):], network[len("network: "):]


@pytest.mark.parametrize("cap", ["none", "AVX2"])
def test_probe_agrees_with_a_bfloat16_network(cap):
    """Where the probe says bfloat16 runs, an AMP network trains a step; where it says not,
    the same network fails in oneDNN (the negative control: capped at AVX2 it must fail)."""
    probe, network = _answers(NO_AVX512 if cap == "AVX2" else {})
    assert (probe == "runs") == (network == "runs"), (probe, network)
    if cap == "AVX2":
        assert network == "fails" and "it needs AVX-512" in probe, (probe, network)


def test_layer_refuses_bfloat16_where_the_cpu_cannot_in_one_line():
    code, out = python(["-c", LAYER], env=NO_AVX512, check=False)
    assert code != 0, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("TypeError: batchnorm0: bfloat16 data cannot run here: MXNet's "
                           "oneDNN has no bfloat16 convolution on this CPU"), out
    assert "primitive descriptor" not in out and "mkldnn" not in out.lower(), out
