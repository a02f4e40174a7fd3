"""The run state: what a checkpoint holds, the four RNG states, resume and its roll-back."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from metamtl import MetaLearner
from metamtl.checkpoint import safe_load
from metamtl.errors import CheckpointError
from metamtl.run_state import RunState, learner_state, resume, rng_state, set_rng_state
from metamtl.tasks import Sinusoid

from .conftest import sine_learner


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trips_torch_numpy_and_python():
    saved = rng_state()
    first = draws()
    set_rng_state(saved)
    assert draws() == first


def test_elapsed_counts_across_clock_starts(monkeypatch):
    now = iter([10.0, 12.5, 20.0, 21.0])
    monkeypatch.setattr("metamtl.run_state.time.perf_counter", lambda: next(now))
    run = RunState(seconds=100.0)
    run.start_clock()          # 10.0
    run.stop_clock()           # 12.5
    assert run.elapsed == 102.5
    run.start_clock()          # 20.0
    assert run.elapsed == 103.5  # 21.0


def test_saved_state_holds_weights_progress_optimizer_and_rngs(sine, tmp_path):
    learner = sine_learner()
    learner.fit(sine, iterations=3, meta_batch_size=2, progress=False)
    obj = learner_state(learner, training_state=True)
    assert obj["iteration"] == 3 and len(obj["history"]) == 3 and obj["config"] == learner.config()
    tr = obj["training"]
    assert set(tr) == {"meta_optimizer", "fit_state", "callbacks", "elapsed", "bad_steps", "layouts", "rng"}
    assert set(tr["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert tr["fit_state"] == {"settings": {"meta_batch_size": 2, "train_tasks": repr(sine), "val_every": None,
                                            "val_episodes": 100, "train_tasks_content": repr(sine),
                                            "val_tasks": None}, "val_every": None}  # the cadence used: none
    assert "training" not in learner_state(learner)
    back = MetaLearner.load(learner.save(tmp_path / "l.pt"), device="cpu")
    assert back.iteration == 3 and back.history == learner.history


def test_resume_restores_everything_and_refuses_another_fit(sine, tmp_path):
    learner = sine_learner()
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    path = learner.save(tmp_path / "last.pt", training_state=True)
    torch.manual_seed(123)
    expected = draws()
    other = sine_learner()
    set_rng_state(rng_state())
    parts = dict(config=other.config(), modules=(other.model, other.algorithm), optimizer=other.meta_optimizer,
                 run=other.run)
    with pytest.raises(CheckpointError, match="fit settings differ"):
        resume(path, settings={**learner.run.settings, "meta_batch_size": 4}, **parts)
    assert other.iteration == 0
    resume(path, settings=learner.run.settings, **parts)
    assert other.iteration == 2 and other.history == learner.history and other.run.seconds > 0
    assert all(torch.equal(a, b) for a, b in zip(learner.model.parameters(), other.model.parameters()))
    assert draws() != expected  # the RNGs are the checkpoint's, not the ones seeded above


def test_resume_refuses_another_schedule_early_stopping_or_validation_and_lists_the_keys(sine, tmp_path):
    """--resume continues a run exactly: a changed schedule, early stopping or validation cadence
    would not, so it is refused naming what differs; more iterations (extending the run) are fine."""
    from metamtl.callbacks import EarlyStopping, LRScheduler

    def callbacks(gamma=0.5, patience=3):
        return [LRScheduler("exponential", gamma=gamma), EarlyStopping("val/loss", "min", patience=patience)]

    learner = sine_learner()
    learner.fit(sine, sine, iterations=2, meta_batch_size=2, val_every=1, val_episodes=2, callbacks=callbacks(),
                checkpoint_dir=tmp_path, progress=False)
    fit = dict(meta_batch_size=2, val_episodes=2, resume=tmp_path / "last.pt", progress=False)
    for changed, names in ((dict(callbacks=[]), ["scheduler.name: 'exponential' != '<missing>'", "early_stopping."]),
                           (dict(callbacks=callbacks(gamma=0.1)), ["scheduler.gamma: 0.5 != 0.1"]),
                           (dict(callbacks=callbacks(patience=2)), ["early_stopping.patience: 3 != 2"]),
                           (dict(callbacks=callbacks(), val_every=2), ["val_every: 1 != 2"])):
        other = sine_learner()
        with pytest.raises(CheckpointError, match="fit settings differ") as info:
            other.fit(sine, sine, iterations=4, **{"val_every": 1, **changed}, **fit)
        assert all(name in str(info.value) for name in names), str(info.value)
        assert other.iteration == 0
    other = sine_learner()
    other.fit(sine, sine, iterations=4, val_every=1, callbacks=callbacks(), **fit)
    assert other.iteration == 4


def higher_learner(optimizer) -> MetaLearner:
    """A learner on backend 'higher' with a torch.optim class as inner optimizer (README: Rprop)."""
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", in_features=1, hidden=[8], out_features=1)
    alg = build_algorithm("maml", steps=1, lr=0.01, backend="higher", optimizer=optimizer)
    return MetaLearner(model, alg, task="regression", device="cpu", meta_lr=1e-2)


@pytest.mark.filterwarnings("ignore:Differentiable Rprop")
def test_a_torch_optim_inner_optimizer_class_saves_loads_and_resumes(sine, tmp_path):
    learner = higher_learner(torch.optim.Rprop)
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path / "run",
                checkpoint_every=1)
    back = MetaLearner.load(learner.save(tmp_path / "l.pt"), device="cpu")
    assert back.algorithm.inner.optimizer is torch.optim.Rprop and back.config() == learner.config()
    ep = sine.episode(7)
    torch.testing.assert_close(back.predict(ep.support_x, ep.support_y, ep.query_x),
                               learner.predict(ep.support_x, ep.support_y, ep.query_x), rtol=0, atol=0)
    other = higher_learner(torch.optim.Rprop)
    other.fit(sine, iterations=3, meta_batch_size=2, progress=False, resume=tmp_path / "run" / "last.pt")
    assert other.iteration == 3 and other.history[:2] == learner.history


def test_an_inner_optimizer_class_a_checkpoint_cannot_name_is_refused_before_training(sine, tmp_path, monkeypatch):
    import higher

    class MySGD(torch.optim.SGD):
        pass

    monkeypatch.setitem(higher.optim._opt_mapping, MySGD, higher.optim.DifferentiableSGD)
    learner = higher_learner(MySGD)
    with pytest.raises(CheckpointError, match=r"optimizer'\] is .*MySGD, which a checkpoint cannot name"):
        learner.fit(sine, iterations=1, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path / "run")
    assert learner.iteration == 0 and not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(CheckpointError, match="use a torch.optim class"):
        learner.save(tmp_path / "l.pt")
    assert not (tmp_path / "l.pt").exists()


def test_metadata_a_checkpoint_could_not_read_back_is_refused_before_anything_is_written(sine, tmp_path):
    """A Path or a numpy number in metadata or task_defaults used to be saved, and the file then refused
    by MetaLearner.load ("unpickling it would run code"): a trained learner that could not be loaded."""
    from pathlib import Path

    learner = sine_learner(metadata={"data": {"root": Path("/data")}})
    with pytest.raises(CheckpointError, match=r"metadata\['data'\]\['root'\] is .*PosixPath.*str\(path\)"):
        learner.save(tmp_path / "l.pt")
    assert not (tmp_path / "l.pt").exists()
    learner = sine_learner(task_defaults={"shots": np.int64(5)})
    with pytest.raises(CheckpointError, match=r"task_defaults\['shots'\] is .*numpy.int64"):
        learner.fit(sine, iterations=1, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path / "run")
    assert learner.iteration == 0 and not (tmp_path / "run" / "last.pt").exists()
    plain = {"root": "/data", "sizes": (1, 2), "n": 3, "none": None, "x": [0.5, True]}
    learner = sine_learner(metadata=plain, task_defaults={"shots": 5})
    assert MetaLearner.load(learner.save(tmp_path / "ok.pt"), device="cpu").metadata == plain


def test_callback_states_a_checkpoint_could_not_read_back_are_converted_or_left_out(sine, tmp_path):
    """A callback whose state held a numpy number was written into last.pt without error, and the
    checkpoint (the run's weights) then could not be loaded nor resumed ("corrupt or unsafe"). Numpy
    numbers are now stored as Python numbers; a state holding anything else is left out with a
    warning, and the run goes on (it is not stopped at its first checkpoint)."""
    from pathlib import Path

    from metamtl.callbacks import Callback

    class Keep(Callback):
        best = None

        def on_iteration_end(self, state, metrics):
            self.best = np.float64(metrics["loss"])

        def state_dict(self):
            return {"best": self.best, "steps": [np.int64(3)]}

        def load_state_dict(self, state):
            self.best = state["best"]

    class Odd(Callback):
        def state_dict(self):
            return {"where": Path("runs")}

    learner = sine_learner()
    with pytest.warns(UserWarning, match=r"callback state\['Odd'\]\['where'\] is .*Path.*leaves that callback's state out"):
        learner.fit(sine, iterations=4, meta_batch_size=2, callbacks=[Keep(), Odd()], checkpoint_dir=tmp_path,
                    checkpoint_every=2, progress=False)
    assert learner.iteration == 4
    state = safe_load(tmp_path / "last.pt")["training"]["callbacks"]
    assert type(state["Keep"]["best"]) is float and state["Keep"]["steps"] == [3] and "Odd" not in state
    assert MetaLearner.load(tmp_path / "last.pt", device="cpu").iteration == 4


def test_a_loaded_learner_keeps_its_meta_training_time(sine, tmp_path):
    """MetaLearner.load started elapsed at 0 s: a loaded learner at iteration 2 had trained for no time,
    and the history rows of a later fit went back in time."""
    learner = sine_learner()
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    loaded = MetaLearner.load(learner.save(tmp_path / "l.pt"), device="cpu")
    assert loaded.elapsed == pytest.approx(learner.elapsed) and loaded.elapsed > 0
    loaded.fit(sine, iterations=1, meta_batch_size=2, progress=False)
    times = [row["time"] for row in loaded.history if "time" in row]
    assert times == sorted(times) and times[-1] > learner.elapsed


def test_a_float64_learner_loads_as_float64_with_identical_predictions(sine, tmp_path):
    """The model's floating dtype is saved and restored (was: loaded as float32, predictions differed)."""
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", in_features=1, hidden=[8], out_features=1).double()
    learner = MetaLearner(model, build_algorithm("maml", steps=1, lr=0.01), task="regression", device="cpu")
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    back = MetaLearner.load(learner.save(tmp_path / "l.pt"), device="cpu")
    assert {p.dtype for p in back.model.parameters()} == {torch.float64}
    ep = sine.episode(3)
    assert torch.equal(back.predict(ep.support_x, ep.support_y, ep.query_x),
                       learner.predict(ep.support_x, ep.support_y, ep.query_x))
    obj = torch.load(tmp_path / "l.pt", weights_only=True)
    del obj["model_dtype"]  # a checkpoint written before the dtype was saved: float32, as before
    torch.save(obj, tmp_path / "old.pt")
    assert {p.dtype for p in MetaLearner.load(tmp_path / "old.pt", device="cpu").model.parameters()} == {torch.float32}


def test_a_float64_run_is_not_resumed_or_loaded_into_a_float32_model(sine, tmp_path):
    """Resuming a float64 run in a float32 learner (or the reverse), or loading it into a given
    float32 model, would cast the weights and optimizer state silently (was: accepted, the resume no
    longer exact): refused naming both dtypes, the learner unchanged."""
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model

    model = build_model("mlp", in_features=1, hidden=[8], out_features=1).double()
    double = MetaLearner(model, build_algorithm("maml", steps=1, lr=0.01, first_order=True), task="regression",
                         device="cpu", meta_lr=1e-2)
    double.fit(sine, iterations=2, meta_batch_size=2, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    single = sine_learner()
    with pytest.raises(CheckpointError, match="weights are float64, this learner's are float32"):
        single.fit(sine, iterations=4, meta_batch_size=2, resume=tmp_path / "last.pt", progress=False)
    assert single.iteration == 0 and {p.dtype for p in single.model.parameters()} == {torch.float32}
    with pytest.raises(CheckpointError, match="weights are float64, the given model's are float32"):
        MetaLearner.load(tmp_path / "last.pt", model=build_model("mlp", in_features=1, hidden=[8], out_features=1))
    back = MetaLearner.load(tmp_path / "last.pt", model=build_model("mlp", in_features=1, hidden=[8], out_features=1).double())
    assert {p.dtype for p in back.model.parameters()} == {torch.float64}


class UserSine:
    """A user's task source: the TaskSource protocol (``episode(i)``, ways/shots/queries/name), no ``__repr__``."""

    def __init__(self, seed=0):
        self.inner, self.seed = Sinusoid(shots=5, queries=5, seed=seed), seed
        self.ways, self.shots, self.queries, self.name = 1, 5, 5, "user-sine"

    def episode(self, i):
        return self.inner.episode(i)


def test_a_user_source_without_repr_resumes_in_a_new_object_and_its_fingerprint_names_no_address(tmp_path):
    """The train-tasks fingerprint (resume, torchrun's start check) never holds a memory address:
    a new object of the same user source resumes (a new process has new objects), another seed is
    refused; metamtl's own sources keep their repr as fingerprint (older checkpoints resume)."""
    fit = dict(meta_batch_size=2, progress=False)
    sine_learner().fit(UserSine(), iterations=2, checkpoint_dir=tmp_path, checkpoint_every=1, **fit)
    resumed = sine_learner()
    resumed.fit(UserSine(), iterations=4, resume=tmp_path / "last.pt", **fit)
    whole = sine_learner()
    whole.fit(UserSine(), iterations=4, **fit)
    assert resumed.iteration == 4
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), whole.model.parameters()))
    with pytest.raises(CheckpointError, match=r"fit settings differ:\n  train_tasks: .*seed=0.*seed=1"):
        sine_learner().fit(UserSine(1), iterations=4, resume=tmp_path / "last.pt", **fit)
    from metamtl.tasks.sampler import source_fingerprint
    assert source_fingerprint(UserSine(3)) == "UserSine(ways=1, shots=5, queries=5, name='user-sine', seed=3)"
    sine = Sinusoid(shots=5, queries=5, seed=0)
    assert source_fingerprint(sine) == repr(sine)


