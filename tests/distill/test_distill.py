"""Knowledge distillation: loss and gradients against closed forms, teachers, taps, the callback."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import ClassDataset, Preprocessing
from metamtl.distill import (
    Distillation, FeatureDistillation, FeatureTap, LearnerTeacher, SoftTargets, distillation, soft_target_loss,
)
from metamtl.errors import ConfigError, InputError
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler, TaskBatch

pytestmark = pytest.mark.usefixtures("single_thread")
PREP = Preprocessing(size=(12, 12), channels=1, mean=(0.5,), std=(0.25,))


def toy(classes=30, per_class=6):
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(classes, 1, 12, 12, generator=g)
    noise = torch.rand(classes * per_class, 1, 12, 12, generator=g)
    images = ((protos.repeat_interleave(per_class, 0) * 0.8 + 0.2 * noise) * 255).to(torch.uint8)
    return ClassDataset(images, torch.arange(classes).repeat_interleave(per_class),
                        [f"c{i}" for i in range(classes)], name="toy", preprocessing=PREP)


@pytest.fixture(scope="module")
def tasks():
    return EpisodeSampler(toy(), 3, 1, 2, seed=0)


def conv(hidden, out=None, seed=0):
    torch.manual_seed(seed)
    return build_model("conv4", in_channels=1, hidden=hidden, image_size=12, blocks=2, out_features=out)


def learner(hidden=4, alg="anil", seed=0, **kw):
    algorithm = build_algorithm(alg, head_init="proto", steps=2, lr=0.3, **kw)
    return MetaLearner(conv(hidden, seed=seed), algorithm, preprocessing=PREP, device="cpu", meta_lr=0.01)


def test_soft_target_loss_and_gradient_match_the_closed_form():
    torch.manual_seed(0)
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5)
    T = 3.0
    loss = soft_target_loss(s, t, T)
    p_t, p_s = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    manual = T * T * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    torch.testing.assert_close(s.grad, T * (p_s - p_t).detach() / 6)
    for bad in (0.0, -1.0, float("nan"), "3"):  # 0 gave NaN; SoftTargets and distillation() refuse them
        with pytest.raises(ConfigError, match="soft_target_loss temperature must be a number > 0"):
            soft_target_loss(s, t, bad)


def test_query_soft_targets_add_exactly_their_gradient_to_the_meta_gradient(tasks):
    ep = tasks.episode(0).to("cpu")
    teacher = conv(6, out=3, seed=5)  # a module scoring the task's 3 labels
    m1, m2 = conv(4, out=3), conv(4, out=3)
    alg = build_algorithm("maml", steps=1, lr=0.3)
    alg.inner.loss_terms.append(SoftTargets(teacher, temperature=2.0, weight=0.5))
    alg.meta_step(m1, TaskBatch([ep]))
    params = dict(m2.named_parameters())  # reference: one second-order SGD step written out
    grads = torch.autograd.grad(F.cross_entropy(m2(ep.support_x), ep.support_y), list(params.values()),
                                create_graph=True)
    adapted = {n: p - 0.3 * g for (n, p), g in zip(params.items(), grads)}
    logits = torch.func.functional_call(m2, adapted, (ep.query_x,))
    with torch.no_grad():
        teacher.eval()
        t = teacher(ep.query_x)
    s, tt = logits / 2.0, t / 2.0
    kd = 4.0 * (torch.softmax(tt, 1) * (torch.log_softmax(tt, 1) - torch.log_softmax(s, 1))).sum(1).mean()
    (F.cross_entropy(logits, ep.query_y) + 0.5 * kd).backward()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_learner_teacher_gives_logits_in_the_episode_label_order(tasks):
    teacher_learner = learner(hidden=8, seed=3)
    teacher = LearnerTeacher(teacher_learner)
    calls = []
    original = teacher_learner.algorithm.adapt
    teacher_learner.algorithm.adapt = lambda *a, **k: calls.append(1) or original(*a, **k)
    ep = tasks.episode(7).to("cpu")
    student = learner()
    student.fit(tasks, iterations=1, meta_batch_size=1, progress=False,
                callbacks=[Distillation(SoftTargets(teacher, phases=("support", "query")))])
    assert len(calls) == 1  # adapted once for the episode, reused by support steps and query
    teacher_learner.algorithm.adapt = original
    expected = teacher_learner.predict(ep.support_x, ep.support_y, ep.query_x)
    ctx = type("Ctx", (), dict(inputs=ep.query_x, support_x=ep.support_x, support_y=ep.support_y, ways=3,
                               logits=expected))()
    torch.testing.assert_close(teacher.logits(ctx), expected)
    assert expected.argmax(1).eq(ep.query_y).float().mean() >= 0.5  # meaningful in this label order


def test_protonet_learner_teaches_soft_targets_and_features(tasks):
    """A ProtoNet learner (the demo's method) is a teacher like any other: its prototype logits
    in the episode's label order, and its trunk's tapped features (README's distillation example)."""
    torch.manual_seed(3)
    teacher_learner = MetaLearner(conv(8, seed=3), build_algorithm("protonet"), preprocessing=PREP, device="cpu")
    teacher = LearnerTeacher(teacher_learner)
    ep = tasks.episode(7).to("cpu")
    expected = teacher_learner.predict(ep.support_x, ep.support_y, ep.query_x)
    ctx = type("Ctx", (), dict(inputs=ep.query_x, support_x=ep.support_x, support_y=ep.support_y, ways=3,
                               logits=expected))()
    torch.testing.assert_close(teacher.logits(ctx), expected)
    student = learner()
    kd = Distillation(SoftTargets(teacher, temperature=4.0, phases=("support", "query")),
                      FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1"))
    student.fit(tasks, iterations=2, meta_batch_size=2, progress=False, callbacks=[kd])
    assert student.fit_state.iteration == 2 and math.isfinite(student.history[-1]["train/loss"])


def test_teacher_with_another_number_of_classes_is_a_clear_error(tasks):
    student = learner()
    kd = Distillation(SoftTargets(conv(4, out=5), phases="query"))
    with pytest.raises(InputError, match=r"teacher gives logits of shape \[6, 5\].*3-way task"):
        student.fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[kd])
    assert student.algorithm.inner.loss_terms == []  # detached even after the error


def test_feature_distillation_gradient_matches_manual_computation(tasks):
    ep = tasks.episode(1).to("cpu")
    teacher = conv(8, seed=4)
    m_with, m_without = conv(4), conv(4)
    term = FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1", weight=2.0)
    term.bind(m_with)
    alg = build_algorithm("anil", head_init="proto", steps=1, lr=0.3)
    alg.inner.loss_terms.append(term)
    alg.meta_step(m_with, TaskBatch([ep]))
    build_algorithm("anil", head_init="proto", steps=1, lr=0.3).meta_step(m_without, TaskBatch([ep]))
    assert isinstance(term.adapter, torch.nn.Conv2d) and term.adapter.weight.grad is not None
    ref = conv(4)
    with torch.no_grad():
        t = teacher.trunk.blocks[:2](ep.query_x)
    (2.0 * F.mse_loss(term.adapter(ref.trunk.blocks[:2](ep.query_x)), t)).backward()
    for a, b, r in zip(m_with.parameters(), m_without.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad - b.grad, r.grad if r.grad is not None else torch.zeros_like(a),
                                   atol=1e-6, rtol=1e-4)
    term.release()


def test_taps_see_the_functional_copies_of_the_inner_loop(tasks):
    ep = tasks.episode(2).to("cpu")
    model = conv(4, out=3)
    seen = []
    with FeatureTap(model, "trunk.blocks.0") as tap:
        alg = build_algorithm("maml", steps=2, lr=0.5)
        alg.inner.loss_terms.append(lambda ctx: seen.append(tap.take(ctx.inputs.shape[0]).detach().clone()))
        alg.meta_step(model, TaskBatch([ep]))
    assert [s.shape for s in seen] == [(3, 4, 6, 6)] * 2 + [(6, 4, 6, 6)]
    assert not torch.allclose(seen[0], seen[1])  # step 1 ran the adapted (fast) weights
    torch.testing.assert_close(seen[0], model.trunk.blocks[0](ep.support_x))


def test_unmappable_feature_shapes_and_unknown_layers_are_clear_errors(tasks):
    student = learner()
    kd = Distillation(FeatureDistillation(conv(8), "trunk.blocks.0", "trunk.blocks.1"))
    with pytest.raises(InputError, match=r"cannot map student layer 'trunk.blocks.0' features \[4, 6, 6\].*\[8, 3, 3\]"):
        student.fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[kd])
    with pytest.raises(InputError, match="student has no layer 'trunk.block.0'.*trunk.blocks.0"):
        student.fit(tasks, iterations=1, meta_batch_size=1, progress=False,
                    callbacks=[Distillation(FeatureDistillation(conv(8), "trunk.block.0", "trunk.blocks.0"))])
    with pytest.raises(ConfigError, match="phases"):
        SoftTargets(conv(8), phases=("inner",))
    other = MetaLearner(conv(8), "maml", preprocessing=Preprocessing(size=(12, 12)), device="cpu")
    with pytest.raises(ConfigError, match="same inputs"):
        student.fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[distillation(other)])


