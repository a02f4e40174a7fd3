"""Ensembles: several trained learners answer together by averaging their class probabilities.

Learners trained independently (other seeds, settings or algorithms) err on different queries, so
the mean of their predicted probabilities is right more often than any one of them.  With a fixed
CPU budget an ensemble is a trade: each member gets a share of it (e.g. one core each, side by
side), so it pays where one model has stopped improving with more iterations: on Omniglot two
two-stage learners trained with one thread each reached +0.13 / +0.85 points (5-way / 20-way
1-shot) over one learner trained on both threads for the same 10 minutes (benchmarks/RESULTS.md).

:class:`Ensemble` has the surfaces of a :class:`~metamtl.MetaLearner` that use a trained model:
``predict``, ``adapt``, ``evaluate``, ``save`` and ``load``; ``metamtl evaluate A.pt B.pt ...``
evaluates one from the command line.  Every member adapts to the support set its own way (its
algorithm, inner steps, head, preprocessing and device, as saved with it); an ensemble of
inductive members is inductive.  For regression learners the members' predictions are averaged.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .checkpoint import FORMAT, FORMAT_VERSION, atomic_save, safe_load
from .errors import CheckpointError, ConfigError, InputError, TaskError, TrainingError
from .evaluation import EvalResult, episode_reader, hierarchy_of, summarize
from .heads import check_no_steps, head_name
from .heads.base import full_precision
from .inputs import check_steps, with_support_copies
from .learner import MetaLearner
from .predictors import learner_datasets
from .progress_bars import progress_bar
from .tasks.episode import Episode
from .tasks.sampler import TaskSource
from .version import __version__


class Ensemble:
    """Several trained learners whose predictions are averaged.

    Args:
        members: :class:`~metamtl.MetaLearner` objects or paths of saved ones (at least one; all
            classification learners or all regression learners).
        device: where members loaded from paths live (``"auto"``: a GPU when there is one).

    Example::

        ens = Ensemble(["runs/seed0/learner.pt", "runs/seed1/learner.pt"])
        print(ens.evaluate(EpisodeSampler(test, 5, 1, 15, seed=2), episodes=600))
        log_probs = ens.predict(support_images, support_labels, query_images)
    """

    def __init__(self, members: Sequence[MetaLearner | str | Path], device: Any = "auto",
                 labels: Sequence[str] | None = None) -> None:
        if isinstance(members, (str, Path, MetaLearner)) or not isinstance(members, Sequence):
            raise ConfigError("Ensemble takes a list of learners or checkpoint paths, e.g. "
                              "Ensemble(['a/learner.pt', 'b/learner.pt'])")
        if not members:
            raise ConfigError("an ensemble needs at least one learner")
        loaded = []
        for m in members:
            if isinstance(m, MetaLearner):
                loaded.append(m)
            elif isinstance(m, (str, Path)):
                loaded.append(MetaLearner.load(m, device=device))
            else:
                raise ConfigError(f"ensemble members are MetaLearner objects or checkpoint paths, got {type(m).__name__}")
        tasks = {m.task for m in loaded}
        if len(tasks) > 1:
            raise ConfigError(f"ensemble members must all solve one kind of task, got {sorted(tasks)}")
        self.members: list[MetaLearner] = loaded
        #: how errors name each member: ``labels``, else its path, else ``member i``
        self.labels = list(labels) if labels is not None else [
            str(m) if isinstance(m, (str, Path)) else f"member {i}" for i, m in enumerate(members)]
        if len(self.labels) != len(loaded):
            raise ConfigError(f"an ensemble of {len(loaded)} members needs as many labels, got {len(self.labels)}")

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``, as every member."""
        return self.members[0].task

    @property
    def averages(self) -> str:
        """What the ensemble averages, for messages: ``"class probabilities"`` or ``"predictions"``."""
        return "class probabilities" if self.task == "classification" else "predictions"

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return f"Ensemble({len(self)} members: " + ", ".join(
            f"{m.algorithm.name}/{m.model.config.get('name', '?')}" for m in self.members) + ")"

    # -- using the ensemble ------------------------------------------------------------------
    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ensemble's output from its members' outputs for the same queries: for classification
        the log of the mean of the members' softmax probabilities (so ``argmax`` is the predicted
        class and ``exp`` gives probabilities), for regression the mean prediction."""
        outs = [full_precision(o.detach()).cpu() for o in outputs]  # float64 members: float64
        if len({o.dtype for o in outs}) > 1:
            outs = [o.double() for o in outs]
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) > 1:
            raise InputError(f"ensemble members gave outputs of different shapes {sorted(shapes)} for the same "
                             "queries (members trained for other numbers of classes?)")
        stacked = torch.stack(outs)
        if self.task != "classification":
            return stacked.mean(0)
        return torch.logsumexp(stacked.log_softmax(-1), 0) - math.log(len(outs))

    def predict(self, support_x: Any, support_y: Any, query_x: Any, steps: int | None = None,
                support_augment: Any = None, head: Any = None, dataset: str | None = None) -> torch.Tensor:
        """Log mean class probabilities (classification) or mean predictions (regression) for
        ``query_x``, every member adapted to ``(support_x, support_y)`` as in
        :meth:`MetaLearner.predict <metamtl.MetaLearner.predict>` (``steps``, ``support_augment``,
        ``head`` and ``dataset`` apply to every member; ``None``: each member's own default). On the CPU."""
        steps_of = self.member_steps(head, steps)
        return self.combine(self.each(lambda m: m.predict(support_x, support_y, query_x, steps_of[id(m)],
                                                          support_augment, head, dataset)))

    def adapt(self, support_x: Any, support_y: Any, steps: int | None = None, support_augment: Any = None,
              head: Any = None, dataset: str | None = None) -> "AdaptedEnsemble":
        """Every member adapted to a support set; the result maps query inputs to the ensemble's
        output (see :meth:`predict`), so one support set serves many query batches."""
        steps_of = self.member_steps(head, steps)
        return AdaptedEnsemble(self, self.each(lambda m: m.adapt(support_x, support_y, steps_of[id(m)],
                                                                 support_augment, head, dataset)))

    def each(self, call: Any) -> list[Any]:
        """``call(member)`` for every member, in order; an error it raises names the member."""
        out = []
        for m, label in zip(self.members, self.labels):
            with naming_member(label):
                out.append(call(m))
        return out

    def heads(self, head: Any = None) -> list[Any]:
        """Each member's classifier for ``head`` (``None``: its algorithm's adaptation);
        :class:`ConfigError` when they mix inductive and transductive heads."""
        heads = [m.inference.classifier(head) for m in self.members]
        if len({h is not None and h.transductive for h in heads}) > 1:
            raise ConfigError("ensemble members mix inductive and transductive heads; use one kind for all of them "
                              "(e.g. head='algorithm', or one head name passed as head=)")
        return heads

    def member_steps(self, head: Any, steps: int | None, heads: list[Any] | None = None) -> dict[int, int | None]:
        """Each member's inner steps for a call with ``head`` and ``steps`` (keyed by ``id``): ``steps``
        where it adapts with its algorithm, none where it classifies with a feature head (which takes
        none); :class:`ConfigError` when every member does, or they mix inductive and transductive heads.
        ``heads``: :meth:`heads` of ``head`` when the caller has them."""
        heads = self.heads(head) if heads is None else heads
        check_no_steps(steps, heads)
        inner = [h is None and m.algorithm.has_inner_loop for m, h in zip(self.members, heads)]
        if steps and not any(inner):
            raise ConfigError(f"steps={steps}: no member adapts with an inner loop (their algorithms "
                              f"{sorted({m.algorithm.name for m in self.members})} take 0 steps): leave steps out")
        return {id(m): steps if adapts else None for m, adapts in zip(self.members, inner)}

    def evaluate(self, tasks: TaskSource | Sequence[Episode], episodes: int = 600, *, ways: int | None = None,
                 shots: int | None = None, queries: int | None = None, steps: int | None = None, start: int = 0,
                 progress: bool = True, support_augment: Any = None, head: Any = None) -> EvalResult:
        """Mean query accuracy of the ensemble over ``episodes`` fixed episodes, with a 95% CI:
        the same episodes, arguments and result as :meth:`MetaLearner.evaluate
        <metamtl.MetaLearner.evaluate>` (the loss is the ensemble's negative log-likelihood, or
        its mean squared error for regression).  Episode ``i``'s test-time support copies are the
        ones a member alone would draw for it.  ``result.steps``: ``steps`` (when a member adapting
        with its algorithm has an inner loop) or the first member's default.  One process (not split
        across torchrun ranks)."""
        check_steps(steps)
        episode_at, n = episode_reader(tasks, episodes, ways=ways, shots=shots, queries=queries, start=start)
        heads = self.heads(head)
        steps_of = self.member_steps(head, steps, heads)  # steps for members with an inner loop
        self.each(lambda m: m.check_finite("evaluate"))
        rows = []
        bar = progress_bar(progress, total=n, desc="evaluate ensemble", leave=False, dynamic_ncols=True)
        try:
            for i in range(n):
                episode = episode_at(i)
                outputs = []
                for m, h, label in zip(self.members, heads, self.labels):
                    with naming_member(label):
                        m.check_episode(episode, "evaluate")
                        ep = with_support_copies(m.placement.batch(episode), m.inference.augment(support_augment, m.task))
                        outputs.append(m.predict(ep.support_x, ep.support_y, ep.query_x, steps_of[id(m)],
                                                 False, h if h is not None else "algorithm", member_dataset(m, episode)))
                rows.append((self.metrics(self.combine(outputs), episode.query_y),
                             (episode.ways, episode.shots, episode.queries)))
                bar.update(1)
        finally:
            bar.close()
        stepped = any(v is not None for v in steps_of.values())  # steps given, and a member adapts with them
        used = 0 if all(h is not None for h in heads) else steps if stepped else self.members[0].algorithm.eval_steps
        names = {head_name(h) for h in heads}
        return summarize(rows, used, hierarchy=hierarchy_of(tasks),
                         head=names.pop() if len(names) == 1 else "+".join(sorted(names)),
                         transductive=bool(heads[0] is not None and heads[0].transductive))

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Query loss (and accuracy) of the ensemble's combined output."""
        target = target.cpu()
        if self.task != "classification":
            return {"loss": float(F.mse_loss(output, target.to(output.dtype).view_as(output)))}
        target = target.long()
        return {"loss": float(F.nll_loss(output, target)),
                "accuracy": float((output.argmax(-1) == target).float().mean())}

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write every member (weights and settings, no training state) to one file, atomically."""
        return atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, "metamtl_version": __version__,
                            "ensemble": [m.state() for m in self.members]}, path)

    @classmethod
    def load(cls, path: str | Path, device: Any = "auto") -> "Ensemble":
        """Rebuild an ensemble written by :meth:`save`."""
        obj = safe_load(path)
        if "ensemble" not in obj:
            raise CheckpointError(f"{path} holds one learner, not an ensemble: load it with MetaLearner.load, "
                                  "or build Ensemble([...paths...])")
        return cls(_learners_in(obj, path, device)[0])


@contextlib.contextmanager
def naming_member(label: str) -> Iterator[None]:
    """An input, task, config or training error raised in the block names the ensemble member
    ``label`` (e.g. which member's fixed-size head cannot serve the episode's ways, or whose weights
    are not finite)."""
    try:
        yield
    except (InputError, TaskError, ConfigError, TrainingError) as exc:
        raise type(exc)(f"ensemble member {label}: {exc}") from exc


def member_dataset(member: MetaLearner, episode: Episode) -> str | None:
    """The ``dataset=`` of ``member``'s prediction for an evaluated ``episode``: its dataset, unless the
    member was trained on several others (``None``: inputs routed by their shape, as
    :meth:`MetaLearner.evaluate <metamtl.MetaLearner.evaluate>` does for a test set of another name)."""
    known = learner_datasets(member)
    return None if known and episode.dataset not in known else episode.dataset


def load_members(paths: Sequence[str | Path], device: Any = "auto") -> tuple[list[MetaLearner], list[str]]:
    """The learners saved in ``paths`` (learner files, and ensemble files expanded into their
    members) and a label for each (``path`` or ``path[i]``): what ``metamtl evaluate`` combines."""
    learners, labels = [], []
    for path in paths:
        found, names = _learners_in(safe_load(path), path, device)
        learners += found
        labels += names
    return learners, labels


def _learners_in(obj: dict[str, Any], path: str | Path, device: Any) -> tuple[list[MetaLearner], list[str]]:
    """The learner of a learner file, or every member of an ensemble file, with their labels."""
    from . import run_state

    states = obj.get("ensemble")
    if states is None:
        return [run_state.learner_from_state(MetaLearner, obj, path, device=device)], [str(path)]
    if not isinstance(states, list) or not states:
        raise CheckpointError(f"{path}: the ensemble entry holds no learners (corrupt file?)")
    return ([run_state.learner_from_state(MetaLearner, m, f"{path} (member {i})", device=device)
             for i, m in enumerate(states)], [f"{path}[{i}]" for i in range(len(states))])


class AdaptedEnsemble:
    """Every member of an :class:`Ensemble` adapted to one support set (see :meth:`Ensemble.adapt`)."""

    def __init__(self, ensemble: Ensemble, predictors: list[Any]) -> None:
        self.ensemble, self.predictors = ensemble, predictors
        #: the members classify queries together (one kind of head for all members, checked)
        self.transductive = any(getattr(p, "transductive", False) for p in predictors)

    def __call__(self, query_x: Any) -> torch.Tensor:
        """The ensemble's output for ``query_x`` (log mean probabilities, or mean predictions)."""
        return self.ensemble.combine([p(query_x) for p in self.predictors])

    def predict(self, query_x: Any) -> torch.Tensor:
        """Predicted labels ``0..ways-1`` (classification) or values (regression)."""
        out = self(query_x)
        return out.argmax(-1) if self.ensemble.task == "classification" else out
