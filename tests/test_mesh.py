"""The sync layers' mesh (distbn/mesh.py, csrc/allreduce.cc) and worker placement."""
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
@pytest.mark.parametrize("np_", [2, 3])
def test_mesh_sums_groups_and_refuses_out_of_step_workers(np_):
    _, out = horovodrun(np_, [MP / "mesh.py"], timeout=120)
    assert out.count(": OK") == np_, out


@pytest.mark.multiproc
def test_a_lost_worker_fails_the_next_collective_naming_it():
    _, out = horovodrun(3, [MP / "mesh.py", "--lose-rank", 1], timeout=120)
    assert out.count(": OK") == 2 and "rank 1/3" not in out, out


@pytest.mark.multiproc
def test_a_silent_worker_fails_the_collective_after_the_mesh_timeout():
    _, out = horovodrun(3, [MP / "mesh.py", "--silent-rank", 2], timeout=120,
                        env={"DISTBN_MESH_TIMEOUT": "2"})
    assert out.count(": OK") == 3, out
