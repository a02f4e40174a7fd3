"""A model whose weights are not finite never reports an accuracy: it raises, naming the step.

NaN weights give NaN logits, whose argmax is class 0: such a model used to evaluate to exactly
1/ways ("50.00% ± 0.00%" for 2 ways).  Each way weights go wrong is produced for real here: weights
poisoned after training (or in a loaded checkpoint), a meta-optimizer step that overflows, a
diverging inner loop at evaluation, and a diverging forward pass that poisons BatchNorm running
statistics during a step that is then skipped.
"""
from __future__ import annotations

import math

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.checkpoint import safe_load
from metamtl.cli import main
from metamtl.errors import TrainingError
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler

from .conftest import tiny_learner, toy_dataset

pytestmark = pytest.mark.reliability("fault")


@pytest.fixture
def tasks():
    return EpisodeSampler(toy_dataset(), 2, 1, 2, seed=0)


def poison(learner: MetaLearner) -> None:
    with torch.no_grad():
        learner.model.trunk.blocks[0][0].weight[0, 0, 0, 0] = math.nan


def test_nan_weights_raise_on_evaluate_adapt_and_predict_instead_of_reporting_chance(tasks):
    learner = tiny_learner("proto")
    learner.fit(tasks, iterations=2, meta_batch_size=1, progress=False)
    poison(learner)
    with pytest.raises(TrainingError, match=r"evaluate: the model's weights are not finite \(model.trunk.blocks.0.0.weight "
                                            r"\(1 of \d+ values\); 1 tensor\(s\).*before evaluate started: training "
                                            r"\(this learner is at iteration 2\) or the checkpoint"):
        learner.evaluate(tasks, 4, progress=False)
    ep = tasks.episode(0)
    with pytest.raises(TrainingError, match="adapt: the model's weights are not finite"):
        learner.adapt(ep.support_x, ep.support_y)
    with pytest.raises(TrainingError, match="adapt: the model's weights are not finite"):
        learner.predict(ep.support_x, ep.support_y, ep.query_x)


def test_fit_on_nan_weights_is_refused_before_training(tasks, tmp_path):
    """fit trained on NaN weights: a short fit returned normally with NaN weights, a longer one
    blamed the meta-gradients and claimed to keep 'the last good parameters'."""
    learner = tiny_learner("proto")
    poison(learner)
    with pytest.raises(TrainingError, match=r"fit: the model's weights are not finite \(model.trunk.blocks.0.0.weight "
                                            r"\(1 of \d+ values\).*before fit started"):
        learner.fit(tasks, iterations=2, meta_batch_size=1, progress=False, checkpoint_dir=tmp_path)
    assert learner.iteration == 0 and not (tmp_path / "last.pt").exists()


