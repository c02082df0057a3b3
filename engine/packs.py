"""Packed trials (``resources.pack: k``): up to k pending trials that share dataset, model and training
schedule run as ONE Ray trial, whose models train together (``poisonsweep.tasks.packed.run_pack``).

Each member is still its own trial: its own ``trial_id``, its own rows written by
``poisonsweep.engine.record.write.write_record`` exactly as a solo run writes them (plus ``pack_size`` and
``pack_note``), its own resume state (a pack is planned from the pending trials only, so a rerun
packs just the ones still missing). Which trials may share a pack is ``poisonsweep.tasks.packed.pack_key``'s
to say, here when the packs are planned as in the trial process when they train.
"""

from __future__ import annotations

import math

from poisonsweep.engine.record.row import now
from poisonsweep.engine.record.write import write_record

# torch (through poisonsweep.tasks.packed) is imported inside the functions: a trial process imports this
# module at its start (``poisonsweep.engine.worker``)

ALONE = "no other pending trial shares its data, model and training schedule"


def plan_packs(trials: list[dict], size: int) -> list[list[dict]]:
    """Group ``trials`` (in order) by ``pack_key`` and cut each group into packs of at most ``size``
    members, as even as possible (9 trials, size 8: 5 + 4, not 8 + 1)."""
    from poisonsweep.tasks.packed import group_by_pack_key

    packs = []
    for group in group_by_pack_key(trials).values():
        count = math.ceil(len(group) / size)
        cuts = [round(i * len(group) / count) for i in range(count + 1)]
        packs += [group[start:stop] for start, stop in zip(cuts, cuts[1:])]
    return packs


def record_pack(configs: list[dict], out: str, *, map_shards=None, version: str = "",
                artifact_dir: str | None = None, plugins: list[dict] = ()) -> list[dict]:
    """Run ``configs`` as one pack and write each member's rows under its own ``trial_id``; returns
    the members' ``trials`` rows. A member that fails is recorded as failed; the others go on."""
    from poisonsweep.tasks.detect.base import serial_map
    from poisonsweep.tasks.packed import run_pack

    started = now()
    try:
        outcomes = run_pack(configs, map_shards=map_shards or serial_map, artifact_dir=artifact_dir)
    except Exception as error:  # a failure of the pack itself: every member records it
        outcomes = [error] * len(configs)
    alone = ALONE if len(configs) == 1 else None
    return [write_record(config, out, outcome, started=started, version=version, plugins=plugins, pack_note=alone)
            for config, outcome in zip(configs, outcomes)]
