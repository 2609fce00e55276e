"""The benchmark scripts run end to end on tiny settings and write the JSON they promise; the
book-path benchmark feeds MXNet's FashionMNIST the verified local data without a download."""
import json
import sys

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA, horovodrun, needs_bfloat16, python

sys.path.insert(0, str(ROOT / "bench"))
ENV = {"DISTBN_DATA_DIR": str(SHARED_DATA)}


def test_book_path_reads_local_copy_offline(tmp_path, monkeypatch, shared_data):
    from mxnet.gluon.data import vision
    import book_path
    from distbn.data import load_fashion_mnist

    monkeypatch.setenv("DISTBN_DATA_DIR", str(shared_data))
    # Any download attempt goes to a closed loopback port and fails at once.
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    monkeypatch.setattr(vision, "FashionMNIST", vision.FashionMNIST)  # restored afterwards
    book_path.use_local_fashion_mnist(tmp_path, book_path.write_idx_gz(tmp_path))
    for train in (True, False):
        ds = vision.FashionMNIST(train=train)  # what d2l.FashionMNIST constructs
        images, labels = load_fashion_mnist(shared_data, train=train)
        assert len(ds) == len(labels) == (60000 if train else 10000)
        np.testing.assert_array_equal(ds._data.asnumpy()[..., 0], images)
        np.testing.assert_array_equal(ds._label, labels)
        x, y = ds[123]
        assert x.shape == (28, 28, 1) and y == labels[123]


def test_throughput_bench_tiny(tmp_path):
    out = tmp_path / "t.json"
    python(["bench/throughput.py", "--workers", "1", "--bn", "gluon", "sync", "--limit", "512",
            "--repeat", "1", "--json", out], timeout=300, env=ENV)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["workers"] == 1
    assert row["gluon_examples_per_s"] > 0 and row["sync_examples_per_s"] > 0
    assert row["sync_step_vs_gluon"] == pytest.approx(
        row["gluon_examples_per_s"] / row["sync_examples_per_s"], rel=1e-2)


def test_layer_bench_tiny(tmp_path):
    out = tmp_path / "l.json"
    _, text = python(["bench/layer.py", "--batch", "8", "--repeat", "2", "--rounds", "1",
                      "--json", out], timeout=300)
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["rows"]] == [8] * 4  # LeNet's four BN shapes
    assert set(data["sum_ms"]) == {"gluon", "custom", "sync", "ops", "book"}
    assert all(v > 0 for v in data["sum_ms"].values()), text


@pytest.mark.multiproc
def test_step_phases_bench_two_workers_counts_collectives(tmp_path):
    out = tmp_path / "p.json"
    horovodrun(2, ["bench/step_phases.py", "--steps", "2", "--bn", "gluon", "sync",
                   "--json", out], timeout=300)
    rows = {r["bn"]: r for r in json.loads(out.read_text())["rows"]}
    # LeNet has 4 BN layers; a sync layer all-reduces once forward, once backward
    assert rows["sync"]["distbn_collectives_per_step"] == 2 * 4
    assert rows["gluon"]["distbn_collectives_per_step"] == 0
    assert all(rows[bn]["step"] > 0 for bn in rows)


@pytest.mark.multiproc
def test_exchange_wait_bench_splits_each_exchange_into_wait_and_exchange(tmp_path):
    out = tmp_path / "w.json"
    horovodrun(2, ["bench/exchange_wait.py", "--arch", "lenet", "--rounds", "2", "--steps", "2",
                   "--warmup", "1", "--json", out], timeout=300)
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["exchanges_per_step"] == 2 * 4 and row["gluon_ms"] > 0 and row["sync_ms"] > 0
    assert row["wait_ms_per_step"] >= 0 and row["exchange_ms_per_step"] > 0
    # Inside the exchanges a worker spends no more than its whole step.
    assert row["wait_ms_per_step"] + row["exchange_ms_per_step"] < row["sync_ms"]
    names = [r["exchange"].split(" (")[0] for r in data["layers"]]
    assert names == [f"distbn.syncbatchnorm{i}_fwd" for i in range(4)] + \
        [f"distbn.syncbatchnorm{i}_bwd" for i in (3, 2, 1, 0)], names


