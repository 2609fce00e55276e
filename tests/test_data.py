"""distbn.data: lookup order, verification, IDX parsing, download, sharding, batching."""
import gzip
import hashlib
import http.server
import shutil
import struct
import threading
from functools import partial

import numpy as np
import pytest

from distbn import data

NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


def idx_bytes(arr, magic):
    return struct.pack(f">{1 + arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def write_small_set(folder, n=5, seed=0, compress=True):
    """Write a small train split; return (images, labels, checksums of the raw files)."""
    rs = np.random.RandomState(seed)
    images = rs.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
    labels = rs.randint(0, 10, size=n).astype(np.uint8)
    sums = {}
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in zip(NAMES, [idx_bytes(images, 2051), idx_bytes(labels, 2049)]):
        sums[name] = hashlib.sha256(raw).hexdigest()
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return images, labels, sums


@pytest.fixture(autouse=True)
def isolated_lookup(tmp_path, monkeypatch):
    """No test sees the real cache, the system copy or the network unless it asks to."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("DISTBN_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("DISTBN_DATA_URL", "http://127.0.0.1:9/")  # discard port: refused at once


# --- small generated IDX files ------------------------------------------------------------

@pytest.mark.parametrize("compress", [True, False])
def test_good_small_files_load(tmp_path, compress):
    images, labels, sums = write_small_set(tmp_path / "d", compress=compress)
    got_x, got_y = data.load_fashion_mnist(tmp_path / "d", checksums=sums)
    assert got_x.shape == (5, 28, 28) and got_x.dtype == np.uint8
    assert got_y.shape == (5,) and got_y.dtype == np.uint8
    np.testing.assert_array_equal(got_x, images)
    np.testing.assert_array_equal(got_y, labels)


def test_truncated_file_is_named(tmp_path):
    _, _, sums = write_small_set(tmp_path / "d", compress=False)
    path = tmp_path / "d" / NAMES[0]
    raw = path.read_bytes()[:-100]
    path.write_bytes(raw)
    sums[NAMES[0]] = hashlib.sha256(raw).hexdigest()  # checksum passes: parsing must catch it
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.*truncated"):
        data.load_fashion_mnist(tmp_path / "d", checksums=sums)


def test_wrong_magic_is_named(tmp_path):
    _, _, sums = write_small_set(tmp_path / "d", compress=False)
    path = tmp_path / "d" / NAMES[1]
    raw = struct.pack(">I", 2051) + path.read_bytes()[4:]
    path.write_bytes(raw)
    sums[NAMES[1]] = hashlib.sha256(raw).hexdigest()
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte: IDX magic number 2051, expected 2049"):
        data.load_fashion_mnist(tmp_path / "d", checksums=sums)


def test_wrong_checksum_is_named(tmp_path):
    _, _, sums = write_small_set(tmp_path / "d")
    sums[NAMES[0]] = "0" * 64
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz: SHA-256"):
        data.load_fashion_mnist(tmp_path / "d", checksums=sums)


def test_corrupt_gzip_is_named(tmp_path):
    _, _, sums = write_small_set(tmp_path / "d")
    path = tmp_path / "d" / f"{NAMES[0]}.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz: cannot read"):
        data.load_fashion_mnist(tmp_path / "d", checksums=sums)


def test_lookup_order_env_then_cache_then_system(tmp_path, monkeypatch):
    _, _, sums_sys = write_small_set(tmp_path / "system", n=3, seed=1)
    _, _, sums_cache = write_small_set(data.cache_dir(), n=4, seed=2)
    _, _, sums_env = write_small_set(tmp_path / "env", n=6, seed=3)
    # Each directory has different content: the length tells which one was read.
    monkeypatch.setenv("DISTBN_DATA_DIR", str(tmp_path / "env"))
    assert len(data.load_fashion_mnist(checksums=sums_env)[0]) == 6
    # The argument beats the environment variable.
    assert len(data.load_fashion_mnist(data.cache_dir(), checksums=sums_cache)[0]) == 4
    monkeypatch.delenv("DISTBN_DATA_DIR")
    assert len(data.load_fashion_mnist(checksums=sums_cache)[0]) == 4
    shutil.rmtree(data.cache_dir())
    assert len(data.load_fashion_mnist(checksums=sums_sys)[0]) == 3


def test_missing_everywhere_names_places_and_remedy(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_fashion_mnist()
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(data.cache_dir()) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download failed" in msg
    assert not data.cache_dir().exists() or not any(data.cache_dir().iterdir())


# --- download, served from a loopback HTTP server ---------------------------------------

@pytest.fixture
def serve(tmp_path, monkeypatch):
    def start(folder):
        handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        monkeypatch.setenv("DISTBN_DATA_URL", f"http://127.0.0.1:{httpd.server_address[1]}/")
        servers.append(httpd)
    servers = []
    yield start
    for s in servers:
        s.shutdown()


def test_download_into_cache_atomically(serve, shared_data):
    serve(shared_data)
    images, labels = data.load_fashion_mnist(train=False)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    files = sorted(p.name for p in data.cache_dir().iterdir())
    assert files == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_corrupt_download_leaves_nothing(serve, tmp_path, shared_data):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(shared_data / "t10k-labels-idx1-ubyte.gz", bad)
    raw = bytearray(gzip.decompress((shared_data / "t10k-images-idx3-ubyte.gz").read_bytes()))
    raw[5000] ^= 0xFF  # one flipped pixel
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    serve(bad)
    with pytest.raises(data.DataError, match="SHA-256"):
        data.load_fashion_mnist(train=False)
    assert list(data.cache_dir().iterdir()) == []  # neither the bad file nor a .part


# --- the real copy in ../shared ----------------------------------------------------------

def test_real_fashion_mnist(shared_data):
    x, y = data.load_fashion_mnist(shared_data, train=True)
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    assert np.bincount(y, minlength=10).tolist() == [6000] * 10
    assert abs(x.mean() / 255 - 0.2860) < 5e-4
    xt, yt = data.load_fashion_mnist(shared_data, train=False)
    assert xt.shape == (10000, 28, 28) and np.bincount(yt).tolist() == [1000] * 10


def test_real_copy_with_a_flipped_byte_is_refused(tmp_path, shared_data):
    d = tmp_path / "copy"
    d.mkdir()
    shutil.copy(shared_data / "t10k-images-idx3-ubyte.gz", d)
    raw = bytearray(gzip.decompress((shared_data / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz: SHA-256"):
        data.load_fashion_mnist(d, train=False)


def test_truncated_real_gz_is_refused(tmp_path, shared_data):
    d = tmp_path / "copy"
    d.mkdir()
    blob = (shared_data / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    shutil.copy(shared_data / "t10k-images-idx3-ubyte.gz", d)
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz"):
        data.load_fashion_mnist(d, train=False)


# --- sharding ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 17, 100, 101, 1000])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_properties(n, size, drop_last):
    if drop_last and n < size:
        with pytest.raises(ValueError):
            data.shard_indices(n, 0, size, epoch=0, seed=0, drop_last=True)
        return
    shards = [data.shard_indices(n, r, size, epoch=3, seed=42, drop_last=drop_last)
              for r in range(size)]
    per = n // size if drop_last else -(-n // size)
    assert all(len(s) == per for s in shards), "every worker must get the same count"
    flat = np.concatenate(shards)
    assert flat.min() >= 0 and flat.max() < n
    if drop_last:
        assert len(set(flat.tolist())) == len(flat), "shards overlap"
    else:
        assert set(flat.tolist()) == set(range(n)), "some example is never seen"
        if per * size - n <= n:  # padding repeats at most per*size - n examples, once each
            assert len(flat) - len(set(flat.tolist())) == per * size - n
    # the same (seed, epoch) gives the same shard on every call (on every worker)
    again = data.shard_indices(n, size - 1, size, epoch=3, seed=42, drop_last=drop_last)
    np.testing.assert_array_equal(again, shards[-1])


def test_shards_reshuffle_per_epoch_and_seed():
    a = data.shard_indices(1000, 1, 4, epoch=0, seed=0)
    assert not np.array_equal(a, data.shard_indices(1000, 1, 4, epoch=1, seed=0))
    assert not np.array_equal(a, data.shard_indices(1000, 1, 4, epoch=0, seed=1))


@pytest.mark.parametrize("size", range(1, 9))
def test_eval_indices_partition(size):
    parts = [data.eval_indices(101, r, size) for r in range(size)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(101))


def test_iterate_batches_shapes_and_values():
    rs = np.random.RandomState(0)
    images = rs.randint(0, 256, size=(10, 28, 28)).astype(np.uint8)
    labels = np.arange(10).astype(np.uint8)
    idx = np.array([9, 3, 4, 0, 7])
    batches = list(data.iterate_batches(images, labels, idx, batch_size=2))
    assert [b[0].shape for b in batches] == [(2, 1, 28, 28), (2, 1, 28, 28), (1, 1, 28, 28)]
    x = np.concatenate([b[0].asnumpy() for b in batches])
    y = np.concatenate([b[1].asnumpy() for b in batches])
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(x[:, 0] * 255, images[idx], atol=1e-3)
    np.testing.assert_array_equal(y, labels[idx])


# --- the install step: python -m distbn.data ----------------------------------------------

def test_ensure_finds_and_verifies_a_copy_without_fetching(shared_data, monkeypatch, capsys):
    monkeypatch.setenv("DISTBN_DATA_DIR", str(shared_data))
    assert data.main([]) == 0
    assert f"Fashion-MNIST verified: {shared_data}" in capsys.readouterr().out
    assert not data.cache_dir().exists()  # nothing downloaded


def test_ensure_downloads_what_is_missing_then_finds_it(serve, shared_data, capsys):
    serve(shared_data)
    assert data.main([]) == 0
    assert len(list(data.cache_dir().iterdir())) == 4
    serve(shared_data.parent)  # a server without the files: a second run must not need it
    assert data.main([]) == 0
    assert f"verified: {data.cache_dir()}" in capsys.readouterr().out


def test_ensure_says_not_found_with_its_own_exit_code(capsys):
    """3 tells launch/install.sh to try Debian's package; a corrupt copy is 1 (no package
    would fix it: the message says to delete the file)."""
    assert data.main([]) == 3
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_ensure_names_a_corrupt_copy(tmp_path, shared_data, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(shared_data, bad)
    (bad / "t10k-labels-idx1-ubyte.gz").chmod(0o644)
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0" * 100))
    assert data.main(["--dir", str(bad)]) == 1
    assert "t10k-labels-idx1-ubyte.gz: SHA-256" in capsys.readouterr().err


# --- ShardSampler: the same number of batches on every worker -------------------------------

@pytest.mark.parametrize("n, workers", [(10, 3), (12, 4), (7, 2), (5, 5)])
@pytest.mark.parametrize("last", ["pad", "drop"])
def test_shard_sampler_gives_every_worker_the_same_batches_count(n, workers, last):
    from mxnet import gluon
    import mxnet as mx
    ds = gluon.data.ArrayDataset(mx.nd.arange(n))
    seen, counts = [], set()
    for rank in range(workers):
        s = data.ShardSampler(n, workers, rank, seed=3, last=last)
        s.set_epoch(1)
        batches = list(gluon.data.DataLoader(ds, batch_size=2, sampler=s, last_batch="keep"))
        counts.add(len(batches))
        seen += [int(v) for b in batches for v in b.asnumpy()]
        assert len(s) == sum(len(b) for b in batches)
    assert len(counts) == 1
    if last == "drop":
        assert len(seen) == n // workers * workers and len(set(seen)) == len(seen)
    else:
        assert set(seen) == set(range(n)) and len(seen) == -(-n // workers) * workers


def test_shard_sampler_reshuffles_per_epoch_alike_on_every_worker():
    a, b = data.ShardSampler(100, 2, 0, seed=5), data.ShardSampler(100, 2, 1, seed=5)
    first = list(a) + list(b)
    a.set_epoch(1), b.set_epoch(1)
    second = list(a) + list(b)
    assert sorted(first) == sorted(second) == list(range(100)) and first != second
    assert list(data.ShardSampler(6, 2, 1, shuffle=False)) == [1, 3, 5]
    with pytest.raises(ValueError, match="'pad' or 'drop'"):
        data.ShardSampler(6, 2, 0, last="keep")


def test_gluons_own_shard_is_uneven_which_the_sampler_fixes():
    """The trap: Dataset.shard(3, i) of 10 examples gives 4, 3, 3."""
    from mxnet import gluon
    import mxnet as mx
    ds = gluon.data.ArrayDataset(mx.nd.arange(10))
    assert [len(ds.shard(3, i)) for i in range(3)] == [4, 3, 3]
    assert [len(data.ShardSampler(10, 3, i)) for i in range(3)] == [4, 4, 4]
