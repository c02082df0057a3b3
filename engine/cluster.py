"""Ray itself: starting or joining it, each trial's resource bundle, and checking a cluster can hold it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def trial_resources(resources: dict):
    """The trial's bundle, plus one bundle per influence actor so actors never oversubscribe."""
    from ray import tune

    main = {"CPU": resources["cpu"], "GPU": resources["gpu"]}
    if resources["actors"] == 0:
        return tune.PlacementGroupFactory([main])
    from poisonsweep.engine.shards import actor_bundles

    bundles = actor_bundles(resources["actors"], resources["actor_cpu"], resources["actor_gpu"])
    return tune.PlacementGroupFactory([main] + bundles)


# set in every trial process, on every node (a driver's own environment reaches only a local Ray)
WORKER_ENV = {
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # keep relative --data-root paths meaning what they meant to the driver
    "PYTHONUNBUFFERED": "1",
}


def init_ray(address: str | None, verbose: bool, py_modules: list[str] = ()) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, set by ``ray job submit``), else start a private
    local Ray. Never ``ray.init()`` bare: it would join whatever cluster ``ray start`` last ran here.
    ``py_modules`` (plugin files and package folders) ship with the job to every node that runs a trial;
    a Ray this process already joined keeps its job's environment (trials then import plugins from their
    driver's paths, which works on this machine only)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = {"_node_ip_address": "127.0.0.1"} if address == "local" else {}
    with loopback_node(address == "local"):
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=True,
                 logging_level="INFO" if verbose else "WARNING", runtime_env=job_runtime_env(py_modules), **local)


def job_runtime_env(py_modules: list[str] = ()) -> dict:
    """The job's Ray ``runtime_env``: ``WORKER_ENV`` and, when there are plugins, their files as ``py_modules``
    (Ray uploads each once, content-addressed, and puts it first on every worker's ``sys.path``)."""
    return {"env_vars": dict(WORKER_ENV), **({"py_modules": list(py_modules)} if py_modules else {})}


@contextlib.contextmanager
def loopback_node(local: bool):
    """While a private local Ray starts, make its node address the loopback, so that its servers
    (GCS, raylet, workers, agents) listen on 127.0.0.1 only.

    On Linux ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it: Ray replaces a loopback
    node address by the machine's own (``services.resolve_ip_for_localhost``), and its servers then
    listen on every interface. Ray keeps the loopback where ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is
    off (its default on macOS and Windows); that setting is read into ``ray_constants`` when ray is
    imported, so it is set there for the start and restored after (a later ``ray.init`` that joins
    a cluster in the same process must see the real address). RESULTS section 11 has the ``ss`` counts.
    """
    from ray._private import ray_constants

    if not local or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def check_cluster_resources(resources: dict) -> None:
    """A GPU asked for where the cluster has none (and cannot add any) is an error before any trial starts."""
    available = _most_resources()
    wanted_gpu = resources["gpu"] + resources["actors"] * resources["actor_gpu"]
    if wanted_gpu > 0 and available.get("GPU", 0) == 0:
        raise RuntimeError(
            f"resources ask for GPUs (gpu: {resources['gpu']}, actor_gpu: {resources['actor_gpu']}) but the Ray "
            "cluster has none; set resources.gpu and resources.actor_gpu to 0 (e.g. --set resources.gpu=0) "
            "or connect to a cluster with GPUs (--address)")
    for kind, key, actor_key in (("GPU", "gpu", "actor_gpu"), ("CPU", "cpu", "actor_cpu")):
        wanted = resources[key] + resources["actors"] * resources[actor_key]
        if wanted > available.get(kind, 0):
            raise RuntimeError(f"one trial needs {wanted:g} {kind}s (trial + influence actors) but the largest the "
                               f"Ray cluster can offer is {available.get(kind, 0):g}; lower resources.{key} / "
                               f"resources.{actor_key} / resources.actors")


# where `ray up` leaves the autoscaler's config on the head node (the monitor's --autoscaling-config)
AUTOSCALING_CONFIG = "~/ray_bootstrap_config.yaml"


def _most_resources() -> dict:
    """The cluster's resources now, or what its autoscaler may add if that is more: a cluster whose
    GPU workers are scaled to zero (cluster.yaml) still counts as having GPUs."""
    import ray
    from ray._private.state import state  # what Ray Train asks for the same check

    now = ray.cluster_resources()
    try:
        most = state.get_max_resources_from_cluster_config() or {}  # KubeRay / autoscaler v2
    except Exception:  # no autoscaler state in this cluster
        most = {}
    path = Path(AUTOSCALING_CONFIG).expanduser()
    if not most and path.is_file():  # cluster launcher: the driver runs on the head (ray job submit)
        import yaml

        most = autoscaler_capacity(yaml.safe_load(path.read_text()) or {})
    return {key: max(now.get(key, 0), most.get(key, 0)) for key in set(now) | set(most)}


def autoscaler_capacity(config: dict) -> dict:
    """Resources of a cluster-launcher config at full scale: each worker type's ``resources`` times
    its ``max_workers`` (capped by the cluster's ``max_workers``), plus the head's."""
    node_types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    total: dict[str, float] = {}
    for name, node_type in node_types.items():
        count = 1 if name == head else node_type.get("max_workers", 0)
        if cap is not None and name != head:
            count = min(count, cap)
        for key, value in (node_type.get("resources") or {}).items():
            total[key] = total.get(key, 0) + value * count
    return total