def test_metamtl_evaluate_of_a_checkpoint_with_nan_weights_exits_2(tmp_path, capsys):
    from .conftest import sinusoid_config
    from metamtl.config import config_from_dict
    from metamtl.experiment import run

    cfg = config_from_dict(sinusoid_config(tmp_path, **{"train.iterations": 3}))
    path = run(cfg, progress=False, quiet=True)["checkpoint"]
    obj = safe_load(path)
    name = next(k for k in obj["model_state"] if k.endswith("weight"))
    obj["model_state"][name].view(-1)[0] = math.inf
    torch.save(obj, path)
    assert main(["evaluate", path, "--episodes", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"evaluate: the model's weights are not finite (model.{name} (1 of" in err and "MSE" not in err


def test_an_overflowing_meta_step_stops_training_naming_the_iteration_and_keeps_last_pt_finite(tasks, tmp_path):
    learner = tiny_learner("proto", meta_optimizer="sgd", meta_lr=1.0)
    learner.fit(tasks, iterations=2, meta_batch_size=1, progress=False, checkpoint_dir=tmp_path)
    for group in learner.meta_optimizer.param_groups:
        group["lr"] = 1e38  # finite gradients, an update beyond float32
    with pytest.raises(TrainingError, match=r"iteration 3: the model's weights are not finite .*the meta-optimizer step "
                                            r"made them so") as info:
        learner.fit(tasks, iterations=3, meta_batch_size=1, progress=False, checkpoint_dir=tmp_path)
    assert any("keeps the last finite weights" in note for note in getattr(info.value, "__notes__", []))
    saved = safe_load(tmp_path / "last.pt")
    assert saved["iteration"] == 2 and all(torch.isfinite(t).all() for t in saved["model_state"].values())
    with pytest.raises(TrainingError, match="evaluate: the model's weights are not finite"):
        learner.evaluate(tasks, 2, progress=False)


class NoNotesError(TrainingError):
    """A TrainingError as Python 3.10 has it: no ``add_note`` (PEP 678 came with 3.11)."""

    @property
    def add_note(self):
        raise AttributeError("add_note")


def test_non_finite_weights_at_a_failed_fit_release_the_run_folder_without_add_note(tasks, tmp_path):
    """Regression: ModelCheckpoint.on_exception called exc.add_note unguarded in the non-finite-weights branch:
    on Python 3.10 the TrainingError became an AttributeError and the run folder stayed locked."""
    from types import SimpleNamespace

    from metamtl.callbacks import ModelCheckpoint

    learner = tiny_learner("proto")
    poison(learner)
    checkpoint = ModelCheckpoint(tmp_path)
    checkpoint._lock.acquire()
    checkpoint.on_exception(SimpleNamespace(is_main_process=True, learner=learner), NoNotesError("overflow"))
    assert not checkpoint._lock.held and not (tmp_path / ".metamtl.lock").exists()


def test_a_diverging_inner_loop_at_evaluation_names_the_episode_and_steps(tasks):
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=2)
    learner = MetaLearner(model, build_algorithm("maml", steps=3, lr=1e30, first_order=True),
                          preprocessing=toy_dataset().preprocessing, device="cpu")
    with pytest.raises(TrainingError, match=r"evaluate: episode 0: the query loss is nan after adapting with 3 inner "
                                            r"step\(s\) from finite weights: the adaptation diverged"):
        learner.evaluate(tasks, 4, progress=False)


def test_a_diverging_adaptation_in_predict_raises_instead_of_returning_nan_predictions(tasks):
    """evaluate of an episode whose adaptation diverges raises; predict on the same support set returned
    NaN logits (argmax: class 0 for every query) or NaN regression values."""
    from metamtl.tasks import Sinusoid

    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=2)
    learner = MetaLearner(model, build_algorithm("maml", steps=3, lr=1e30, first_order=True),
                          preprocessing=toy_dataset().preprocessing, device="cpu")
    ep = tasks.episode(0)
    with pytest.raises(TrainingError, match=r"predict: the query outputs are not finite after adapting with 3 inner "
                                            r"step\(s\) from finite weights: the adaptation diverged"):
        learner.predict(ep.support_x, ep.support_y, ep.query_x)
    with pytest.raises(TrainingError, match="the adaptation diverged"):
        learner.adapt(ep.support_x, ep.support_y).predict(ep.query_x)
    assert torch.isfinite(learner.predict(ep.support_x, ep.support_y, ep.query_x, steps=0)).all()
    sine = MetaLearner(build_model("mlp", in_features=1, hidden=[8], out_features=1),
                       build_algorithm("maml", steps=5, lr=1e8), task="regression", device="cpu")
    e = Sinusoid(shots=5, queries=5, seed=0).episode(0)
    with pytest.raises(TrainingError, match="after adapting with 5 inner step"):
        sine.predict(e.support_x, e.support_y, e.query_x)


def test_a_skipped_step_leaves_batchnorm_running_statistics_finite(tasks):
    """MAML++ per-step BatchNorm updates running statistics in the forward pass: a diverging
    inner loop wrote NaN into them although the step itself was skipped."""
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=2)
    algorithm = build_algorithm("mamlpp", steps=2, lr=1e30, per_step_bn=True, first_order_iterations=10)
    learner = MetaLearner(model, algorithm, preprocessing=toy_dataset().preprocessing, device="cpu", max_bad_steps=3)
    with pytest.warns(RuntimeWarning, match="step skipped"), pytest.raises(TrainingError, match="3 consecutive non-finite"):
        learner.fit(tasks, iterations=8, meta_batch_size=1, progress=False)
    buffers = {k: v for k, v in learner.algorithm.state_dict().items() if "running" in k}
    assert buffers and all(torch.isfinite(v).all() for v in buffers.values())
    # the weights are finite, so evaluation gets as far as the diverging adaptation and says so
    with pytest.raises(TrainingError, match="evaluate: episode 0: the query loss is nan after adapting with 2 inner"):
        learner.evaluate(tasks, 2, progress=False)
