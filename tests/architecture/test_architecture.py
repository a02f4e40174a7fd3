"""The package's architecture rules (tools/check_architecture.py): layers of the data flow, no
import cycles, short functions.  A failure message names the import (file, line, statement)
and the rule it breaks."""
from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_architecture", REPO / "tools" / "check_architecture.py")
arch = importlib.util.module_from_spec(_spec)
sys.modules["check_architecture"] = arch
_spec.loader.exec_module(arch)


def _report(problems: list[str]) -> str:
    return "\n\n".join(problems)


def test_no_module_imports_from_a_higher_layer():
    problems = arch.layer_violations()
    assert not problems, _report(problems)


def test_no_import_cycle_between_modules():
    problems = arch.import_cycles()
    assert not problems, _report(problems)


def test_no_function_is_longer_than_the_limit_without_saying_why():
    problems = arch.long_functions()
    assert not problems, _report(problems)


def test_every_module_layer_is_declared_once_for_a_module_that_exists():
    tree = ast.parse((REPO / "tools" / "check_architecture.py").read_text())
    table = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", None) == "MODULE_LAYERS")
    keys = [key.value for key in table.keys]  # a dict literal keeps only the last of repeated keys
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert set(keys) <= set(arch.modules()), sorted(set(keys) - set(arch.modules()))
    assert arch.layer_of("metamtl.heads.base") == "models"  # feature heads import models and tasks only


def test_the_learner_facade_module_stays_small():
    lines = len((REPO / "metamtl" / "learner.py").read_text().splitlines())
    assert lines <= 300, f"metamtl/learner.py has {lines} lines: move the work into the part that owns it"


def test_every_import_is_seen_function_local_and_type_only_ones_too():
    found = {(i.source, i.target, i.runtime, i.scope.split(",")[0]) for i in arch.imports()}
    assert ("metamtl.learner", "metamtl.callbacks", True, "module level") in found
    assert ("metamtl.callbacks", "metamtl.learner", False, "module level") in found  # TYPE_CHECKING
    assert ("metamtl.experiment", "metamtl.distill", True, "in function run_callbacks") in found


# -- the checker itself, on a small fake package ------------------------------------------------------


def fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "metamtl"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_an_upward_import_is_named_with_its_file_line_statement_and_rule(tmp_path):
    root = fake_package(tmp_path, {
        "data/__init__.py": "",
        "data/base.py": "def f():\n    from ..learner import MetaLearner\n    return MetaLearner\n",
        "learner.py": "from .data.base import f\n",
    })
    (msg,) = arch.layer_violations(root)
    assert msg.startswith("metamtl/data/base.py:2 `from ..learner import MetaLearner` (in function f): ")
    assert "metamtl.data.base (layer 'data') imports metamtl.learner (layer 'learner'), a higher layer" in msg
    assert "Layer 'data' may import only foundation, data." in msg


def test_a_cycle_is_named_step_by_step_through_package_inits(tmp_path):
    root = fake_package(tmp_path, {
        "algorithms/__init__.py": "from .maml import MAML\nfrom ..multitask.algo import MultiTask\n",
        "algorithms/maml.py": "class MAML: ...\n",
        "multitask/__init__.py": "",
        "multitask/algo.py": "from ..algorithms.maml import MAML\nclass MultiTask(MAML): ...\n",
    })
    (msg,) = arch.import_cycles(root)
    assert msg.startswith("import cycle between metamtl.algorithms, metamtl.multitask.algo:")
    assert ("metamtl.algorithms -> metamtl.multitask.algo: metamtl/algorithms/__init__.py:2 "
            "`from ..multitask.algo import MultiTask` (module level)") in msg
    assert ("metamtl.multitask.algo -> metamtl.algorithms: metamtl/multitask/algo.py:1 "
            "`from ..algorithms.maml import MAML` (module level)") in msg


def test_imports_of_a_package_own_parent_and_type_only_imports_are_no_cycle(tmp_path):
    root = fake_package(tmp_path, {
        "algorithms/__init__.py": "from .maml import MAML\n",
        "algorithms/maml.py": "from .base import Base\nclass MAML(Base): ...\n",
        "algorithms/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .maml import MAML\nclass Base: ...\n",
    })
    assert arch.import_cycles(root) == []


def test_long_functions_need_a_reason(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    root = fake_package(tmp_path, {
        "data/__init__.py": "",
        "data/long.py": f"def long():\n{body}\n\ndef fine():  # long function: a table\n{body}",
    })
    (msg,) = arch.long_functions(root)
    assert msg.startswith("metamtl/data/long.py:1 function long has 62 lines (limit 60)")


def test_a_module_without_a_layer_is_reported(tmp_path):
    root = fake_package(tmp_path, {"gadgets.py": ""})
    assert arch.layer_violations(root) == [
        "metamtl.gadgets has no layer: add it to MODULE_LAYERS in tools/check_architecture.py"]
