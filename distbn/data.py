"""Fashion-MNIST: locate, verify, parse, shard and batch.

Files are looked up, each on its own, in this order:
  1. the ``data_dir`` argument, or else the ``DISTBN_DATA_DIR`` environment variable;
  2. the user cache ``~/.cache/distbn/fashion-mnist`` (``$XDG_CACHE_HOME`` respected);
  3. the copy Debian's ``dataset-fashion-mnist`` package installs (``/usr/share/datasets/fashion-mnist``,
     or ``$DISTBN_SYSTEM_DATA_DIR``);
  4. otherwise the official file is downloaded into the user cache (temporary file, then rename).
A file may be gzip-compressed (``NAME.gz``) or raw (``NAME``). Every file is verified by the
SHA-256 of its *decompressed* bytes, so the official gz files and Debian's re-compressed ones
both pass, and a corrupt or truncated file is never used.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Tuple

import numpy as np

# SHA-256 of the decompressed IDX files (../shared/data/fashion-mnist/RAW-SHA256SUMS).
RAW_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Official download location, as listed in the Zalando repository's README.
DEFAULT_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Debian's dataset-fashion-mnist (DISTBN_SYSTEM_DATA_DIR: elsewhere, e.g. nowhere in tests).
SYSTEM_DIR = Path(os.environ.get("DISTBN_SYSTEM_DATA_DIR", "/usr/share/datasets/fashion-mnist"))
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


class DataError(RuntimeError):
    """A data file is missing, corrupt or malformed; the message names the file."""


class DataNotFound(DataError):
    """No copy anywhere, and the download failed or was disabled."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distbn" / "fashion-mnist"


def _file_names(train: bool) -> Tuple[str, str]:
    split = "train" if train else "t10k"
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def _search_dirs(data_dir: Optional[os.PathLike]) -> List[Path]:
    first = data_dir if data_dir is not None else os.environ.get("DISTBN_DATA_DIR")
    dirs = [Path(first).expanduser()] if first else []
    return dirs + [cache_dir(), SYSTEM_DIR]


def _read_raw(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip data (judged by its magic bytes)."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); delete it and run again") from e


def _verified_bytes(path: Path, name: str, checksums: Mapping[str, str]) -> bytes:
    raw = _read_raw(path)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != checksums[name]:
        raise DataError(
            f"{path}: SHA-256 of the decompressed content is {digest}, expected "
            f"{checksums[name]} (corrupt or not the expected file); delete it and run again")
    return raw


def parse_idx(raw: bytes, path: Path, expect_magic: int) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, then one uint32 per dimension)."""
    ndim = {IMAGE_MAGIC: 3, LABEL_MAGIC: 1}[expect_magic]
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != expect_magic:
        raise DataError(f"{path}: IDX magic number {magic}, expected {expect_magic}")
    if ndim == 3 and tuple(dims[1:]) != (28, 28):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, the header {tuple(dims)} implies {expected} "
                        f"(truncated or padded file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _download(name: str, dest_dir: Path, checksums: Mapping[str, str]) -> Path:
    url = os.environ.get("DISTBN_DATA_URL", DEFAULT_URL).rstrip("/") + f"/{name}.gz"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name}.gz"
    from tqdm import tqdm  # only needed here

    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest_dir)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, os.fdopen(fd, "wb") as out, \
                tqdm(total=int(resp.headers.get("Content-Length") or 0) or None, unit="B",
                     unit_scale=True, desc=f"download {name}.gz", file=sys.stderr) as bar:
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))
        _verified_bytes(Path(tmp), name, checksums)
        os.replace(tmp, dest)  # atomic: the cache never holds a partial or unverified file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def _locate(name: str, data_dir: Optional[os.PathLike], download: bool,
            checksums: Mapping[str, str]) -> Path:
    searched = []
    for d in _search_dirs(data_dir):
        for candidate in (d / f"{name}.gz", d / name):
            searched.append(str(candidate))
            if candidate.is_file():
                return candidate
    if download:
        try:
            return _download(name, cache_dir(), checksums)
        except OSError as e:  # URLError, timeouts, refused connections: all end in the same advice
            reason = f"download failed ({e})"
    else:
        reason = "download disabled"
    raise DataNotFound(
        f"Fashion-MNIST file {name} not found; looked in: " + ", ".join(searched) +
        f"; {reason}. Get the data with `apt-get install dataset-fashion-mnist` (Debian), or put "
        f"the four official .gz files in a folder and pass it as data.dir / DISTBN_DATA_DIR.")


def load_fashion_mnist(data_dir: Optional[os.PathLike] = None, train: bool = True,
                       download: bool = True, checksums: Optional[Mapping[str, str]] = None
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: uint8 arrays of shape (N, 28, 28) and (N,).

    ``checksums`` maps file names (without .gz) to the SHA-256 of their decompressed content;
    the default is Fashion-MNIST's. Tests pass their own for small generated IDX files.
    """
    checksums = RAW_SHA256 if checksums is None else checksums
    img_name, lbl_name = _file_names(train)
    img_path = _locate(img_name, data_dir, download, checksums)
    lbl_path = _locate(lbl_name, data_dir, download, checksums)
    images = parse_idx(_verified_bytes(img_path, img_name, checksums), img_path, IMAGE_MAGIC)
    labels = parse_idx(_verified_bytes(lbl_path, lbl_name, checksums), lbl_path, LABEL_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{img_path} holds {len(images)} images but {lbl_path} "
                        f"{len(labels)} labels")
    return images, labels


