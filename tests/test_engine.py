"""The sync layers' collective engine (distbn/engine.py, csrc/allreduce.cc on Gloo) and worker
placement."""
import re

import pytest

from conftest import MP, horovodrun
from distbn.placement import slice_for


def test_local_workers_get_disjoint_core_slices():
    assert [slice_for([0, 1], r, 2) for r in range(2)] == [[0], [1]]
    assert [slice_for(list(range(8)), r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [slice_for([0, 1, 2], r, 2) for r in range(2)] == [[0], [1]]
    # more workers than cores: shared round-robin
    assert [slice_for([4, 5], r, 4) for r in range(4)] == [[4], [5], [4], [5]]


@pytest.mark.multiproc
@pytest.mark.parametrize("np_", [2, 3, 4])
def test_engine_sums_groups_and_refuses_out_of_step_workers(np_):
    _, out = horovodrun(np_, [MP / "engine.py"], timeout=120)
    assert out.count(": OK") == np_, out


@pytest.mark.multiproc
@pytest.mark.parametrize("np_", [2, 3])
def test_out_of_step_workers_with_other_lengths_both_fail_at_once(np_):
    _, out = horovodrun(np_, [MP / "engine.py", "--other-length"], timeout=120, check=False)
    assert out.count(": OK") == np_, out
    assert "another sent a message of another length" in out, out


@pytest.mark.multiproc
@pytest.mark.parametrize("np_", [2, 4])
def test_a_lost_worker_fails_the_next_collective_naming_it(np_):
    _, out = horovodrun(np_, [MP / "engine.py", "--lose-rank", 1], timeout=120, check=False)
    assert out.count(": OK") == np_ - 1 and f"rank 1/{np_}" not in out, out
    named = {int(r) for r in re.findall(r"loss: .*lost the connection to rank (\d+)", out)}
    reporters = {int(r) for r in re.findall(r"rank (\d+) loss:", out)}
    assert 1 in named and named <= {1} | reporters, out  # rank 1, or a worker that failed itself


@pytest.mark.multiproc
def test_a_silent_worker_fails_the_collective_after_the_sync_timeout():
    _, out = horovodrun(3, [MP / "engine.py", "--silent-rank", 2], timeout=120,
                        env={"DISTBN_SYNC_TIMEOUT": "2"})
    assert out.count(": OK") == 3, out
