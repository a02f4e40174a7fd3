"""Content fingerprints of task sources: what a resumed run must train and validate on again.

A source's ``repr`` (:func:`~metamtl.tasks.sampler.source_fingerprint`, the ``train_tasks`` key
every checkpoint holds) names its settings, not its data: two splits of a dataset with the same
name and number of classes look alike, and a :class:`~metamtl.tasks.sampler.MixedTasks` names only
its sources and weights.  :func:`tasks_fingerprint` adds what tells them apart: the classes and a
digest of the images of an :class:`~metamtl.tasks.sampler.EpisodeSampler`'s dataset and its
hierarchy mapping, a mixture's seed, weights and every source's own fingerprint.  It reads public
attributes only, so any source shaped like these is fingerprinted the same way.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from ..data.base import ClassDataset
from .sampler import source_fingerprint


def tasks_fingerprint(source: Any) -> Any:
    """What identifies ``source``'s episodes across processes: plain values only (a string, or a
    mapping for a mixture, so a resume refused for a changed source names it), never a memory address.

    * a mixture (``sources`` and ``probs``, e.g. :class:`~metamtl.tasks.sampler.MixedTasks`):
      ``{"seed", "weights": {name: probability}, "sources": {name: fingerprint}}``;
    * a source drawing from a :class:`~metamtl.data.ClassDataset` (``dataset``): its ``repr`` and
      :func:`dataset_digest` of that dataset (and of its ``hierarchy`` mapping);
    * anything else: :func:`~metamtl.tasks.sampler.source_fingerprint` (its ``repr``, which for
      metamtl's other sources, e.g. ``Sinusoid``, names everything its episodes depend on).
    """
    sources, probs = getattr(source, "sources", None), getattr(source, "probs", None)
    if isinstance(sources, (list, tuple)) and isinstance(probs, (list, tuple)):
        return {"seed": getattr(source, "seed", None),
                "weights": {str(s.name): float(p) for s, p in zip(sources, probs)},
                "sources": {str(s.name): tasks_fingerprint(s) for s in sources}}
    dataset = getattr(source, "dataset", None)
    if isinstance(dataset, ClassDataset):
        return f"{source_fingerprint(source)}, data={dataset_digest(dataset, getattr(source, 'hierarchy', None))}"
    return source_fingerprint(source)


def dataset_digest(dataset: ClassDataset, hierarchy: Any = None) -> str:
    """``"<classes> classes, <examples> examples, sha256:<16 hex digits>"``: a digest of the class
    names, the examples per class, the images' shape and dtype, the first and last image of every
    class (another split, image size or dataset differs there; reading every image would cost
    seconds on large datasets) and a ``{class name: superclass}`` ``hierarchy``."""
    counts = dataset.class_counts
    h = hashlib.sha256(json.dumps([dataset.class_names, counts.tolist(), list(dataset.images.shape),
                                   str(dataset.images.dtype)]).encode())
    filled = counts > 0
    first = dataset.class_offsets[filled]
    for rows in (first, first + counts[filled] - 1):
        h.update(dataset.images[rows].detach().cpu().contiguous().numpy().tobytes())
    if isinstance(hierarchy, dict):
        h.update(json.dumps(sorted((str(k), str(v)) for k, v in hierarchy.items())).encode())
    return f"{len(dataset.class_names)} classes, {int(counts.sum())} examples, sha256:{h.hexdigest()[:16]}"