def test_callback_detaches_trains_adapters_and_resumes_exactly(tasks, tmp_path):
    teacher = learner(hidden=8, seed=3)

    def kd():
        return distillation(teacher, temperature=2.0, phases=("support", "query"),
                            features=[("trunk.blocks.1", "trunk.blocks.1")])

    full, cb_full = learner(), kd()
    full.fit(tasks, iterations=4, meta_batch_size=2, progress=False, callbacks=[cb_full])
    assert full.algorithm.inner.loss_terms == []
    adapter = cb_full.terms[1].adapter
    assert adapter.weight.shape == (8, 4, 1, 1)
    part = learner()
    part.fit(tasks, iterations=2, meta_batch_size=2, progress=False, callbacks=[kd()],
             checkpoint_dir=tmp_path, checkpoint_every=2)
    resumed, cb_resumed = learner(), kd()
    resumed.fit(tasks, iterations=4, meta_batch_size=2, progress=False, callbacks=[cb_resumed],
                resume=tmp_path / "last.pt")
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(cb_resumed.terms[1].adapter.weight, adapter.weight)
    loaded = MetaLearner.load(full.save(tmp_path / "student.pt"), device="cpu")  # no teacher inside
    assert loaded.algorithm.inner.loss_terms == []


def test_config_section_builds_the_callback(tmp_path):
    from metamtl.config import config_from_dict
    from metamtl.distill import from_config

    path = learner(hidden=8).save(tmp_path / "teacher.pt")
    kd = from_config({"teacher": str(path), "temperature": 2, "phases": ["support", "query"],
                      "features": [["trunk.blocks.1", "trunk.blocks.1"]]})
    soft, feat = kd.terms
    assert soft.temperature == 2.0 and soft.phases == ("support", "query")
    assert isinstance(soft.teacher, LearnerTeacher) and feat.teacher is soft.teacher
    with pytest.raises(ConfigError, match="unknown key.*temprature"):
        from_config({"teacher": str(path), "temprature": 2})
    with pytest.raises(ConfigError, match="saved learner"):
        from_config({"weight": 1})
    assert config_from_dict({"distill": {"teacher": str(path)}}).distill == {"teacher": str(path)}


