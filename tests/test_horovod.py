"""Horovod is built with MXNet + Gloo and its collectives work on this machine."""
import pytest

from conftest import MP, horovodrun, python


def test_import_and_init_one_process():
    import horovod.mxnet as hvd

    hvd.init()
    assert hvd.size() == 1 and hvd.rank() == 0


@pytest.mark.multiproc
def test_two_process_allreduce_sum():
    _, out = horovodrun(2, [MP / "allreduce.py"], timeout=120)
    assert out.count(": OK") == 2, out


def test_size_one_allreduce_is_identity_without_collective():
    _, out = python([MP / "allreduce.py"])
    assert "sum 1.0 want 1.0" in out and ": OK" in out, out
