"""Bad input -> the library's own error, saying what was wrong and how to fix it.

Each row is one bad input: a call, the expected :mod:`metamtl.errors` type and a pattern the
message must contain.  Rows are grouped by surface (sampler, learner/models, config/CLI); data
files and checkpoints are in ``test_untrusted_files.py``.  Related cases already covered
elsewhere (not repeated here): ``tests/core/test_sampler.py::test_bad_arguments_raise_task_errors``,
``tests/core/test_learner.py::test_bad_inputs_get_clear_errors``,
``tests/core/test_learner.py::test_bad_settings_raise_config_errors``,
``tests/core/test_config.py`` and ``tests/data/test_data_folder.py::test_corrupt_or_truncated_image_error_names_the_file``.
"""
from __future__ import annotations

import math

import pytest
import torch

from metamtl import MetaLearner
from metamtl.adaptation import InnerLoop
from metamtl.algorithms import build_algorithm
from metamtl.cli import main
from metamtl.config import apply_overrides, config_from_dict, load_config
from metamtl.tasks import Sinusoid
from metamtl.errors import CheckpointError, ConfigError, InputError, MetamtlError, TaskError
from metamtl.models import build_model
from metamtl.tasks import Episode, EpisodeSampler, MixedTasks

from .conftest import sinusoid_config, tiny_learner, toy_dataset

pytestmark = pytest.mark.reliability("bad_input")


def fit(learner, tasks, val=None, **kw):
    return learner.fit(tasks, val, iterations=1, meta_batch_size=1, val_every=1, val_episodes=1, progress=False, **kw)


def episode_with(ep: Episode, **changes) -> Episode:
    import dataclasses

    return dataclasses.replace(ep, **changes)


def regressor(algorithm="maml", out_features=1, **inner):
    model = build_model("mlp", hidden=[8], out_features=out_features)
    inner = inner if algorithm == "protonet" else {"steps": 1, "lr": 0.01} | inner
    return MetaLearner(model, build_algorithm(algorithm, **inner), task="regression", device="cpu")


def listed(episode):
    """A task source serving ``episode`` at every index."""
    source = Sinusoid(shots=episode.shots, queries=episode.queries)
    source.episode = lambda index: episode
    return source


def sine_episode():
    return Sinusoid(shots=5, queries=5).episode(0)


class _Unsized(torch.nn.Module):
    """A user's trunk that does not say how many features it gives (no ``out_features``)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def part_cast(part, dtype):
    """A conv4 model whose trunk or head (only) is cast to ``dtype`` (or moved to a device)."""
    model = build_model("conv4", hidden=4, image_size=12, blocks=2)
    getattr(model, part).to(dtype)
    return model


def custom_learner(head, **inner):
    from metamtl.models import TrunkHead
    return MetaLearner(TrunkHead(_Unsized(), head), build_algorithm("maml", **({"steps": 1, "lr": 0.1} | inner)), device="cpu")


def trunk_learner(algorithm, out_features, flatten=True, head=None, **inner):
    """A user's trunk declaring ``out_features`` (it really gives 4 x 12 x 12 = 576 features)."""
    from metamtl.models import TrunkHead
    trunk = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), *([torch.nn.Flatten()] if flatten else []))
    trunk.out_features = out_features
    return MetaLearner(TrunkHead(trunk, head), build_algorithm(algorithm, **inner), device="cpu")


SAMPLER = [
    ("ways-more-than-classes", lambda e: EpisodeSampler(e.ds, ways=13, queries=1), TaskError, r"13-way tasks need 13 classes but 'toy' has only 12; lower ways"),
    ("shots+queries-more-than-images", lambda e: EpisodeSampler(e.ds, 5, shots=4, queries=3), TaskError, r"shots \+ queries = 7 but 12 class\(es\) have fewer images, e.g. c0 \(6\), .*; lower shots/queries or drop those classes \(move their folders or CSV rows out of the dataset; in Python: dataset.subset\)"),
    ("zero-classes", lambda e: EpisodeSampler(e.ds.subset([]), 1, 1, 1), TaskError, r"has no classes; check its root and split"),
    ("ways-zero", lambda e: EpisodeSampler(e.ds, ways=0, queries=1), TaskError, r"ways must be an integer >= 1, got 0"),
    ("ways-one", lambda e: EpisodeSampler(e.ds, ways=1, queries=1), TaskError, r"ways must be >= 2, got 1: a 1-way episode of 'toy' has a single class, so every query is trivially right"),
    ("shots-string", lambda e: EpisodeSampler(e.ds, 5, shots="1", queries=1), TaskError, r"shots must be an integer >= 1, got '1'"),
    ("queries-negative", lambda e: EpisodeSampler(e.ds, 5, 1, queries=-1), TaskError, r"queries must be an integer >= 0"),
    ("shots-astronomical", lambda e: EpisodeSampler(e.ds, 5, shots=2**70), TaskError, r"shots \+ queries = \d+ but"),
    ("seed-none", lambda e: EpisodeSampler(e.ds, 5, 1, 1, seed=None), TaskError, r"seed must be an integer, got None"),
    ("seed-nan", lambda e: EpisodeSampler(e.ds, 5, 1, 1, seed=math.nan), TaskError, r"seed must be an integer"),
    ("index-negative", lambda e: e.sampler.episode(-1), TaskError, r"episode index must be an integer >= 0, got -1"),
    ("index-string", lambda e: e.sampler.episode("3"), TaskError, r"episode index must be an integer >= 0, got '3'"),
    ("not-a-class-dataset", lambda e: EpisodeSampler(e.ds.images, 5), TaskError, r"needs a ClassDataset, got Tensor"),
    ("with-settings-typo", lambda e: e.sampler.with_settings(wayz=3), TaskError, r"with_settings accepts ways, shots, queries, seed, name, augment, hierarchy; got wayz"),
    ("mixture-weight-negative", lambda e: MixedTasks([e.sampler], weights=[-1]), TaskError, r"finite, >= 0"),
    ("mixture-weight-text", lambda e: MixedTasks([e.sampler], weights=["x"]), TaskError, r"list of numbers"),
    ("mixture-temperature-zero", lambda e: MixedTasks([e.sampler], temperature=0), TaskError, r"temperature must be > 0"),
    ("mixture-same-names", lambda e: MixedTasks([e.sampler, e.sampler]), TaskError, r"distinct names"),
    ("sinusoid-range-reversed", lambda e: Sinusoid(amplitude=(5, 1)), TaskError, r"low <= high"),
    ("sinusoid-range-text", lambda e: Sinusoid(phase="ab"), TaskError, r"pair of numbers"),
]