def shard_indices(n: int, rank: int, size: int, epoch: int, seed: int,
                  drop_last: bool = False, shuffle: bool = True) -> np.ndarray:
    """This worker's example indices for one epoch.

    A permutation of range(n) drawn from (seed, epoch) (range(n) itself without ``shuffle``)
    is dealt round-robin to the workers.
    Every worker gets the same count, ``n // size`` with ``drop_last`` (the tail is dropped)
    or ``ceil(n / size)`` without it (the permutation wraps around to pad), so every worker
    runs the same number of batches: a worker with fewer would leave the others waiting in a
    collective forever.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a world of size {size}")
    if n < size and (drop_last or n == 0):
        raise ValueError(f"{n} examples cannot be shared by {size} workers")
    perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_worker = n // size if drop_last else -(-n // size)
    total = per_worker * size
    if total > n:
        perm = np.resize(perm, total)  # pad by wrapping around the permutation
    return perm[rank:total:size]


class ShardSampler:
    """A Gluon sampler (``gluon.data.DataLoader(dataset, sampler=...)``, or
    ``gluon.data.BatchSampler``) of this worker's share of a data set of ``length`` examples,
    of the same length on every worker, so that all run the same number of batches.

    MXNet's ``Dataset.shard`` gives the first ``length % workers`` shards one example more;
    with ``last_batch='keep'`` those workers then run one more step and the others wait in
    its collectives forever (horovod.mxnet has no ``join``). Here ``last='pad'`` (the default,
    as PyTorch's DistributedSampler) repeats examples from the start of the epoch's
    permutation to fill the last shards, ``last='drop'`` drops the tail. With ``shuffle`` the
    permutation is redrawn each epoch from (seed, epoch), the same on every worker: call
    :meth:`set_epoch` before each epoch. ``workers``/``rank`` default to distbn's communicator.
    """

    def __init__(self, length: int, workers: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, last: str = "pad"):
        if last not in ("pad", "drop"):
            raise ValueError(f"last must be 'pad' or 'drop', got {last!r}")
        if workers is None or rank is None:
            from .comm import get_comm
            comm = get_comm()
            workers = comm.size if workers is None else workers
            rank = comm.rank if rank is None else rank
        self.length, self.workers, self.rank = length, workers, rank
        self.shuffle, self.seed, self.last, self.epoch = shuffle, seed, last, 0
        self._indices()  # checks the arguments now rather than at the first epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        return shard_indices(self.length, self.rank, self.workers, self.epoch, self.seed,
                             drop_last=self.last == "drop", shuffle=self.shuffle)

    def __iter__(self):
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return self.length // self.workers if self.last == "drop" else -(-self.length // self.workers)


def eval_indices(n: int, rank: int, size: int) -> np.ndarray:
    """Disjoint, unpadded, unshuffled shard for evaluation: every example counted exactly once.

    Shards may differ in length by one; evaluation does no collective per batch (prediction
    mode never communicates), only one metric all-reduce at the end, so that cannot hang.
    """
    return np.arange(rank, n, size)


def iterate_batches(images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                    batch_size: int, ctx=None) -> Iterator[Tuple["object", "object"]]:
    """Yield ``(X, y)`` NDArrays: X float32 (b, 1, 28, 28) in [0, 1], y float32 (b,).

    Only the batch is gathered and converted; the uint8 data set is never copied.
    """
    import mxnet as mx

    ctx = ctx or mx.cpu()
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        x = images[idx].astype(np.float32)[:, None, :, :] * np.float32(1 / 255)
        yield mx.nd.array(x, ctx=ctx, dtype=np.float32), mx.nd.array(labels[idx], ctx=ctx, dtype=np.float32)


def num_batches(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def ensure(data_dir: Optional[os.PathLike] = None) -> List[Path]:
    """Every Fashion-MNIST file found (downloaded where missing) and verified; their paths.
    What ``launch/install.sh`` runs, so that training finds the data it needs."""
    paths = []
    for name in (*_file_names(True), *_file_names(False)):
        path = _locate(name, data_dir, True, RAW_SHA256)
        _verified_bytes(path, name, RAW_SHA256)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    """``python -m distbn.data``: exit 0 when the four files are there and verified (found or
    downloaded), 3 when they are nowhere and cannot be downloaded, 1 for a corrupt file."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m distbn.data", description=main.__doc__)
    ap.add_argument("--dir", help="look here first (default: $DISTBN_DATA_DIR)")
    args = ap.parse_args(argv)
    try:
        paths = ensure(args.dir)
    except DataError as e:
        print(f"distbn.data: {e}", file=sys.stderr)
        return 3 if isinstance(e, DataNotFound) else 1
    print("Fashion-MNIST verified: " + ", ".join(sorted({str(p.parent) for p in paths})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