def toy_classes(seed: int):
    """12 classes of 4 feature vectors; another seed: the same name and class count, other classes."""
    from metamtl.data.base import ClassDataset

    g = torch.Generator().manual_seed(seed)
    return ClassDataset(torch.randn(48, 4, generator=g), torch.arange(12).repeat_interleave(4),
                        [f"s{seed}c{i}" for i in range(12)], name="toy")


def class_learner() -> MetaLearner:
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model

    torch.manual_seed(0)
    return MetaLearner(build_model("mlp", in_features=4, hidden=[8], out_features=3),
                       build_algorithm("maml", steps=1, lr=0.1, first_order=True), device="cpu")


def toy_tasks(data_seed=1, seed=0, source_seed=0, hierarchy=None, weights=None):
    from metamtl.tasks.sampler import EpisodeSampler, MixedTasks

    if hierarchy is not None:
        names = toy_classes(data_seed).class_names
        hierarchy = {c: str(hierarchy(i)) for i, c in enumerate(names)}
    sources = [EpisodeSampler(toy_classes(data_seed), 3, 1, 2, seed=source_seed, name=n, hierarchy=hierarchy)
               for n in ("a", "b")]
    return sources[0] if seed is None else MixedTasks(sources, weights=weights, seed=seed)


@pytest.mark.parametrize("first, other, names", [
    pytest.param(dict(seed=None), dict(seed=None, data_seed=2), [r"train_tasks_content: .*data=12 classes.*sha256"],
                 id="another-split-same-name-and-class-count"),
    pytest.param(dict(seed=None, hierarchy=lambda i: i % 2), dict(seed=None, hierarchy=lambda i: i < 6),
                 ["train_tasks_content: "], id="another-hierarchy-mapping"),
    pytest.param(dict(seed=0), dict(seed=5), ["train_tasks_content.seed: 0 != 5"], id="another-mixture-seed"),
    pytest.param(dict(seed=0), dict(seed=0, source_seed=9), [r"train_tasks_content.sources.a: .*seed=0.* != .*seed=9",
                                                             "train_tasks_content.sources.b: "], id="other-source-seeds"),
    pytest.param(dict(seed=0), dict(seed=0, weights=[0.501, 0.499]), ["train_tasks_content.weights.a: 0.5 != 0.501"],
                 id="other-mixture-weights"),
])
def test_resume_refuses_training_tasks_whose_repr_hides_the_change(tmp_path, first, other, names):
    """The ``train_tasks`` repr shows a sampler's dataset name and class count, a mixture's source names
    and rounded weights only (was: another split, hierarchy or mixture seed resumed silently); the
    content fingerprint names what differs, the same tasks rebuilt resume, and a checkpoint written
    before the fingerprint was saved resumes as before."""
    fit = dict(meta_batch_size=2, progress=False)
    class_learner().fit(toy_tasks(**first), iterations=2, checkpoint_dir=tmp_path, checkpoint_every=1, **fit)
    learner = class_learner()
    with pytest.raises(CheckpointError, match="fit settings differ") as info:
        learner.fit(toy_tasks(**other), iterations=4, resume=tmp_path / "last.pt", **fit)
    assert all(re.search(name, str(info.value)) for name in names), str(info.value)
    assert learner.iteration == 0
    class_learner().fit(toy_tasks(**first), iterations=4, resume=tmp_path / "last.pt", **fit)
    obj = torch.load(tmp_path / "last.pt", weights_only=True)
    del obj["training"]["fit_state"]["settings"]["train_tasks_content"]  # an older checkpoint: not compared
    torch.save(obj, tmp_path / "old.pt")
    class_learner().fit(toy_tasks(**other), iterations=4, resume=tmp_path / "old.pt", **fit)


