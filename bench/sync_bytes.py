"""Bytes each worker sends per training step for one sync BN layer, measured on loopback, and a
model of both exchanges up to 256 workers.

    unshare -n bash -c 'ip link set lo up; HOROVOD_CYCLE_TIME=1000 \
        horovodrun -np N -H localhost:N python bench/sync_bytes.py --steps 200'   # N = 2, 4, 8
    python bench/sync_bytes.py --model           # the model, ResNet-50's BN widths, 2..256 workers

Measured: the loopback interface's transmitted bytes (``/proc/net/dev``, TCP/IP headers
included) over ``--steps`` training steps of one layer's two all-reduces (forward and backward,
each of 1 + 2C float64 values, exactly what the layer sends), minus an idle window of the same
length (Horovod's own background traffic), divided by workers and steps. Run it in a network
namespace of its own (``unshare -n``), so that nothing else on the machine shares its loopback.

Modelled (per worker and step, summed over a network's BN layers): distbn's former all-to-all
sent every vector to every peer, (N - 1) * V bytes per exchange in one latency step; Gloo's
halving-doubling all-reduce sends 2 * (N - 1) / N * V in 2 * log2(N) steps, and at N = 2 the
engine's ring sends V in one step (V: a layer's 8 * (1 + 2C) bytes; two exchanges per layer and
step; the engine's one-int ready notifications are left out).
"""
import argparse
import math
import time

import numpy as np

from report import emit


def lo_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def measure(channels: int, steps: int) -> dict:
    from distbn import engine
    from distbn.comm import get_comm
    comm = get_comm()
    stats = np.random.RandomState(comm.rank).rand(1 + 2 * channels)

    def window(exchange: bool) -> tuple:
        comm.allgather_object(None)
        before, t = lo_tx_bytes(), time.perf_counter()
        for _ in range(steps):
            if exchange:
                engine.allreduce(stats, "bytes.fwd")
                engine.allreduce(stats, "bytes.bwd")
        seconds = time.perf_counter() - t
        seconds = max(comm.allgather_object(seconds))
        if not exchange:
            time.sleep(seconds)
        comm.allgather_object(None)
        return lo_tx_bytes() - before, seconds

    engine.allreduce(stats, "bytes.warmup")
    busy, seconds = window(True)
    idle, _ = window(False)  # the same time again without exchanges: Horovod's own traffic
    per_worker_step = (busy - idle) / comm.size / steps
    return {"workers": comm.size, "channels": channels, "steps": steps,
            "vector_bytes": stats.nbytes, "lo_bytes_exchanges": busy, "lo_bytes_idle": idle,
            "bytes_per_worker_per_step": round(per_worker_step),
            "ms_per_step": round(seconds * 1e3 / steps, 3)}


def resnet50_widths() -> list:
    from mxnet.gluon.model_zoo import vision
    from distbn.convert import bn_layers
    net = vision.resnet50_v1(classes=1000)
    net.initialize()
    import mxnet as mx
    net.infer_shape(mx.nd.zeros((1, 3, 224, 224)))
    return [layer.gamma.shape[0] for layer in bn_layers(net)]


def model(widths: list, workers: list) -> list:
    rows = []
    vec = [8 * (1 + 2 * c) for c in widths]
    for n in workers:
        old = 2 * sum(v * (n - 1) for v in vec)
        new = 2 * sum(v * 2 * (n - 1) / n for v in vec)
        steps = 1 if n == 2 else 2 * math.ceil(math.log2(n))  # ring at 2, else halving-doubling
        rows.append({"workers": n, "bn_layers": len(widths),
                     "all_to_all_MB_per_worker_step": round(old / 1e6, 2),
                     "gloo_MB_per_worker_step": round(new / 1e6, 2),
                     "all_to_all_latency_steps": 2 * len(widths),
                     "gloo_latency_steps": 2 * len(widths) * steps})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--model", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.model:
        widths = resnet50_widths()
        rows = model(widths, [2, 4, 8, 16, 32, 64, 128, 256])
        print(f"ResNet-50 v1: {len(widths)} BN layers, {sum(widths)} channels")
    else:
        rows = [measure(args.channels, args.steps)]
        from distbn.comm import get_comm
        if get_comm().rank != 0:
            return
    emit(rows, args.json)


if __name__ == "__main__":
    main()
