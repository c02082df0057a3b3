"""Per-sample work of a trial, sharded over a pool of Ray actors.

``ActorPoolMap(n_actors, cpu_per_actor, gpu_per_actor)`` is a drop-in for
``poisonsweep.tasks.detect.base.serial_map``: ``pool(fn, shared, shards) -> [fn(shared, s) for s in shards]``,
results in shard order whatever the finishing order. ``shared`` (model weights, fitted curvature,
training data) is put in the object store once per call; each actor resolves it once and keeps it
for every shard it is handed. An actor that dies (killed, out of memory, ``os._exit``) is replaced
and its shards are recomputed; an exception raised by ``fn`` is re-raised in the caller.

Inside a Ray Tune trial the actors are captured by the trial's placement group, so the trial must
reserve them: ``tune.PlacementGroupFactory([trial_bundle] + actor_bundles(n, cpu, gpu))``. In a
plain driver (after ``ray.init``) they are scheduled like any actor. ``fn`` must be a module-level
function so that it pickles by reference.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

# shards queued on each actor at once: one running, one waiting, so an actor never idles on a round trip
IN_FLIGHT_PER_ACTOR = 2


def actor_bundles(n_actors: int, cpu: float, gpu: float) -> list[dict]:
    """One placement-group bundle per actor, matching what ``ActorPoolMap`` requests for it."""
    bundle = {"CPU": float(cpu)}
    if gpu:
        bundle["GPU"] = float(gpu)
    return [dict(bundle) for _ in range(n_actors)]


@ray.remote
class ShardWorker:
    """Runs ``fn(shared, shard)``; resolves each call's ``shared`` once and keeps it."""

    def __init__(self):
        self._key = None
        self._shared = None

    def run(self, box: list, fn: Callable, shard: Any) -> Any:
        # ``box`` wraps the ObjectRef so Ray does not resolve it per task
        ref = box[0]
        if ref.hex() != self._key:
            self._shared = None  # drop the previous call's object before loading the next
            self._shared = ray.get(ref)
            self._key = ref.hex()
        return fn(self._shared, shard)


class ActorPoolMap:
    """``map_shards`` on ``n_actors`` Ray actors of ``cpu_per_actor`` CPUs and ``gpu_per_actor`` GPUs.

    Parameters
    ----------
    n_actors : int
        Actors started (lazily, on the first call) and kept until ``close()``.
    cpu_per_actor, gpu_per_actor : float
        Logical resources of each actor; must match the bundles of ``actor_bundles``.
    max_actor_deaths : int, default=3
        Actor deaths tolerated within one call before it gives up (an ``fn`` that always
        kills its process would otherwise loop forever).
    """

    def __init__(self, n_actors: int, cpu_per_actor: float = 1.0, gpu_per_actor: float = 0.0, *,
                 max_actor_deaths: int = 3):
        if n_actors < 1:
            raise ValueError(f"n_actors must be an int >= 1; got {n_actors}")
        if cpu_per_actor < 0 or gpu_per_actor < 0 or cpu_per_actor + gpu_per_actor == 0:
            raise ValueError(f"an actor needs some CPU or GPU; got cpu={cpu_per_actor}, gpu={gpu_per_actor}")
        self.n_actors = n_actors
        self.cpu_per_actor = cpu_per_actor
        self.gpu_per_actor = gpu_per_actor
        self.max_actor_deaths = max_actor_deaths
        self.actors: list = []
        self.replacements = 0  # actors replaced so far, over every call

    def _new_actor(self):
        return ShardWorker.options(num_cpus=self.cpu_per_actor, num_gpus=self.gpu_per_actor,
                                   max_restarts=0, max_task_retries=0).remote()

    def __call__(self, fn: Callable, shared: Any, shards: Sequence) -> list:
        shards = list(shards)
        if not shards:
            return []
        if not ray.is_initialized():
            raise RuntimeError("ActorPoolMap needs a running Ray: call ray.init() first (or use serial_map)")
        while len(self.actors) < self.n_actors:
            self.actors.append(self._new_actor())
        box = [ray.put(shared)]
        results: list = [None] * len(shards)
        pending = deque(range(len(shards)))
        running: dict = {}  # ObjectRef -> (actor slot, shard position, actor handle)
        load = [0] * self.n_actors
        deaths = 0

        def fill(slot: int) -> None:
            while pending and load[slot] < IN_FLIGHT_PER_ACTOR:
                position = pending.popleft()
                actor = self.actors[slot]
                running[actor.run.remote(box, fn, shards[position])] = (slot, position, actor)
                load[slot] += 1

        for slot in range(self.n_actors):
            fill(slot)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            slot, position, actor = running.pop(ref)
            load[slot] -= 1
            try:
                results[position] = ray.get(ref)
            except RayTaskError as error:  # fn raised: a bug or bad input, not worth retrying
                raise error.as_instanceof_cause() from None
            except RayActorError as error:
                pending.appendleft(position)
                if self.actors[slot] is actor:  # first failure seen from this actor: replace it
                    deaths += 1
                    if deaths > self.max_actor_deaths:
                        raise RuntimeError(f"{deaths} shard actors died in one call (last: {error}); "
                                           f"giving up on shard {position}") from error
                    ray.kill(actor, no_restart=True)
                    self.actors[slot] = self._new_actor()
                    self.replacements += 1
            fill(slot)
        return results

    def close(self) -> None:
        """Kill the actors (a later call starts new ones)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> "ActorPoolMap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