LEARNER = [
    # data that does not fit the model, on every path that takes tasks
    ("evaluate-wrong-image-size", lambda e: e.learner.evaluate(EpisodeSampler(toy_dataset(size=16), 5, 1, 2), 2, progress=False), InputError, r"does not fit the model: model expects images of shape \[batch, 1, 12, 12\], got \[5, 1, 16, 16\]. Build the model"),
    ("evaluate-wrong-channels", lambda e: e.learner.evaluate(EpisodeSampler(toy_dataset(channels=3), 5, 1, 2), 2, progress=False), InputError, r"got \[5, 3, 12, 12\]"),
    ("fit-wrong-image-size", lambda e: fit(e.learner, EpisodeSampler(toy_dataset(size=16), 5, 1, 2)), InputError, r"fit: episode 0 of 'toy': the data does not fit the model"),
    ("fit-wrong-channels-proto-head", lambda e: fit(e.proto, EpisodeSampler(toy_dataset(channels=3), 5, 1, 2)), InputError, r"expects images of shape \[batch, 1, 12, 12\], got \[5, 3, 12, 12\]"),
    ("fit-validation-wrong-size", lambda e: fit(e.learner, e.sampler, EpisodeSampler(toy_dataset(size=16), 5, 1, 2)), InputError, r"evaluate: episode 0 of 'toy': the data does not fit"),
    ("fit-ways-differ-from-learned-head", lambda e: fit(e.learner, EpisodeSampler(e.ds, 3, 1, 2)), InputError, r"head has 5 outputs but the task has 3 classes; build the model for 3 ways, or use head_init 'zero' or 'proto'"),
    ("fit-no-queries", lambda e: fit(e.learner, EpisodeSampler(e.ds, 5, 1, 0)), InputError, r"has no query examples; fit needs queries >= 1"),
    ("evaluate-no-queries", lambda e: e.learner.evaluate(EpisodeSampler(e.ds, 5, 1, 0), 1, progress=False), InputError, r"evaluate needs queries >= 1"),
    ("fit-dataset-instead-of-tasks", lambda e: fit(e.learner, e.ds), ConfigError, r"train_tasks must be a task source .* got ClassDataset \(wrap it: EpisodeSampler"),
    ("evaluate-none", lambda e: e.learner.evaluate(None, 2, progress=False), ConfigError, r"tasks must be a task source"),
    ("fit-regression-tasks-to-classifier", lambda e: fit(e.learner, Sinusoid()), InputError, r"regression task but this learner does classification"),
    # hand-made episodes
    ("episode-labels-out-of-range", lambda e: e.learner.evaluate([episode_with(e.episode, support_y=e.episode.support_y + 1)], progress=False), InputError, r"support labels must lie in 0..4 for a 5-way task, got \[1, 2, 3, 4, 5\]; relabel"),
    ("episode-class-without-support", lambda e: e.learner.evaluate([episode_with(e.episode, support_y=torch.tensor([0, 1, 2, 3, 3]))], progress=False), InputError, r"class\(es\) \[4\] of 0..4 have no support example"),
    ("episode-query-size-differs", lambda e: e.proto.evaluate([episode_with(e.episode, query_x=e.episode.query_x[..., :8, :8])], progress=False), InputError, r"support inputs have shape \[1, 12, 12\] but query inputs \[1, 8, 8\]"),
    ("episode-float-labels", lambda e: e.learner.evaluate([episode_with(e.episode, support_y=e.episode.support_y.float())], progress=False), InputError, r"labels must be a 1-D integer tensor"),
    ("episode-length-mismatch", lambda e: e.learner.evaluate([episode_with(e.episode, query_y=e.episode.query_y[:3])], progress=False), InputError, r"query inputs \[10, 1, 12, 12\] and labels \[3\] differ in length"),
    ("evaluate-list-of-non-episodes", lambda e: e.learner.evaluate([1, 2], progress=False), ConfigError, r"list of Episode"),
    # adapt / predict
    ("predict-query-other-size", lambda e: e.proto.predict(e.episode.support_x, e.episode.support_y, torch.zeros(2, 1, 8, 8)), InputError, r"query_x: model expects images of shape \[batch, 1, 12, 12\], got \[2, 1, 8, 8\]; give raw images"),
    ("predict-query-other-channels", lambda e: e.proto.predict(e.episode.support_x, e.episode.support_y, torch.zeros(2, 3, 12, 12)), InputError, r"query_x: model expects .* got \[2, 3, 12, 12\]"),
    ("adapt-support-missing-batch-dim", lambda e: e.proto.adapt(e.episode.support_x[0], e.episode.support_y[:1]), InputError, r"support_x: model expects .* got \[1, 12, 12\]"),
    ("adapt-negative-label", lambda e: e.proto.adapt(e.episode.support_x[:2], [-1, 0]), InputError, r"support labels must be integers in 0..N-1, got \[-1, 0\]"),
    ("adapt-empty-support", lambda e: e.proto.adapt(e.episode.support_x[:0], []), InputError, r"the support set is empty: adapt/predict need at least one labelled example of each of >= 2 classes"),
    ("predict-empty-support", lambda e: e.proto.predict(e.episode.support_x[:0], torch.zeros(0, dtype=torch.long), e.episode.query_x), InputError, r"the support set is empty"),
    ("adapt-one-way", lambda e: e.proto.adapt(e.episode.support_x[:1], [0]), InputError, r"support set has 1 class \(labels 0..0\); adapt/predict need at least 2 classes"),
    ("predict-one-way", lambda e: e.learner.predict(e.episode.support_x[:1], [0], e.episode.query_x), InputError, r"need at least 2 classes"),
    ("adapt-class-without-support", lambda e: e.proto.adapt(e.episode.support_x[:3], [0, 2, 3]), InputError, r"class\(es\) \[1\] have no support example \(relabel classes to 0..N-1\)"),
    ("adapt-labels-text", lambda e: e.proto.adapt(e.episode.support_x, ["a"] * 5), InputError, r"support_y must be labels 0..N-1"),
    ("adapt-labels-none", lambda e: e.proto.adapt(e.episode.support_x, None), InputError, r"support_y must be labels 0..N-1"),
    ("adapt-labels-2d", lambda e: e.proto.adapt(e.episode.support_x, e.episode.support_y.view(5, 1)), InputError, r"1-D tensor of labels, got shape \[5, 1\]"),
    ("adapt-labels-fractional", lambda e: e.proto.adapt(e.episode.support_x, e.episode.support_y + 0.5), InputError, r"integer class labels"),
    ("adapt-length-mismatch", lambda e: e.proto.adapt(e.episode.support_x, e.episode.support_y[:4]), InputError, r"support_x has 5 examples but support_y has 4 labels"),
    ("adapt-nan-input", lambda e: e.proto.adapt(e.episode.support_x * math.nan, e.episode.support_y), InputError, r"contains NaN or infinite values"),
    ("predict-meta-query", lambda e: e.learner.predict(e.episode.support_x, e.episode.support_y, e.episode.query_x.to("meta")), InputError, r"query_x is a tensor on torch's 'meta' device: it has a shape but no values"),
    ("adapt-meta-labels", lambda e: e.proto.adapt(e.episode.support_x, e.episode.support_y.to("meta")), InputError, r"support_y is a tensor on torch's 'meta' device"),
    ("adapt-integer-tensor", lambda e: e.proto.adapt(e.episode.support_x.long(), e.episode.support_y), InputError, r"must be float model input, uint8 images or raw images"),
    ("adapt-steps-negative", lambda e: e.proto.adapt(e.episode.support_x, e.episode.support_y, steps=-1), ConfigError, r"steps must be an integer >= 0, got -1"),
    ("evaluate-steps-text", lambda e: e.proto.evaluate(e.sampler, 1, steps="3", progress=False), ConfigError, r"steps must be an integer >= 0, got '3'"),
    ("evaluate-more-ways-than-classes", lambda e: e.proto.evaluate(e.sampler, 1, ways=20, progress=False), TaskError, r"20-way tasks need 20 classes"),
    ("evaluate-one-way", lambda e: e.proto.evaluate(e.sampler, 1, ways=1, progress=False), TaskError, r"ways must be >= 2, got 1"),
    # learner, model and algorithm settings
    ("max-bad-steps-zero", lambda e: tiny_learner(max_bad_steps=0), ConfigError, r"max_bad_steps must be an integer >= 1"),
    ("meta-lr-negative", lambda e: tiny_learner(meta_lr=-1e-3), ConfigError, r"meta_lr must be a finite number > 0, got -0.001"),
    ("meta-lr-nan", lambda e: tiny_learner(meta_lr=math.nan), ConfigError, r"meta_lr must be a finite number > 0"),
    ("meta-optimizer-typo", lambda e: tiny_learner(meta_optimizer="adma"), ConfigError, r"unknown meta optimizer 'adma'. Did you mean 'adam'"),
    ("meta-optimizer-kwargs-invalid", lambda e: tiny_learner(meta_optimizer_kwargs={"weight_decay": -1}), ConfigError, r"bad meta_optimizer_kwargs for 'adam': Invalid weight_decay value: -1"),
    ("grad-clip-zero", lambda e: tiny_learner(grad_clip=0), ConfigError, r"grad_clip must be a finite number > 0"),
    ("fit-iterations-fractional", lambda e: e.learner.fit(e.sampler, iterations=2.5, progress=False), ConfigError, r"iterations must be an integer >= 0, got 2.5"),
    ("fit-val-every-zero", lambda e: e.learner.fit(e.sampler, iterations=1, val_every=0, progress=False), ConfigError, r"val_every must be an integer >= 1"),
    ("fit-checkpoint-every-negative", lambda e: fit(e.learner, e.sampler, checkpoint_every=-5), ConfigError, r"checkpoint_every must be an integer >= 0"),
    ("model-hidden-text", lambda e: build_model("conv4", hidden="64"), ConfigError, r"Conv4 hidden must be an integer >= 1 or a list of 4 of them \(one per block\), got '64'"),
    ("model-zero-channels", lambda e: build_model("conv4", in_channels=0), ConfigError, r"in_channels to be an integer >= 1"),
    ("model-image-too-small", lambda e: build_model("conv4", image_size=8, blocks=4), ConfigError, r"image_size 8 is too small for 4 pooling blocks"),
    ("model-negative-ways", lambda e: build_model("conv4", out_features=-1), ConfigError, r"out_features must be an integer >= 1 \(the number of ways\)"),
    ("model-setting-typo", lambda e: build_model("conv4", hiden=3), ConfigError, r"does not take \['hiden'\]. Did you mean 'hidden'"),
    ("mlp-hidden-scalar", lambda e: build_model("mlp", hidden=40), ConfigError, r"MLP hidden must be a list of layer widths"),
    ("inner-lr-nan", lambda e: build_algorithm("maml", lr=math.nan), ConfigError, r"inner lr must be a finite number > 0"),
    ("inner-optimizer-kwargs-typo", lambda e: build_algorithm("maml", optimizer="momentum", optimizer_kwargs={"momentun": 0.5}), ConfigError, r"bad inner optimizer_kwargs .* unexpected keyword argument 'momentun'"),
    ("inner-optimizer-kwargs-value", lambda e: build_algorithm("maml", optimizer_kwargs={"momentum": "high"}), ConfigError, r"bad inner optimizer_kwargs"),
    ("inner-optimizer-betas-one", lambda e: build_algorithm("maml", optimizer="adam", optimizer_kwargs={"betas": [0.9]}), ConfigError, r"bad inner optimizer_kwargs \{'betas': \[0.9\]\} for 'adam'"),
    ("inner-optimizer-betas-mapping", lambda e: build_algorithm("maml", optimizer="adamax", optimizer_kwargs={"betas": {"b1": .9, "b2": .99}}), ConfigError, r"bad inner optimizer_kwargs .* for 'adamax': KeyError 0 reading a setting: .* \(betas is a list of two numbers"),
    ("inner-optimizer-betas-one-higher", lambda e: build_algorithm("maml", backend="higher", optimizer="torch.optim.Adam", optimizer_kwargs={"betas": [0.9]}), ConfigError, r"bad inner optimizer_kwargs .* for Adam"),
    ("inner-optimizer-list", lambda e: InnerLoop(optimizer=["adam"]), ConfigError, r"unknown inner optimizer \['adam'\]. Did you mean 'adam'"),
    ("meta-optimizer-betas-one", lambda e: tiny_learner(meta_optimizer_kwargs={"betas": [0.9]}), ConfigError, r"bad meta_optimizer_kwargs for 'adam'"),
    ("meta-optimizer-list", lambda e: tiny_learner(meta_optimizer=["adam"]), ConfigError, r"unknown meta optimizer \['adam'\]. Did you mean 'adam'"),
    ("inner-optimizer-class-higher-lacks", lambda e: build_algorithm("maml", backend="higher", optimizer=torch.optim.NAdam), ConfigError, r"higher has no differentiable version of NAdam: backend 'higher' takes one of \[.*'Rprop', 'SGD'\]"),
    ("inner-optimizer-maximize-higher", lambda e: build_algorithm("maml", backend="higher", optimizer_kwargs={"maximize": True}), ConfigError, r"maximize: higher's differentiable optimizers ignore it"),
    ("inner-optimizer-class-lbfgs", lambda e: build_algorithm("maml", backend="higher", optimizer=torch.optim.LBFGS), ConfigError, r"higher has no differentiable version of LBFGS"),
    ("inner-optimizer-torch-name-unknown", lambda e: build_algorithm("maml", backend="higher", optimizer="torch.optim.Rpropp"), ConfigError, r"inner optimizer 'torch.optim.Rpropp' is not a torch.optim optimizer class"),
    ("inner-first-order-text", lambda e: build_algorithm("maml", first_order="yes"), ConfigError, r"first_order must be true or false"),
    ("algorithm-typo", lambda e: build_algorithm("reptil"), ConfigError, r"unknown algorithm 'reptil'. Did you mean 'reptile'"),
    ("algorithm-setting-typo", lambda e: build_algorithm("maml", stepz=3), ConfigError, r"algorithm 'maml' does not take \['stepz'\]. Did you mean 'steps'\? It accepts \[.*'task_threads'\]"),
    ("algorithm-setting-typo-own-argument", lambda e: build_algorithm("mamlpp", learn_lrr=False), ConfigError, r"algorithm 'mamlpp' does not take \['learn_lrr'\]. Did you mean 'learn_lr'"),
    ("algorithm-setting-of-another", lambda e: build_algorithm("protonet", steps=3), ConfigError, r"algorithm 'protonet' does not take \['steps'\]. It accepts \['bn_stats', 'distance', 'learn_scale', 'scale', 'temperature'\]"),
    ("strategy-setting-typo", lambda e: build_algorithm("multitask", datasets=["a", "b"], strategy={"name": "dwa", "temprature": 2}), ConfigError, r"multi-task strategy 'dwa' does not take \['temprature'\]. Did you mean 'temperature'"),
    ("reptile-no-steps", lambda e: build_algorithm("reptile", steps=0).check_trainable(), ConfigError, r"reptile needs steps >= 1: its meta-gradient is the weight change of the inner loop"),
    ("reptile-head-only-learned-head", lambda e: build_algorithm("reptile", adapt="head").check_trainable(), ConfigError, r"reptile with adapt 'head' and head_init 'learned' never trains the trunk.*head_init 'proto'.*adapt 'all'.*requires_grad_\(False\)"),
    ("reptile-head-only-zero-head", lambda e: build_algorithm("reptile", adapt="head", head_init="zero").check_trainable(), ConfigError, r"reptile with adapt 'head' and head_init 'zero' never trains the trunk, it trains nothing"),
    ("algorithm-contradiction", lambda e: build_algorithm("reptile", first_order=False), ConfigError, r"algorithm 'reptile' fixes \{'first_order': True\}; drop the contradictory setting"),
    # regression and user-built models
    ("regression-proto-head", lambda e: regressor(head_init="proto", out_features=None), ConfigError, r"builds its head from class prototypes \(head_init='proto'\), which needs class labels; for regression"),
    ("regression-protonet", lambda e: regressor("protonet", out_features=None), ConfigError, r"algorithm 'protonet' builds its head from class prototypes"),
    ("regression-feature-head-default", lambda e: MetaLearner(build_model("mlp", in_features=1, out_features=1, hidden=(4,)), "maml", task="regression", head="logreg"), ConfigError, r"feature head 'logreg' classifies; this learner does regression"),
    ("regression-feature-head-evaluate", lambda e: regressor().evaluate([sine_episode()], progress=False, head="simpleshot"), ConfigError, r"feature head 'simpleshot' classifies; this learner does regression"),
    ("regression-nan-target", lambda e: regressor().predict(sine_episode().support_x, sine_episode().support_y * math.nan, sine_episode().query_x), InputError, r"support_y contains NaN or infinite targets"),
    ("regression-targets-wider-than-model", lambda e: regressor().predict(sine_episode().support_x, sine_episode().support_y.expand(-1, 3), sine_episode().query_x), InputError, r"support_y has shape \[5, 3\] but the model predicts 1 value\(s\) per example: give targets of shape \[n\] or \[n, 1\], or build the model with out_features=3"),
    ("regression-episode-nan-query", lambda e: regressor().evaluate([episode_with(sine_episode(), query_y=sine_episode().query_y * math.inf)], progress=False), InputError, r"episode 0 of 'sinusoid': query_y contains NaN or infinite targets"),
    ("regression-fit-targets-narrower-than-model", lambda e: fit(regressor(out_features=2), Sinusoid()), InputError, r"fit: episode 0 of 'sinusoid': support_y has shape \[\d+, 1\] but the model predicts 2 value\(s\)"),
    ("regression-episode-int-inputs", lambda e: fit(regressor(), listed(episode_with(sine_episode(), support_x=sine_episode().support_x.long()))), InputError, r"episode 0 of 'sinusoid': support_x must be float regression inputs .*got torch.int64"),
    ("regression-episode-bool-inputs", lambda e: regressor().evaluate([episode_with(sine_episode(), query_x=sine_episode().query_x > 0)], progress=False), InputError, r"query_x must be float regression inputs .*got torch.bool"),
    ("regression-episode-uint8-inputs", lambda e: regressor().evaluate([episode_with(sine_episode(), support_x=sine_episode().support_x.abs().to(torch.uint8))], progress=False), InputError, r"support_x must be float regression inputs .*got torch.uint8.*x.float\(\)"),
    ("regression-episode-nan-inputs", lambda e: fit(regressor(), listed(episode_with(sine_episode(), support_x=sine_episode().support_x * math.nan))), InputError, r"episode 0 of 'sinusoid': support_x contains NaN or infinite inputs"),
    ("regression-predict-int-targets", lambda e: regressor().predict(sine_episode().support_x, torch.tensor([1, 2, 3, 4, 5]), sine_episode().query_x), InputError, r"support_y must be float regression targets, got torch.int64"),
    ("regression-predict-bool-targets", lambda e: regressor().predict(sine_episode().support_x, sine_episode().support_y > 0, sine_episode().query_x), InputError, r"support_y must be float regression targets, got torch.bool"),
    ("regression-predict-complex-targets", lambda e: regressor().predict(sine_episode().support_x, sine_episode().support_y.to(torch.complex64), sine_episode().query_x), InputError, r"support_y must be float regression targets, got torch.complex64"),
    ("regression-support-augment", lambda e: MetaLearner(build_model("mlp", hidden=[8], out_features=1), "maml", task="regression", support_augment={"copies": 2}), ConfigError, r"support_augment makes augmented copies of support images; this learner does regression"),
    ("regression-evaluate-support-augment", lambda e: regressor().evaluate([sine_episode()], progress=False, support_augment={"copies": 2}), ConfigError, r"support_augment makes augmented copies of support images; this learner does regression"),
    ("custom-trunk-without-out-features", lambda e: custom_learner(None, head_init="zero"), ConfigError, r"the trunk _Unsized does not say how many features it gives, and per-task heads are built on them: set trunk.out_features"),
    ("custom-trunk-wrong-out-features-anil", lambda e: fit(trunk_learner("anil", 10, head_init="zero"), e.sampler), ConfigError, r"trunk.out_features is 10 but the trunk Sequential gives 576 features per example \(shape \[1, 576\] for one example\): set trunk.out_features = 576"),
    ("custom-trunk-wrong-out-features-metasgd", lambda e: fit(trunk_learner("metasgd", 10, head_init="zero"), e.sampler), ConfigError, r"trunk.out_features is 10 but .* gives 576 features"),
    ("custom-trunk-wrong-out-features-protonet", lambda e: fit(trunk_learner("protonet", 10), e.sampler), ConfigError, r"trunk.out_features is 10 but .* gives 576 features"),
    ("custom-trunk-wrong-out-features-predict", lambda e: trunk_learner("protonet", 10).predict(e.episode.support_x, e.episode.support_y, e.episode.query_x), ConfigError, r"trunk.out_features is 10 but .* gives 576 features"),
    ("custom-trunk-unflattened-features", lambda e: trunk_learner("protonet", 576, flatten=False).evaluate(e.sampler, 1, progress=False), ConfigError, r"the trunk Sequential gives features of shape \[1, 4, 12, 12\] for one example; .* need one flat feature vector per example, \[batch, features\]: flatten them in the trunk"),
    ("custom-trunk-extra-axis-learned-head", lambda e: fit(trunk_learner("maml", 12, flatten=False, head=torch.nn.Linear(12, 5)), e.sampler), InputError, r"the model gives outputs of shape \[1, 4, 12, 5\] for one example; it must give \[batch, out_features\] = \[1, 5\]"),
    ("custom-trunk-extra-axis-predict", lambda e: trunk_learner("maml", 12, flatten=False, head=torch.nn.Linear(12, 5)).predict(e.episode.support_x, e.episode.support_y, e.episode.query_x), InputError, r"outputs of shape \[1, 4, 12, 5\]"),
    ("custom-model-checkpoints-without-name", lambda e: fit(custom_learner(torch.nn.Linear(4, 5)), e.sampler, checkpoint_dir=e.tmp), CheckpointError, r"the model has no config name, .* TrunkHead\(trunk, head, config=\{'name': 'mynet'\}\)"),
    ("model-weights-bf16", lambda e: MetaLearner(build_model("conv4", hidden=4, image_size=12, blocks=2).bfloat16(), device="cpu"), ConfigError, r"the model's weights are bfloat16 \(trunk.blocks.0.0.weight\): .* call model.float\(\) .* set precision 'bf16'"),
    ("model-weights-half", lambda e: MetaLearner(build_model("conv4", hidden=4, image_size=12, blocks=2).half(), device="cpu"), ConfigError, r"the model's weights are float16"),
    ("model-head-half", lambda e: MetaLearner(part_cast("head", torch.float16), device="cpu"), ConfigError, r"the model's weights are float16 \(head.weight\): .* call model.float\(\)"),
    ("model-head-bf16", lambda e: MetaLearner(part_cast("head", torch.bfloat16), device="cpu"), ConfigError, r"the model's weights are bfloat16 \(head.weight\)"),
    ("model-weights-float32-and-float64", lambda e: MetaLearner(part_cast("trunk", torch.float64), device="cpu"), ConfigError, r"the model's weights mix float64 \(trunk.blocks.0.0.weight\) and float32 \(head.weight\): .* call model.float\(\) or model.double\(\)"),
    ("model-on-meta-device", lambda e: MetaLearner(build_model("conv4", hidden=4, image_size=12, blocks=2).to("meta"), device="cpu"), ConfigError, r"the model's weights are on torch's 'meta' device \(trunk.blocks.0.0.weight\): .* no values; .*to_empty"),
    ("model-head-on-meta-device", lambda e: MetaLearner(part_cast("head", "meta"), device="cpu"), ConfigError, r"the model's weights are on torch's 'meta' device \(head.weight\)"),
    ("learner-device-meta", lambda e: MetaLearner(build_model("mlp", hidden=[8], out_features=1), task="regression", device="meta"), ConfigError, r"device 'meta' is not supported: metamtl trains on 'cpu' or 'cuda'"),
    ("learner-device-mps", lambda e: MetaLearner(build_model("mlp", hidden=[8], out_features=1), task="regression", device="mps"), ConfigError, r"device 'mps' is not supported"),
    ("learner-task-defaults-list", lambda e: MetaLearner(build_model("mlp", hidden=[8], out_features=1), task="regression", device="cpu", task_defaults=[5]), ConfigError, r"task_defaults must be a dict \(names to values\), got list \[5\]"),
    ("learner-metadata-str", lambda e: MetaLearner(build_model("mlp", hidden=[8], out_features=1), task="regression", device="cpu", metadata="run1"), ConfigError, r"metadata must be a dict \(names to values\), got str 'run1'"),
    ("learner-needs-trunk-head", lambda e: MetaLearner(torch.nn.Linear(2, 2)), ConfigError, r"needs a metamtl.models.TrunkHead"),
]


