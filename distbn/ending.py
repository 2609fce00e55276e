"""How a training process ends when it is told to stop: SIGTERM or SIGINT, never as a success.

One process (``python -m distbn.train``): the first signal raises :class:`Stopped` in the main
thread, the trainer records it and exits with 128 + the signal (143, 130).

Under ``horovodrun`` a worker must also outlive the launcher's first step. Horovod 0.28.1 ends a
job it was signalled to stop (and the other workers when one fails) thus, per worker
(``horovod/runner/common/util/safe_shell_exec.py``): SIGTERM to the worker, up to 5 s for it to
go, SIGSTOP to the ``sh -c`` the worker runs under, SIGKILL to the worker, then a 5 s
``psutil.wait`` on the shell and SIGKILL to it. Meanwhile the middleman's main thread waits for
the same shell with ``subprocess.Popen.wait``. A worker that exits within those first 5 s lets
its shell exit before the SIGSTOP, and then both threads wait for it; when psutil's
``waitpid`` reaps it first, CPython's ``Popen.wait`` gets ECHILD and reports status 0, and a
job stopped by a signal exits 0 (seen under load). So a worker that was signalled holds its
exit until the launcher kills it: its shell is then stopped while it is still alive and only
the main thread reaps it (status 137 for the worker, 1 for ``horovodrun``). The hold is
bounded (:data:`HOLD_SECONDS`) for a signal that did not come from the launcher.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

# horovodrun kills a worker 5 s after its SIGTERM (GRACEFUL_TERMINATION_TIME_S); three times
# that is the bound for a worker whose signal came from elsewhere (kill PID, a scheduler).
HOLD_SECONDS = 15.0

_state = {"signal": None, "exiting": False, "caught": False,
          "record": None}  # what to record when the first signal comes, on the watcher thread
_recorded = threading.Event()
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """Raised in the main thread by the first SIGTERM or SIGINT (a BaseException, like
    KeyboardInterrupt: no ``except Exception`` of the training code swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _handler(signum, frame) -> None:
    if _state["signal"] is not None:
        return  # the first signal is being acted on
    _state["signal"] = signum
    if not _state["exiting"]:  # an exit under way holds by itself (see exit)
        raise Stopped(signum)


def catch() -> None:
    """Handle SIGTERM and SIGINT from now on (call from the main thread; once is enough).

    The main thread's handler runs only between Python bytecodes; a worker blocked in an
    exchange whose peer has stopped never gets there before the launcher kills it. So the
    signal is also written to a pipe (``signal.set_wakeup_fd``) that a thread of this module
    reads, and that thread runs what :func:`on_signal` registered (the run's record)."""
    if _state["caught"]:
        return
    for sig in _SIGNALS:
        signal.signal(sig, _handler)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    threading.Thread(target=_watch, args=(read_end,), name="distbn-signals", daemon=True).start()
    _state["caught"] = True


def _watch(read_end: int) -> None:
    signum = 0
    while signum not in _SIGNALS:  # a byte per handled signal, its number
        signum = os.read(read_end, 1)[0]
    try:
        if _state["record"]:
            _state["record"](signum)
    except Exception as e:  # noqa: BLE001 - a failed record must not hide the stop
        print(f"distbn: warning: could not record the stop: {e}", file=sys.stderr)
    _recorded.set()


def on_signal(record: Callable[[int], None]) -> None:
    """Run ``record(signum)`` on the watcher thread when the first SIGTERM or SIGINT comes
    (the newest one registered: the run in progress)."""
    _state["record"] = record


def wait_recorded(timeout: float = 5.0) -> None:
    """Wait (bounded) until what :func:`on_signal` registered has run."""
    _recorded.wait(timeout)


def received() -> Optional[int]:
    """The signal that told this process to stop, or None."""
    return _state["signal"]


def under_launcher() -> bool:
    """Whether horovodrun started this process (its Gloo rendezvous is in the environment)."""
    return "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ


def leaving() -> None:
    """From now on the process is on its way out: a signal no longer raises :class:`Stopped`
    (it is remembered, and :func:`exit` holds for it)."""
    _state["exiting"] = True


def exit(code: int) -> None:  # noqa: A001 - the trainer's one way out
    """``sys.exit(code)``, except for a signalled worker under horovodrun, which first waits
    (bounded) for the launcher's SIGKILL (see the module docstring); after a signal the status
    is never 0."""
    leaving()
    signum = _state["signal"]
    if signum is not None and under_launcher():
        time.sleep(HOLD_SECONDS)  # a signal meanwhile resumes it (PEP 475); the kill ends it
    if signum is not None and code == 0:
        code = 128 + signum
    sys.exit(code)
