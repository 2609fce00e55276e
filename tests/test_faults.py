"""Fault injection: every case is bounded in time and checks what is left on disk.

Run alone with `pytest -m faults`.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mxnet as mx
import pytest

from conftest import BIN, MP, ROOT, SHARED_DATA, horovodrun

pytestmark = [pytest.mark.faults, pytest.mark.multiproc]
ENV = {**os.environ, "DISTBN_DATA_DIR": str(SHARED_DATA), "PYTHONUNBUFFERED": "1"}


def train_args(run_dir, *extra):
    # Slow enough to be killed mid-epoch: 3 epochs of 80 steps of 64 examples.
    return ["-m", "distbn.train", "--config", "configs/smoke.yaml", "--run-dir", str(run_dir),
            "--set", "data.limit=5120", "--set", "train.epochs=3", "--set", "log.progress=false",
            *extra]


def train_cmd(np_, run_dir):
    return [str(BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", sys.executable,
            "-W", "ignore", *train_args(run_dir)]


def one_process_cmd(run_dir):
    return [sys.executable, "-W", "ignore", *train_args(run_dir)]


def local_sh_cmd(run_dir):  # launch/local.sh CONFIG [train args...], 2 workers
    config, *rest = train_args(run_dir)[3:]
    return ["bash", "launch/local.sh", config, *rest]


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def worker_pids(run_dir):
    out = subprocess.run(["pgrep", "-f", f"distbn.train.*{run_dir}"], capture_output=True, text=True)
    launcher = subprocess.run(["pgrep", "-f", f"horovodrun.*{run_dir}"], capture_output=True, text=True)
    skip = set(launcher.stdout.split())
    return [int(p) for p in out.stdout.split() if p not in skip]


def run_and_interrupt(np_, run_dir, interrupt, cmd=None):
    """Start training (``cmd``, default horovodrun), wait for the first checkpoint, apply
    ``interrupt(proc)``; return the exit code, the seconds from the fault to the launcher's
    exit, and the output."""
    proc = subprocess.Popen(cmd or train_cmd(np_, run_dir), cwd=ROOT,
                            env={**ENV, "NP": str(np_), "DISTBN_VENV": str(BIN.parent)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 240, "the first checkpoint")
        time.sleep(1.0)  # into epoch 2
        t = time.time()
        interrupt(proc)
        out, _ = proc.communicate(timeout=90)
        return proc.returncode, time.time() - t, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def assert_checkpoint_intact_and_resumable(np_, run_dir):
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    ckpt = run_dir / "checkpoints" / latest
    params = mx.nd.load(str(ckpt / "model.params"))
    assert params and json.loads((ckpt / "meta.json").read_text())["epoch"] >= 1
    _, out = horovodrun(np_, train_args(run_dir, "--resume"), timeout=300,
                        env={"DISTBN_DATA_DIR": str(SHARED_DATA)})
    assert "resuming after epoch" in out
    epochs = [json.loads(l)["epoch"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1] == 3


@pytest.mark.parametrize("np_", [2, 4])
def test_sigkill_of_one_worker_ends_the_job_and_resume_finishes(tmp_path, np_):
    run_dir = tmp_path / "run"

    def kill_one(proc):
        pids = worker_pids(run_dir)
        assert len(pids) >= np_, pids
        os.kill(pids[-1], signal.SIGKILL)
    code, seconds, out = run_and_interrupt(np_, run_dir, kill_one)
    print(f"SIGKILL of a worker at -np {np_}: launcher exit {code} after {seconds:.1f} s")
    assert code != 0 and seconds < 60, out[-3000:]
    wait_for(lambda: not worker_pids(run_dir), 30, "no worker left")
    assert_checkpoint_intact_and_resumable(np_, run_dir)


def assert_summary_says_stopped(run_dir, sig):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["signal"] == sig.name, summary
    last = Path(summary["last_checkpoint"])
    assert last.parent == run_dir / "checkpoints" and last.name.startswith("epoch-"), summary


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_launcher_ends_every_worker(tmp_path, sig):
    """horovodrun passes SIGTERM on to every worker, whichever signal it got; each worker holds
    its exit until horovodrun kills it (distbn.ending), so horovodrun reports the job failed
    (1) instead of, under load, 0 (bench/signal_exits.py repeats this 30 times)."""
    run_dir = tmp_path / "run"
    code, seconds, out = run_and_interrupt(2, run_dir, lambda proc: proc.send_signal(sig))
    print(f"{sig.name} to horovodrun: exit {code} after {seconds:.1f} s")
    assert code == 1 and seconds < 60, out[-3000:]
    assert out.count("distbn.train: error: stopped by SIGTERM") == 1, out[-3000:]
    assert_summary_says_stopped(run_dir, signal.SIGTERM)
    wait_for(lambda: not worker_pids(run_dir), 30, "no worker left")
    assert_checkpoint_intact_and_resumable(2, run_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_one_process_exits_128_plus_the_signal(tmp_path, sig):
    run_dir = tmp_path / "run"
    code, seconds, out = run_and_interrupt(1, run_dir, lambda proc: proc.send_signal(sig),
                                           one_process_cmd(run_dir))
    print(f"{sig.name} to one process: exit {code} after {seconds:.1f} s")
    assert code == 128 + sig and seconds < 30, out[-3000:]
    assert f"distbn.train: error: stopped by {sig.name}" in out, out[-3000:]
    assert_summary_says_stopped(run_dir, sig)


def test_sigterm_to_the_launch_script_exits_143(tmp_path):
    """launch/local.sh (and so make train) runs horovodrun under a trap (launch/job.sh)."""
    run_dir = tmp_path / "run"
    code, seconds, out = run_and_interrupt(2, run_dir, lambda proc: proc.send_signal(signal.SIGTERM),
                                           local_sh_cmd(run_dir))
    print(f"SIGTERM to launch/local.sh: exit {code} after {seconds:.1f} s")
    assert code == 143 and seconds < 60, out[-3000:]
    assert_summary_says_stopped(run_dir, signal.SIGTERM)
    wait_for(lambda: not worker_pids(run_dir), 30, "no worker left")


def test_ctrl_c_to_the_launch_scripts_group_exits_130(tmp_path):
    """Ctrl-C at a terminal signals the whole foreground group (make, the script, and before,
    horovodrun too). horovodrun runs in a group of its own and gets the signal once, through
    the script's trap (launch/job.sh: a second one could hang it); the job still stops."""
    run_dir = tmp_path / "run"
    code, seconds, out = run_and_interrupt(2, run_dir, lambda proc: os.killpg(proc.pid, signal.SIGINT),
                                           local_sh_cmd(run_dir))
    print(f"SIGINT to launch/local.sh's group: exit {code} after {seconds:.1f} s")
    assert code == 130 and seconds < 60, out[-3000:]
    assert_summary_says_stopped(run_dir, signal.SIGTERM)  # horovodrun stops its workers so
    wait_for(lambda: not worker_pids(run_dir), 30, "no worker left")