def cfg_with(**overrides):
    return lambda e: config_from_dict(sinusoid_config(e.tmp, **overrides))


CONFIG = [
    ("unknown-section", lambda e: config_from_dict({"trian": {}}), ConfigError, r"unknown key 'trian'. Did you mean 'train'"),
    ("algorithm-name-typo", lambda e: config_from_dict({"algorithm": {"name": "maml", "nmae": "anil"}}), ConfigError, r"algorithm 'maml' does not take \['nmae'\]. Did you mean 'name'\?"),
    ("model-name-typo", lambda e: config_from_dict({"model": {"name": "conv4", "nmae": "mlp"}}), ConfigError, r"model 'conv4' does not take \['nmae'\]. Did you mean 'name'\?"),
    ("unknown-key", cfg_with(**{"train.chekpoint_every": 5}), ConfigError, r"unknown key 'chekpoint_every'. Did you mean 'checkpoint_every'"),
    ("unknown-algorithm-key", cfg_with(**{"algorithm.stepz": 2}), ConfigError, r"algorithm 'maml' does not take \['stepz'\]. Did you mean 'steps'"),
    ("unknown-model-key", cfg_with(**{"model.hiden": [3]}), ConfigError, r"Did you mean 'hidden'"),
    ("unknown-dataset", cfg_with(**{"data.name": "omniglott"}), ConfigError, r"unknown dataset 'omniglott'. Did you mean 'omniglot'"),
    ("unknown-meta-optimizer", cfg_with(**{"train.meta_optimizer": "sgdd"}), ConfigError, r"unknown meta optimizer 'sgdd'. Did you mean 'sgd'"),
    ("unknown-device", cfg_with(**{"train.device": "gpu"}), ConfigError, r"unknown device 'gpu'; use 'auto', 'cpu'"),
    ("wrong-type-int", cfg_with(**{"tasks.shots": "five"}), ConfigError, r"config.tasks.shots: expected an integer, got 'five'"),
    ("wrong-type-bool", cfg_with(**{"logging.report": "yes"}), ConfigError, r"config.logging.report: expected true/false"),
    ("wrong-type-list", cfg_with(**{"eval.settings": {"ways": 5}}), ConfigError, r"config.eval.settings: expected a list"),
    ("wrong-type-section", cfg_with(train=[1, 2]), ConfigError, r"config.train: expected a mapping of settings"),
    ("meta-lr-negative", cfg_with(**{"train.meta_lr": -0.01}), ConfigError, r"train.meta_lr must be > 0, got -0.01"),
    ("meta-lr-nan", cfg_with(**{"train.meta_lr": math.nan}), ConfigError, r"config.train.meta_lr: expected a finite number, got nan"),
    ("meta-lr-inf", cfg_with(**{"train.meta_lr": math.inf}), ConfigError, r"expected a finite number, got inf"),
    ("inner-lr-negative", cfg_with(**{"algorithm.lr": -0.4}), ConfigError, r"inner lr must be a finite number > 0, got -0.4"),
    ("inner-lr-nan", cfg_with(**{"algorithm.lr": math.nan}), ConfigError, r"inner lr must be a finite number > 0, got nan"),
    ("grad-clip-zero", cfg_with(**{"train.grad_clip": 0}), ConfigError, r"train.grad_clip must be > 0"),
    ("queries-zero", cfg_with(**{"tasks.queries": 0}), ConfigError, r"tasks.queries must be >= 1"),
    ("max-bad-steps-zero", cfg_with(**{"train.max_bad_steps": 0}), ConfigError, r"train.max_bad_steps must be >= 1"),
    ("seed-negative", cfg_with(seed=-3), ConfigError, r"seed must be an integer in 0..2\*\*63-1"),
    ("name-escapes-output-dir", cfg_with(name="../elsewhere"), ConfigError, r"must be a plain folder name"),
    ("contradiction-test-split-is-train", cfg_with(**{"data.test_split": "train"}), ConfigError, r"data.test_split \('train'\) shares classes with data.train_split \('train'\): evaluation classes must be held out"),
    ("contradiction-val-split-in-train-val", cfg_with(**{"data.train_split": "train+val", "data.val_split": "val"}), ConfigError, r"data.val_split \('val'\) shares classes with data.train_split \('train\+val'\)"),
    ("contradiction-train-split-all", cfg_with(**{"data.train_split": "all"}), ConfigError, r"data.test_split \('test'\) shares classes with data.train_split \('all'\)"),
    ("contradiction-val-split-all", cfg_with(**{"data.val_split": "all"}), ConfigError, r"data.val_split \('all'\) shares classes with data.train_split \('train'\)"),
    ("regression-eval-feature-head", cfg_with(**{"eval.heads": ["algorithm", "softkmeans"]}), ConfigError, r"eval.heads\[1\]: feature head 'softkmeans' classifies; a regression run"),
    ("regression-eval-support-augment", cfg_with(**{"eval.support_augment": {"copies": 2}}), ConfigError, r"eval.support_augment makes augmented copies of support images; a regression run"),
    ("regression-transfer", cfg_with(**{"algorithm": {"name": "transfer"}}), ConfigError, r"algorithm 'transfer' .*classes.*regression"),
    ("regression-ways", cfg_with(**{"tasks.ways": 5}), ConfigError, r"tasks.ways: regression tasks \(data.name: sinusoid\) have ways 1, got 5"),
    ("regression-hierarchy", cfg_with(**{"tasks.hierarchy": 1}), ConfigError, r"tasks.hierarchy: regression tasks .* no classes for a hierarchy"),
    ("contradiction-multidataset-test-split-is-train", lambda e: config_from_dict({"datasets": [{"name": "omniglot"}, {"name": "omniglot", "label": "b", "test_split": "train"}]}), ConfigError, r"datasets\[1\].test_split \('train'\) shares classes with datasets\[1\].train_split \('train'\)"),
    ("contradiction-multidataset-val-split-in-train-val", lambda e: config_from_dict({"datasets": [{"name": "omniglot", "train_split": "train+val", "val_split": "val", "test_split": "test"}, {"name": "omniglot", "label": "b"}]}), ConfigError, r"datasets\[0\].val_split \('val'\) shares classes"),
    ("multidataset-image-size-zero", lambda e: config_from_dict({"datasets": [{"name": "omniglot"}, {"name": "omniglot", "label": "b", "image_size": 0}]}), ConfigError, r"datasets\[1\].image_size must be >= 1, got 0"),
    ("contradiction-eval-ways-learned-head", lambda e: config_from_dict({"eval": {"settings": [{"ways": 20, "shots": 1}]}}), ConfigError, r"set algorithm.head_init to 'zero' or 'proto'"),
    ("contradiction-out-features-vs-ways", lambda e: config_from_dict({"model": {"name": "conv4", "out_features": 20}}), ConfigError, r"model.out_features is 20 but tasks.ways is 5"),
    ("contradiction-anil-adapts-all", cfg_with(**{"algorithm.name": "anil", "algorithm.adapt": "all"}), ConfigError, r"algorithm 'anil' fixes \{'adapt': 'head'\}"),
    ("override-without-value", lambda e: apply_overrides({}, ["train.iterations"]), ConfigError, r"must look like key.subkey=value"),
    ("override-empty-key-part", lambda e: apply_overrides({}, ["train..iterations=3"]), ConfigError, r"bad key 'train..iterations'"),
    ("override-bad-yaml", lambda e: apply_overrides({}, ["data.sources=[a, b"]), ConfigError, r"value is not valid YAML"),
    ("override-into-a-value", lambda e: apply_overrides({"name": "x"}, ["name.first=1"]), ConfigError, r"'name' is not a section"),
    ("config-file-missing", lambda e: load_config(e.tmp / "nope.yaml"), ConfigError, r"nope.yaml does not exist"),
    ("config-file-not-yaml", lambda e: load_config(e.write("bad.yaml", "train: [1, 2\n")), ConfigError, r"bad.yaml is not valid YAML"),
    ("config-file-not-mapping", lambda e: load_config(e.write("list.yaml", "- 1\n- 2\n")), ConfigError, r"must contain a mapping of sections"),
]


