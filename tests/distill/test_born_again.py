"""Born-again distillation over all training classes: 0.5 CE + 0.5 KL on the transfer classifier."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.config import config_from_dict
from metamtl.data import ClassDataset, Preprocessing
from metamtl.distill import distillation, from_config
from metamtl.errors import ConfigError, InputError
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler

pytestmark = pytest.mark.usefixtures("single_thread")
PREP = Preprocessing(size=(12, 12), channels=1, mean=(0.5,), std=(0.25,))


def toy(classes=10, per_class=6):
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(classes, 1, 12, 12, generator=g)
    images = ((protos.repeat_interleave(per_class, 0) * 0.8 + 0.2 * torch.rand(classes * per_class, 1, 12, 12,
                                                                                generator=g)) * 255).to(torch.uint8)
    return ClassDataset(images, torch.arange(classes).repeat_interleave(per_class), [f"c{i}" for i in range(classes)],
                        name="toy", preprocessing=PREP)


def transfer(hidden=4, seed=0, classes=10, **kw):
    torch.manual_seed(seed)
    model = build_model("conv4", in_channels=1, hidden=hidden, image_size=12, blocks=2, out_features=None)
    alg = build_algorithm("transfer", num_classes=classes, classifier="cosine", scale=10.0, steps=0, head_init="proto")
    return MetaLearner(model, alg, preprocessing=PREP, device="cpu", **kw)


def test_one_step_follows_half_cross_entropy_plus_half_kl_over_all_classes():
    tasks = EpisodeSampler(toy(), 6, 1, 1, seed=0)
    teacher = transfer(hidden=6, seed=1)
    teacher.fit(tasks, iterations=2, meta_batch_size=1, progress=False)
    student = transfer(seed=2, meta_optimizer="sgd", meta_lr=0.5)
    before = [p.detach().clone() for p in student.meta_parameters()]
    # the same step by hand: RFS's 0.5 * CE + 0.5 * T^2 KL(teacher || student), T = 4
    ep = tasks.episode(0).to("cpu")
    x = torch.cat([ep.support_x, ep.query_x])
    y = torch.tensor(ep.classes)[torch.cat([ep.support_y, ep.query_y])]
    with torch.no_grad():
        t_logits = teacher.algorithm.global_logits(teacher.model.trunk(x))
    s_logits = student.algorithm.global_logits(student.model.trunk(x))
    kl = F.kl_div(F.log_softmax(s_logits / 4, 1), F.log_softmax(t_logits / 4, 1), reduction="batchmean", log_target=True)
    loss = 0.5 * F.cross_entropy(s_logits, y) + 0.5 * 16 * kl
    grads = torch.autograd.grad(loss, student.meta_parameters())
    kd = distillation(teacher, temperature=4.0, weight=0.5, phases=["classes"], ce_weight=0.5)
    student.fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[kd])
    for p, p0, g in zip(student.meta_parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g, atol=1e-5, rtol=1e-4)
    assert student.algorithm.inner.task_weight == 1.0 and not student.algorithm.inner.loss_terms  # detached


def test_classes_phase_needs_a_teacher_over_the_same_classes():
    tasks = EpisodeSampler(toy(), 6, 1, 1, seed=0)
    anil_teacher = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=None),
                               build_algorithm("anil", head_init="proto"), preprocessing=PREP, device="cpu")
    with pytest.raises(InputError, match="needs a teacher with a classifier over them"):
        transfer().fit(tasks, iterations=1, meta_batch_size=1, progress=False,
                       callbacks=[distillation(anil_teacher, phases=["classes"])])
    other = transfer(classes=12)
    with pytest.raises(InputError, match="classifies 10 training classes"):
        transfer().fit(tasks, iterations=1, meta_batch_size=1, progress=False,
                       callbacks=[distillation(other, phases=["classes"])])


def test_born_again_config(tmp_path):
    teacher = transfer()
    path = teacher.save(tmp_path / "gen0.pt")
    kd = from_config({"teacher": str(path), "temperature": 4, "weight": 0.5, "ce_weight": 0.5, "phases": ["classes"]})
    assert kd.ce_weight == 0.5 and kd.terms[0].phases == ("classes",) and kd.terms[0].weight == 0.5
    with pytest.raises(ConfigError, match="ce_weight must be a number >= 0"):
        from_config({"teacher": str(path), "ce_weight": -1})
    cfg = config_from_dict({"algorithm": {"name": "transfer"},
                            "distill": {"teacher": str(path), "phases": ["classes"], "ce_weight": 0.5}})
    assert cfg.distill["ce_weight"] == 0.5


def test_born_again_table_pairs_student_and_twin_over_the_same_episodes(tmp_path):
    """``benchmarks/born_again.py table``: the gain of a student over its twin, with the unpaired
    CI and the paired one (the same evaluation episodes), which is narrower when they agree."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    twin = [0.4, 0.6, 0.5, 0.7, 0.3, 0.5]
    student = [a + d for a, d in zip(twin, [0.1, 0.0, 0.1, 0.0, 0.1, 0.0])]  # +5 points, 5 +- 5.5 paired
    for name, acc in (("twin_seed0", twin), ("student-teacher_seed0", student)):
        (tmp_path / name).mkdir()
        test = [{"ways": 5, "shots": s, "accuracy": sum(acc) / 6, "ci95": 0.1, "per_episode_accuracy": acc}
                for s in (1, 5)]
        (tmp_path / name / "results.json").write_text(json.dumps({"iterations": 10, "train_seconds": 60, "test": test}))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "born_again.py"
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "table"], capture_output=True, text=True,
                         check=True).stdout
    assert "student-teacher seed 0: 5-way 1-shot gain over its twin +5.00 ± 14.14" in out
    assert "paired over the same 6 episodes: ± 4.38" in out
    assert "mean gain over 1 seed(s) +5.00 points" in out