def test_a_null_distill_section_is_no_distillation_as_in_a_stage():
    """``distill=null`` (or an empty ``distill:`` key in a file) trains the student config's
    no-distillation twin, as a stage's ``distill: null`` does."""
    from pathlib import Path

    from metamtl.config import load_config

    student = Path(__file__).resolve().parents[2] / "configs" / "distill" / "omniglot_student.yaml"
    assert load_config(student, ["distill=null"]).distill == {}
    assert load_config(student, ["distill="]).distill == {}


def test_a_home_relative_teacher_path_is_read_under_home(tmp_path, monkeypatch):
    from metamtl.distill import from_config

    monkeypatch.setenv("HOME", str(tmp_path))
    learner(hidden=8).save(tmp_path / "teacher.pt")
    assert isinstance(from_config({"teacher": "~/teacher.pt"}).terms[0].teacher, LearnerTeacher)


def test_protonet_student_applies_query_distillation(tasks):
    """A ProtoNet student's query loss gets the loss terms (was: silently ignored, identical to no
    distillation): soft targets change its training, and a feature pair the adapter cannot map fails."""
    def student():
        torch.manual_seed(0)
        return MetaLearner(conv(4), build_algorithm("protonet"), preprocessing=PREP, device="cpu", meta_lr=0.01)

    teacher = LearnerTeacher(learner(hidden=8, seed=3))
    plain, taught = student(), student()
    plain.fit(tasks, iterations=1, meta_batch_size=2, progress=False)
    kd = Distillation(SoftTargets(teacher, weight=100.0), FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1"))
    taught.fit(tasks, iterations=1, meta_batch_size=2, progress=False, callbacks=[kd])
    assert kd.terms[0].last_value is not None and kd.terms[1].last_value is not None
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.parameters(), taught.model.parameters()))
    bad = Distillation(FeatureDistillation(teacher, "trunk.blocks.0", "trunk.blocks.1"))
    with pytest.raises(InputError, match="cannot map student layer"):
        student().fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[bad])


@pytest.mark.parametrize("alg", ["anil", "maml", "protonet"])
def test_feature_distillation_taps_the_trunk_itself(tasks, alg):
    """The layer ``trunk`` (the trunk's flat output) can be tapped on both sides (was: dropped by
    the ``trunk.`` prefix filter, "produced no tensor output")."""
    teacher = LearnerTeacher(learner(hidden=8, seed=3))
    algorithm = build_algorithm("protonet") if alg == "protonet" else build_algorithm(alg, head_init="proto", steps=1)
    student = MetaLearner(conv(4), algorithm, preprocessing=PREP, device="cpu", meta_lr=0.01)
    kd = Distillation(FeatureDistillation(teacher, "trunk", "trunk", phases=algorithm.loss_term_phases))
    student.fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[kd])
    feat = kd.terms[0]
    assert feat.last_value is not None and math.isfinite(feat.last_value)
    assert isinstance(feat.adapter, torch.nn.Linear) and feat.adapter.in_features == student.model.num_features


