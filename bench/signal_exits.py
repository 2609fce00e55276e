"""Exit statuses of jobs stopped by a signal, repeated with the machine loaded: a reliability
count, not a timing (docs/results.md, "Stopped jobs").

Each repeat starts a 2-worker smoke run through one launcher, waits for its first checkpoint,
sends the signal to the launcher, and records the launcher's exit status, the seconds to it and
what the run's summary.json says. Counted apart: exit statuses other than the launcher's
documented one, 0 above all (horovodrun: 1; launch/local.sh: 128 + the signal; make train:
killed by it; one process: 128 + the signal), and runs whose summary.json does not say
"stopped", and jobs not ended 120 s after the signal (hung: killed, counted as wrong). ``--load N`` keeps N busy processes running meanwhile (the test suite loads both
cores like this).

    python bench/signal_exits.py --repeats 30 --load 2 --launcher horovodrun
"""
import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = ["--config", "configs/smoke.yaml", "--set", "data.limit=5120", "--set", "train.epochs=3",
         "--set", "log.progress=false"]


def command(launcher: str, run_dir: Path) -> list:
    args = [*TRAIN, "--run-dir", str(run_dir)]
    if launcher == "horovodrun":
        return [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", sys.executable, "-W",
                "ignore", "-m", "distbn.train", *args]
    if launcher == "local.sh":
        return ["bash", "launch/local.sh", args[1], *args[2:]]  # CONFIG first
    if launcher == "make":
        return ["make", "--no-print-directory", "train", "CONFIG=configs/smoke.yaml",
                "ARGS=" + " ".join(args[2:])]
    return [sys.executable, "-W", "ignore", "-m", "distbn.train", *args]  # one process


def expected(launcher: str, sig: int) -> int:
    """The launcher's documented status (as subprocess reports it)."""
    if launcher == "horovodrun":
        return 1
    if launcher == "make":  # make re-raises the signal: killed by it (the shell's 128 + sig)
        return -sig
    return 128 + sig


def busy(stop):
    while not stop.is_set():
        sum(i * i for i in range(10000))


def once(launcher: str, sig: int, folder: Path) -> dict:
    run_dir = folder / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NP": "2", "DISTBN_VENV": str(BIN.parent)}
    proc = subprocess.Popen(command(launcher, run_dir), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "latest").exists():
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"no checkpoint: {proc.communicate()[0][-2000:]}")
            time.sleep(0.2)
        time.sleep(1.0)  # into epoch 2
        t = time.time()
        if launcher == "make" and sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C: a terminal signals the whole foreground group
        else:
            proc.send_signal(sig)  # kill PID: the launcher alone
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # a hung job: counted, and killed below
            out = None
        seconds = time.time() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    summary = run_dir / "summary.json"
    status = json.loads(summary.read_text()).get("status") if summary.exists() else None
    code = proc.returncode if out is not None else None
    return {"launcher": launcher, "signal": signal.Signals(sig).name, "exit": code,
            "seconds": round(seconds, 1), "summary": status, "hung": out is None,
            "wrong_status": code != expected(launcher, sig), "no_record": status != "stopped"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--load", type=int, default=2, help="busy processes meanwhile")
    ap.add_argument("--launcher", nargs="+", default=["horovodrun"],
                    choices=["horovodrun", "local.sh", "make", "python"])
    ap.add_argument("--signal", nargs="+", default=["SIGTERM", "SIGINT"])
    ap.add_argument("--json")
    a = ap.parse_args()
    # Started in the background (`cmd &`), this process inherits SIGINT ignored, and so would
    # the launchers: a shell cannot trap a signal ignored on entry. Default for the children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = multiprocessing.Event()
    loaders = [multiprocessing.Process(target=busy, args=(stop,), daemon=True)
               for _ in range(a.load)]
    for p in loaders:
        p.start()
    rows, counts = [], {}
    try:
        for i in range(a.repeats):  # interleaved: every launcher and signal in each round
            for launcher in a.launcher:
                for name in a.signal:
                    with tempfile.TemporaryDirectory() as folder:
                        row = {"repeat": i + 1, **once(launcher, signal.Signals[name], Path(folder))}
                    emit([row])
                    rows.append(row)
                    key = f"{launcher} {name}"
                    counts.setdefault(key, [0, 0, 0, 0])
                    counts[key][0] += 1
                    counts[key][1] += row["wrong_status"]
                    counts[key][2] += row["no_record"]
                    counts[key][3] += row["hung"]
    finally:
        stop.set()
    totals = [{"launcher_signal": k, "runs": n, "wrong_exit_statuses": w, "without_record": r,
               "hung": h} for k, (n, w, r, h) in counts.items()]
    emit(totals, a.json, load=a.load)


if __name__ == "__main__":
    main()