def test_born_again_student_names_a_missing_teacher(tmp_path):
    """``student --teacher wide --teacher-seed 0`` without that teacher's run: a clear exit that
    names the missing file and how to make it, before any training starts."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "born_again.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "student", "--seed", "1",
                           "--teacher", "wide", "--teacher-seed", "0", "--iterations", "5"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "wide_seed1000" in proc.stderr and "teacher --seed 0 --name wide" in proc.stderr


def test_born_again_table_reads_the_algorithm_head_of_a_teacher_with_several_heads(tmp_path):
    """A teacher trained elsewhere (e.g. the 60-minute benchmark run) carries feature-head and
    transductive rows after the algorithm's own: the table shows the algorithm head's accuracy."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "wide60_seed1000").mkdir()
    test = [{"ways": 5, "shots": s, "head": h, "accuracy": acc + s / 100, "ci95": 0.01}
            for s in (1, 5) for h, acc in (("algorithm", 0.49), ("simpleshot", 0.30), ("bdcspn", 0.70))]
    (tmp_path / "wide60_seed1000" / "results.json").write_text(
        json.dumps({"iterations": 8258, "train_seconds": 3600, "test": test}))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "born_again.py"
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "table"], capture_output=True, text=True,
                         check=True).stdout
    assert "| wide60 | 1000 | 8258 | 60.0 | 50.00 ± 1.00 | 54.00 ± 1.00 |" in out


def test_loading_a_teacher_leaves_the_global_rng_alone(tmp_path):
    """A student built after its teacher is loaded draws the same initial weights as its twin."""
    path = transfer(seed=3).save(tmp_path / "gen0.pt")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    MetaLearner.load(path, device="cpu")
    from_config({"teacher": str(path), "phases": ["classes"]})
    assert torch.equal(torch.rand(3), expected)


def test_config_student_and_its_twin_start_from_the_same_weights(tmp_path, data_root):
    """`distill:` in a config changes the loss only: same seed, same initial weights (born_again.py's pairs)."""
    from metamtl.callbacks import Callback
    from metamtl.experiment import run

    class FirstWeights(Callback):
        def on_fit_start(self, state):
            self.weights = {k: v.clone() for k, v in state.learner.model.state_dict().items()}

    base = {"data": {"name": "omniglot", "root": str(data_root), "sources": ["images_background_small1"],
                     "image_size": 28, "val_split": None, "test_split": None},
            "tasks": {"ways": 5, "shots": 1, "queries": 2}, "model": {"name": "conv4", "hidden": 4},
            "algorithm": {"name": "maml", "steps": 1, "lr": 0.4}, "output_dir": str(tmp_path),
            "train": {"iterations": 1, "meta_batch_size": 1, "device": "cpu", "scheduler": None},
            "logging": {"report": False, "metrics": None}}
    firsts = {}
    for name, extra in (("teacher", {}), ("twin", {}), ("student", {"distill": {"teacher": str(tmp_path / "teacher" / "learner.pt"),
                                                                                "phases": ["query"]}})):
        firsts[name] = FirstWeights()
        run(config_from_dict({**base, "name": name, "seed": 7 if name == "teacher" else 0, **extra}),
            callbacks=[firsts[name]], progress=False, quiet=True)
    twin, student = firsts["twin"].weights, firsts["student"].weights
    assert all(torch.equal(twin[k], student[k]) for k in twin)
    assert not all(torch.equal(twin[k], firsts["teacher"].weights[k]) for k in twin)