def test_config_values_are_checked_naming_the_key(tmp_path, tasks):
    """Bad distill values are ConfigErrors naming the key when the config is read (were: teacher_steps
    -3 accepted, weight 'abc' a raw ValueError after data loading); a missing teacher names
    distill.teacher; a teacher whose fixed head cannot serve the task says it is the teacher's."""
    from metamtl.config import config_from_dict
    from metamtl.distill import from_config

    path = str(learner(hidden=8).save(tmp_path / "teacher.pt"))
    for key, value, match in (("teacher_steps", -3, "distill.teacher_steps must be an integer >= 0"),
                              ("weight", "abc", "distill.weight must be a number >= 0, got 'abc'"),
                              ("temperature", "abc", "distill.temperature must be a number > 0"),
                              ("temperature", 0, "distill.temperature must be a number > 0"),
                              ("ce_weight", -1, "distill.ce_weight must be a number >= 0")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"distill": {"teacher": path, key: value}})
        with pytest.raises(ConfigError, match=match):
            from_config({"teacher": path, key: value})
    with pytest.raises(ConfigError, match=r"distill.teacher: .*nope.pt does not exist"):
        from_config({"teacher": str(tmp_path / "nope.pt")})
    torch.manual_seed(0)
    fixed = MetaLearner(conv(4, out=5), build_algorithm("maml", steps=1, lr=0.1), preprocessing=PREP, device="cpu")
    kd = Distillation(SoftTargets(fixed))
    with pytest.raises(InputError, match=r"TEACHER \(not the student\).*the teacher's meta-learned head has 5 outputs"):
        learner().fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[kd])


def test_resuming_with_another_distillation_or_none_is_refused_listing_what_differs(tasks, tmp_path):
    from metamtl.errors import CheckpointError

    teacher, other = learner(hidden=8, seed=3), learner(hidden=8, seed=4)
    part = learner()
    part.fit(tasks, iterations=2, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path,
             callbacks=[distillation(teacher, 4.0, 0.5, ce_weight=0.5)])
    for callbacks, differs in (([], "distillation.ce_weight: 0.5 != '<missing>'"),
                               ([distillation(teacher, 4.0, 0.7, ce_weight=0.5)], "distillation.terms.0.weight: 0.5 != 0.7"),
                               ([distillation(other, 4.0, 0.5, ce_weight=0.5)], "distillation.terms.0.weights: ")):
        with pytest.raises(CheckpointError, match="fit settings differ") as info:
            learner().fit(tasks, iterations=4, meta_batch_size=2, progress=False, callbacks=callbacks,
                          resume=tmp_path / "last.pt")
        assert differs in str(info.value)
    resumed = learner()
    resumed.fit(tasks, iterations=4, meta_batch_size=2, progress=False, resume=tmp_path / "last.pt",
                callbacks=[distillation(teacher, 4.0, 0.5, ce_weight=0.5)])
    assert resumed.iteration == 4
    plain = learner()
    plain.fit(tasks, iterations=2, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path / "plain")
    with pytest.raises(CheckpointError, match="distillation.ce_weight: '<missing>' != 0.5"):
        learner().fit(tasks, iterations=4, meta_batch_size=2, progress=False, resume=tmp_path / "plain" / "last.pt",
                      callbacks=[distillation(teacher, 4.0, 0.5, ce_weight=0.5)])


def test_several_feature_pairs_are_each_distilled(tasks):
    """Two feature pairs on one teacher (was: binding the second released the shared teacher's taps,
    a bare KeyError for the first layer)."""
    kd = distillation(learner(hidden=8, seed=3), 2.0, phases=("query",),
                      features=[("trunk.blocks.0", "trunk.blocks.0"), ("trunk.blocks.1", "trunk.blocks.1")])
    learner().fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[kd])
    assert all(t.last_value is not None and math.isfinite(t.last_value) for t in kd.terms)
    assert [t.adapter.weight.shape[0] for t in kd.terms[1:]] == [8, 8]


def test_weight_zero_is_the_no_distillation_baseline_and_bad_weights_are_refused(tasks, tmp_path):
    """``weight: 0`` (no features) trains exactly as without distillation, from the API and from a
    config (was: "needs at least one loss term" after the data loaded); negative and NaN weights
    say what a weight must be."""
    from metamtl.distill import from_config

    def run(callbacks):
        st = learner()
        st.fit(tasks, iterations=2, meta_batch_size=2, progress=False, callbacks=callbacks)
        return [p.detach().clone() for p in st.meta_parameters()]

    teacher = learner(hidden=8, seed=3)
    path = str(teacher.save(tmp_path / "teacher.pt"))
    plain = run([])
    for kd in (distillation(teacher, weight=0), from_config({"teacher": path, "weight": 0})):
        assert all(torch.equal(a, b) for a, b in zip(plain, run([kd])))
    for bad in (-1, float("nan"), True, "1", None):
        with pytest.raises(ConfigError, match="distillation weight must be a number >= 0"):
            distillation(teacher, weight=bad)


