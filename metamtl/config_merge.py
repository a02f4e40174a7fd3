"""Merging config sections (plain dicts): a config file over the one it extends, overrides over a
config, a ``stages`` entry over the config's sections.  Below :mod:`metamtl.config`, which validates
the merged result, so that readers of saved configs (the reports) merge as the run did."""
from __future__ import annotations

from typing import Any, Mapping

#: what a stage may change (merged over the config's sections, key by key)
STAGE_KEYS = ("algorithm", "tasks", "train", "data", "model", "distill")


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: sections merge key by key, other values (lists too) are replaced.

    A section naming another registry entry (``algorithm: {name: protonet}`` over
    ``{name: maml, ...}``) replaces the base's section instead of merging into it.
    """
    out = dict(base)
    for k, v in top.items():
        old = out.get(k)
        same = isinstance(v, Mapping) and isinstance(old, dict) and v.get("name", old.get("name")) == old.get("name")
        out[k] = merge(old, v) if same else v
    return out


def stage_dict(base: Mapping[str, Any], stage: Mapping[str, Any]) -> dict[str, Any]:
    """The config (a dict) of one ``stages`` entry: its sections (:data:`STAGE_KEYS`; ``name`` and any
    other key left out) merged over ``base``'s, as :func:`metamtl.config.stage_configs` does before validating;
    ``distill: {}`` (or ``null``) turns the distillation off."""
    stage = {k: v for k, v in stage.items() if k in STAGE_KEYS}
    if "distill" in stage and stage["distill"] in (None, {}):  # explicitly off for this stage
        base, stage = {**base, "distill": {}}, {k: v for k, v in stage.items() if k != "distill"}
    return merge(dict(base), stage)


def evaluated_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config (a dict, e.g. a run's ``results["config"]``) whose learner a run evaluated: a staged
    run's last stage merged over its sections (its algorithm, tasks, data ...), else ``config``."""
    stages = config.get("stages")
    if not isinstance(stages, list) or not stages or not isinstance(stages[-1], Mapping):
        return dict(config)
    return stage_dict(config, stages[-1])