def test_resume_refuses_other_validation_tasks_or_none(sine, tmp_path):
    """Validation steers a run (a plateau schedule, early stopping, best.pt): resuming with other
    val tasks, or none (was: accepted, the schedule or the validation rows changed silently), is
    refused naming val_tasks; the same val tasks rebuilt resume, and so does a checkpoint written
    before the val tasks were saved."""
    fit = dict(meta_batch_size=2, val_every=1, val_episodes=2, progress=False)
    sine_learner().fit(sine, Sinusoid(shots=5, queries=5, seed=1), iterations=2, checkpoint_dir=tmp_path,
                       checkpoint_every=1, **fit)
    for other, name in ((Sinusoid(shots=5, queries=5, seed=7), r"val_tasks: 'Sinusoid\(.*seed=1\)' != 'Sinusoid\(.*seed=7\)'"),
                        (None, r"val_tasks: 'Sinusoid\(.*seed=1\)' != None")):
        learner = sine_learner()
        with pytest.raises(CheckpointError, match="fit settings differ:(.|\n)*" + name):
            learner.fit(sine, other, iterations=4, resume=tmp_path / "last.pt", **fit)
        assert learner.iteration == 0
    sine_learner().fit(sine, Sinusoid(shots=5, queries=5, seed=1), iterations=4, resume=tmp_path / "last.pt", **fit)
    obj = torch.load(tmp_path / "last.pt", weights_only=True)
    del obj["training"]["fit_state"]["settings"]["val_tasks"]  # an older checkpoint: not compared
    torch.save(obj, tmp_path / "old.pt")
    sine_learner().fit(sine, Sinusoid(shots=5, queries=5, seed=7), iterations=4, resume=tmp_path / "old.pt", **fit)


