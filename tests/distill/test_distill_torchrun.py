"""Feature distillation under torchrun (2 gloo ranks on CPU) against one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

SCRIPT = '''
import os, sys
import torch
sys.path.insert(0, {here!r})
from test_distill import conv, learner, toy, PREP
from metamtl.distill import distillation
from metamtl.tasks import EpisodeSampler
tasks = EpisodeSampler(toy(), 3, 1, 2, seed=0)
teacher, student = learner(hidden=8, seed=3), learner()
kd = distillation(teacher, 2.0, weight=0.0, phases=("query",), features=[("trunk.blocks.1", "trunk.blocks.1")],
                  feature_weight=5.0)
student.fit(tasks, iterations=3, meta_batch_size=4, progress=False, callbacks=[kd])
torch.save({{"adapter": kd.terms[0].adapter.state_dict(), "model": dict(student.model.named_parameters())}},
           os.path.join({out!r}, "out_" + os.environ.get("RANK", "single") + ".pt"))
'''


def test_adapters_train_on_the_whole_meta_batch_under_torchrun(tmp_path):
    """The adapters' gradients are averaged over ranks like the meta-gradient (was: each rank stepped
    its adapter on its own tasks, so the adapters drifted apart and the run left the one-process run)."""
    script = tmp_path / "kd.py"
    script.write_text(SCRIPT.format(here=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, str(script)], check=True, env=env, cwd=tmp_path, timeout=240)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--monitor-interval=0.5", str(script)], env=env, cwd=tmp_path, timeout=240,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1, one = (torch.load(tmp_path / f"out_{r}.pt", weights_only=True) for r in ("0", "1", "single"))
    for k in r0["adapter"]:
        assert torch.equal(r0["adapter"][k], r1["adapter"][k])
        torch.testing.assert_close(r0["adapter"][k], one["adapter"][k], atol=1e-6, rtol=1e-5)
    # conv biases feeding BatchNorm have a true meta-gradient of 0: Adam turns their rounding noise
    # (which differs with the summation order) into lr-sized steps, so they are left out
    for k, v in r0["model"].items():
        if not (k.startswith("trunk.blocks.") and k.endswith(".0.bias")):
            torch.testing.assert_close(v, one["model"][k], atol=1e-5, rtol=1e-4)
