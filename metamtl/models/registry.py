"""Models by name, for configs and saved learners: ``build_model("conv4", hidden=32)``.

Every built-in model is registered here, so the registry is the same whatever was imported first.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

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