def test_frozen_weights_stay_frozen_after_load_and_a_resume_names_a_different_trainable_set(sine, tmp_path):
    """save/load lost which weights were frozen (the loaded learner meta-trained a frozen trunk), and
    resuming into a learner that freezes other weights blamed a 'damaged checkpoint'."""
    import torch

    learner = sine_learner()
    learner.model.trunk.requires_grad_(False)
    learner = MetaLearner(learner.model, learner.algorithm, task="regression", device="cpu", meta_lr=1e-2)
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    path = learner.save(tmp_path / "frozen.pt", training_state=True)
    loaded = MetaLearner.load(path, device="cpu")
    assert len(loaded.meta_parameters()) == len(learner.meta_parameters()) == 2
    trunk = [p.detach().clone() for p in loaded.model.trunk.parameters()]
    loaded.fit(sine, iterations=1, meta_batch_size=2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(trunk, loaded.model.trunk.parameters()))
    other = sine_learner()  # the same model, nothing frozen
    with pytest.raises(CheckpointError, match=r"it trained other weights than this learner does; frozen there and "
                                              r"trainable here: \['model.trunk.net.0.bias', 'model.trunk.net.0.weight'"):
        other.fit(sine, iterations=4, meta_batch_size=2, progress=False, resume=path)
    assert other.iteration == 0
    obj = safe_load(path)
    del obj["frozen"]  # a checkpoint written before the entry: the optimizer's count says it
    torch.save(obj, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"its meta-optimizer trained 2 weight tensors, this learner's trains 4"):
        other.fit(sine, iterations=4, meta_batch_size=2, progress=False, resume=tmp_path / "old.pt")