def test_non_finite_training_stops_every_worker_and_keeps_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    smoke = ["-m", "distbn.train", "--config", "configs/smoke.yaml", "--run-dir", str(run_dir),
             "--set", "log.progress=false"]
    horovodrun(2, smoke + ["--set", "train.epochs=1"], env={"DISTBN_DATA_DIR": str(SHARED_DATA)})
    before = digest(run_dir / "checkpoints" / "epoch-0001")
    t = time.time()
    code, out = horovodrun(2, smoke + ["--resume", "--set", "train.lr=1e30"],
                           env={"DISTBN_DATA_DIR": str(SHARED_DATA)}, check=False, timeout=120)
    print(f"lr 1e30: exit {code} after {time.time() - t:.1f} s")
    assert code != 0
    # Caught at a logged step ("training loss is nan at epoch 2, step N") or at the epoch's
    # end ("training diverged in epoch 2"), whichever comes first; printed once for the job.
    errors = [l for l in out.splitlines() if "distbn.train: error:" in l]
    assert len(errors) == 1 and "epoch 2" in errors[0], out[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "epoch-0001"
    assert digest(run_dir / "checkpoints" / "epoch-0001") == before
    assert not (run_dir / "checkpoints" / "epoch-0002").exists()


def test_crash_during_checkpoint_save_keeps_the_previous_one(tmp_path):
    from distbn import checkpoint, models
    from distbn.storage import StorageError

    net = models.lenet("sync")
    net.initialize()
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    folder = tmp_path / "checkpoints"
    checkpoint.save(folder, 1, 10, net, trainer, {"name": "x"})
    before = digest(folder / "epoch-0001")

    def crash(path):
        raise OSError(28, "disk full (injected)")
    trainer.save_states = crash  # model.params is written, then the save fails
    with pytest.raises(StorageError, match=r"trainer.states: disk full \(injected\)"):
        checkpoint.save(folder, 2, 20, net, trainer, {"name": "x"})
    found = checkpoint.latest(folder)
    assert found.epoch == 1 and digest(found.path) == before
    assert not (folder / "epoch-0002").exists()
    net.load_parameters(str(found.params))  # loadable
    assert not list(folder.glob(".tmp-*"))  # the failed save removed its partial folder
    (folder / ".tmp-epoch-0002-999").mkdir()  # what a save killed mid-way leaves behind ...
    del trainer.save_states
    checkpoint.save(folder, 2, 20, net, trainer, {"name": "x"})
    assert not list(folder.glob(".tmp-*"))  # ... is swept by the next save
    assert checkpoint.latest(folder).epoch == 2


def test_worker_that_skips_a_batch_ends_the_job_naming_the_collective(tmp_path):
    """Rank 1 drops one batch (fault injection): its collectives no longer pair with rank 0's
    and both block; the stall guard ends the job and names the collective each waits on."""
    run_dir = tmp_path / "run"
    t = time.time()
    code, out = horovodrun(2, train_args(run_dir, "--set", "train.stall_timeout=10"),
                           env={"DISTBN_DATA_DIR": str(SHARED_DATA), "DISTBN_INJECT_SKIP": "1:5"},
                           check=False, timeout=120)
    seconds = time.time() - t
    print(f"worker skipping a batch: exit {code} after {seconds:.1f} s")
    assert code != 0 and seconds < 90, out[-3000:]
    assert "made no progress" in out and "last collective 'distbn." in out, out[-3000:]


def test_stalled_worker_is_detected_by_the_watchdog(tmp_path):
    t = time.time()
    code, out = horovodrun(2, [MP / "stall.py"], check=False, timeout=120)
    seconds = time.time() - t
    print(f"stalled worker: exit {code} after {seconds:.1f} s")
    assert code != 0 and seconds < 60, out[-3000:]
    assert "made no progress" in out and "test.never" in out, out[-3000:]