def test_config_phases_and_features_of_the_wrong_type_name_the_key(tmp_path):
    """Was: bare TypeErrors for ``phases: null`` / ``5`` and ``features: 5``; a ``{query: 1}`` mapping
    and a null layer name (layer "None") were accepted."""
    from metamtl.config import config_from_dict

    path = str(learner(hidden=8).save(tmp_path / "teacher.pt"))
    for extra, key in (({"phases": None}, "distill.phases"), ({"phases": 5}, "distill.phases"),
                       ({"phases": {"query": 1}}, "distill.phases"), ({"phases": [None]}, "distill.phases"),
                       ({"features": 5}, "distill.features"), ({"features": [[None, "trunk"]]}, "distill.features"),
                       ({"features": [["trunk"]]}, "distill.features")):
        with pytest.raises(ConfigError, match=key):
            config_from_dict({"distill": {"teacher": path, **extra}})


def test_python_api_numbers_are_checked_in_the_constructors(tasks):
    """Was: bools accepted as 1.0, bare TypeErrors for str/None, ``Distillation(lr=-1)`` a torch
    ValueError mid-training."""
    teacher = learner(hidden=8, seed=3)
    for kw, match in (({"weight": True}, "weight"), ({"temperature": True}, "temperature"),
                      ({"weight": "1"}, "weight"), ({"weight": None}, "weight"), ({"temperature": None}, "temperature"),
                      ({"temperature": 0}, "temperature must be a number > 0"), ({"phases": None}, "phases")):
        with pytest.raises(ConfigError, match=match):
            SoftTargets(teacher, **kw)
    with pytest.raises(ConfigError, match="layer name"):
        FeatureDistillation(teacher, None, "trunk")
    for lr in (-1.0, 0, "0.01", True, float("inf")):
        with pytest.raises(ConfigError, match="distillation lr must be a number > 0"):
            Distillation(FeatureDistillation(teacher, "trunk", "trunk"), lr=lr)


def test_a_float32_teacher_teaches_a_float64_student_and_a_teacher_that_cannot_take_the_inputs_is_named(tasks):
    """Was: 'Input type (double) and bias type (float) should be the same' (the teacher was moved to
    the device, not fed the student's dtype), and any teacher forward failure a bare RuntimeError."""
    teacher = learner(hidden=8, seed=3)
    model = conv(4)
    model.double()
    student = MetaLearner(model, build_algorithm("anil", head_init="proto", steps=2, lr=0.3), preprocessing=PREP,
                          device="cpu")
    kd = distillation(teacher, phases=("support", "query"), features=[("trunk.blocks.1", "trunk.blocks.1")])
    student.fit(tasks, iterations=2, meta_batch_size=1, progress=False, callbacks=[kd])
    assert all(math.isfinite(t.last_value) for t in kd.terms)
    assert next(teacher.model.parameters()).dtype == torch.float32  # the teacher is left as it was
    torch.manual_seed(0)
    rgb = build_model("conv4", in_channels=3, hidden=4, image_size=12, blocks=2, out_features=3)
    with pytest.raises(InputError, match=r"distillation TEACHER \(TrunkHead\) failed on the student's inputs"):
        learner().fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[Distillation(SoftTargets(rgb))])


@pytest.mark.parametrize("alg,match", [("anil", "adapts only the head"), ("fomaml", "gets no gradient"),
                                       ("reptile", "gets no gradient")])
def test_support_only_feature_terms_that_can_never_act_are_refused(tasks, alg, match):
    """Was: under ANIL a support-phase trunk-feature term changed nothing; under FOMAML/Reptile its
    adapter was never trained (a frozen random projection). Both are refused, from the API and from
    a config section; where a phase acts the term is kept."""
    from metamtl.distill.hooks import check_config_applies

    teacher = learner(hidden=8, seed=3)
    student = learner(alg=alg)
    term = FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1", phases=("support",), weight=5.0)
    with pytest.raises(ConfigError, match=match):
        student.fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[Distillation(term)])
    assert student.algorithm.inner.loss_terms == [] and student.iteration == 0
    section = {"teacher": "t.pt", "phases": ["support"], "features": [["trunk.blocks.1", "trunk.blocks.1"]]}
    with pytest.raises(ConfigError, match=match):
        check_config_applies(section, student.algorithm)
    check_config_applies({**section, "features": []}, student.algorithm)  # soft targets act in the support loss
    if alg != "reptile":  # reptile applies no query phase
        check_config_applies({**section, "phases": ["support", "query"]}, student.algorithm)
    fixed = torch.nn.Conv2d(4, 8, 1).requires_grad_(False)
    kept = FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1", phases=("support",), adapter=fixed)
    if alg != "anil":  # a fixed adapter needs no gradient
        student.fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=[Distillation(kept)])
        assert kept.last_value is not None