def test_weights_frozen_after_the_learner_was_built_load_and_resume(sine, tmp_path):
    """bca7f89 froze the saved weights before rebuilding the learner: a learner frozen entirely after
    training (for serving) no longer loaded ('nothing to meta-learn'), and a run whose trunk was frozen
    after the learner was built could not be resumed (its meta-optimizer held more weights)."""
    import torch

    learner = sine_learner()
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    learner.model.requires_grad_(False)
    loaded = MetaLearner.load(learner.save(tmp_path / "served.pt"), device="cpu")
    assert not any(p.requires_grad for p in loaded.model.parameters())
    ep = sine.episode(0)
    torch.testing.assert_close(loaded.predict(ep.support_x, ep.support_y, ep.query_x, steps=0),
                               learner.predict(ep.support_x, ep.support_y, ep.query_x, steps=0))
    phased = sine_learner()
    phased.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    phased.model.trunk.requires_grad_(False)  # phase 2: the head only
    phased.fit(sine, iterations=2, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path / "run", checkpoint_every=1)
    resumed = MetaLearner.load(tmp_path / "run" / "last.pt", device="cpu")
    resumed.fit(sine, iterations=6, meta_batch_size=2, progress=False, resume=tmp_path / "run" / "last.pt")
    assert resumed.iteration == 6
    built_frozen = sine_learner()
    built_frozen.model.trunk.requires_grad_(False)
    built_frozen = MetaLearner(built_frozen.model, built_frozen.algorithm, task="regression", device="cpu", meta_lr=1e-2)
    with pytest.raises(CheckpointError, match=r"its meta-optimizer held other weights than this learner's; held there "
                                              r"only: \['model.trunk.net.0.bias', 'model.trunk.net.0.weight'\]"):
        built_frozen.fit(sine, iterations=6, meta_batch_size=2, progress=False, resume=tmp_path / "run" / "last.pt")


