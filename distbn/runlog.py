"""Rank-0 side effects in one place: console messages, progress bar, metrics.jsonl, TensorBoard,
checkpoints, the export. Every other rank gets a :class:`NullRunLog` whose methods do nothing, so training
code never asks which rank it is on."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from . import checkpoint, storage
from .convert import bn_layers


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


class NullRunLog:
    """What ranks other than 0 get: the same interface, no output, no files."""
    run_dir: Optional[Path] = None

    def info(self, msg: str) -> None:
        pass

    def progress(self, total: int, desc: str):
        return _NullBar()

    def step(self, global_step: int, loss: float, lr: float) -> None:
        pass

    def epoch(self, metrics: dict, net) -> None:
        pass

    def save_checkpoint(self, epoch: int, global_step: int, net, trainer, config: dict) -> None:
        pass

    def forget_epochs_after(self, epoch: int) -> None:
        pass

    def export(self, net, input_shape: tuple) -> None:
        pass

    def abandon(self) -> None:
        pass

    def summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog(NullRunLog):
    """Rank 0's log of a run, in ``run_dir``."""

    def __init__(self, run_dir: Path, config_yaml: str, config: dict, show_progress: bool,
                 histograms: bool, checkpoint_bytes: int):
        from tensorboardX import SummaryWriter

        self.run_dir = run_dir
        self._summary_lock = threading.Lock()
        # Found before the first step: a folder that cannot be made or written, or a disk
        # that cannot hold one checkpoint.
        storage.prepare_dir(run_dir, checkpoint_bytes)
        storage.write_text(run_dir / "config.yaml", config_yaml)
        self._tb_failure: Optional[OSError] = None
        self._watch_tensorboard_thread()
        with storage.writing(run_dir):
            # A long queue: events are checked for a dead writer thread before each one is
            # queued (see _add), and a put must never block on a queue nobody drains.
            self._tb = SummaryWriter(logdir=str(run_dir), flush_secs=10, max_queue=1000)
        self._add("add_text", "config", "```\n" + config_yaml + "\n```", 0)
        self._show_progress, self._histograms = show_progress, histograms

    def _watch_tensorboard_thread(self) -> None:
        """tensorboardX writes event files from a thread of its own: a failed write (full
        disk) kills that thread with a traceback, and later events would queue up behind it
        forever. Keep the failure instead, for the next call to report as a StorageError."""
        previous = threading.excepthook

        def hook(args):
            if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_EventLoggerThread":
                self._tb_failure = args.exc_value
            else:
                previous(args)
        threading.excepthook = hook

    def _check_tensorboard(self) -> None:
        if self._tb_failure is not None:
            events = sorted(self.run_dir.glob("events.out.tfevents.*")) or [self.run_dir]
            raise storage.StorageError(events[-1], self._tb_failure.strerror or str(self._tb_failure))

    def _add(self, method: str, *args) -> None:
        """One TensorBoard event, unless the writer thread has died (then a StorageError)."""
        self._check_tensorboard()
        getattr(self._tb, method)(*args)

    def info(self, msg: str) -> None:
        print(f"[distbn] {msg}", file=sys.stderr, flush=True)

    def progress(self, total: int, desc: str):
        if not self._show_progress:
            return _NullBar()
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True,
                    leave=False)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self._add("add_scalar", "step/loss", loss, global_step)
        self._add("add_scalar", "step/lr", lr, global_step)

    def epoch(self, metrics: dict, net) -> None:
        self._check_tensorboard()
        storage.append_line(self.run_dir / "metrics.jsonl", json.dumps(metrics))
        e = metrics["epoch"]
        for key in ("train_loss", "train_acc", "test_acc", "test_acc_ema", "epoch_seconds",
                    "examples_per_second", "precise_bn_seconds"):
            self._add("add_scalar", f"epoch/{key}", metrics[key], e)
        if self._histograms:
            for i, layer in enumerate(bn_layers(net)):
                for tag, param in _bn_params(layer):
                    self._add("add_histogram", f"bn{i}/{tag}", param.data().asnumpy().ravel(), e)
        with storage.writing(self.run_dir / "events.out.tfevents.*"):
            self._tb.flush()
        self._check_tensorboard()
        self.info(f"epoch {e}: loss {metrics['train_loss']:.4f}, train acc "
                  f"{metrics['train_acc']:.3f}, test acc {metrics['test_acc']:.3f} "
                  f"(running averages {metrics['test_acc_ema']:.3f}), "
                  f"{metrics['epoch_seconds']:.1f} s, {metrics['examples_per_second']:.0f} ex/s")

    def save_checkpoint(self, epoch: int, global_step: int, net, trainer, config: dict) -> None:
        t = time.perf_counter()
        ckpt = checkpoint.save(self.run_dir / "checkpoints", epoch, global_step, net, trainer, config)
        self.info(f"checkpoint {ckpt.path} ({time.perf_counter() - t:.2f} s)")

    def export(self, net, input_shape: tuple) -> None:
        """The network for serving, in ``run_dir/export`` (:mod:`distbn.export`)."""
        from .export import export
        t = time.perf_counter()
        files = export(net, self.run_dir / "export" / "model", input_shape)
        self.info(f"export {files[0].parent}: {', '.join(f.name for f in files)} "
                  f"({time.perf_counter() - t:.2f} s)")

    def forget_epochs_after(self, epoch: int) -> None:
        """Drops metrics.jsonl records past ``epoch`` (a run that stopped after recording an
        epoch but before its checkpoint completed repeats that epoch when resumed)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["epoch"] <= epoch]
        if len(kept) != len(lines):
            storage.write_text(path, "".join(line + "\n" for line in kept))

    def summary(self, summary: dict) -> None:
        with self._summary_lock:  # the main thread's and distbn.ending's (a stop) may meet
            storage.write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")

    def close(self) -> None:
        self._tb.close()

    def abandon(self) -> None:
        """After a storage failure: close what can be closed, and keep tensorboardX from
        retrying its flush at exit (which would fail again, with a traceback)."""
        try:
            self._tb.close()
        except OSError:
            for writer in [self._tb.file_writer, *(self._tb.all_writers or {}).values()]:
                if writer is not None:
                    writer.event_writer._closed = True


def _bn_params(layer):
    """(tag, Parameter) pairs of a BN layer (Gluon's and distbn's share the names)."""
    return [(name, getattr(layer, name)) for name in ("gamma", "beta", "running_mean", "running_var")]


def open_run_log(is_root: bool, run_dir: Path, config_yaml: str, config: dict,
                 show_progress: bool, histograms: bool, checkpoint_bytes: int):
    if not is_root:
        return NullRunLog()
    return RunLog(run_dir, config_yaml, config, show_progress, histograms, checkpoint_bytes)
