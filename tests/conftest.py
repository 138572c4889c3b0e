import os
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from tests.ray_cluster import ONE_ACTOR, RayCluster

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDMNIST = REPO.parent / "shared" / "data" / "medmnist"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Extracted arrays and MD5 results go to a temporary cache, never into ~ or shared/."""
    os.environ["FEDMED_CACHE"] = str(tmp_path_factory.mktemp("fedmed-cache"))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    yield


@pytest.fixture(scope="session")
def ray_cluster(_isolated_cache):
    """The address of this test process's two-node Ray cluster (``tests/ray_cluster.py``), for
    ``ray.address=``: started when a test first asks for it, stopped when the test run ends."""
    cluster = RayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def on_cluster(ray_cluster) -> tuple[str, str]:
    """Overrides that run a federation on the test run's Ray cluster with one ClientApp actor."""
    return f"ray.address={ray_cluster}", ONE_ACTOR


@pytest.fixture
def one_thread():
    # One intra-op thread: on a busy 2-core runner, two OpenMP threads waiting on each other at
    # every barrier made small-input model tests 10x slower (test_models.py: 140 s against 14 s).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def medmnist_root() -> Path:
    if not (SHARED_MEDMNIST / "pneumoniamnist.npz").exists():
        pytest.skip(f"{SHARED_MEDMNIST} is not beside the repository")
    return SHARED_MEDMNIST


@pytest.fixture
def task_identity():
    """Messages need a run id, which the Flower runtime sets in a real run."""
    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
