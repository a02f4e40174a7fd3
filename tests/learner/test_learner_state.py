"""A MetaLearner as an object: calls from several threads, loading, dtype and module changes, predictors
kept while the learner changes, a shared algorithm."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import ClassDataset, Preprocessing
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler


def toy_dataset() -> ClassDataset:
    g = torch.Generator().manual_seed(0)
    return ClassDataset(torch.randint(0, 256, (120, 1, 12, 12), dtype=torch.uint8, generator=g),
                        torch.arange(20).repeat_interleave(6), [f"c{i}" for i in range(20)], name="toy",
                        preprocessing=Preprocessing(size=(12, 12), channels=1, mean=(0.5,), std=(0.25,)))


DS = toy_dataset()
TRAIN = EpisodeSampler(DS.subset(range(15)), 5, 1, 2, seed=0)
TEST = EpisodeSampler(DS.subset(range(15, 20)), 5, 1, 3, seed=1)
EP = TEST.episode(0)


def conv4(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=None)


def make(alg: str = "maml", algorithm=None, seed: int = 0, **kw) -> MetaLearner:
    model = conv4(seed)
    akw = {} if alg == "protonet" else dict(steps=1, lr=0.3, head_init="zero")
    return MetaLearner(model, algorithm or build_algorithm(alg, **akw), preprocessing=DS.preprocessing, device="cpu",
                       channels_last=False, **kw)


def one_at_a_time(fn, overlaps: list[bool], inside: list[int], guard: threading.Lock):
    """``fn`` recording in ``overlaps`` whether another instrumented call was running when it started."""
    def run(*args, **kwargs):
        with guard:
            inside[0] += 1
            overlaps.append(inside[0] > 1)
        time.sleep(0.02)  # leaves other threads time to come in
        try:
            return fn(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1
    return run


def test_adapt_predict_evaluate_and_a_predictor_from_several_threads_take_turns_and_leave_the_learner_intact():
    L = make("maml")
    L.model.train()
    sx, qx = L.model_input(EP.support_x), L.model_input(EP.query_x)
    ref, P = L.predict(sx, EP.support_y, qx), L.adapt(sx, EP.support_y)
    ref_eval = L.evaluate(TEST, 2, progress=False).per_episode_loss
    weights = {k: v.clone() for k, v in L.model.state_dict().items()}
    overlaps, inside, guard = [], [0], threading.Lock()
    L.algorithm.adapt = one_at_a_time(L.algorithm.adapt, overlaps, inside, guard)
    L.algorithm.evaluate_episodes = one_at_a_time(L.algorithm.evaluate_episodes, overlaps, inside, guard)
    P.adapted = one_at_a_time(P.adapted, overlaps, inside, guard)
    results, errors = [], []

    def work(kind):
        try:
            for _ in range(3):
                results.append(torch.equal(L.predict(sx, EP.support_y, qx), ref) if kind == 0 else
                               torch.equal(P(qx), ref) if kind == 1 else
                               L.evaluate(TEST, 2, progress=False).per_episode_loss == ref_eval)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i % 3,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(results) == 18 and all(results)
    assert len(overlaps) == 18 and not any(overlaps), "calls on one learner must take turns"
    assert all(torch.equal(v, weights[k]) for k, v in L.model.state_dict().items())
    assert L.model.training and all(m.training for m in L.model.modules())


@pytest.mark.parametrize("alg", ["maml", "anil"])
def test_a_learner_loaded_under_inference_mode_adapts_inside_and_outside_it_and_trains(alg, tmp_path):
    L = make(alg)
    L.save(tmp_path / "l.pt")
    ref = L.predict(EP.support_x, EP.support_y, EP.query_x)
    with torch.inference_mode():
        M = MetaLearner.load(tmp_path / "l.pt", device="cpu")
        assert torch.equal(M.predict(EP.support_x, EP.support_y, EP.query_x), ref)
    assert not any(p.is_inference() for p in [*M.model.parameters(), *M.model.buffers()])
    assert torch.equal(M.predict(EP.support_x, EP.support_y, EP.query_x), ref)
    M.fit(TRAIN, iterations=1, meta_batch_size=2, progress=False)


@pytest.mark.parametrize("alg", ["maml", "metasgd", "protonet"])
def test_a_learner_built_under_inference_mode_predicts_and_trains_outside_it(alg):
    """Built under torch.inference_mode() (a serving context), the channels_last conversion (and Meta-SGD's
    rates) became inference tensors: every later predict or fit raised a bare RuntimeError, as load did."""
    def build(model):
        akw = {} if alg == "protonet" else dict(steps=1, lr=0.3, head_init="zero")
        return MetaLearner(model, build_algorithm(alg, **akw), preprocessing=DS.preprocessing, device="cpu",
                           channels_last=True)
    ref, model = build(conv4()), conv4()  # the model built normally
    with torch.inference_mode():
        L = build(model)
    assert not any(t.is_inference() for t in [*L.model.parameters(), *L.model.buffers(), *L.meta_parameters()])
    assert torch.equal(L.predict(EP.support_x, EP.support_y, EP.query_x), ref.predict(EP.support_x, EP.support_y,
                                                                                       EP.query_x))
    L.fit(TRAIN, iterations=1, meta_batch_size=2, progress=False)


def test_a_model_holding_inference_tensors_is_refused_naming_the_fix():
    from metamtl.errors import ConfigError
    with torch.inference_mode():
        model = conv4()
    with pytest.raises(ConfigError, match=r"inference tensors.*torch.inference_mode\(\).*outside it"):
        MetaLearner(model, "protonet", device="cpu")


@pytest.mark.parametrize("convert", ["double", "half", "bfloat16"])
def test_a_model_converted_after_the_learner_was_built_is_a_config_error_naming_the_fix(convert, tmp_path):
    from metamtl.errors import ConfigError
    L = make("maml")
    getattr(L.model, convert)()
    for call in (lambda: L.predict(EP.support_x, EP.support_y, EP.query_x), lambda: L.adapt(EP.support_x, EP.support_y),
                 lambda: L.evaluate(TEST, 2, progress=False),
                 lambda: L.fit(TRAIN, iterations=1, meta_batch_size=2, progress=False)):
        with pytest.raises(ConfigError, match="float64 after the learner|metamtl trains float32") as info:
            call()
        if convert == "double":
            assert "learner.model.float()" in str(info.value) and "MetaLearner.load" in str(info.value)
    L.model.float()
    L.predict(EP.support_x, EP.support_y, EP.query_x)


def test_predict_and_evaluate_use_a_trunk_that_replaced_the_models_one_after_earlier_predictions():
    import copy
    L = make("maml")
    old = L.predict(EP.support_x, EP.support_y, EP.query_x)
    L.evaluate(TEST, 2, progress=False)
    other = conv4(5).trunk
    L.model.trunk = copy.deepcopy(other)
    R = make("maml")  # the same swap on a learner that never predicted
    R.model.trunk = copy.deepcopy(other)
    new = L.predict(EP.support_x, EP.support_y, EP.query_x)
    assert not torch.equal(new, old)
    assert torch.equal(new, R.predict(EP.support_x, EP.support_y, EP.query_x))
    assert L.evaluate(TEST, 2, progress=False).per_episode_loss == R.evaluate(TEST, 2, progress=False).per_episode_loss


@pytest.mark.parametrize("alg,kw", [("maml", {}), ("anil", {}), ("mamlpp", {}), ("protonet", {}),
                                    ("maml", {"head": "logreg"})])
def test_a_predictor_is_refused_once_the_learner_trained_on_or_took_other_weights(alg, kw):
    from metamtl.errors import InputError
    L = make(alg)
    L.fit(TRAIN, iterations=1, meta_batch_size=2, progress=False)
    P = L.adapt(EP.support_x, EP.support_y, **kw)
    before = P(EP.query_x)
    assert torch.equal(P(EP.query_x), before)  # calling it changes nothing
    L.evaluate(TEST, 2, progress=False, **kw)
    L.predict(EP.support_x, EP.support_y, EP.query_x, **kw)
    assert torch.equal(P(EP.query_x), before)  # nor do other calls that leave the weights alone
    L.fit(TRAIN, iterations=1, meta_batch_size=2, progress=False)
    with pytest.raises(InputError, match="adapt.*again"):
        P(EP.query_x)
    P = L.adapt(EP.support_x, EP.support_y, **kw)
    P(EP.query_x)
    L.init_from(make(alg, seed=3))
    with pytest.raises(InputError, match="no longer holds"):
        P.predict(EP.query_x)


@pytest.mark.parametrize("alg,kw", [("maml", {}), ("protonet", {}), ("maml", {"head": "logreg"})])
@pytest.mark.parametrize("edit", ["in_place", "replaced"])
def test_a_predictor_is_refused_once_a_weight_is_edited_through_data(alg, kw, edit):
    from metamtl.errors import InputError
    L = make(alg)
    P = L.adapt(EP.support_x, EP.support_y, **kw)
    p = next(L.model.trunk.parameters())
    if edit == "in_place":
        p.data.add_(0.5)  # bumps no version counter that p sees
    else:
        p.data = p.data + 0.5  # keeps p, gives it other storage
    with pytest.raises(InputError, match="adapt.*again"):
        P(EP.query_x)


@pytest.mark.parametrize("alg,kw", [("maml", {}), ("protonet", {}), ("maml", {"head": "logreg"})])
def test_pickling_a_predictor_is_an_input_error_saying_to_save_the_learner_and_a_deepcopy_keeps_working(alg, kw):
    import copy
    import io
    import pickle

    from metamtl.errors import InputError
    L = make(alg)
    P = L.adapt(EP.support_x, EP.support_y, **kw)
    for save in (pickle.dumps, lambda p: torch.save(p, io.BytesIO())):
        with pytest.raises(InputError, match=r"learner\.save"):
            save(P)
    Q, S = copy.deepcopy(P), copy.copy(P)
    assert torch.equal(Q(EP.query_x), P(EP.query_x)) and torch.equal(S(EP.query_x), P(EP.query_x))
    L.fit(TRAIN, iterations=1, meta_batch_size=2, progress=False)
    Q(EP.query_x)  # its own learner did not change
    with pytest.raises(InputError):
        S(EP.query_x)  # a shallow copy shares the learner that trained on


@pytest.mark.parametrize("alg", ["metasgd", "mamlpp"])
def test_an_algorithm_with_learned_state_given_to_a_second_learner_is_a_config_error(alg):
    import copy

    from metamtl.errors import ConfigError
    algorithm = build_algorithm(alg, steps=1, lr=0.3, head_init="zero")
    L1 = make(alg, algorithm=algorithm)
    MetaLearner(L1.model, algorithm, device="cpu", channels_last=False)  # the same model's learner: allowed
    with pytest.raises(ConfigError, match="belongs to another learner.*build_algorithm"):
        make(alg, algorithm=algorithm, seed=1)
    p1 = L1.predict(EP.support_x, EP.support_y, EP.query_x)
    L2 = make(alg, algorithm=copy.deepcopy(algorithm), seed=1)  # a copy: independent
    L2.fit(TRAIN, iterations=2, meta_batch_size=2, progress=False)
    assert torch.equal(L1.predict(EP.support_x, EP.support_y, EP.query_x), p1)


def test_an_algorithm_without_learned_state_may_serve_several_learners():
    algorithm = build_algorithm("maml", steps=1, lr=0.3, head_init="zero")
    L1, L2 = make(algorithm=algorithm), make(algorithm=algorithm, seed=1)
    p1 = L1.predict(EP.support_x, EP.support_y, EP.query_x)
    L2.fit(TRAIN, iterations=2, meta_batch_size=2, progress=False)
    assert torch.equal(L1.predict(EP.support_x, EP.support_y, EP.query_x), p1)
