"""MetaLearner: save/load, adapt/predict, preprocess, input errors, exact resume."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import ClassDataset, Preprocessing
from metamtl.errors import CheckpointError, ConfigError, InputError
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler, MixedTasks


def toy_dataset(classes=40, per_class=10, size=12):
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(classes, 1, size, size, generator=g)
    noise = torch.rand(classes * per_class, 1, size, size, generator=g)
    images = ((protos.repeat_interleave(per_class, 0) * 0.8 + 0.2 * noise) * 255).to(torch.uint8)
    prep = Preprocessing(size=(size, size), channels=1, mean=(0.5,), std=(0.25,))
    return ClassDataset(images, torch.arange(classes).repeat_interleave(per_class),
                        [f"c{i}" for i in range(classes)], name="toy", preprocessing=prep)


def make_learner(alg="maml", head_init="learned", **kw):
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2,
                        out_features=5 if head_init == "learned" else None)
    return MetaLearner(model, build_algorithm(alg, steps=2, lr=0.3, head_init=head_init),
                       preprocessing=toy_dataset().preprocessing, device="cpu", **kw)


@pytest.fixture(scope="module")
def tasks():
    ds = toy_dataset()
    return EpisodeSampler(ds.subset(range(30)), 5, 1, 3, seed=0), EpisodeSampler(ds.subset(range(30, 40)), 5, 1, 3, seed=1)


def test_save_load_round_trip_gives_identical_predictions(tmp_path, tasks):
    train, test = tasks
    learner = make_learner(head_init="proto")
    learner.fit(train, iterations=3, meta_batch_size=2, progress=False)
    path = learner.save(tmp_path / "l.pt")
    loaded = MetaLearner.load(path, device="cpu")
    ep = test.episode(0).to("cpu")
    a = learner.predict(ep.support_x, ep.support_y, ep.query_x)
    b = loaded.predict(ep.support_x, ep.support_y, ep.query_x)
    assert torch.equal(a, b)
    assert loaded.preprocessing == learner.preprocessing
    assert loaded.algorithm.config() == learner.algorithm.config()
    r1 = learner.evaluate(test, 5, progress=False)
    r2 = loaded.evaluate(test, 5, progress=False)
    assert r1.per_episode_accuracy == r2.per_episode_accuracy


@pytest.mark.parametrize("algorithm", [build_algorithm("protonet"), build_algorithm("transfer", num_classes=5),
                                       build_algorithm("maml", head_init="zero"), build_algorithm("anil", head_init="proto")])
def test_a_model_head_that_per_task_heads_never_use_is_warned_about(algorithm):
    with pytest.warns(UserWarning, match=r"own head \(7 outputs\).*never used.*model.out_features: null"):
        MetaLearner(build_model("conv4", hidden=4, image_size=16, out_features=7), algorithm, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetaLearner(build_model("conv4", hidden=4, image_size=16, out_features=None), algorithm, device="cpu")
        MetaLearner(build_model("conv4", hidden=4, image_size=16, out_features=7), "maml", device="cpu")


def test_predict_accepts_raw_images_and_matches_preprocessed(tasks):
    _, test = tasks
    learner = make_learner(head_init="zero")
    ep = test.episode(1)
    pil_support = [Image.fromarray(x[0].numpy()) for x in ep.support_x]
    arr_query = [x[0].numpy() for x in ep.query_x]
    raw = learner.predict(pil_support, ep.support_y, arr_query)
    ready = learner.predict(ep.support_x.float().div(255).sub(0.5).div(0.25), ep.support_y,
                            ep.query_x.float().div(255).sub(0.5).div(0.25))
    torch.testing.assert_close(raw, ready)
    # uint8 stored images are preprocessed too
    torch.testing.assert_close(learner.predict(ep.support_x, ep.support_y, ep.query_x), ready)
    assert raw.shape == (15, 5)


def test_stored_uint8_tensors_with_the_channel_squeezed_are_read_as_stored_not_inverted(tasks):
    """An inverting dataset's (Omniglot's) stored pixels give the same predictions as [N,1,H,W]
    and as [N,H,W]; only raw images (PIL, numpy) are decoded and inverted like files on disk."""
    _, test = tasks
    learner = make_learner(head_init="proto")
    learner.preprocessing = prep = Preprocessing(size=(12, 12), channels=1, mean=(0.5,), std=(0.25,), invert=True)
    ep = test.episode(1)
    torch.testing.assert_close(prep(ep.support_x[:, 0]), prep(ep.support_x))
    torch.testing.assert_close(learner.predict(ep.support_x[:, 0], ep.support_y, ep.query_x[:, 0]),
                               learner.predict(ep.support_x, ep.support_y, ep.query_x))
    torch.testing.assert_close(prep(ep.support_x[:, 0].numpy()), prep(255 - ep.support_x))  # raw: inverted
    with pytest.warns(UserWarning, match=r"decoded as raw images and inverted"):
        prep(ep.support_x.permute(0, 2, 3, 1))  # [N,H,W,1]: not the stored layout


def test_uint8_arrays_of_the_stored_shape_are_inverted_as_raw_images_with_a_warning(tasks):
    """``episode.support_x.numpy()`` is decoded as raw files, so an inverting dataset's stored pixels
    were inverted a second time without a word (the tensor itself is only normalised)."""
    import warnings

    prep = Preprocessing(size=(12, 12), channels=1, mean=(0.5,), std=(0.25,), invert=True)
    stored = tasks[1].episode(1).support_x
    with pytest.warns(UserWarning, match=r"uint8 array of shape \[5, 1, 12, 12\] is decoded as raw images and "
                                         r"inverted.*torch.from_numpy"):
        out = prep(stored.numpy())
    torch.testing.assert_close(out, prep(255 - stored))  # arrays are raw images, as documented
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prep(stored.permute(0, 2, 3, 1).numpy())  # [N,H,W,1]: how image files load, no warning
        Preprocessing(size=(12, 12), channels=1)(stored.numpy())  # nothing inverted

def test_a_multi_dataset_learner_predicts_raw_images_with_the_named_datasets_preprocessing(tasks):
    """`metamtl fit` on several datasets saves each one's preprocessing in metadata (none of its
    own): dataset="name" picks it for uint8 tensors and raw images; without it, a clear error."""
    from metamtl.ensemble import Ensemble
    _, test = tasks
    a = Preprocessing(size=(12, 12), channels=1, mean=(0.5,), std=(0.25,), invert=True)
    b = Preprocessing(size=(12, 12), channels=1, mean=(0.2,), std=(0.5,))
    learner = make_learner(head_init="proto")
    learner.preprocessing, learner.metadata["preprocessing"] = None, {"a": a.to_dict(), "b": b.to_dict()}
    ep = test.episode(1)
    for name, prep in (("a", a), ("b", b)):
        ready = learner.predict(prep(ep.support_x), ep.support_y, prep(ep.query_x))
        torch.testing.assert_close(learner.predict(ep.support_x, ep.support_y, ep.query_x, dataset=name), ready)
        raw_query = [x[0].numpy() for x in (255 - ep.query_x if prep.invert else ep.query_x)]  # files on disk
        torch.testing.assert_close(learner.adapt(ep.support_x, ep.support_y, dataset=name)(raw_query), ready)
        torch.testing.assert_close(Ensemble([learner]).predict(ep.support_x, ep.support_y, ep.query_x, dataset=name),
                                   ready.log_softmax(-1))
        torch.testing.assert_close(learner.preprocess(ep.support_x, dataset=name), prep(ep.support_x))
    with pytest.raises(InputError, match=r"trained on several datasets, \['a', 'b'\].*pass dataset="):
        learner.predict(ep.support_x, ep.support_y, ep.query_x)
    with pytest.raises(InputError, match=r"\['a', 'b'\], each with its own preprocessing, none for dataset 'c'"):
        learner.predict(ep.support_x, ep.support_y, ep.query_x, dataset="c")
    ready = learner.predict(a(ep.support_x), ep.support_y, a(ep.query_x), dataset="c")  # model input: any dataset
    assert ready.shape == (15, 5)


def test_support_augmentation_of_a_multi_dataset_learner_undoes_the_right_normalisation(tasks):
    """Support copies are made from pixels: float input of a learner trained on several datasets is
    un-normalised as dataset=NAME's, as the dataset a multi-dataset model routes it to, or as the one
    normalisation all share; otherwise a clear error (it used to augment normalised input as pixels)."""
    from metamtl.data.augment import SupportAugment
    _, test = tasks
    a = Preprocessing(size=(12, 12), channels=1, mean=(0.5,), std=(0.25,))
    b = Preprocessing(size=(12, 12), channels=1, mean=(0.2,), std=(0.5,))
    tta = SupportAugment(copies=3, seed=0, augment={"name": "affine", "rotation": 10, "p": 1.0})
    learner = make_learner(head_init="proto")
    learner.preprocessing, learner.metadata["preprocessing"] = None, {"a": a.to_dict(), "b": b.to_dict()}
    ep = test.episode(1)
    expected = learner.predict(ep.support_x, ep.support_y, ep.query_x, support_augment=tta, dataset="b")
    assert not torch.allclose(expected, learner.predict(ep.support_x, ep.support_y, ep.query_x, dataset="b"))
    with pytest.raises(InputError, match=r"support augmentation makes its copies from pixels.*\['a', 'b'\].*dataset="):
        learner.predict(b(ep.support_x), ep.support_y, b(ep.query_x), support_augment=tta)
    learner.metadata["preprocessing"] = {"a": b.to_dict(), "b": b.to_dict()}  # one normalisation: no need to name it
    torch.testing.assert_close(learner.predict(b(ep.support_x), ep.support_y, b(ep.query_x), support_augment=tta), expected)
    two = MetaLearner(build_model("multidataset", inputs={"a": [1, 12, 12], "b": [1, 10, 10]}, width=8, size=4, hidden=8, blocks=2, out_features=None),
                      build_algorithm("protonet"), device="cpu", metadata={"preprocessing": {
                          "a": a.to_dict(), "b": Preprocessing(size=(10, 10), channels=1, mean=(0.2,), std=(0.5,)).to_dict()}})
    small = torch.nn.functional.interpolate(ep.support_x.float(), size=(10, 10)).round().to(torch.uint8)
    prep_b = Preprocessing(size=(10, 10), channels=1, mean=(0.2,), std=(0.5,))
    named = two.predict(small, ep.support_y, prep_b(small), support_augment=tta, dataset="b")
    torch.testing.assert_close(two.predict(prep_b(small), ep.support_y, prep_b(small), support_augment=tta), named)


def test_one_learner_serves_5_and_20_way_tasks():
    ds = toy_dataset()
    learner = make_learner(head_init="proto")
    for ways in (5, 20):
        res = learner.evaluate(EpisodeSampler(ds, ways, 1, 2, seed=3), 3, progress=False)
        assert res.ways == ways and 0 <= res.accuracy <= 1


def test_a_list_of_episodes_honours_start_and_episodes_and_refuses_settings_it_cannot_give():
    """evaluate(list) uses list[start:start+episodes]; ways/shots/queries (no source to draw them
    from) and a list mixing settings (averaged under the first one's label) are ConfigErrors."""
    ds = toy_dataset()
    learner = make_learner(head_init="proto")
    eps = [EpisodeSampler(ds, 5, 1, 2, seed=3).episode(i) for i in range(4)]
    full = learner.evaluate(eps, progress=False)
    assert full.episodes == 4
    part = learner.evaluate(eps, episodes=2, start=1, progress=False)
    assert part.episodes == 2 and part.per_episode_loss == full.per_episode_loss[1:3]
    for kw in (dict(ways=20), dict(shots=5), dict(queries=3)):
        with pytest.raises(ConfigError, match=rf"list of episodes and {next(iter(kw))}=.*pass a task source"):
            learner.evaluate(eps, progress=False, **kw)
    mixed = [eps[0], EpisodeSampler(ds, 20, 2, 2, seed=3).episode(0)]
    for listed in (mixed, mixed[::-1]):
        with pytest.raises(ConfigError, match=r"mixing episodes of different settings .*\(5, 1, 2\), \(20, 2, 2\)"):
            learner.evaluate(listed, progress=False)
    assert learner.evaluate(mixed, episodes=1, progress=False).ways == 5  # the chosen ones share a setting
    mixed_source = MixedTasks([EpisodeSampler(ds, 5, 1, 2, seed=3), EpisodeSampler(ds, 10, 1, 2, name="other")])
    with pytest.raises(ConfigError, match=r"task source mixing episodes of different settings .*\(5, 1, 2\), \(10, 1, 2\)"):
        learner.evaluate(mixed_source, episodes=8, progress=False)  # a source as its episodes listed: not one label
    with pytest.raises(ConfigError, match="start=4 is past the end of the list of 4 episodes"):
        learner.evaluate(eps, start=4, progress=False)
    from metamtl.tasks import TaskBatch
    assert learner.evaluate(TaskBatch(eps), episodes=2, start=1, progress=False).per_episode_loss == part.per_episode_loss
    with pytest.raises(ConfigError, match="episodes must be an integer >= 1, got 0"):
        learner.evaluate(eps, episodes=0, progress=False)


def test_adapt_predictor_predicts_labels(tasks):
    _, test = tasks
    learner = make_learner(head_init="proto")
    ep = test.episode(2)
    predictor = learner.adapt(ep.support_x, ep.support_y)
    labels = predictor.predict(ep.query_x)
    assert labels.shape == (15,) and labels.max() < 5


@pytest.mark.parametrize("head", [None, "simpleshot"])
def test_adapt_and_predict_run_in_eval_mode_and_leave_the_learners_mode_as_it_was(tasks, head):
    """Support and query passes run in eval mode, also a predictor called later while the learner is
    training; the learner's mode is left as it was (adapt used to leave it in eval mode)."""
    train, test = tasks
    learner = make_learner(head_init="proto")
    if head:
        learner.compute_feature_mean(train)
    ep = test.episode(0)
    seen = []
    learner.model.trunk.register_forward_hook(lambda m, i, o: seen.append(m.training))
    learner.model.train()
    logits = learner.predict(ep.support_x, ep.support_y, ep.query_x, head=head)
    assert learner.model.training and seen and not any(seen)
    predictor = learner.adapt(ep.support_x, ep.support_y, head=head)
    assert learner.model.training
    seen.clear()
    assert torch.equal(predictor(ep.query_x), logits) and learner.model.training and not any(seen)


def test_predict_adapt_and_evaluate_leave_every_modules_mode_as_the_user_set_it(tasks):
    """A frozen (eval-mode) BatchNorm in a training model came back in training mode: only the
    top-level flag was restored."""
    _, test = tasks
    learner, ep = make_learner(head_init="proto"), test.episode(0)
    learner.compute_feature_mean(test)
    learner.model.train()
    for m in learner.model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    modes = [(name, m.training) for name, m in learner.model.named_modules()]
    assert not all(training for _, training in modes)
    for head in (None, "simpleshot"):
        learner.predict(ep.support_x, ep.support_y, ep.query_x, head=head)
        learner.adapt(ep.support_x, ep.support_y, head=head)(ep.query_x)
        learner.evaluate(test, 1, head=head, progress=False)
        assert [(name, m.training) for name, m in learner.model.named_modules()] == modes, head

def test_bad_inputs_get_clear_errors(tasks):
    _, test = tasks
    learner = make_learner()
    ep = test.episode(0).to("cpu")
    with pytest.raises(InputError, match="expects images of shape"):
        learner.predict(ep.support_x[:, :, :8, :8], ep.support_y, ep.query_x)
    with pytest.raises(InputError, match="class\\(es\\) \\[1, 2\\] have no support example"):
        learner.adapt(ep.support_x[:2], torch.tensor([0, 3]))
    with pytest.raises(InputError, match="labels"):
        learner.adapt(ep.support_x[:2], torch.tensor([-1, 0]))
    with pytest.raises(InputError, match="5 examples but support_y has 4"):
        learner.adapt(ep.support_x, ep.support_y[:4])
    with pytest.raises(InputError, match="meta-learned head has 5 outputs but the task has 3"):
        learner.adapt(ep.support_x[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="NaN"):
        learner.adapt(ep.support_x * float("nan"), ep.support_y)
    with pytest.raises(InputError):
        learner.predict(ep.support_x, ep.support_y, torch.zeros(3, 1, 20, 20))


def test_bad_settings_raise_config_errors():
    model = build_model("conv4", hidden=4, image_size=8, blocks=2)
    with pytest.raises(ConfigError, match="unknown algorithm 'mamll'. Did you mean 'maml'"):
        MetaLearner(model, "mamll")
    with pytest.raises(ConfigError, match="meta_lr must be a finite number > 0"):
        MetaLearner(model, "maml", meta_lr=float("nan"))
    with pytest.raises(ConfigError, match="inner lr"):
        build_algorithm("maml", lr=-1)
    with pytest.raises(ConfigError, match="unknown inner optimizer 'adma'"):
        build_algorithm("maml", optimizer="adma")
    with pytest.raises(ConfigError, match="fixes"):
        build_algorithm("anil", adapt="all")


def test_resume_is_bit_exact(tmp_path, tasks):
    train, val = tasks
    full = make_learner(alg="maml", head_init="learned")
    full.fit(train, val, iterations=6, meta_batch_size=2, val_every=2, val_episodes=2, progress=False)

    part = make_learner(alg="maml", head_init="learned")
    part.fit(train, val, iterations=3, meta_batch_size=2, val_every=2, val_episodes=2, progress=False,
             checkpoint_dir=tmp_path, checkpoint_every=3)
    resumed = make_learner(alg="maml", head_init="learned")
    resumed.fit(train, val, iterations=6, meta_batch_size=2, val_every=2, val_episodes=2, progress=False,
                resume=tmp_path / "last.pt")
    assert resumed.iteration == 6
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # same validation numbers at the same iterations (the interrupted run also validated at its end)
    val = {r["iteration"]: r["val/accuracy"] for r in full.history if "val/accuracy" in r}
    val_resumed = {r["iteration"]: r["val/accuracy"] for r in resumed.history if "val/accuracy" in r}
    assert val == {k: val_resumed[k] for k in val}


def test_resume_from_different_config_lists_the_differences(tmp_path, tasks):
    train, _ = tasks
    learner = make_learner()
    learner.fit(train, iterations=1, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path)
    other = MetaLearner(build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=5),
                        build_algorithm("maml", steps=3, lr=0.3), device="cpu")
    with pytest.raises(CheckpointError, match="algorithm.steps: 2 != 3"):
        other.fit(train, iterations=2, meta_batch_size=2, progress=False, resume=tmp_path / "last.pt")


def test_non_finite_steps_are_skipped_then_stop(tasks):
    from metamtl.errors import TrainingError

    train, _ = tasks
    learner = make_learner(max_bad_steps=2)
    before = [p.detach().clone() for p in learner.model.parameters()]
    # every meta-gradient is NaN (weights already NaN are refused before the first step)
    learner.model.trunk.blocks[0][0].weight.register_hook(lambda g: g * float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with pytest.raises(TrainingError, match="2 consecutive non-finite"):
            learner.fit(train, iterations=5, meta_batch_size=2, progress=False)
    for a, b in zip(before, learner.model.parameters()):
        assert torch.equal(a, b.detach())


def test_unsafe_pickle_checkpoint_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": "metamtl-checkpoint", "x": Evil()}, fh)
    with pytest.raises(CheckpointError, match="refusing to load"):
        MetaLearner.load(path)


def test_preprocess_matches_dataset_pipeline():
    prep = Preprocessing(size=(6, 6), channels=1, invert=True)
    img = Image.fromarray((np.arange(144).reshape(12, 12) % 256).astype(np.uint8))
    stored = prep.decode(img)
    assert stored.shape == (1, 6, 6) and stored.dtype == torch.uint8
    torch.testing.assert_close(prep([img]), stored.float().unsqueeze(0) / 255)
