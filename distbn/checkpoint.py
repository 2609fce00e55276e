"""Atomic checkpoints: a crash at any moment leaves the previous checkpoint loadable.

Layout of ``RUN_DIR/checkpoints``::

    epoch-0003/model.params     network parameters, moving statistics included
    epoch-0003/trainer.states   optimizer state (momentum buffers)
    epoch-0003/meta.json        {"epoch": 3, "global_step": ..., "config": {...}}
    epoch-0003/SHA256SUMS       the three files' SHA-256 (``sha256sum -c`` reads it)
    latest                      the name of the newest complete checkpoint

A checkpoint is written into a temporary folder, flushed to disk, then renamed into place; only
then is ``latest`` replaced (write a temporary file, rename over the old one). A write that
fails (full disk, read-only mount) removes the temporary folder and raises
:class:`distbn.storage.StorageError`; the checkpoints already there stay as they were. A
checkpoint whose files no longer match their checksums (a disk or copy that damaged them) is
passed over by :func:`latest`, which says so and takes the newest intact one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .storage import damaged, write_checksums, writing


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    epoch: int
    global_step: int

    @property
    def params(self) -> Path:
        return self.path / "model.params"

    @property
    def states(self) -> Path:
        return self.path / "trainer.states"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save(ckpt_dir: Path, epoch: int, global_step: int, net, trainer, config: dict) -> Checkpoint:
    with writing(ckpt_dir):
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".tmp-*"):  # left by a save that crashed (one writer: rank 0)
        shutil.rmtree(stale, ignore_errors=True)
    name = f"epoch-{epoch:04d}"
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    try:
        _write_files(tmp, epoch, global_step, net, trainer, config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = ckpt_dir / name
    with writing(final):
        if final.exists():  # the same epoch again (a resumed run): move the old one aside first
            old = ckpt_dir / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    latest_tmp = ckpt_dir / f".latest-{os.getpid()}"
    with writing(ckpt_dir / "latest"):
        try:
            latest_tmp.write_text(name + "\n")
            _fsync_file(latest_tmp)
            os.replace(latest_tmp, ckpt_dir / "latest")
        finally:
            if latest_tmp.exists():
                latest_tmp.unlink()
        _fsync_dir(ckpt_dir)
    return Checkpoint(final, epoch, global_step)


def _write_files(tmp: Path, epoch: int, global_step: int, net, trainer, config: dict) -> None:
    with writing(tmp):
        tmp.mkdir()
    with writing(tmp / "model.params"):
        net.save_parameters(str(tmp / "model.params"))
    with writing(tmp / "trainer.states"):
        trainer.save_states(str(tmp / "trainer.states"))
    with writing(tmp / "meta.json"):
        (tmp / "meta.json").write_text(json.dumps(
            {"epoch": epoch, "global_step": global_step, "config": config}, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
    write_checksums(tmp / CHECKSUMS, [tmp / n for n in ("model.params", "trainer.states", "meta.json")])


def size_estimate(net, trainer_states: int) -> int:
    """Bytes of one checkpoint: the parameters, ``trainer_states`` optimizer arrays of the
    same size (1 for SGD with momentum, 0 without), and room for the small files."""
    params = sum(p.data().size * np.dtype(p.dtype).itemsize for p in net.collect_params().values())
    return params * (1 + trainer_states) + (1 << 16)


CHECKSUMS = "SHA256SUMS"


def _read(path: Path, report: Callable[[str], None]) -> Optional[Checkpoint]:
    """The checkpoint in ``path`` if it is complete and intact; a damaged one is reported."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not (path / "model.params").is_file() or not (path / "trainer.states").is_file():
            return None
        # Checkpoints written before checksums were (no SHA256SUMS) are taken as they are.
        problem = damaged(path / CHECKSUMS) if (path / CHECKSUMS).is_file() else None
        if problem:
            report(f"checkpoint {path} is damaged ({problem}): passed over")
            return None
        return Checkpoint(path, int(meta["epoch"]), int(meta["global_step"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest(ckpt_dir: Path, report: Callable[[str], None] = lambda msg: None) -> Optional[Checkpoint]:
    """The newest complete, intact checkpoint: the one ``latest`` names, else the newest
    readable one. Each damaged checkpoint passed over is told to ``report`` in one line."""
    pointer = ckpt_dir / "latest"
    tried = None
    if pointer.is_file():
        tried = ckpt_dir / pointer.read_text().strip()
        found = _read(tried, report)
        if found is not None:
            return found
    for path in sorted(ckpt_dir.glob("epoch-*"), reverse=True):
        found = _read(path, report) if path != tried else None
        if found is not None:
            return found
    return None