@pytest.fixture
def case_env(env, tmp_path):
    env.tmp = tmp_path

    def write(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    env.write = write
    return env


@pytest.mark.parametrize("call, error, message", [pytest.param(*c[1:], id=c[0]) for c in SAMPLER + LEARNER + CONFIG])
def test_bad_input_gets_a_clear_library_error(case_env, call, error, message):
    with pytest.raises(MetamtlError) as info:
        call(case_env)
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {info.value}"
    assert info.match(message)


def test_failed_calls_leave_the_learner_usable(env):
    """A refused input changes nothing: the same learner then trains and predicts normally."""
    learner = env.learner
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    for bad in (EpisodeSampler(toy_dataset(size=16), 5, 1, 2), EpisodeSampler(env.ds, 5, 1, 0)):
        with pytest.raises(InputError):
            fit(learner, bad)
    assert learner.iteration == 0
    assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
    fit(learner, env.sampler)
    assert learner.iteration == 1
    assert learner.predict(env.episode.support_x, env.episode.support_y, env.episode.query_x).shape == (10, 5)


# -- the command line: a message and exit code 2, never a traceback --------------------------------


@pytest.mark.parametrize("argv, message", [
    pytest.param(["fit", "{tmp}/missing.yaml"], "missing.yaml does not exist", id="fit-missing-config"),
    pytest.param(["fit", "{cfg}", "train.iteratons=3"], "unknown key 'iteratons'. Did you mean 'iterations'", id="fit-override-typo"),
    pytest.param(["fit", "{cfg}", "train.meta_lr=.nan"], "expected a finite number, got nan", id="fit-nan-lr"),
    pytest.param(["fit", "{cfg}", "algorithm.lr=-1"], "inner lr must be a finite number > 0", id="fit-negative-inner-lr"),
    pytest.param(["fit", "{cfg}", "data.name=folder", "data.root={tmp}/nowhere"], "does not exist", id="fit-missing-data-folder"),
    pytest.param(["fit", "{cfg}", "--resume", "{tmp}/none.pt"], "none.pt does not exist", id="fit-missing-resume-checkpoint"),
    pytest.param(["evaluate", "{tmp}/none.pt"], "none.pt does not exist", id="evaluate-missing-checkpoint"),
    pytest.param(["evaluate", "{cfg}"], "not a readable checkpoint", id="evaluate-yaml-as-checkpoint"),
    pytest.param(["evaluate", "{tmp}/cfg.yaml"], "cfg.yaml is not a readable checkpoint: it starts with b'a fi', not a torch checkpoint's bytes", id="evaluate-text-file-as-checkpoint"),
    pytest.param(["evaluate", "{tmp}"], "{tmp} is a folder, not a checkpoint file with no checkpoint in it", id="evaluate-a-folder"),
    # numeric options: checked before the checkpoint is even opened (none.pt does not exist), never
    # replaced by the learner's defaults
    pytest.param(["evaluate", "{tmp}/none.pt", "--ways", "0"], "--ways must be an integer >= 1, got 0", id="evaluate-ways-zero"),
    pytest.param(["evaluate", "{tmp}/none.pt", "--ways", "-5"], "--ways must be an integer >= 1, got -5", id="evaluate-ways-negative"),
    pytest.param(["evaluate", "{tmp}/none.pt", "--shots", "0"], "--shots must be an integer >= 1, got 0", id="evaluate-shots-zero"),
    pytest.param(["evaluate", "{tmp}/none.pt", "--queries", "0"], "--queries must be an integer >= 1, got 0", id="evaluate-queries-zero"),
    pytest.param(["evaluate", "{tmp}/none.pt", "--queries", "-1"], "--queries must be an integer >= 1, got -1", id="evaluate-queries-negative"),
    pytest.param(["evaluate", "{tmp}/none.pt", "--episodes", "0"], "--episodes must be an integer >= 1, got 0", id="evaluate-episodes-zero"),
    pytest.param(["evaluate", "{tmp}/none.pt", "--episodes", "-600"], "--episodes must be an integer >= 1, got -600", id="evaluate-episodes-negative"),
    pytest.param(["evaluate", "{tmp}/none.pt", "--steps", "-1"], "--steps must be an integer >= 0, got -1", id="evaluate-steps-negative"),
    # output paths: checked before any work
    pytest.param(["evaluate", "{tmp}/none.pt", "--json", "{tmp}"], "--json file {tmp} is a folder", id="evaluate-json-is-a-folder"),
    pytest.param(["evaluate", "{tmp}/none.pt", "--json", "{tmp}/cfg.yaml/out.json"], "--json file {tmp}/cfg.yaml/out.json cannot be written", id="evaluate-json-under-a-file"),
    pytest.param(["report", "{tmp}/none", "--out", "{tmp}"], "--out file {tmp} is a folder", id="report-out-is-a-folder"),
    pytest.param(["report", "{tmp}/none", "--steps-episodes", "-1"], "--steps-episodes must be an integer >= 0, got -1", id="report-steps-episodes-negative"),
    pytest.param(["report", "{tmp}/none", "--steps", "0", "-2"], "--steps must be an integer >= 0, got -2", id="report-steps-negative"),
])
def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys, argv, message):
    import yaml

    cfg = tmp_path / "sine.yaml"
    cfg.write_text(yaml.safe_dump(sinusoid_config(tmp_path / "runs")))
    (tmp_path / "cfg.yaml").write_text("a file, not a folder")
    code = main([a.format(tmp=tmp_path, cfg=cfg) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("metamtl: error: ") and message.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err


# -- eval.settings the test split cannot serve: refused before training ------------------------------


@pytest.fixture
def folder_config(tmp_path):
    """A `metamtl fit` config on a 10-class folder of 4 distinct 8x8 images each (test split: 2 classes)."""
    import numpy as np
    from PIL import Image

    for c in range(10):
        for i in range(4):
            (tmp_path / "data" / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), 20 * c + i, np.uint8)).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    cfg = sinusoid_config(tmp_path / "runs", **{
        "data": {"name": "folder", "root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")},
        "tasks": {"ways": 2, "shots": 1, "queries": 1},
        "model": {"name": "conv4", "hidden": 4, "blocks": 2},
        "algorithm": {"name": "protonet"},
        "eval": {"episodes": 2, "queries": 1, "settings": [{"ways": 2, "shots": 1}]},
    })
    return tmp_path, cfg