def test_ce_weight_scales_the_task_loss_only_in_the_phases_where_a_term_acts(tasks):
    """Query-only terms with ``ce_weight=0.5``: the query loss is 0.5 CE (+ the terms) and the inner
    adaptation is unchanged (was: the support loss was halved too, a halved inner lr in training but
    not at evaluation). With plain SGD that is exactly a halved meta lr."""
    teacher = learner(hidden=8, seed=3)

    def run(meta_lr, callbacks):
        st = MetaLearner(conv(4, out=3), build_algorithm("maml", steps=1, lr=0.4), preprocessing=PREP, device="cpu",
                         meta_lr=meta_lr, meta_optimizer="sgd")
        st.fit(tasks, iterations=1, meta_batch_size=1, progress=False, callbacks=callbacks)
        return torch.cat([p.detach().flatten() for p in st.meta_parameters()])

    query = run(0.1, [Distillation(SoftTargets(teacher, weight=0.0, phases=("query",)), ce_weight=0.5)])
    torch.testing.assert_close(query, run(0.05, []), atol=1e-7, rtol=1e-6)
    both = run(0.1, [Distillation(SoftTargets(teacher, weight=0.0, phases=("support", "query")), ce_weight=0.5)])
    assert not torch.allclose(both, query)  # a support-phase term: the inner loss is 0.5 CE as well


def test_a_skipped_non_finite_step_leaves_the_adapters_as_they_were(tasks):
    """One non-finite teacher output: that step is skipped for the adapters too (was: the adapter
    optimizer stepped before the non-finite check, the adapters became NaN and every later step was
    skipped until TrainingError)."""
    import warnings

    from metamtl.callbacks import Callback

    class Feat(torch.nn.Module):
        calls = 0

        def forward(self, x):
            Feat.calls += 1
            out = x.flatten(1)[:, :10] * 1.0
            return out * float("nan") if Feat.calls == 2 else out

    class Teacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = Feat()

        def forward(self, x):
            return self.feat(x)[:, :3]

    student = MetaLearner(conv(4), build_algorithm("protonet"), preprocessing=PREP, device="cpu", meta_lr=0.01)
    kd = Distillation(FeatureDistillation(Teacher(), "trunk", "feat"))
    snapshots = []

    class Snap(Callback):  # runs after the distillation's hooks
        order = 50

        def on_iteration_end(self, state, metrics):
            snapshots.append([p.detach().clone() for p in kd.terms[0].adapter.parameters()])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student.fit(tasks, iterations=4, meta_batch_size=1, progress=False, callbacks=[kd, Snap()])
    assert [r.get("train/skipped") for r in student.history] == [None, 1.0, None, None]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # the skipped step
    assert all(torch.isfinite(p).all() for p in kd.terms[0].adapter.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[3]))  # trained on afterwards


def test_soft_targets_for_a_regression_learner_are_refused(tmp_path):
    """A softmax over one regression output is always 1: the KL term would be 0, the setting silently
    ignored (was: training identical to training without distillation). Refused for Python and configs."""
    from metamtl.config import config_from_dict
    from metamtl.tasks import Sinusoid

    def regressor():
        model = build_model("mlp", hidden=[8], in_features=1, out_features=1)
        return MetaLearner(model, build_algorithm("maml", steps=1, lr=0.01), task="regression", device="cpu")

    student = regressor()
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"SoftTargets .*class.* this learner does regression"):
        student.fit(Sinusoid(), iterations=1, meta_batch_size=1, progress=False,
                    callbacks=[distillation(regressor(), weight=100, phases=("support", "query"))])
    assert all(torch.equal(before[k], v) for k, v in student.model.state_dict().items())
    section = {"teacher": str(tmp_path / "t.pt")}
    sine = {"data": {"name": "sinusoid", "val_split": None}, "tasks": {"ways": 1},
            "model": {"name": "mlp", "hidden": [8]}}
    with pytest.raises(ConfigError, match=r"distill.weight.*regression"):
        config_from_dict({**sine, "distill": section})
    assert config_from_dict({**sine, "distill": {**section, "weight": 0}}).distill["weight"] == 0


def test_the_teacher_cache_never_answers_for_another_tensor_at_a_reused_id_and_address():
    """The teacher's outputs are cached for the tensor they were computed on.  Per-task views of one
    stacked batch are new tensor objects each time: a freed one's ``id`` and address come back for
    the next (another task's data at the same place), which must be computed, not served stale."""
    from metamtl.adaptation import LossContext
    from metamtl.distill import as_teacher

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    teacher = as_teacher(module)
    buf, support = torch.zeros(2, 5, 4), torch.zeros(3, 4)
    g = torch.Generator().manual_seed(1)

    def outputs():
        view = buf[0]  # a new tensor object at buf's address, often with the freed one's id
        ctx = LossContext("query", torch.zeros(5, 3), torch.zeros(5), view, support, torch.arange(3), 3, module)
        return teacher.outputs(ctx)["logits"], id(view)

    ids = set()
    for _ in range(20):
        buf.copy_(torch.randn(buf.shape, generator=g))  # the next task's images, at the same address
        logits, ident = outputs()
        ids.add(ident)
        torch.testing.assert_close(logits, module(buf[0]).detach(), rtol=0, atol=0)
    assert len(ids) < 20  # ids were reused: the case the cache must tell apart


