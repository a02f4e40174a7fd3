"""Registries and lazy package imports do not depend on what was imported first."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
{first}
from metamtl.algorithms import ALGORITHMS
from metamtl.models import MODELS
from metamtl.tasks import TASK_FAMILIES
print(json.dumps([sorted(ALGORITHMS), sorted(MODELS), sorted(TASK_FAMILIES)]))
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("first", [
    "pass", "import metamtl", "import metamtl.algorithms.maml", "import metamtl.algorithms.multitask",
    "import metamtl.multitask", "import metamtl.models.backbones", "from metamtl import MetaLearner",
])
def test_registries_hold_every_builtin_whatever_is_imported_first(first):
    algorithms, models, families = json.loads(_run(PROBE.format(first=first)))
    assert algorithms == ["anil", "fomaml", "imaml", "maml", "mamlpp", "metasgd", "multitask", "protonet", "reptile",
                          "transfer"]
    assert models == ["conv4", "mlp", "multidataset", "resnet12"]
    assert families == ["sinusoid"]


def test_importing_the_data_layer_loads_nothing_above_it():
    loaded = json.loads(_run(
        "import json, sys, metamtl.data; print(json.dumps(sorted(m for m in sys.modules if m.startswith('metamtl'))))"))
    leaves = ("errors", "version", "progress_bars", "files")  # foundation modules every layer may import
    assert all(m.split(".")[1] in ("data", *leaves) for m in loaded if m != "metamtl"), loaded


def test_public_names_of_the_package_are_lazy_and_complete():
    import metamtl

    assert {"MetaLearner", "EvalResult", "MetamtlError", "__version__"} <= set(dir(metamtl))
    assert metamtl.MetaLearner.__name__ == "MetaLearner" and metamtl.EvalResult.__name__ == "EvalResult"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        metamtl.Nope  # noqa: B018