@pytest.mark.parametrize("settings, queries, message", [
    pytest.param([{"ways": 2, "shots": 1}, {"ways": 5, "shots": 1}], 1,
                 r"eval.settings\[1\] \(5-way 1-shot, eval.queries 1\) cannot be evaluated on the test split \('test'\): 5-way tasks need 5 classes but", id="more-ways-than-test-classes"),
    pytest.param([{"ways": 2, "shots": 3}], 2,
                 r"eval.settings\[0\] \(2-way 3-shot, eval.queries 2\) .* shots \+ queries = 5 but", id="shots-plus-queries-more-than-images"),
    pytest.param([{"ways": 2, "shots": 1, "hierarchy": {f"c{c}": f"s{c}" for c in range(10)}}], 1,
                 r"eval.settings\[0\] \(2-way 1-shot within one superclass \(hierarchy .*\), eval.queries 1\) cannot be evaluated on the test split \('test'\): 2-way episodes within one superclass need a superclass with >= 2 classes",
                 id="hierarchy-superclasses-smaller-than-ways"),
])
def test_eval_settings_the_test_split_cannot_serve_are_refused_before_training(folder_config, capsys, settings, queries, message):
    import re

    import yaml

    tmp_path, cfg = folder_config
    cfg["eval"].update(settings=settings, queries=queries)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "nothing was trained" in err and not (tmp_path / "runs" / "sine" / "last.pt").exists()