def test_ctrl_c_while_a_resume_restores_rolls_everything_back_and_stays_a_keyboard_interrupt(sine, tmp_path, monkeypatch):
    """Regression: a KeyboardInterrupt (Ctrl-C) raised part-way through the restore escaped the roll-back
    (``except Exception``), leaving the checkpoint's weights with iteration 0 and an empty optimizer."""
    learner = sine_learner()
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    path = learner.save(tmp_path / "last.pt", training_state=True)
    other = sine_learner()
    fresh = [p.detach().clone() for p in other.model.parameters()]

    calls = []
    load = other.meta_optimizer.load_state_dict

    def ctrl_c(state):  # the signal lands during the first restore only (the roll-back then loads as usual)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        load(state)

    monkeypatch.setattr(other.meta_optimizer, "load_state_dict", ctrl_c)
    with pytest.raises(KeyboardInterrupt) as info:
        resume(path, config=other.config(), settings=learner.run.settings, modules=(other.model, other.algorithm),
               optimizer=other.meta_optimizer, run=other.run)
    assert type(info.value) is KeyboardInterrupt  # re-raised as it is, not wrapped
    assert other.iteration == 0 and other.history == [] and not other.run.resumed
    assert all(torch.equal(a, b) for a, b in zip(fresh, other.model.parameters()))