def test_the_layout_probe_leaves_no_gradient_in_the_adapters(tasks):
    """The automatic layout's probe meta-steps (before the first real step) add nothing to the
    adapters' gradient (was: their gradients were summed into the first adapter step)."""
    from metamtl.callbacks import Callback
    from metamtl.placement import LayoutProbe

    teacher = learner(hidden=6, seed=3)
    grads = {}

    class Grab(Callback):  # after the backward pass, before the adapter step
        def on_after_backward(self, state):
            grads.setdefault(state.learner.placement.layout_setting, [p.grad.clone() for p in kd.terms[0].parameters()])

    for channels_last in (None, False):
        kd = distillation(teacher, weight=0, features=[("trunk.blocks.1", "trunk.blocks.1")])
        s = MetaLearner(conv(4), build_algorithm("anil", head_init="proto", steps=2, lr=0.3), preprocessing=PREP,
                        device="cpu", meta_lr=0.01, channels_last=channels_last)
        clock = iter(range(1000))  # every probe step takes 1 s: both layouts are probed, the initial one kept
        s.layout_probe = LayoutProbe(timer=lambda: next(clock), min_seconds=0.5, min_iterations=0, repeats=1, warmup=0)
        s.fit(tasks, iterations=1, meta_batch_size=2, progress=False, callbacks=[kd, Grab()])
    assert len(grads) == 2 and s.run.layouts == {}
    auto, fixed = grads.values()
    for a, b in zip(auto, fixed):
        torch.testing.assert_close(a, b)


def test_a_callback_reused_for_another_learner_starts_afresh(tasks):
    """A Distillation object reused for a second student trains it exactly as a new one would (was:
    the second student started from the first one's trained adapter and Adam state)."""
    teacher = learner(hidden=6, seed=3)

    def kd(adapter=None):
        return Distillation(FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1", phases=("support", "query"),
                                                adapter=adapter))

    shared = kd()
    learner(seed=1).fit(tasks, iterations=2, meta_batch_size=2, progress=False, callbacks=[shared])
    reused, fresh = learner(seed=2), learner(seed=2)
    reused.fit(tasks, iterations=2, meta_batch_size=2, progress=False, callbacks=[shared])
    fresh.fit(tasks, iterations=2, meta_batch_size=2, progress=False, callbacks=[new := kd()])
    for a, b in zip([*reused.model.parameters(), *shared.terms[0].parameters()],
                    [*fresh.model.parameters(), *new.terms[0].parameters()]):
        torch.testing.assert_close(a, b)
    assert shared.optimizer.state[shared.optimizer.param_groups[0]["params"][0]]["step"] == 2
    given = torch.nn.Conv2d(4, 6, 1)
    initial = given.weight.detach().clone()
    term = kd(given)
    learner(seed=1).fit(tasks, iterations=1, meta_batch_size=2, progress=False, callbacks=[term])
    assert not torch.equal(given.weight, initial)
    term.reset()  # a given adapter is put back to its initial weights
    torch.testing.assert_close(given.weight.detach(), initial)


def test_adapter_weights_set_after_building_the_term_are_trained_from_at_the_first_fit(tasks):
    """An adapter the user initialised after creating the term (identity, pre-trained) was reset to its
    construction-time weights at the first fit; the weights to restore are those of the callback's first use."""
    teacher = learner(hidden=4, seed=3)
    given = torch.nn.Conv2d(4, 4, 1)
    term = Distillation(FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1", adapter=given), lr=1e-12)
    with torch.no_grad():
        given.weight.copy_(torch.eye(4)[:, :, None, None])
        given.bias.zero_()
    learner(seed=1).fit(tasks, iterations=1, meta_batch_size=2, progress=False, callbacks=[term])
    identity = given.weight.detach().clone()
    torch.testing.assert_close(identity, torch.eye(4)[:, :, None, None], atol=1e-6, rtol=0)
    learner(seed=2).fit(tasks, iterations=1, meta_batch_size=2, progress=False, callbacks=[term])  # reused: afresh
    with torch.no_grad():
        given.weight.add_(1.0)
    term.reset()  # back to the weights of the callback's first use
    torch.testing.assert_close(given.weight.detach(), identity, atol=1e-6, rtol=0)


def test_resuming_with_an_already_used_callback_restores_the_checkpoint_optimizer(tasks, tmp_path):
    """A resume with a Distillation object that already trained another learner equals the
    uninterrupted run (was: it kept its own Adam moments instead of the checkpoint's)."""
    teacher = learner(hidden=6, seed=3)

    def kd():
        return distillation(teacher, phases=("support", "query"), features=[("trunk.blocks.1", "trunk.blocks.1")])

    learner().fit(tasks, iterations=2, meta_batch_size=2, progress=False, callbacks=[kd()],
                  checkpoint_dir=tmp_path, checkpoint_every=2)
    full = learner()
    full.fit(tasks, iterations=4, meta_batch_size=2, progress=False, callbacks=[kd()])
    used = kd()
    learner(seed=7).fit(tasks, iterations=3, meta_batch_size=2, progress=False, callbacks=[used])
    resumed = learner()
    resumed.fit(tasks, iterations=4, meta_batch_size=2, progress=False, callbacks=[used], resume=tmp_path / "last.pt")
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b)