@pytest.mark.parametrize("section, key, message", [
    ("data", "train_augment", r"augment of '.*' \(images \[1, 8, 8\]\): augment padding 8 must be smaller than the image size 8x8"),
    ("eval", "support_augment", r"eval.support_augment: augment of '.*' \(images \[1, 8, 8\]\): augment padding 8 must be smaller"),
])
def test_augmentation_too_large_for_the_images_is_refused_before_training(folder_config, capsys, section, key, message):
    """Crop padding as large as the 8x8 images: before, the training augment failed at the first
    episode and test-time support copies only at evaluation, after the whole training run."""
    import re

    import yaml

    tmp_path, cfg = folder_config
    crop = {"name": "crop_flip", "padding": 8}
    cfg[section][key] = crop if key == "train_augment" else {"copies": 2, "augment": crop}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "runs" / "sine" / "last.pt").exists()


def test_eval_queries_too_many_for_the_test_images_names_the_setting_and_what_fits(folder_config, capsys):
    """The default eval.queries (15) on a folder of 4 images per class: the error says which setting
    decides it and the largest value that fits, not just "shots + queries = 16"."""
    import yaml

    tmp_path, cfg = folder_config
    del cfg["eval"]["queries"]  # the default, 15
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.test_split ('test') cannot give held-out episodes" in err, err
    assert "tasks.shots (1) + eval.queries (15) images per class" in err
    assert "4 images in its smallest class, eval.queries: 3 or less fits" in err
    assert not (tmp_path / "runs" / "sine" / "last.pt").exists()


