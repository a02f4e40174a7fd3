"""benchmarks/compare_algorithms.py: the table names what differs between methods' training."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def compare(benchmark_script):
    return benchmark_script("compare_algorithms")


def _result(augment):
    data = {"sources": ["a"]} if augment is None else {"sources": ["a"], "train_augment": augment}
    return {"iterations": 10, "train_seconds": 60.0,
            "config": {"algorithm": {"name": "transfer", "steps": 100}, "tasks": {"ways": 20}, "data": data},
            "test": [{"ways": 5, "shots": 1, "accuracy": 0.9, "ci95": 0.01, "episodes": 600, "steps": 100}]}


def test_table_row_names_training_augmentation_only_where_a_method_has_one(compare):
    plain = compare.table([compare.row("transfer", _result(None))]).splitlines()[-1]
    augmented = compare.table([compare.row("transfer", _result({"name": "affine"}))]).splitlines()[-1]
    assert "augmentation" not in plain and "train 20-way; " in plain
    assert 'train 20-way, augmentation `{"name": "affine"}`; `{"steps": 100}`' in augmented
    assert "**90.00 ± 1.00**" in augmented


def test_training_cell_names_inner_steps_only_for_algorithms_with_an_inner_loop(benchmark_script):
    """benchmarks/common.py printed "protonet ... 1 inner steps" (ProtoNet has no inner loop)."""
    common = benchmark_script("common")

    def cell(alg):
        return common.training_cell({
            "iterations": 10, "train_seconds": 60.0, "stopped_by": "iterations", "precision": "fp32", "layout": "nchw",
            "config": {"algorithm": alg, "model": {"name": "conv4", "hidden": 32}, "train": {"meta_batch_size": 4},
                       "tasks": {"ways": 5, "shots": 1}}})

    assert "inner steps" not in cell({"name": "protonet"})
    assert cell({"name": "protonet"}).startswith("protonet, conv4-32; trained 5w1s")
    assert ", 5 inner steps;" in cell({"name": "anil", "steps": 5}) and ", 1 inner steps;" in cell({"name": "maml"})


def test_benchmark_rows_get_published_numbers_only_where_the_report_reads_them(benchmark_script):
    """benchmarks/common.py put the published random-class MAML/MAML++ figures beside within-superclass
    rows (omniglot_20w1s_alphabet) and transductive heads' rows; its published column now follows the
    report's references(): none ('– / –') for those rows."""
    common = benchmark_script("common")
    row = {"accuracy": 0.70, "ci95": 0.01, "loss": 1.0, "loss_ci95": 0.1, "episodes": 600, "ways": 20, "shots": 1,
           "queries": 15, "steps": 0, "hierarchy": None, "head": "algorithm", "transductive": False}
    results = {"iterations": 10, "train_seconds": 60, "stopped_by": "budget", "machine": {},
               "config": {"algorithm": {"name": "protonet"}, "tasks": {"ways": 60, "shots": 1},
                          "train": {"meta_batch_size": 1}, "model": {"name": "conv4", "hidden": 64}}}

    def published(r, transductive=False):
        return common.result_rows({**results, "test": [r]}, "Omniglot", "omniglot", transductive)[0].split(" | ")[7]

    assert published(row) == "95.80 / 97.65"
    assert published({**row, "hierarchy": 1}) == "– / –"
    assert published({**row, "head": "bdcspn", "transductive": True}, transductive=True) == "– / –"


def test_the_child_command_drops_lock_and_methods_in_both_spellings(compare):
    """``--lock=FILE`` reached the child, which then waited forever for its parent's lock."""
    argv = ["--lock=/tmp/l", "--methods=maml", "--set", "eval.episodes=2", "--lock", "/tmp/l", "--methods", "a", "b"]
    assert compare._without(argv, "--lock", "--methods") == ["--set", "eval.episodes=2"]
