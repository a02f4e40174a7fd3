"""benchmarks/time_to_accuracy.py: what a snapshot holds, and the record it writes."""
from __future__ import annotations

import argparse

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import ClassDataset
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler


@pytest.fixture(scope="module")
def tta(benchmark_script):
    return benchmark_script("time_to_accuracy")


def _metasgd() -> MetaLearner:
    torch.manual_seed(0)
    model = build_model("conv4", hidden=4, image_size=12, blocks=2, out_features=5)
    return MetaLearner(model, build_algorithm("metasgd", steps=1, lr=0.4), meta_lr=0.01, device="cpu")


def test_a_snapshot_restores_the_algorithms_learned_rates_too(tta):
    """A snapshot held ``learner.model`` only: Meta-SGD's learned rates were scored untrained."""
    g = torch.Generator().manual_seed(0)
    ds = ClassDataset(torch.randint(0, 256, (60, 1, 12, 12), dtype=torch.uint8, generator=g),
                      torch.arange(10).repeat_interleave(6), [f"c{i}" for i in range(10)], name="toy")
    snaps = tta.Snapshots(every=0.0)
    trained = _metasgd()
    trained.fit(EpisodeSampler(ds, 5, 1, 2, seed=0), iterations=3, meta_batch_size=2, progress=False,
                callbacks=[snaps])
    fresh = _metasgd()
    moved = [not torch.equal(a, b) for a, b in zip(trained.algorithm.state_dict().values(),
                                                   fresh.algorithm.state_dict().values())]
    assert any(moved)  # the rates were meta-learned: a model-only snapshot would lose them
    tta.restore(fresh, snaps.rows[-1])
    for (name, a), b in zip(trained.algorithm.state_dict().items(), fresh.algorithm.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(trained.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)


def _results_copy(tmp_path, monkeypatch, tta):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("# r\n\n<!-- tta:start -->\nold\n<!-- tta:end -->\n\nkeep\n")
    monkeypatch.setattr(tta, "REPO", tmp_path)
    return tmp_path / "benchmarks" / "RESULTS.md"


def test_the_record_names_the_evaluated_runs_config_episodes_and_training_commit(tta, tmp_path, monkeypatch):
    """The record named evaluate's --config default, "600 episodes, 15 queries" and the evaluation's
    commit whatever the snapshots had been trained and scored with."""
    path = _results_copy(tmp_path, monkeypatch, tta)
    info = {"config": "configs/benchmarks/omniglot_5w5s.yaml", "episodes": 100, "queries": 5,
            "commit": "abc1234", "date": "2026-12-01", "command": "python benchmarks/time_to_accuracy.py train"}
    tta.write_results(["| core | x | 1.00 min | 96% |"], argparse.Namespace(target=0.95), {"core": info})
    text = path.read_text()
    assert "configs/benchmarks/omniglot_5w5s.yaml" in text and "omniglot_5w1s" not in text
    assert "100 episodes, 5 queries" in text and "600 episodes" not in text
    assert "commit abc1234, date 2026-12-01" in text and "flock" not in text
    assert text.endswith("<!-- tta:end -->\n\nkeep\n")
    other = {**info, "config": "configs/omniglot_5w1s.yaml", "episodes": 600}
    assert tta.runs_cell({"a": info, "b": other}).count("config ") == 2  # differing runs: one entry each


def test_backend_curves_of_an_algorithm_without_an_inner_loop_are_refused_with_the_fix(tta):
    """The default command compared backends on the demo config, whose algorithm (protonet) takes no
    backend: it failed with a ConfigError before training; it now says to pass --variant curves."""
    args = argparse.Namespace(config=str(tta.REPO / "configs" / "omniglot_5w1s.yaml"), variant=None, backends="core,higher")
    with pytest.raises(SystemExit, match="no inner loop, so no backends to compare: pass --variant"):
        tta.variants(args)
    args.config = str(tta.REPO / "configs" / "compare" / "maml.yaml")
    assert tta.variants(args) == {"core": ["algorithm.backend=core"], "higher": ["algorithm.backend=higher"]}
    args.variant = ['wide="model.hidden=96"']
    assert tta.variants(args) == {"wide": ["model.hidden=96"]}


def test_the_documented_default_train_command_has_backends_to_compare(tta, monkeypatch, tmp_path):
    """`time_to_accuracy.py train --minutes 5`, the docstring's first command, exited at once: its
    default config, the demo, became ProtoNet, which has no inner loop and so no backends."""
    import shlex
    import sys

    from metamtl.config import load_config

    seen = []
    monkeypatch.setattr(tta, "train", seen.append)
    monkeypatch.setenv("METAMTL_DATA", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["time_to_accuracy.py", "train", "--minutes", "5"])
    tta.main()
    assert tta.variants(seen[0]) == {"core": ["algorithm.backend=core"], "higher": ["algorithm.backend=higher"]}
    # the variants of the commands RESULTS.md records still apply to the default config
    for spec in ("algorithm.backend=higher", "algorithm.backend=auto train.channels_last=true",
                 "'algorithm={name: protonet}' train.channels_last=true"):
        load_config(seen[0].config, shlex.split(spec))