def test_images_that_are_not_square_are_refused_before_training_naming_the_fix(folder_config, capsys):
    """The models take square images: a folder of 8x6 images is refused before training with the setting
    that fixes it (it used to train nothing and fail on the first episode's shape)."""
    import numpy as np
    import yaml
    from PIL import Image

    tmp_path, cfg = folder_config
    for c in range(10):
        for i in range(4):
            Image.fromarray(np.full((8, 6), 20 * c + i, np.uint8)).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "its images are stored at 8x6 (height x width" in err and "set data.image_size: N" in err, err
    assert not (tmp_path / "runs" / "sine" / "last.pt").exists()
    cfg["data"]["image_size"] = 8
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(path), "--no-progress"]) == 0, capsys.readouterr().err


def test_a_held_out_split_of_one_class_is_refused_naming_the_split(tmp_path):
    """A 1-way validation split would score 100% whatever the model (and pick best.pt by it)."""
    from metamtl.experiment import _held_out

    cfg = config_from_dict(sinusoid_config(tmp_path, **{"data.name": "folder", "data.val_split": "val", "tasks.ways": 5, "tasks.shots": 1,
                                                    "algorithm.head_init": "zero", "eval.settings": [{"ways": 2, "shots": 1}]}))
    with pytest.raises(TaskError, match=r"data.val_split \('val'\) of 'toy' holds a single class \(c3\): too few for held-out "
                                        r"episodes, which need 2 or more ways; .* or set data.val_split: null"):
        _held_out(toy_dataset().subset([3]), cfg, 1, 2)
    with pytest.raises(TaskError, match=r"data.test_split \('test'\) .* set data.test_split: null"):
        _held_out(toy_dataset().subset([3]), cfg, 2, 2, key="test_split")
    assert _held_out(toy_dataset().subset([3, 4]), cfg, 1, 2).ways == 2  # at most the split's classes


def test_a_user_trunk_without_out_features_takes_its_feature_count_from_the_head(env):
    """Per-task heads need the trunk's feature count; a head's in_features answers when the trunk
    does not say, so a user's network with a linear head trains with a fresh per-task head."""
    learner = custom_learner(torch.nn.Linear(4, 5))
    assert learner.model.num_features == 4
    transfer = MetaLearner(learner.model, build_algorithm("transfer", num_classes=5, steps=1), device="cpu")
    episode = env.episode
    assert transfer.predict(episode.support_x, episode.support_y, episode.query_x).shape == (10, 5)


def test_a_user_trunk_with_unflattened_features_and_its_own_flattening_head_still_trains(env):
    """Only per-task heads and prototypes need flat features: a model's own head takes whatever its trunk gives."""
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(576, 5))
    head.out_features = 5
    learner = trunk_learner("maml", None, flatten=False, head=head, steps=1, lr=0.1)
    fit(learner, env.sampler)
    assert learner.predict(env.episode.support_x, env.episode.support_y, env.episode.query_x).shape == (10, 5)


@pytest.mark.parametrize("queries, message, not_in", [
    (2, r"lower tasks.ways, or set tasks.hierarchy: null", "tasks.queries"),  # images suffice: superclasses too small
    (6, r"tasks.shots \(1\) \+ tasks.queries \(6\) images per class; with 6 images in its smallest class, tasks.queries: 5 or less fits", None),
])
def test_held_out_episodes_within_superclasses_name_the_setting_that_does_not_fit(queries, message, not_in):
    """Validation episodes within one superclass (tasks.hierarchy) of too few classes name tasks.ways
    and tasks.hierarchy, not the images-per-class advice, which is only given when images are short."""
    from metamtl.experiment import _held_out

    cfg = config_from_dict({"tasks": {"ways": 3, "shots": 1, "queries": queries}, "algorithm": {"name": "protonet"}})
    pairs = {f"c{i}": f"s{i // 2}" for i in range(12)}  # superclasses of 2 classes: 3-way episodes cannot be drawn
    with pytest.raises(TaskError, match=message) as info:
        _held_out(toy_dataset(), cfg, 0, queries, hierarchy=pairs)
    assert not_in is None or not_in not in str(info.value)


