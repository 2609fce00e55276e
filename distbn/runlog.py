"""Rank-0 side effects in one place: console messages, progress bar, metrics.jsonl, TensorBoard,
checkpoints. Every other rank gets a :class:`NullRunLog` whose methods do nothing, so training
code never asks which rank it is on."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from . import checkpoint
from .models import bn_layers


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

    def summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog(NullRunLog):
    """Rank 0's log of a run, in ``run_dir``."""

    def __init__(self, run_dir: Path, config_yaml: str, config: dict, show_progress: bool,
                 histograms: bool):
        from tensorboardX import SummaryWriter

        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        self._metrics = open(run_dir / "metrics.jsonl", "a")
        self._tb = SummaryWriter(logdir=str(run_dir), flush_secs=10)
        self._tb.add_text("config", "```\n" + config_yaml + "\n```", 0)
        self._show_progress, self._histograms = show_progress, histograms

    def info(self, msg: str) -> None:
        print(f"[distbn] {msg}", file=sys.stderr, flush=True)

    def progress(self, total: int, desc: str):
        if not self._show_progress:
            return _NullBar()
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True,
                    leave=False)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self._tb.add_scalar("step/loss", loss, global_step)
        self._tb.add_scalar("step/lr", lr, global_step)

    def epoch(self, metrics: dict, net) -> None:
        self._metrics.write(json.dumps(metrics) + "\n")
        self._metrics.flush()
        e = metrics["epoch"]
        for key in ("train_loss", "train_acc", "test_acc", "epoch_seconds", "examples_per_second"):
            self._tb.add_scalar(f"epoch/{key}", metrics[key], e)
        if self._histograms:
            for i, layer in enumerate(bn_layers(net)):
                for tag, param in _bn_params(layer):
                    self._tb.add_histogram(f"bn{i}/{tag}", param.data().asnumpy().ravel(), e)
        self._tb.flush()
        self.info(f"epoch {e}: loss {metrics['train_loss']:.4f}, train acc "
                  f"{metrics['train_acc']:.3f}, test acc {metrics['test_acc']:.3f}, "
                  f"{metrics['epoch_seconds']:.1f} s, {metrics['examples_per_second']:.0f} ex/s")

    def save_checkpoint(self, epoch: int, global_step: int, net, trainer, config: dict) -> None:
        t = time.perf_counter()
        ckpt = checkpoint.save(self.run_dir / "checkpoints", epoch, global_step, net, trainer, config)
        self.info(f"checkpoint {ckpt.path} ({time.perf_counter() - t:.2f} s)")

    def summary(self, summary: dict) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    def close(self) -> None:
        self._tb.close()
        self._metrics.close()


def _bn_params(layer):
    """(tag, Parameter) pairs of a BN layer (Gluon's and distbn's share the names)."""
    return [(name, getattr(layer, name)) for name in ("gamma", "beta", "running_mean", "running_var")]


def open_run_log(is_root: bool, run_dir: Path, config_yaml: str, config: dict,
                 show_progress: bool, histograms: bool):
    if not is_root:
        return NullRunLog()
    return RunLog(run_dir, config_yaml, config, show_progress, histograms)
