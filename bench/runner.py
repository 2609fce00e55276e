"""Run `python -m distbn.train` the way a user does (launch/local.sh, its thread settings) and
hand back what the run wrote: the benchmarks' one way to train."""
import json
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Benchmarks measure training, not the console, TensorBoard histograms or per-step logging.
QUIET = {"log.progress": "false", "log.histograms": "false", "log.every_steps": "1000000"}


def train(workers, sets, config="lenet_syncbn.yaml", env=None, timeout=3600):
    """Train with ``workers`` local workers and ``--set`` overrides ``sets`` (a dict).

    Returns ``(summary, epochs)``: summary.json and the list of metrics.jsonl records (one per
    epoch: train_loss, test_acc, epoch_seconds, examples_per_second, ...).
    """
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["bash", str(ROOT / "launch" / "local.sh"), str(ROOT / "configs" / config),
               "--run-dir", tmp]
        for key, value in {**QUIET, **sets}.items():
            cmd += ["--set", f"{key}={value}"]
        proc = subprocess.run(cmd, env={**os.environ, **(env or {}), "NP": str(workers)},
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
        return summary, [json.loads(line) for line in lines]