def test_a_run_folder_given_as_a_checkpoint_names_the_checkpoint_inside():
    import tempfile
    from pathlib import Path

    from metamtl.checkpoint import safe_load
    from metamtl.errors import CheckpointError

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "learner.pt").write_bytes(b"")
        with pytest.raises(CheckpointError, match=rf"{tmp} is a folder, not a checkpoint file: give one of its checkpoints, e.g. {tmp}/learner.pt"):
            safe_load(tmp)


def test_a_run_resumed_from_another_folders_checkpoint_evaluates_its_own_best(folder_config, capsys):
    """A run resumed from another folder's checkpoint had no best.pt of its own (it compared with the
    other folder's best) and said it evaluated the last weights; it now keeps its own best.pt and
    evaluates it."""
    import yaml

    tmp_path, cfg = folder_config
    cfg["train"].update(iterations=4, val_every=2, val_episodes=2, checkpoint_every=2)
    cfg["eval"]["checkpoint"] = "best"
    first = tmp_path / "a.yaml"
    first.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(first), "--no-progress"]) == 0
    assert "holds no best.pt" not in capsys.readouterr().out
    cfg.update(name="elsewhere")
    cfg["train"]["iterations"] = 6
    second = tmp_path / "b.yaml"
    second.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(second), "--no-progress", "--resume", str(tmp_path / "runs" / "sine" / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert "warning: eval.checkpoint is 'best' but" not in out
    assert (tmp_path / "runs" / "elsewhere" / "best.pt").is_file()


def test_a_user_trunk_that_cannot_run_on_the_data_is_an_input_error_naming_the_shape(env):
    """A user trunk built for RGB given grey images failed inside the library's one-example check
    with torch's bare RuntimeError (a built-in trunk gives an InputError)."""
    from metamtl.models import TrunkHead

    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten())
    trunk.out_features = 576
    learner = MetaLearner(TrunkHead(trunk, None), "protonet", device="cpu", channels_last=False)
    ep = env.episode
    with pytest.raises(InputError, match=r"the trunk Sequential could not run on inputs of shape \[1, 1, 12, 12\]") as info:
        learner.predict(ep.support_x, ep.support_y, ep.query_x)
    assert "weight of size" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(InputError, match=r"could not run on inputs of shape \[1, 1, 12, 12\]"):
        fit(learner, env.sampler)


def test_a_user_head_without_out_features_takes_them_from_its_last_linear_layer_or_is_refused(env):
    """TrunkHead.out_features read head.out_features: an nn.Sequential head failed in fit/predict with
    the misleading AttributeError "'TrunkHead' object has no attribute 'out_features'"."""
    from metamtl.models import TrunkHead

    head = torch.nn.Sequential(torch.nn.Linear(576, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    learner = trunk_learner("maml", 576, head=head, steps=1, lr=0.1)
    assert learner.model.out_features == 5
    fit(learner, env.sampler)
    assert learner.predict(env.episode.support_x, env.episode.support_y, env.episode.query_x).shape == (10, 5)

    class Scale(torch.nn.Module):  # no out_features and no linear layer: its outputs cannot be known
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.w * x

    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 5))
    trunk.out_features = 5
    with pytest.raises(ConfigError, match=r"the head Scale does not say how many outputs it gives.*set head.out_features"):
        MetaLearner(TrunkHead(trunk, Scale()), build_algorithm("maml", steps=1, lr=0.1), device="cpu")


class ListedSource:
    """A user's task source: the TaskSource protocol (``episode(i)``, ways/shots/queries/name), nothing more."""

    def __init__(self, episodes):
        self.episodes = episodes
        self.ways, self.shots, self.queries, self.name = episodes[0].ways, episodes[0].shots, episodes[0].queries, "listed"

    def episode(self, i):
        return self.episodes[i % len(self.episodes)]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_classification_labels_of_any_integer_dtype_train_and_evaluate_as_int64(env, dtype):
    """int32/int16/uint8 labels (from numpy, ``arange(dtype=...)``) are class labels: the same
    cross-entropy as int64, never a raw torch error nor the regression loss."""
    eps = [env.sampler.episode(i) for i in range(2)]
    as_dtype = [episode_with(e, support_y=e.support_y.to(dtype), query_y=e.query_y.to(dtype)) for e in eps]
    for make in (tiny_learner, lambda: tiny_learner("proto")):
        want, got = make().evaluate(eps, progress=False), make().evaluate(as_dtype, progress=False)
        assert got.accuracy == want.accuracy and got.loss == pytest.approx(want.loss)
        a, b = make(), make()
        fit(a, ListedSource(eps)), fit(b, ListedSource(as_dtype))
        assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_episodes_with_unequal_shots_per_class_are_grouped_by_their_real_sizes(env):
    """An episode with 2 and 3 shots for its classes is valid; adapted with regular episodes in one
    call (``task_chunk=2``, ``fit`` meta-batches) it is stacked only with episodes of its own sizes."""
    eps = [env.sampler.episode(i) for i in range(4)]
    extra = eps[1].support_x[:1], eps[1].support_y[:1]
    eps[1] = episode_with(eps[1], support_x=torch.cat([eps[1].support_x, extra[0]]),
                          support_y=torch.cat([eps[1].support_y, extra[1]]))
    assert eps[1].validate() is eps[1]

    def make(chunk):
        torch.manual_seed(0)
        model = build_model("conv4", hidden=4, image_size=12, blocks=2, out_features=5)
        return MetaLearner(model, build_algorithm("maml", steps=1, lr=0.3, task_chunk=chunk),
                           preprocessing=env.ds.preprocessing, device="cpu")

    one, two = make(1).evaluate(eps, progress=False), make(2).evaluate(eps, progress=False)
    assert two.per_episode_loss == pytest.approx(one.per_episode_loss, abs=1e-5)
    make(2).fit(ListedSource(eps), iterations=1, meta_batch_size=4, progress=False)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_image_inputs_other_than_uint8_get_an_input_error(env, dtype):
    """int64 pixels (numpy's default) are neither stored uint8 images nor float model input: an
    InputError naming the tensor and its dtype, in evaluate and fit, never a raw conv2d error."""
    ep = env.sampler.episode(0)
    bad = episode_with(ep, support_x=ep.support_x.to(dtype), query_x=ep.query_x.to(dtype))
    with pytest.raises(InputError, match=rf"support_x is a {dtype}.*uint8 pixels.*float"):
        env.learner.evaluate([bad], progress=False)
    with pytest.raises(InputError, match=rf"support_x is a {dtype}"):
        fit(tiny_learner(), ListedSource([bad]))


def test_peak_memory_resolves_its_device_like_the_learner():
    """PeakMemory('cuda') without a GPU and PeakMemory('auto') were bare RuntimeErrors from torch,
    and PeakMemory('meta') silently measured the process's RSS."""
    from metamtl.memory import PeakMemory

    assert PeakMemory("auto").cuda == torch.cuda.is_available()
    for device, message in [("meta", r"device 'meta' is not supported: metamtl trains on 'cpu' or 'cuda'"),
                            ("gpu", r"unknown device 'gpu'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
                            *([] if torch.cuda.is_available() else
                              [("cuda", r"device 'cuda' requested but CUDA is not available")])]:
        with pytest.raises(ConfigError, match=message):
            PeakMemory(device)
