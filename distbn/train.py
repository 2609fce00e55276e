"""Data-parallel training on Fashion-MNIST with synced batch norm.

    horovodrun -np 4 python -m distbn.train     # the book's LeNet with sync BN, 4 workers
    python -m distbn.train                      # the same in one process: GPU 0 or CPU
    python -m distbn.train --config configs/resnet18_syncbn.yaml --set train.epochs=1

Without ``--config`` the built-in defaults train (``configs/lenet_syncbn.yaml`` holds the same
values), into ``./runs``. Options: ``--set KEY=VALUE`` (repeatable) overrides the YAML or the
defaults; ``--run-dir DIR`` names the run
directory (default ``log.dir/NAME-TIMESTAMP``); ``--resume`` continues from the newest complete
checkpoint in ``--run-dir`` (same command as the original run, plus ``--resume``).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import ending
from .config import Config, ConfigError, dump_config, load_config


def _is_root_before_init() -> bool:
    """Whether this process prints errors found before Horovod starts (horovodrun sets the rank)."""
    return os.environ.get("HOROVOD_RANK", "0") == "0"


# How long a worker other than rank 0 waits, after a config or data error that every worker
# meets, for horovodrun to end the job. horovodrun kills all workers when the first one exits:
# had rank 1 exited at once, rank 0 was seen killed before it printed the error (2 CI runs
# in 5). Rank 0 exits within a second, so the wait ends long before this; it is only the
# bound for a worker whose rank 0 did not fail.
_REPORT_GRACE_SECONDS = 30.0


INPUT_SHAPE = (1, 1, 28, 28)  # one Fashion-MNIST image, channels first: what the networks take

LOST_WORKER_EXIT_CODE = 6  # a sync layer's exchange lost another worker (distbn.engine)
# A worker that lost another waits this long before it reports: horovodrun, which sees the
# other worker's exit too, usually ends the job first (within a second here), and the other
# worker's own message, if it left one, stays the job's only one.
_LOST_GRACE_SECONDS = 5.0


def fail(msg: str, code: int = 2, is_root: Optional[bool] = None, shared: bool = False,
         after: float = 0.0, stopped: bool = False) -> None:
    """Exit with ``code``; the message is printed once for the job, by rank 0.

    ``shared``: an error every worker meets alike (config, data), found before Horovod
    starts; the other workers leave the exit to rank 0 (see _REPORT_GRACE_SECONDS).
    ``after``: seconds to wait first, for an error that is the consequence of another
    worker's exit: horovodrun ends the job at the first exit, so when that worker left with
    its own message, this one is ended before it adds a second. ``stopped``: the message
    says that a signal stopped the run; any other is left unsaid once a signal came (the
    launcher is ending the job and says why), and the exit waits for it (distbn.ending)."""
    ending.leaving()
    time.sleep(after)
    quiet = ending.received() is not None and not stopped
    if (_is_root_before_init() if is_root is None else is_root) and not quiet:
        print(f"distbn.train: error: {msg}", file=sys.stderr, flush=True)
    elif shared and not quiet:
        time.sleep(_REPORT_GRACE_SECONDS)
    ending.exit(code)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m distbn.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="YAML config (configs/*.yaml); default: the built-in "
                                     "settings, the book's LeNet with sync BN (lenet_syncbn)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.epochs=2 (repeatable)")
    ap.add_argument("--run-dir", help="run directory (default: log.dir/NAME-TIMESTAMP)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint of --run-dir")
    ap.add_argument("--check", action="store_true",
                    help="check the config and the run directory (with room for a checkpoint), "
                         "then exit without training (the launch scripts run this first)")
    return ap.parse_args(argv)


# Keys that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"train.epochs", "train.lr", "train.stall_timeout", "train.precision",
                      "train.precise_bn", "train.devices_per_worker",
                      "log.every_steps", "log.histograms", "log.progress"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resolve_config(args) -> tuple:
    """(Config, run_dir) from the command line; raises ConfigError on anything unusable."""
    run_dir = Path(args.run_dir) if args.run_dir else None
    saved = run_dir / "config.yaml" if run_dir else None
    if args.resume and run_dir is None:
        raise ConfigError("--resume needs --run-dir (the run to continue)")
    path = args.config or (str(saved) if args.resume and saved.is_file() else None)
    cfg = load_config(path, args.overrides)  # neither: the built-in defaults
    if args.resume and saved.is_file():
        before = _flatten(load_config(str(saved)).to_dict())
        now = _flatten(cfg.to_dict())
        changed = sorted(k for k in now if now[k] != before.get(k) and k not in _RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"--resume with a different {changed[0]} ({before.get(changed[0])!r} "
                              f"in {saved}, {now[changed[0]]!r} now)")
    if run_dir is None:
        run_dir = Path(cfg.log.dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, run_dir


@dataclass
class Data:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_data(cfg: Config) -> Data:
    from .data import load_fashion_mnist

    train_x, train_y = load_fashion_mnist(cfg.data.dir, train=True)
    test_x, test_y = load_fashion_mnist(cfg.data.dir, train=False)
    if cfg.data.limit:
        train_x, train_y = train_x[:cfg.data.limit], train_y[:cfg.data.limit]
    if cfg.data.test_limit:
        test_x, test_y = test_x[:cfg.data.test_limit], test_y[:cfg.data.test_limit]
    return Data(train_x, train_y, test_x, test_y)


# Several CPU devices in one process draw temporary space from MXNet's one shared pool, which
# must hold more copies than one device's training graph draws (else a device's exchange can
# wait for a copy another device's queued operators hold: docs/layer.md, several devices: the
# book's LeNet needed 256 here, a model-zoo ResNet-18 more than 256; MXNet's default is 4).
# MXNet reads it when its first operator runs.
CPU_TEMP_COPIES = "1024"


def prepare_devices(cfg: Config) -> None:
    """What several devices a worker need before MXNet starts (a value already set is kept)."""
    if cfg.train.devices_per_worker > 1:
        os.environ.setdefault("MXNET_CPU_TEMP_COPY", CPU_TEMP_COPIES)


def devices(comm, per_worker: int) -> list:
    """This worker's devices: on a machine with GPUs (ones MXNet's CUDA wheel can run:
    distbn.gpu) GPU ``local_rank`` for one device a worker, else GPUs
    ``local_rank * per_worker`` onwards; without GPUs ``mx.cpu(0)`` .. ``mx.cpu(per_worker - 1)``."""
    import mxnet as mx
    from . import gpu
    n = mx.context.num_gpus()
    if n == 0:
        return [mx.cpu(i) for i in range(per_worker)]
    if per_worker == 1:
        ctxs = [mx.gpu(comm.local_rank % n)]
    elif per_worker * comm.local_size > n:
        raise ConfigError(f"train.devices_per_worker {per_worker} with {comm.local_size} worker(s) "
                          f"on this node needs {per_worker * comm.local_size} GPUs; it has {n}")
    else:
        ctxs = [mx.gpu(comm.local_rank * per_worker + i) for i in range(per_worker)]
    for ctx in ctxs:
        gpu.check(ctx)
    return ctxs


def bn_group(cfg: Config, comm):
    """This worker's group for sync BN (``model.bn_group`` consecutive ranks), or None for all
    workers. Every worker makes every group, in the same order."""
    k = cfg.model.bn_group or comm.size
    if comm.size % k:
        raise ConfigError(f"model.bn_group {k} does not divide the {comm.size} workers")
    if k == comm.size:
        return None
    groups = [comm.group(range(first, first + k)) for first in range(0, comm.size, k)]
    return groups[comm.rank // k]


def build_model(cfg: Config, ctxs: list, process_set=None):
    """The configured network, initialized on ``ctxs`` (every shape known, so rank 0's values
    can be broadcast) and hybridized when asked; sync layers sync over ``process_set`` and
    over the devices."""
    import mxnet as mx
    from .models import build, finish_shapes

    mx.random.seed(cfg.train.seed)  # identical everywhere; rank 0's values are broadcast anyway
    net = build(cfg.model.arch, cfg.model.bn, process_set)
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    if cfg.model.hybridize:
        net.hybridize(static_alloc=True)  # not static_shape: several CPU devices hung with it
    try:
        finish_shapes(net, mx.nd.zeros(INPUT_SHAPE, ctx=ctxs[0]))
    except (mx.base.MXNetError, ValueError) as e:
        raise ConfigError(f"model.arch {cfg.model.arch} does not take 1x28x28 input: "
                          f"{str(e).splitlines()[0]}") from None
    return net


def replica_shards(n: int, comm, ctxs: list, epoch: int, seed: int) -> list:
    """This worker's shard of the epoch per device: the data is dealt to the workers x devices
    replicas, device d of rank r being replica r * D + d, so a global batch holds the same
    examples for any split into workers and devices of the same product (1 x 2 and 2 x 1)."""
    from .data import shard_indices
    d = len(ctxs)
    return [shard_indices(n, comm.rank * d + i, comm.size * d, epoch, seed) for i in range(d)]


def device_batches(data_x, data_y, shards: list, batch: int, ctxs: list):
    """Per step, one ``(X, y)`` per device from its shard (every shard has the same length)."""
    from .data import iterate_batches
    return zip(*[iterate_batches(data_x, data_y, idx, batch, ctx) for idx, ctx in zip(shards, ctxs)])


def train_epoch(epoch, cfg, comm, net, trainer, data, ctxs, log, global_step, watchdog):
    """One pass over this worker's shard, split over its devices. Returns (loss_sum, correct,
    count, global_step).

    Every ``log.every_steps`` steps the global loss is all-reduced (the same value on every
    worker, so all stop together on a non-finite one).
    """
    import mxnet as mx
    from mxnet import autograd
    from . import precision
    from .data import num_batches

    loss_fn = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    per_device = cfg.train.batch_size // (comm.size * len(ctxs))
    shards = replica_shards(len(data.train_x), comm, ctxs, epoch, cfg.train.seed)
    bar = log.progress(num_batches(len(shards[0]), per_device), f"epoch {epoch}/{cfg.train.epochs}")
    loss_sum = mx.nd.zeros(1, ctx=ctxs[0])
    correct = mx.nd.zeros(1, ctx=ctxs[0])
    skip = _injected_skip(comm.rank)
    for batches in device_batches(data.train_x, data.train_y, shards, per_device, ctxs):
        if global_step + 1 == skip:  # fault injection (tests only): this worker drops a batch
            skip = None
            continue
        with autograd.record():  # a forward per device; their sync layers meet in the exchange
            outs = [net(X) for X, _ in batches]
            losses = [loss_fn(out, y) for out, (_, y) in zip(outs, batches)]
            with precision.scaled(cfg.train.precision, losses, trainer) as scaled_losses:
                autograd.backward(scaled_losses)
        examples = sum(X.shape[0] for X, _ in batches)
        trainer.step(examples)  # gradients: summed over devices, mean over workers, / local batch
        step_loss_sum = on_first(ctxs, [loss.sum() for loss in losses])
        loss_sum += step_loss_sum
        correct += on_first(ctxs, [(out.argmax(axis=1) == y).sum() for out, (_, y) in zip(outs, batches)])
        global_step += 1
        bar.update()
        if global_step % cfg.log.every_steps == 0:  # waits for this step: only every N steps
            total, count = global_sums(comm, "distbn.step.loss", step_loss_sum, examples)
            step_loss = total / count
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"training loss is {step_loss} at epoch {epoch}, step {global_step}; stopped "
                    f"on every worker, the last good checkpoint is kept (lower train.lr?)")
            log.step(global_step, step_loss, trainer.learning_rate)
            bar.set_postfix_str(f"loss {step_loss:.4f}")
        watchdog.beat(f"epoch {epoch} step {global_step}")
    bar.close()
    return loss_sum, correct, sum(len(idx) for idx in shards), global_step


def _injected_skip(rank: int) -> Optional[int]:
    """Fault injection for the test suite: ``DISTBN_INJECT_SKIP=RANK:STEP`` makes worker RANK
    skip the batch of global step STEP, as a worker with a bug would."""
    spec = os.environ.get("DISTBN_INJECT_SKIP", "")
    if spec.partition(":")[0] == str(rank):
        return int(spec.partition(":")[2])
    return None


def on_first(ctxs: list, values: list):
    """The sum of per-device arrays, on the first device."""
    return sum(v.as_in_context(ctxs[0]) for v in values)


def test_accuracy(cfg, comm, net, data, ctxs, tag: str) -> float:
    correct, count = evaluate(cfg, comm, net, data, ctxs)
    correct, count = global_sums(comm, f"distbn.metrics.test.{tag}", correct, count)
    return correct / count


def evaluate(cfg, comm, net, data, ctxs):
    """Accuracy on the whole test set, each example on exactly one device of one worker
    (prediction needs no meeting of the devices, so each runs its shard apart)."""
    import mxnet as mx
    from .data import eval_indices, iterate_batches

    replicas = comm.size * len(ctxs)
    correct, count = mx.nd.zeros(1, ctx=ctxs[0]), 0
    for i, ctx in enumerate(ctxs):
        idx = eval_indices(len(data.test_x), comm.rank * len(ctxs) + i, replicas)
        for X, y in iterate_batches(data.test_x, data.test_y, idx, 1000, ctx):
            correct += on_first(ctxs, [(net(X).argmax(axis=1) == y).sum()])
        count += len(idx)
    return correct, count


def reestimate(cfg, comm, net, data, ctxs, epoch) -> float:
    """Population statistics for evaluation (distbn.update_bn_stats) from ``train.precise_bn``
    examples over all workers: the first of each device's shard of this epoch, in training
    batches. Every shard has the same length, so all run the same batch count.
    Returns the seconds it took."""
    from .precise_bn import update_bn_stats

    t0 = time.perf_counter()
    replicas = comm.size * len(ctxs)
    per_replica = max(1, cfg.train.precise_bn // replicas)
    shards = [idx[:per_replica] for idx in
              replica_shards(len(data.train_x), comm, ctxs, epoch, cfg.train.seed)]
    batches = list(device_batches(data.train_x, data.train_y, shards,  # a list: counted at once
                                  cfg.train.batch_size // replicas, ctxs))
    update_bn_stats(net, batches if len(ctxs) > 1 else [parts[0] for parts in batches])
    return time.perf_counter() - t0


def global_sums(comm, name, *values):
    """Sum each scalar over the workers (one collective); returns floats."""
    import mxnet as mx
    local = mx.nd.array([v if isinstance(v, (int, float)) else v.asscalar() for v in values],
                        dtype="float64")
    return comm.allreduce_sum(local, name=name).asnumpy().tolist()


def replica_deviation(comm, params, tag: str) -> float:
    """Largest |value - the value on rank 0's first device| over the given parameters and
    every device of every worker."""
    import mxnet as mx
    if not params:
        return 0.0
    # asnumpy: a device's array may sit in oneDNN's layout, which a copy of a view cannot read
    vecs = [np.concatenate([p.data(ctx).asnumpy().ravel() for p in params])
            for ctx in params[0].list_ctx()]
    root = comm.broadcast(mx.nd.array(vecs[0], dtype=vecs[0].dtype), name=f"distbn.replica.{tag}")
    root = root.asnumpy()
    local = mx.nd.array([max(float(np.max(np.abs(v - root))) for v in vecs)], dtype="float64")
    return float(comm.allreduce_max(local, name=f"distbn.replica.{tag}.max").asscalar())


def non_finite_parameters(net) -> list:
    """Names of parameters (moving statistics included) holding NaN or inf on a device of
    this worker."""
    return [name for name, p in net.collect_params().items()
            if not all(np.isfinite(d.asnumpy()).all() for d in p.list_data())]


def resume_point(comm, run_dir: Path, net, trainer, log, lr: float):
    """Load the newest checkpoint on every worker; returns (start_epoch, global_step)."""
    from . import checkpoint

    ckpt = checkpoint.latest(run_dir / "checkpoints", report=log.info)
    # Every worker must agree on where to start, or their collectives would pair up wrongly.
    import mxnet as mx
    mine = mx.nd.array([ckpt.epoch if ckpt else 0], dtype="float64")
    root = comm.broadcast(mine, name="distbn.resume.epoch").asscalar()
    if int(root) != (ckpt.epoch if ckpt else 0):
        raise RuntimeError(f"this worker sees checkpoint epoch {ckpt.epoch if ckpt else 0} in "
                           f"{run_dir}, rank 0 sees {int(root)}: use a shared run directory")
    if ckpt is None:
        log.info(f"no checkpoint in {run_dir}/checkpoints: starting from epoch 1")
        return 1, 0
    log.forget_epochs_after(ckpt.epoch)  # records of epochs whose checkpoint never completed
    net.load_parameters(str(ckpt.params), ctx=net.collect_params().list_ctx())
    trainer.load_states(str(ckpt.states))
    trainer.set_learning_rate(lr)  # the saved optimizer carries the old one; the config wins
    log.info(f"resuming after epoch {ckpt.epoch} from {ckpt.path}")
    return ckpt.epoch + 1, ckpt.global_step


def checkpoint_bytes(cfg: Config, net) -> int:
    from .checkpoint import size_estimate
    return size_estimate(net, trainer_states=1 if cfg.train.momentum else 0)


def check(cfg: Config, run_dir: Path) -> None:
    """``--check``: what a launch script verifies in one process before starting workers:
    the config (already loaded), the GPUs the local workers would take, the data, the network,
    and the run directory (made and probed; when the command names none, the log folder),
    with room for one checkpoint."""
    from . import gpu, precision
    from .storage import prepare_dir

    import mxnet as mx
    for i in range(mx.context.num_gpus()):
        gpu.check(mx.gpu(i))
    precision.check(cfg.train.precision, mx.gpu(0) if mx.context.num_gpus() else mx.cpu())
    load_data(cfg)
    prepare_dir(run_dir, checkpoint_bytes(cfg, build_model(cfg, [mx.cpu()])))


def run(cfg: Config, run_dir: Path, resume: bool) -> dict:
    from . import precision
    from .comm import broadcast_parameters, get_comm
    from .runlog import open_run_log
    from .storage import StorageError
    from .watchdog import Watchdog

    comm = get_comm()
    watchdog = Watchdog(cfg.train.stall_timeout if comm.size > 1 else 0,
                        lambda: f"rank {comm.rank} (last collective {comm.last_collective})")
    replicas = comm.size * cfg.train.devices_per_worker
    if cfg.train.batch_size % replicas:
        per = "" if cfg.train.devices_per_worker == 1 else f" x {cfg.train.devices_per_worker} devices"
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by the "
                          f"{comm.size} worker{'s' if comm.size > 1 else ''}{per}")
    ctxs = devices(comm, cfg.train.devices_per_worker)
    precision.check(cfg.train.precision, ctxs[0])  # the cheap checks first
    data = load_data(cfg)  # before any file is written: missing data leaves nothing behind
    if len(data.train_x) < replicas:
        raise ConfigError(f"data.limit {len(data.train_x)} gives fewer examples than workers "
                          f"x devices ({replicas})")
    precision.start(cfg.train.precision)  # AMP changes the operators the network is built from
    np.random.seed(cfg.train.seed + comm.rank)
    net = build_model(cfg, ctxs, bn_group(cfg, comm))
    # Rank 0 makes and checks the run directory before the first collective: if it cannot,
    # it stops, and the others stop with it at that collective.
    log = open_run_log(comm.rank == 0, run_dir, dump_config(cfg), cfg.to_dict(),
                       cfg.log.progress, cfg.log.histograms, checkpoint_bytes(cfg, net))
    broadcast_parameters(net, prefix="distbn.init")
    # How the run ended, in summary.json (rank 0), when a signal stops it: written on
    # distbn.ending's thread, since this one may be blocked in an exchange with a stopped peer.
    ending.on_signal(lambda signum: log.summary({
        "status": "stopped", "signal": signal.Signals(signum).name, "workers": comm.size,
        "run_dir": str(run_dir), "last_checkpoint": _last_checkpoint(run_dir)}))
    opt = {"learning_rate": cfg.train.lr, "momentum": cfg.train.momentum}
    trainer = comm.trainer(net.collect_params(), "sgd", opt)
    precision.prepare_trainer(cfg.train.precision, trainer)
    try:
        return _train(cfg, comm, run_dir, resume, data, ctxs, net, trainer, log, watchdog)
    except StorageError:
        log.abandon()
        raise
    except ending.Stopped:
        ending.wait_recorded()  # summary.json, written on the signal's thread (below)
        log.close()
        raise


def _train(cfg, comm, run_dir, resume, data, ctxs, net, trainer, log, watchdog) -> dict:
    from . import precision
    from .comm import broadcast_parameters
    from .convert import bn_layers

    start, global_step = resume_point(comm, run_dir, net, trainer, log, cfg.train.lr) if resume else (1, 0)
    broadcast_parameters(net, prefix="distbn.resume")
    via = " over Gloo" if comm.engine else ""
    log.info(f"{cfg.name}: {cfg.model.arch}, {comm.size} worker(s) on {', '.join(map(str, ctxs))}"
             f"{' each' if comm.size > 1 else ''}, bn={cfg.model.bn}"
             f"{via if cfg.model.bn == 'sync' else ''}"
             f"{f' in groups of {cfg.model.bn_group}' if cfg.model.bn == 'sync' and cfg.model.bn_group else ''}"
             f", {cfg.train.precision}, global batch "
             f"{cfg.train.batch_size} ({cfg.train.batch_size // comm.size} per worker"
             f"{f', {cfg.train.batch_size // (comm.size * len(ctxs))} per device' if len(ctxs) > 1 else ''}), "
             f"{len(data.train_x)} training examples, run dir {run_dir}")
    last = None
    for epoch in range(start, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        loss_sum, correct, count, global_step = train_epoch(
            epoch, cfg, comm, net, trainer, data, ctxs, log, global_step, watchdog)
        loss_sum, correct, count = global_sums(comm, "distbn.metrics.train", loss_sum, correct, count)
        seconds = time.perf_counter() - t0
        test_acc_ema = test_acc = test_accuracy(cfg, comm, net, data, ctxs, "ema")
        precise_seconds = 0.0
        if cfg.train.precise_bn and bn_layers(net):
            watchdog.beat(f"epoch {epoch} BN statistics")
            precise_seconds = reestimate(cfg, comm, net, data, ctxs, epoch)
            test_acc = test_accuracy(cfg, comm, net, data, ctxs, "precise")
        last = {"epoch": epoch, "train_loss": loss_sum / count, "train_acc": correct / count,
                "test_acc": test_acc, "test_acc_ema": test_acc_ema,
                "precise_bn_seconds": precise_seconds, "epoch_seconds": seconds,
                "examples_per_second": count / seconds, "workers": comm.size,
                "devices_per_worker": len(ctxs),
                "global_step": global_step, "bn": cfg.model.bn,
                "precision": cfg.train.precision}
        scale = precision.loss_scale(cfg.train.precision, trainer)
        if scale is not None:
            last["loss_scale"] = scale
        bad = non_finite_parameters(net)
        (bad_anywhere,) = global_sums(comm, "distbn.check.finite", len(bad))  # all decide alike
        if bad_anywhere or not math.isfinite(last["train_loss"]):
            what = f"parameters {', '.join(bad[:3])}" if bad else "parameters on another worker"
            raise FloatingPointError(
                f"training diverged in epoch {epoch} (step {global_step}): loss "
                f"{last['train_loss']}, non-finite {what if bad_anywhere else 'nothing else'}; "
                f"the last good checkpoint is kept (lower train.lr?)")
        log.epoch(last, net)
        log.save_checkpoint(epoch, global_step, net, trainer, cfg.to_dict())
        watchdog.beat(f"epoch {epoch} evaluation and checkpoint")
    log.export(net, INPUT_SHAPE)  # the statistics the last test_acc used
    bn = bn_layers(net)
    moving = [p for layer in bn for p in (layer.running_mean, layer.running_var)]
    learned = [p for p in net.collect_params().values() if p.grad_req != "null"]
    summary = {"status": "completed", "final": last, "workers": comm.size, "run_dir": str(run_dir),
               "precision": cfg.train.precision,
               "param_max_deviation_across_workers": replica_deviation(comm, learned, "learned"),
               "moving_stats_max_deviation_across_workers": replica_deviation(comm, moving, "moving")}
    log.summary(summary)
    log.close()
    watchdog.stop()
    return summary


def main(argv=None) -> int:
    ending.catch()
    args = parse_args(argv)
    try:
        cfg, run_dir = resolve_config(args)
    except ConfigError as e:
        fail(str(e), shared=True)
    prepare_devices(cfg)
    from .data import DataError
    from .gpu import UnsupportedGPU
    from .storage import StorageError

    try:
        if args.check:
            check(cfg, run_dir if args.run_dir else Path(cfg.log.dir))
        else:
            run(cfg, run_dir, args.resume)
    except (ConfigError, DataError) as e:
        fail(str(e), shared=True)
    except UnsupportedGPU as e:  # each worker has its own GPU: each one refused says so
        fail(str(e), is_root=True)
    except StorageError as e:
        if os.environ.get("DISTBN_TRACEBACK") == "1":
            raise
        fail(f"{e}; the last complete checkpoint is {_last_checkpoint(run_dir)}", code=4,
             is_root=True)  # only the writer (rank 0) meets storage errors
    except FloatingPointError as e:
        fail(str(e), code=3)
    except Exception as e:  # noqa: BLE001 - only the engine's own failures are turned into a line
        from . import engine
        from .comm import get_comm
        lost = engine.failure(e)
        if lost is None or os.environ.get("DISTBN_TRACEBACK") == "1":
            raise
        fail(f"rank {get_comm().rank}: {lost}; the last complete checkpoint is "
             f"{_last_checkpoint(run_dir)} (--resume continues from it)", code=LOST_WORKER_EXIT_CODE,
             is_root=True, after=_LOST_GRACE_SECONDS)
    except ending.Stopped as e:
        fail(f"stopped by {e.name}; the last complete checkpoint is {_last_checkpoint(run_dir)} "
             f"(--resume continues from it)", code=128 + e.signum, stopped=True)
    return 0


def _last_checkpoint(run_dir: Path) -> str:
    from .checkpoint import latest
    try:
        found = latest(run_dir / "checkpoints")
    except OSError:
        found = None
    return str(found.path) if found else "none"


if __name__ == "__main__":
    ending.exit(main())