def test_a_per_task_head_run_with_dropout_resumes_exactly(tmp_path):
    """The per-task head template was built with nn.Linear's random init on the global generator,
    once per model and ways and not saved: a resumed run drew other dropout masks than the
    uninterrupted one (and a predict before fit changed what a seeded fit trained)."""
    from torch import nn

    from metamtl.algorithms import build_algorithm
    from metamtl.data import ClassDataset, Preprocessing
    from metamtl.models import TrunkHead
    from metamtl.tasks import EpisodeSampler

    g = torch.Generator().manual_seed(0)
    ds = ClassDataset(torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=g),
                      torch.arange(8).repeat_interleave(6), [f"c{i}" for i in range(8)],
                      preprocessing=Preprocessing(size=(8, 8), channels=1, mean=(0.5,), std=(0.25,)))

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d, self.out_features = nn.Conv2d(1, 2, 3, padding=1), nn.Dropout(0.5), 32

        def forward(self, x):
            return self.d(nn.functional.max_pool2d(self.c(x), 2)).flatten(1)

    def fit(iterations, **kwargs):
        torch.manual_seed(0)
        learner = MetaLearner(TrunkHead(Trunk(), None, config={"name": "mynet"}),
                              build_algorithm("maml", head_init="proto", lr=0.1), device="cpu",
                              preprocessing=ds.preprocessing)
        learner.fit(EpisodeSampler(ds, 5, 1, 2, seed=0), iterations=iterations, meta_batch_size=2, progress=False,
                    **kwargs)
        return learner

    full = fit(4)
    fit(2, checkpoint_dir=tmp_path, checkpoint_every=2)
    resumed = fit(4, checkpoint_dir=tmp_path, resume=tmp_path / "last.pt")
    assert [h["train/loss"] for h in resumed.history if "train/loss" in h] == \
        [h["train/loss"] for h in full.history if "train/loss" in h]
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))


def test_a_sinusoid_run_validated_on_the_old_held_out_stream_resumes_with_a_warning(sine, tmp_path):
    """Held-out sinusoid tasks got a random stream of their own (split='val'); checkpoints written before
    recorded val_tasks without it, and `metamtl fit --resume` refused them: 'fit settings differ'."""
    import torch

    from metamtl.tasks import Sinusoid

    val = Sinusoid(shots=5, queries=5, seed=1, split="val")
    kw = dict(meta_batch_size=2, val_every=1, val_episodes=2, progress=False)
    learner = sine_learner()
    learner.fit(sine, val, iterations=2, checkpoint_dir=tmp_path / "run", checkpoint_every=1, **kw)
    obj = safe_load(tmp_path / "run" / "last.pt")
    settings = obj["training"]["fit_state"]["settings"]
    assert settings["val_tasks"].endswith(", split='val')")
    settings["val_tasks"] = settings["val_tasks"].replace(", split='val')", ")")  # as written before
    torch.save(obj, tmp_path / "old.pt")
    resumed = sine_learner()
    with pytest.warns(RuntimeWarning, match="validated on sinusoid tasks of the training stream's kind"):
        resumed.fit(sine, val, iterations=3, resume=tmp_path / "old.pt", **kw)
    assert resumed.iteration == 3
    with pytest.raises(CheckpointError, match="fit settings differ"):  # other validation tasks: still refused
        sine_learner().fit(sine, Sinusoid(shots=5, queries=5, seed=2, split="val"), iterations=3,
                           resume=tmp_path / "old.pt", **kw)


