"""Checks that need the data loaded, shared by ``config.check_data``: which trials share one load, and
whether each distinct model can take its data's images."""

from __future__ import annotations

import json


def source_key(data: dict) -> str:
    """What tells one dataset of a sweep from another (its subsets are cut from the same load)."""
    return json.dumps([data["name"], data["root"], data.get("params")], sort_keys=True)


def model_errors(trials: list[dict], loaded: dict) -> list[str]:
    """Build each distinct model once for its data's image shape and classes, so that a model that cannot
    take them (images too small for ``keras_cnn``, a torchvision model that needs 224 px or has no linear
    head) is refused before any trial, not in every one."""
    from poisonsweep.tasks.models import build_model

    errors, built = [], set()
    for trial in trials:
        full, model = loaded.get(source_key(trial["data"])), trial["model"]
        key = json.dumps([model, None if full is None else full.in_shape, getattr(full, "num_classes", None)],
                         sort_keys=True, default=str)
        if full is None or key in built:
            continue
        built.add(key)
        try:
            build_model(model["name"], full.in_shape, full.num_classes, model["params"])
        except (ValueError, RuntimeError, TypeError) as error:  # ConfigError is a ValueError
            shape = "x".join(map(str, full.in_shape))
            errors.append(f"model.name {model['name']!r} on {trial['data']['name']} ({shape} images): "
                          f"{str(error).splitlines()[0]}")
    return errors
