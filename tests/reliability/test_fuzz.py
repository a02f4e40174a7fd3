"""Property-based fuzzing: every input either works or raises the library's own error type.

Hypothesis generates sampler arguments, config files, command-line overrides, support labels and
damaged checkpoint bytes.  Default runs are derandomized (the same examples on every run, so CI is
not flaky) and bounded by ``max_examples`` (about 10 s in all); ``HYPOTHESIS_PROFILE=deep`` draws
ten times as many fresh random examples.
The outcome of every example is tallied for ``benchmarks/reliability_counts.py``.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metamtl import MetaLearner
from metamtl.config import Config, apply_overrides, config_from_dict
from metamtl.data import ClassDataset
from metamtl.errors import MetamtlError
from metamtl.tasks import EpisodeSampler, MixedTasks, task_batches

from .conftest import sinusoid_config, tiny_learner, toy_dataset

pytestmark = pytest.mark.reliability("fuzz")

SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 1


def fuzz(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def outcome(tally: dict, name: str, call):
    """Run ``call``; a MetamtlError counts as handled, anything else is counted (``other``) and
    fails the test."""
    try:
        result = call()
    except MetamtlError:
        tally[name]["library_error"] += 1
        return None
    except Exception:
        tally[name]["other"] += 1
        raise
    tally[name]["worked"] += 1
    return result


#: anything a user might pass where a number is expected
ANY = st.one_of(
    st.integers(-3, 40), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(0, 5), max_size=3),
)


def mostly(valid: st.SearchStrategy, share: float = 0.8) -> st.SearchStrategy:
    """``valid`` in about ``share`` of the examples, :data:`ANY` otherwise."""
    return st.floats(0, 1).flatmap(lambda u: valid if u < share else ANY)


SMALL_INT = mostly(st.integers(1, 4), 0.9)
SEED = mostly(st.integers(0, 2**64))


@st.composite
def class_datasets(draw) -> ClassDataset:
    size = st.floats(0, 1).flatmap(lambda u: st.integers(6, 9) if u < 0.85 else st.integers(0, 5))
    counts = draw(st.lists(size, min_size=0, max_size=8))
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)], dtype=torch.long)
    images = torch.randint(0, 256, (len(labels), 1, 3, 3), dtype=torch.uint8)
    return ClassDataset(images, labels, [f"c{i}" for i in range(len(counts))], name="fuzz")


@fuzz(200)
@given(ds=class_datasets(), ways=SMALL_INT, shots=SMALL_INT, queries=SMALL_INT, seed=SEED, index=SEED)
def test_sampler_arguments(tally, ds, ways, shots, queries, seed, index):
    ep = outcome(tally, "sampler", lambda: EpisodeSampler(ds, ways, shots, queries, seed=seed).episode(index))
    if ep is not None:  # a working sampler gives a well-formed episode
        assert ep.support_x.shape == (ep.ways * ep.shots, 1, 3, 3)
        assert ep.query_y.tolist() == sorted(ep.query_y.tolist()) and len(set(ep.classes)) == ep.ways
        ep.validate()


@fuzz(100)
@given(weights=mostly(st.one_of(st.lists(st.floats(0, 5), min_size=2, max_size=2), st.sampled_from(["equal", "size", None])), 0.7),
       temperature=mostly(st.floats(0.1, 10)), seed=SEED, index=SEED, start=SMALL_INT,
       # any type, but not a billion-episode batch: that is valid and would only fill the memory
       batch=st.one_of(st.integers(-3, 8), st.floats(), st.none(), st.booleans(), st.text(max_size=2)),
       rank=st.one_of(st.just(0), SMALL_INT), world=st.one_of(st.just(1), SMALL_INT))
def test_mixtures_and_meta_batches(tally, weights, temperature, seed, index, batch, start, rank, world):
    a = EpisodeSampler(toy_dataset(name="a"), 2, 1, 1)
    b = EpisodeSampler(toy_dataset(classes=4, name="b"), 2, 1, 1)
    outcome(tally, "mixture", lambda: MixedTasks([a, b], weights, temperature, seed).episode(index))
    outcome(tally, "meta-batches", lambda: next(task_batches(a, batch, start, num_batches=1, rank=rank, world_size=world)))


SECTIONS = {f.name: f for f in Config.__dataclass_fields__.values()}
KEYS = sorted({"name", "seed", "output_dir", "data.name", "data.root", "data.sources", "data.image_size",
               "data.split_fractions", "data.val_split", "data.test_split", "data.train_split", "tasks.ways",
               "tasks.shots", "tasks.queries", "tasks.seed", "tasks.num_workers", "model.name", "model.hidden",
               "model.out_features", "algorithm.name", "algorithm.lr", "algorithm.steps", "algorithm.optimizer",
               "algorithm.first_order", "algorithm.head_init", "algorithm.optimizer_kwargs", "algorithm.eval_steps",
               "train.iterations", "train.meta_lr", "train.meta_optimizer", "train.grad_clip", "train.max_bad_steps",
               "train.val_every", "train.checkpoint_every", "train.device", "train.budget_minutes",
               "eval.episodes", "eval.steps", "eval.settings", "logging.wandb", "logging.tags", "trian.x",
               "train.iteratons", "model.hiden"})
VALUES = st.one_of(st.integers(1, 5), st.floats(1e-4, 1.0), st.booleans(), st.sampled_from(["maml", "anil", "reptile", "fomaml", "conv4", "mlp", "adam", "sgd",
                                         "cpu", "auto", "train", "val", "test", "zero", "proto", "learned"]),
                   st.dictionaries(st.sampled_from(["ways", "shots", "momentum", "x"]), ANY, max_size=2),
                   st.lists(st.dictionaries(st.sampled_from(["ways", "shots"]), SMALL_INT, max_size=2), max_size=2))


@fuzz(150)
@given(changes=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3))
def test_config_values(tally, tmp_path, changes):
    cfg = outcome(tally, "config", lambda: config_from_dict(sinusoid_config(tmp_path, **changes)))
    if cfg is not None:  # a valid config builds its algorithm (the model needs the data's shape)
        from metamtl.algorithms import build_algorithm

        build_algorithm(**cfg.algorithm)


@fuzz(150)
@given(overrides=st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=8)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.sampled_from(
        ["", "1", "-1", "0.5", ".nan", ".inf", "null", "true", "[1, 2]", "{a: 1}", "[", "'x", "1e400", "0x10"])),
    st.text(max_size=12)), max_size=3))
def test_command_line_overrides(tally, tmp_path, overrides):
    outcome(tally, "overrides", lambda: config_from_dict(apply_overrides(sinusoid_config(tmp_path), overrides)))


@fuzz(80)
@given(labels=mostly(st.lists(st.integers(0, 2), min_size=3, max_size=6), 0.6) | st.lists(
           st.one_of(st.integers(-2, 6), st.floats(-1, 6), st.none(), st.text(max_size=1)), max_size=6),
       steps=st.one_of(st.none(), st.integers(0, 2), st.integers(-3, -1), st.floats(), st.text(max_size=2), st.booleans()))
def test_support_labels_and_steps(tally, adapt_env, labels, steps):
    learner, support, query = adapt_env
    outcome(tally, "predict", lambda: learner.predict(support[: len(labels)] if isinstance(labels, list) else support,
                                                       labels, query, steps=steps))


@pytest.fixture(scope="module")
def adapt_env():
    learner = tiny_learner("proto")
    ep = EpisodeSampler(toy_dataset(), 5, 1, 2).episode(0)
    return learner, ep.support_x.repeat(2, 1, 1, 1)[:6], ep.query_x


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    path = tiny_learner().save(tmp_path_factory.mktemp("ckpt") / "good.pt", training_state=True)
    return path.read_bytes()


@fuzz(50)
@given(data=st.data())
def test_damaged_checkpoint_bytes(tally, tmp_path, checkpoint_bytes, data):
    raw = bytearray(checkpoint_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "zero-run"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "truncate":
            del raw[at:]
        elif kind == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif kind == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif raw:
            raw[at:at + 64] = bytes(len(raw[at:at + 64]))
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(raw))
    learner = outcome(tally, "checkpoint", lambda: MetaLearner.load(path, device="cpu"))
    if learner is not None:  # whatever loads is a usable learner
        assert learner.model.config["name"] == "conv4"


def test_an_input_that_raises_anything_else_is_counted_before_it_fails_the_test():
    """The tally counted only ``worked`` and ``library_error``: reliability_counts.py printed 0
    under "anything else" even when a fuzz test had failed."""
    from collections import Counter, defaultdict

    counts: defaultdict[str, Counter] = defaultdict(Counter)
    with pytest.raises(ZeroDivisionError):
        outcome(counts, "target", lambda: 1 / 0)
    assert counts["target"] == Counter(other=1)
