"""Storage faults: a disk that fills up after the first checkpoint (a tmpfs the test fills
while epoch 2 runs), a read-only run directory, a missing parent, a disk too small for one
checkpoint, and the resume after space is freed; at 1 and 2 workers. Each ends with exit status 4 and one line
``distbn.train: error: cannot write <path>: <reason>; the last complete checkpoint is ...``.

The tmpfs mounts need root and ``mount``: without them those cases skip with one line saying
why. Every mount is made under the test's own temporary folder and unmounted afterwards.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import BIN, ROOT, SHARED_DATA, horovodrun, python

pytestmark = pytest.mark.faults
ENV = {"DISTBN_DATA_DIR": str(SHARED_DATA)}


def _can_mount():
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("mount") is None:
        return "needs the mount command"
    return None


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path; remount(size) resizes it."""
    why = _can_mount()
    if why:
        pytest.skip(why)
    point = tmp_path / "disk"
    point.mkdir()

    class Disk:
        path = point

        @staticmethod
        def mount(size, *opts):
            subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]),
                            "tmpfs", str(point)], check=True, timeout=30)
            return point

        @staticmethod
        def remount(*opts):
            subprocess.run(["mount", "-o", ",".join(["remount", *opts]), str(point)],
                           check=True, timeout=30)

    try:
        yield Disk
    finally:
        subprocess.run(["umount", "-l", str(point)], timeout=30, capture_output=True)


def train(np_, run_dir, *extra, check=False, timeout=240):
    args = ["-m", "distbn.train", "--config", "configs/smoke.yaml", "--run-dir", str(run_dir),
            "--set", "log.progress=false", *extra]
    if np_ == 1:
        return python(args, env=ENV, timeout=timeout, check=check)
    return horovodrun(np_, args, env=ENV, timeout=timeout, check=check)


def the_error(out):
    lines = [line for line in out.splitlines() if "distbn.train: error:" in line]
    assert len(lines) == 1, out
    return lines[0].split("distbn.train: error: ", 1)[1]


def assert_exit_4(np_, code, out):
    """Exit status 4 and no traceback before the one line (under horovodrun, horovodrun's
    own traceback follows it: launch/local.sh checks first to avoid that)."""
    if np_ == 1:
        assert code == 4 and "Traceback" not in out, out
    else:
        assert code != 0 and "exit with status code 4" in out, out
        head = out[:out.index("distbn.train: error:")]
        assert "Traceback" not in head, out


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("np_", [1, pytest.param(2, marks=pytest.mark.multiproc)])
def test_disk_fills_after_the_first_checkpoint_then_resume(tmpfs, np_):
    """Another process fills the disk while epoch 2 runs: the run stops at its next write
    with the one line; checkpoint 1 stays byte-identical; after the space is freed,
    --resume finishes the run."""
    run_dir = tmpfs.mount("8m") / "run"
    args = ["-m", "distbn.train", "--config", "configs/smoke.yaml", "--run-dir", str(run_dir),
            "--set", "log.progress=false", "--set", "data.limit=5120", "--set", "train.epochs=3"]
    cmd = [sys.executable, "-W", "ignore", *args] if np_ == 1 else [
        str(BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", sys.executable,
        "-W", "ignore", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.time() + 120
        while not (latest.is_file() and latest.read_text().strip() == "epoch-0001"):
            assert proc.poll() is None and time.time() < deadline, "no first checkpoint"
            time.sleep(0.02)
        first = run_dir / "checkpoints" / "epoch-0001"
        before = digest(first)
        with open(tmpfs.path / "filler", "wb") as f:  # the disk fills up
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError:
                pass
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert_exit_4(np_, proc.returncode, out)
    error = the_error(out)
    assert error.startswith(f"cannot write {run_dir}/") and "No space left on device" in error, out
    assert error.endswith(f"the last complete checkpoint is {first}"), out
    assert digest(first) == before  # complete checkpoints untouched
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # no partial checkpoint left
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no torn record
    (tmpfs.path / "filler").unlink()  # space freed
    train(np_, run_dir, "--set", "data.limit=5120", "--set", "train.epochs=3", "--resume",
          check=True)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "epoch-0003"


@pytest.mark.parametrize("np_", [1, pytest.param(2, marks=pytest.mark.multiproc)])
def test_read_only_run_directory(tmpfs, np_):
    run_dir = tmpfs.mount("1m") / "run"
    run_dir.mkdir()
    tmpfs.remount("ro")
    code, out = train(np_, run_dir, "--set", "train.epochs=1")
    assert_exit_4(np_, code, out)
    assert the_error(out) == (f"cannot write {run_dir}: Read-only file system; the last "
                              f"complete checkpoint is none"), out
    assert "epoch 1:" not in out  # found before the first step


def test_disk_too_small_for_one_checkpoint_is_found_before_training(tmpfs):
    run_dir = tmpfs.mount("64k") / "run"
    code, out = train(1, run_dir)
    assert code == 4, out
    error = the_error(out)
    assert error.startswith(f"cannot write {run_dir}: ") and "one checkpoint needs about" in error
    assert "epoch 1:" not in out


@pytest.mark.parametrize("np_", [1, pytest.param(2, marks=pytest.mark.multiproc)])
def test_missing_parent(np_):
    run_dir = "/proc/distbn-no-such-dir/run"
    code, out = train(np_, run_dir, timeout=120)
    assert_exit_4(np_, code, out)
    assert the_error(out).startswith(f"cannot write {run_dir}: "), out


@pytest.mark.multiproc
def test_launch_script_checks_before_horovodrun(tmp_path):
    """launch/local.sh checks config and run directory in one process: the one line, exit 4,
    and no horovodrun traceback after it."""
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "configs/smoke.yaml",
                           "--run-dir", "/proc/distbn-no-such-dir/run"], cwd=ROOT,
                          env={**os.environ, **ENV, "NP": "2"}, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out
    assert the_error(out).startswith("cannot write /proc/distbn-no-such-dir/run: "), out
    assert "Traceback" not in out and "horovodrun" not in out.lower(), out
