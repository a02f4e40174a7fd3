"""Feature-space heads: classify a task's queries from frozen trunk features.

A :class:`FeatureHead` replaces the algorithm's own adaptation at evaluation and prediction time
(:meth:`MetaLearner.evaluate(..., head=...) <metamtl.MetaLearner.evaluate>`, ``adapt``,
``predict``; config ``eval.heads``).  The trunk computes support and query features (query
BatchNorm statistics as the algorithm's ``bn_stats`` says), with no gradient, and the head turns
them into logits over the task's ``ways`` classes.

Inductive heads (each query is classified on its own; the default kind):

=================  ===========================================================================
``simpleshot``     nearest class mean of centred + L2-normalised features (SimpleShot, Wang et
                   al. 2019); the centring mean is the training split's mean feature
``logreg``         multinomial logistic regression fitted on the (augmented) support features
                   (RFS evaluation, Tian et al. 2020)
=================  ===========================================================================

Transductive heads (they use the whole query set of a task; ``transductive = True``, and
results say so: never compare them with inductive rows):

=================  ===========================================================================
``bdcspn``         BD-CSPN prototype rectification (Liu et al. 2020)
``laplacianshot``  LaplacianShot (Ziko et al. 2020): rectified prototypes + Laplacian-regularised
                   soft assignments over a kNN graph of the queries
``softkmeans``     soft k-means refinement of the prototypes with the queries (Ren et al. 2018);
                   ``balanced: true`` (or ``sinkhorn``) makes assignments class-balanced with
                   Sinkhorn iterations (as PT-MAP, Hu et al. 2020)
=================  ===========================================================================

``build_head(spec)`` takes a name, a mapping ``{name: ..., **settings}`` or a head; ``"algorithm"``
(or ``None``) means the algorithm's own adaptation.

Heads of your own subclass :class:`FeatureHead` (a ``name``, settings as dataclass fields,
``classify``).  Any head can be passed to one ``evaluate``/``adapt``/``predict`` call; to be a
learner's saved default (``MetaLearner(head=...)``) or to be named in configs, register it in
:data:`HEADS` (``HEADS["cosine"] = Cosine``, also in the program that loads the learner): a saved
learner names its head, and ``load`` rebuilds it from the registry.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError, did_you_mean
from .base import ALGORITHM, FeatureHead, episode_metrics, query_features, transform
from .inductive import LogisticRegression, NearestCentroid
from .transductive import BDCSPN, LaplacianShot, Sinkhorn, SoftKMeans

HEADS: dict[str, type[FeatureHead]] = {
    cls.name: cls for cls in (NearestCentroid, LogisticRegression, BDCSPN, LaplacianShot, SoftKMeans, Sinkhorn)
}


def build_head(spec: Any) -> FeatureHead | None:
    """A head from a name, ``{name: ..., **settings}`` or a :class:`FeatureHead`; ``None`` and
    ``"algorithm"`` mean the algorithm's own adaptation (returned as ``None``)."""
    if spec is None or spec == ALGORITHM:
        return None
    if isinstance(spec, FeatureHead):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"a head is a name ({', '.join([ALGORITHM, *HEADS])}) or a mapping with a 'name'; got {spec!r}")
    settings = dict(spec)
    name = settings.pop("name")
    if name == ALGORITHM:
        if settings:
            raise ConfigError(f"the 'algorithm' head takes no settings, got {sorted(settings)}")
        return None
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}.{did_you_mean(name, [ALGORITHM, *HEADS])} "
                          f"Valid heads: {', '.join([ALGORITHM, *HEADS])}.")
    return HEADS[name].from_settings(settings)


def registered(head: FeatureHead | None) -> FeatureHead | None:
    """``head``, refused with a :class:`ConfigError` unless :data:`HEADS` rebuilds it from its name (a
    saved learner names its head: ``load`` could not rebuild it)."""
    if head is None or HEADS.get(head.name) is type(head):
        return head
    kind = type(head).__name__
    taken = f"; the name {head.name!r} is {HEADS[head.name].__name__}'s: give yours its own" if head.name in HEADS else ""
    raise ConfigError(
        f"head {kind} ({head.name!r}) is not registered, so a saved learner could not be loaded with it{taken}: "
        f"register it first: metamtl.heads.HEADS[{head.name!r}] = {kind} (also before loading), or pass it to "
        "each evaluate/adapt/predict call (head=...) instead of making it the learner's default")


def check_no_steps(steps: int | None, heads: list[FeatureHead | None], option: str = "steps") -> None:
    """:class:`ConfigError` when inner ``steps`` are given and every one of ``heads`` (a call's, or an
    ensemble's members') is a feature head, which takes none: they would be silently ignored
    (``steps=0`` is what such a head takes, so it is accepted)."""
    if steps is not None and steps != 0 and heads and all(h is not None for h in heads):
        flag = "--head algorithm" if option.startswith("--") else "head='algorithm'"
        raise ConfigError(
            f"{option}: feature head {head_name(heads[0])} takes no inner steps (it classifies the trunk's features; "
            f"its results take 0 steps): evaluate without {option}, or with {flag} to adapt with {steps} inner steps")


def head_name(head: FeatureHead | None) -> str:
    """What a result row calls ``head``: ``"algorithm"``, a head's name, or its name with the settings
    that differ from the defaults (:attr:`FeatureHead.label`)."""
    return ALGORITHM if head is None else head.label


__all__ = ["ALGORITHM", "BDCSPN", "FeatureHead", "HEADS", "LaplacianShot", "LogisticRegression", "NearestCentroid",
           "Sinkhorn", "SoftKMeans", "build_head", "check_no_steps", "episode_metrics", "head_name", "query_features", "registered",
           "transform"]