@pytest.mark.multiproc
def test_step_time_bench_two_workers(tmp_path):
    out = tmp_path / "s.json"
    horovodrun(2, ["bench/step_time.py", "--arch", "lenet", "resnet18_v1", "--rounds", "1",
                   "--steps", "2", "--warmup", "1", "--json", out], timeout=300)
    rows = {r["arch"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["lenet"]["batch_per_worker"] == 128 and rows["resnet18_v1"]["batch_per_worker"] == 32
    for r in rows.values():
        assert r["workers"] == 2 and r["gluon_ms"] > 0 and r["sync_ms"] > 0
        assert r["sync_vs_gluon"] == pytest.approx(r["sync_ms"] / r["gluon_ms"], rel=1e-2)


def test_step_time_bench_two_devices(tmp_path):
    """The book's multi-device loop on two CPU devices (docs/layer.md: the temporary-space
    copies it needs)."""
    out = tmp_path / "d.json"
    python(["bench/step_time.py", "--devices", "2", "--arch", "lenet", "--rounds", "1",
            "--steps", "2", "--warmup", "1", "--json", out], timeout=300,
           env={"MXNET_CPU_TEMP_COPY": "256"})
    (row,) = json.loads(out.read_text())["rows"]
    assert row["devices_per_worker"] == 2 and row["gluon_ms"] > 0 and row["sync_ms"] > 0


@needs_bfloat16
@pytest.mark.multiproc
def test_precision_bench_two_workers(tmp_path):
    out = tmp_path / "p.json"
    horovodrun(2, ["bench/precision.py", "--arch", "lenet", "--rounds", "1", "--steps", "2",
                   "--warmup", "1", "--json", out], timeout=300)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["workers"] == 2 and row["bn"] == "sync" and row["batch_per_worker"] == 128
    assert row["float32_ms"] > 0 and row["bfloat16_ms"] > 0
    assert row["bfloat16_vs_float32"] == pytest.approx(row["bfloat16_ms"] / row["float32_ms"],
                                                       rel=1e-2)


@pytest.mark.multiproc
def test_bn_group_bench_tiny(tmp_path):
    out = tmp_path / "g.json"
    python(["bench/bn_group.py", "--workers", "2", "--groups", "1", "2", "--batch", "8",
            "--seeds", "0", "--limit", "512", "--json", out], timeout=600, env=ENV)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["bn_group"], r["examples_per_statistic"]) for r in rows] == [(1, 8), (2, 16)]
    for r in rows:
        assert len(r["test_acc"]) == 1 and 0 < r["test_acc"][0] <= 1
        assert r["examples_per_second"] and all(v > 0 for v in r["examples_per_second"])


def test_precise_bn_bench_tiny(tmp_path):
    out = tmp_path / "p.json"
    python(["bench/precise_bn.py", "--workers", "1", "--seeds", "0", "--epochs", "1", "--limit",
            "512", "--precise-bn", "256", "--json", out], timeout=600, env=ENV)
    got = json.loads(out.read_text())
    assert [r["stats"] for r in got["rows"]] == ["running", "re-estimated"]
    (raw,) = got["raw"]
    assert raw["precise_bn_seconds"] > 0 and 0 < raw["test_acc"] <= 1
    assert raw["precise_bn_share"] == pytest.approx(raw["precise_bn_seconds"] / raw["epoch_seconds"],
                                                    abs=1e-4)


@pytest.mark.multiproc
def test_numpy_mode_bench_two_workers(tmp_path):
    out = tmp_path / "n.json"
    horovodrun(2, ["bench/numpy_mode.py", "--rounds", "1", "--steps", "2", "--warmup", "1",
                   "--json", out], timeout=300)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["workers"] == 2 and row["bn"] == "sync" and row["legacy_ms"] > 0
    assert row["numpy_vs_legacy"] == pytest.approx(row["numpy_ms"] / row["legacy_ms"], rel=1e-2)


def test_sync_bytes_model():
    _, text = python(["bench/sync_bytes.py", "--model"], timeout=300)
    rows = [dict(kv.split("=") for kv in line.split(" | ")) for line in text.splitlines()
            if line.startswith("workers=")]
    by_n = {int(r["workers"]): r for r in rows}
    assert sorted(by_n) == [2, 4, 8, 16, 32, 64, 128, 256]
    # The all-to-all grows with N - 1; Gloo's halving-doubling stays under twice the two-worker bytes.
    assert float(by_n[256]["all_to_all_MB_per_worker_step"]) > 200 * float(by_n[2]["all_to_all_MB_per_worker_step"])
    assert float(by_n[256]["gloo_MB_per_worker_step"]) < 2 * float(by_n[2]["gloo_MB_per_worker_step"])
    assert int(by_n[2]["gloo_latency_steps"]) == int(by_n[2]["all_to_all_latency_steps"])  # the ring