def test_phases_the_algorithm_never_applies_are_refused():
    """``phases: [classes]`` on a non-transfer student (and any phase its training never calls)
    was silently no distillation at all: now a ConfigError naming the phases that do apply."""
    tasks = EpisodeSampler(toy(), 3, 1, 1, seed=0)
    anil = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=None),
                       build_algorithm("anil", head_init="proto"), preprocessing=PREP, device="cpu")
    with pytest.raises(ConfigError, match="'classes' phase.*only for the 'transfer' algorithm"):
        anil.fit(tasks, iterations=1, meta_batch_size=1, progress=False,
                 callbacks=[distillation(transfer(), phases=["classes"])])
    assert anil.algorithm.inner.loss_terms == [] and anil.fit_state.iteration == 0
    proto = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=None),
                        build_algorithm("protonet"), preprocessing=PREP, device="cpu")
    with pytest.raises(ConfigError, match=r"never apply to algorithm 'protonet'.*\['query'\]"):
        proto.fit(tasks, iterations=1, meta_batch_size=1, progress=False,
                  callbacks=[distillation(anil, phases=["support"])])
    with pytest.raises(ConfigError, match=r"never apply to algorithm 'transfer'.*\['classes'\]"):
        transfer().fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[distillation(anil)])


@pytest.mark.parametrize("layer", ["trunk", "trunk.blocks.1"])
def test_feature_distillation_in_the_classes_phase_matches_the_hand_computed_step(layer):
    """Feature pairs act in the transfer ``classes`` phase (was: 'layer produced no tensor output':
    the supervised step handed no tapped features to the terms)."""
    from metamtl.distill import FeatureDistillation

    tasks = EpisodeSampler(toy(), 6, 1, 1, seed=0)
    teacher = transfer(hidden=6, seed=1)
    teacher.fit(tasks, iterations=2, meta_batch_size=1, progress=False)
    student = transfer(seed=2, meta_optimizer="sgd", meta_lr=0.5)
    before = [p.detach().clone() for p in student.meta_parameters()]
    kd = distillation(teacher, 4.0, 0.0, phases=["classes"], features=[(layer, layer)], feature_weight=2.0, ce_weight=0.5)
    student.fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[kd])
    term = kd.terms[0]
    assert isinstance(term, FeatureDistillation) and term.last_value is not None
    ep = tasks.episode(0).to("cpu")
    x = torch.cat([ep.support_x, ep.query_x])
    y = torch.tensor(ep.classes)[torch.cat([ep.support_y, ep.query_y])]
    params = dict(zip([n for n, p in student.model.named_parameters()], before))
    ref = transfer(seed=2)
    ref.algorithm.setup(ref.model)
    ref.model.load_state_dict({**student.model.state_dict(), **params})
    ref.algorithm.head.weight.data.copy_(before[-1])
    with torch.no_grad():
        t = teacher.model.trunk(x) if layer == "trunk" else teacher.model.trunk.blocks[:2](x)
    s = ref.model.trunk(x) if layer == "trunk" else ref.model.trunk.blocks[:2](x)
    adapter = term._build_adapter(s, t)  # the adapter's initial weights (seeded)
    logits = ref.algorithm.global_logits(ref.model.trunk(x))
    loss = 0.5 * F.cross_entropy(logits, y) + 2.0 * F.mse_loss(adapter(s), t)
    grads = torch.autograd.grad(loss, [*ref.model.parameters(), ref.algorithm.head.weight], allow_unused=True)
    for p, p0, g in zip(student.meta_parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * (g if g is not None else 0), atol=1e-5, rtol=1e-4)
