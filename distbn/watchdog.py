"""A stall guard: a worker that makes no progress for ``timeout`` seconds exits with an error.

A collective that one worker never joins (a dead, stopped or out-of-step worker) blocks the
others forever without a word; Horovod's own stall check did not fire on this stack. The
training loop calls :meth:`Watchdog.beat` after every step; a daemon thread checks the time
since the last beat and, past the timeout, prints what the worker was doing and the last
collective it issued, then exits the process with status 5 -- which makes ``horovodrun`` end
the whole job. (MXNet's waits release the GIL, so the thread runs while the main one blocks.)
"""
from __future__ import annotations

import os
import sys
import threading
import time

STALL_EXIT_CODE = 5


class Watchdog:
    def __init__(self, timeout: float, describe):
        """``describe()`` returns a string naming the worker and its last collective."""
        self._timeout, self._describe = timeout, describe
        self._last, self._what = time.monotonic(), "start-up"
        self._stop = threading.Event()
        self._thread = None
        if timeout > 0:
            self._thread = threading.Thread(target=self._run, name="distbn-watchdog", daemon=True)
            self._thread.start()

    def beat(self, what: str) -> None:
        self._last, self._what = time.monotonic(), what

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(self._timeout / 4, 5.0)):
            idle = time.monotonic() - self._last
            if idle > self._timeout:
                print(f"distbn.train: error: {self._describe()} made no progress for {idle:.0f} s "
                      f"after {self._what}: another worker is dead, stopped or out of step "
                      f"(a different number of batches, a skipped forward pass); stopping",
                      file=sys.stderr, flush=True)
                os._exit(STALL_EXIT_CODE)
