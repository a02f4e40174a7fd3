"""Models by name, for configs and saved learners: ``build_model("conv4", hidden=32)``.

Every built-in model is registered here, so the registry is the same whatever was imported first.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from ..errors import ConfigError, unknown_name, unknown_settings
from .backbones import TrunkHead, conv4_model, mlp_model
from .multidataset import multidataset_model
from .resnet import resnet12_model

MODELS: dict[str, Callable[..., TrunkHead]] = {
    "conv4": conv4_model, "resnet12": resnet12_model, "mlp": mlp_model, "multidataset": multidataset_model,
}

#: Settings a model takes from the training data when its config leaves them out, by model name:
#: ``inputs`` (``{dataset: [channels, height, width]}`` of the training datasets).  Declared, not
#: guessed from the signature (as algorithms declare theirs in ``Algorithm.from_data``).
MODEL_FROM_DATA: dict[str, tuple[str, ...]] = {"multidataset": ("inputs",)}


#: Settings given once or per block, by model: what counts the blocks (a setting's name, or their
#: fixed number) and the settings that take one value or a list of one per block.
MODEL_PER_BLOCK: dict[str, tuple[str | int, tuple[str, ...]]] = {
    "conv4": ("blocks", ("hidden", "pool")), "resnet12": (4, ("widths",)),
    "multidataset": ("blocks", ("hidden",)),  # its hidden: the widths of a Conv4 of ``blocks`` blocks
}


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, in lists and mappings too (as YAML and checkpoints hold them)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def normalized_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model config (``{"name": ..., **settings}``) in one spelling per architecture, to compare
    two: every default filled in, tuples as lists, and a per-block setting that is the same for
    every block as that one value (conv4 ``hidden: [64, 64, 64, 64]`` with 4 blocks is
    ``hidden: 64``).  A config that is not one of a registered model's is returned as it is."""
    settings = dict(config)
    name = settings.pop("name", None)
    if not isinstance(name, str) or name not in MODELS:
        return dict(config)
    try:
        bound = inspect.signature(MODELS[name]).bind(**settings)
    except TypeError:
        return dict(config)
    bound.apply_defaults()
    out = {key: _plain(value) for key, value in bound.arguments.items()}
    count, keys = MODEL_PER_BLOCK.get(name, (0, ()))
    blocks = out.get(count) if isinstance(count, str) else count
    for key in keys:
        value = out.get(key)
        if isinstance(value, list) and value and len(value) == blocks and all(
                v == value[0] and type(v) is type(value[0]) for v in value):
            out[key] = value[0]
    return {"name": name, **out}


def check_model_config(name: Any, kwargs: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for an unknown model name or setting (nothing is built)."""
    if not isinstance(name, str) or name not in MODELS:
        raise unknown_name("model", name, MODELS)
    error = unknown_settings(f"model {name!r}", kwargs, inspect.signature(MODELS[name]).parameters)
    if error is not None:
        raise error


def build_model(name: str = "conv4", **kwargs: Any) -> TrunkHead:
    """Build a registered model from its config; the config is kept in ``model.config``."""
    check_model_config(name, kwargs)
    out = kwargs.get("out_features")
    if out is not None and (isinstance(out, bool) or not isinstance(out, int) or out < 1):
        raise ConfigError(f"model {name!r}: out_features must be an integer >= 1 (the number of ways) or None, got {out!r}")
    try:
        model = MODELS[name](**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"bad settings for model {name!r} {kwargs}: {exc}") from None
    model.config = {"name": name, **kwargs}
    return model