def test_a_cosine_transfer_teacher_taps_its_own_trunk_layers(tasks):
    """A transfer teacher with the cosine classifier adapts on normalised features; its taps still
    read the model's own layers (was: 'trunk.blocks.1' was 'not found' in a list naming it, and
    'trunk' gave the normalised features of norm `scale`)."""
    from metamtl.adaptation import LossContext, tap_outputs

    teacher = MetaLearner(conv(6, seed=3), build_algorithm("transfer", num_classes=30, head_init="zero",
                                                           classifier="cosine", steps=1, lr=0.3),
                          preprocessing=PREP, device="cpu")
    teacher.fit(tasks, iterations=1, meta_batch_size=2, progress=False)
    ep = tasks.episode(0).to("cpu")
    t = LearnerTeacher(teacher)
    t.tap("trunk")
    t.tap("trunk.blocks.1")
    ctx = LossContext("query", torch.zeros(len(ep.query_y), 3), ep.query_y, ep.query_x, ep.support_x, ep.support_y, 3,
                      teacher.model)
    out = t.outputs(ctx)
    teacher.model.eval()
    with torch.no_grad(), tap_outputs(teacher.model, ["trunk.blocks.1"]) as feats:
        trunk = teacher.model.trunk(ep.query_x)
    torch.testing.assert_close(out["trunk"], trunk)
    torch.testing.assert_close(out["trunk.blocks.1"], feats["trunk.blocks.1"])
    learner().fit(tasks, iterations=1, meta_batch_size=2, progress=False,
                  callbacks=[distillation(teacher, features=[("trunk.blocks.1", "trunk.blocks.1")])])


@pytest.mark.parametrize("alg", ["maml", "anil"])
def test_a_student_taps_its_learned_head_also_when_only_the_head_adapts(tasks, alg):
    """'head' is the adapted head's output under head-only adaptation (ANIL) too (was: an InputError
    'layer head produced no tensor output' on the first step)."""
    teacher = MetaLearner(conv(6, out=3, seed=3), build_algorithm("maml", head_init="learned", steps=1, lr=0.3),
                          preprocessing=PREP, device="cpu")
    student = MetaLearner(conv(4, out=3), build_algorithm(alg, head_init="learned", steps=1, lr=0.3),
                          preprocessing=PREP, device="cpu")
    ep = tasks.episode(0).to("cpu")
    adapted = student.algorithm.adapt(student.model, ep.support_x, ep.support_y, 3)
    logits, feats = adapted.forward(ep.query_x, taps=["head"])
    torch.testing.assert_close(feats["head"], logits)
    student.fit(tasks, iterations=1, meta_batch_size=2, progress=False,
                callbacks=[distillation(teacher, weight=0, phases=["support", "query"], features=[("head", "head")])])


def test_multitask_combines_the_adapter_gradient_like_the_model_gradient(tasks):
    """Under the 'equal' strategy the adapter gets the mean of the datasets' gradients, as the model
    does (was: their sum, and under the other strategies no task weighting at all)."""
    import dataclasses

    from metamtl.algorithms.multitask import MultiTask

    ea = [dataclasses.replace(tasks.episode(i).to("cpu"), dataset="a") for i in range(2)]
    eb = [dataclasses.replace(tasks.episode(10 + i).to("cpu"), dataset="b") for i in range(2)]
    teacher = conv(6, seed=5)

    def run(alg, batch):
        m = conv(4)
        term = FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1")
        term.bind(m)
        alg.inner.loss_terms.append(term)
        alg.meta_step(m, TaskBatch(batch))
        return [next(m.parameters()).grad, term.adapter.weight.grad]

    def anil():
        return build_algorithm("anil", head_init="proto", steps=1, lr=0.3)

    both = run(MultiTask(anil(), "equal", ["a", "b"]), ea + eb)
    for g, ga, gb in zip(both, run(anil(), ea), run(anil(), eb)):
        torch.testing.assert_close(g, (ga + gb) / 2)


def test_a_teacher_path_that_is_a_folder_names_a_checkpoint_in_it(tmp_path):
    """(was: 'does not exist' for a folder that exists)"""
    from metamtl.distill import from_config

    learner().save(tmp_path / "learner.pt")
    with pytest.raises(ConfigError, match=r"distill.teacher: .* is a folder, not a checkpoint file: give one of its "
                                          r"checkpoints, e.g. .*learner.pt"):
        from_config({"teacher": str(tmp_path)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a checkpoint file with no checkpoint in it"):
        from_config({"teacher": str(tmp_path / "empty")})