def test_numpy_integer_fit_counts_are_stored_as_python_ints(tmp_path):
    """fit(meta_batch_size=np.int64(2), ...) was accepted but kept the numpy numbers in the fit settings,
    the run's meta-batch size and the stop record: last.pt and a saved learner could then not be loaded
    nor resumed ("not a plain-tensor checkpoint"). The counts are now stored as Python ints."""
    from metamtl.callbacks import EarlyStopping

    train, val = Sinusoid(shots=5, queries=5, seed=0), Sinusoid(shots=5, queries=5, seed=1, split="val")
    learner = sine_learner()
    learner.fit(train, val, iterations=np.int64(6), meta_batch_size=np.int64(2), val_every=np.int64(2),
                val_episodes=np.int64(2), checkpoint_every=np.int64(2), progress=False, checkpoint_dir=tmp_path,
                callbacks=[EarlyStopping(patience=1, min_delta=1e9)])
    assert learner.iteration == 4 and safe_load(tmp_path / "last.pt")["training"]["fit_state"]["stop"]["iterations"] == 6
    for path in (tmp_path / "last.pt", learner.save(tmp_path / "learner.pt")):
        assert MetaLearner.load(path, device="cpu").iteration == learner.iteration
    settings = learner.run.settings
    assert all(type(settings[k]) is int for k in ("meta_batch_size", "val_every", "val_episodes"))
    sine_learner().fit(train, val, iterations=6, meta_batch_size=2, val_every=2, val_episodes=2, progress=False,
                       resume=tmp_path / "last.pt", callbacks=[EarlyStopping(patience=1, min_delta=1e9)])


def test_a_resumed_continued_fit_keeps_the_default_validation_cadence(tmp_path):
    """The default val_every is a tenth of the fit's iterations: iterations more in a continued fit, the
    run's total on resume. A continued fit interrupted and resumed validated every 4 iterations instead of
    every 2 (early stopping, the plateau schedule and best.pt then differed); the cadence is now saved."""
    import os
    import signal

    from metamtl.callbacks import Callback
    from metamtl.errors import FitInterrupted

    class SigintAt25(Callback):
        def on_iteration_end(self, state, metrics):
            if state.iteration == 25:
                os.kill(os.getpid(), signal.SIGINT)

    train, val = Sinusoid(shots=5, queries=5, seed=0), Sinusoid(shots=5, queries=5, seed=1, split="val")
    fit = dict(meta_batch_size=1, val_episodes=1, progress=False)

    def validated(interrupt):
        folder, learner = tmp_path / str(interrupt), sine_learner()
        learner.fit(train, val, iterations=20, checkpoint_dir=folder, **fit)
        try:  # continued: 20 more, validating every 20 // 10 = 2
            learner.fit(train, val, iterations=20, checkpoint_dir=folder, callbacks=[SigintAt25()] if interrupt else [], **fit)
        except FitInterrupted as exc:  # resumed: iterations is the run's total
            learner = sine_learner()
            learner.fit(train, val, iterations=40, checkpoint_dir=folder, resume=exc.checkpoint, **fit)
        return [r["iteration"] for r in learner.history if "val/loss" in r and r["iteration"] > 20]

    assert validated(True) == validated(False) == list(range(22, 41, 2))
