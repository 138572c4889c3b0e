"""fedmed's own Ray instance: started in a thread, without the autoscaler monitor, stopped whole."""

import ray
from ray._private import ray_constants, worker

from fedmed.ray_start import RayStart

LOCAL = {"address": "local", "num_cpus": 1, "include_dashboard": False, "logging_level": "WARNING"}


def test_an_own_instance_runs_without_the_monitor_and_stops_whole():
    start = RayStart(LOCAL)
    start.wait()
    try:
        processes = {kind: [p.process for p in infos] for kind, infos in worker._global_node.all_processes.items()}
        assert [p.poll() for p in processes[ray_constants.PROCESS_TYPE_MONITOR]] != [None]  # gone
        assert all(p.poll() is None for p in processes[ray_constants.PROCESS_TYPE_GCS_SERVER])
        assert ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=60) == 42  # the instance works
    finally:
        start.shutdown()
    assert not ray.is_initialized()
    assert all(p.poll() is not None for kind in processes for p in processes[kind]), processes
