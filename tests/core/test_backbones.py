"""Backbones through build_model: ResNet-12 shapes, parameters, gradients, a short CPU run; conv4 widths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import ClassDataset, Preprocessing
from metamtl.errors import ConfigError, InputError
from metamtl.models import EpisodicBatchNorm, ResNet12, build_model
from metamtl.tasks import EpisodeSampler

SMALL = [8, 12, 16, 24]


def test_resnet12_standard_shapes_and_parameter_count():
    model = build_model("resnet12", out_features=None)  # 64-160-320-640, 84x84 RGB
    assert isinstance(model.trunk, ResNet12) and model.num_features == 640
    assert sum(p.numel() for p in model.parameters()) == 12_424_320  # the usual "12.4 M" ResNet-12
    with torch.no_grad():
        assert model.trunk(torch.randn(2, 3, 84, 84)).shape == (2, 640)
    assert sum(isinstance(m, EpisodicBatchNorm) for m in model.modules()) == 16  # 3 per block + shortcut


@pytest.mark.parametrize("kwargs,shape", [
    ({"in_channels": 1, "image_size": 28, "widths": SMALL}, (5, 24)),
    ({"in_channels": 3, "image_size": 32, "widths": SMALL, "pool": "flatten"}, (5, 24 * 2 * 2)),
])
def test_resnet12_small_images_and_gradients(kwargs, shape):
    model = build_model("resnet12", out_features=4, **kwargs)
    x = torch.randn(5, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    feats = model.trunk(x)
    assert feats.shape == shape and model.num_features == shape[1]
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(InputError, match=r"expects images of shape \[batch, "):
        model.check_input(torch.randn(2, 3, 84, 84))


def test_resnet12_residual_block_matches_a_hand_written_forward():
    torch.manual_seed(0)
    block = ResNet12(1, SMALL, 16).blocks[0]
    x = torch.randn(4, 1, 16, 16)
    bn = lambda t: torch.nn.functional.batch_norm(t, None, None, training=True)  # noqa: E731
    lr = lambda t: torch.nn.functional.leaky_relu(t, 0.1)  # noqa: E731
    c = block.convs
    out = bn(c[2](lr(bn(c[1](lr(bn(c[0](x))))))))
    expected = torch.nn.functional.max_pool2d(lr(out + bn(block.shortcut[0](x))), 2)
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("kwargs,match", [
    ({"widths": [8, 8, 8]}, "list of 4"), ({"image_size": 12}, "image_size >= 16"), ({"pool": "max"}, "pool must be"),
])
def test_resnet12_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model("resnet12", **kwargs)


def toy(classes=12, per_class=8, size=16):
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(classes, 1, size, size, generator=g)
    x = ((protos.repeat_interleave(per_class, 0) * 0.8 + 0.2 * torch.rand(classes * per_class, 1, size, size,
                                                                             generator=g)) * 255).to(torch.uint8)
    return ClassDataset(x, torch.arange(classes).repeat_interleave(per_class), [f"c{i}" for i in range(classes)],
                        preprocessing=Preprocessing(size=(size, size), channels=1))


@pytest.mark.parametrize("algorithm", [{"name": "protonet"}, {"name": "anil", "head_init": "proto", "steps": 1, "lr": 0.1}])
def test_short_cpu_run_with_resnet12(algorithm, single_thread):
    torch.manual_seed(0)
    ds = toy()
    learner = MetaLearner(build_model("resnet12", in_channels=1, image_size=16, widths=SMALL, out_features=None),
                          build_algorithm(**algorithm), device="cpu", meta_lr=0.003)
    tasks = EpisodeSampler(ds, 4, 1, 3, seed=0)
    before = learner.evaluate(tasks, 20, progress=False).accuracy
    learner.fit(tasks, iterations=30, meta_batch_size=2, progress=False)
    after = learner.evaluate(tasks, 20, progress=False)
    assert after.accuracy > max(before, 0.5)  # 4-way: chance is 0.25


def test_conv4_accepts_one_width_per_block():
    model = build_model("conv4", in_channels=1, hidden=[8, 16, 32, 48], image_size=28, out_features=None)
    assert [b[0].out_channels for b in model.trunk.blocks] == [8, 16, 32, 48] and model.num_features == 48
    assert model.trunk(torch.randn(3, 1, 28, 28)).shape == (3, 48)
    assert build_model("conv4", hidden=32, out_features=None).num_features == 32  # one width, as before
    with pytest.raises(ConfigError, match="list of 4 of them"):
        build_model("conv4", hidden=[8, 16])


def test_conv4_without_the_last_pooling_keeps_the_last_map():
    """``pool=[True, True, True, False]``: the same weights and the same forward up to the last block,
    whose map is flattened instead of max-pooled (28x28 -> 3x3: 9x the features)."""
    torch.manual_seed(0)
    pooled = build_model("conv4", hidden=8, out_features=None)
    unpooled = build_model("conv4", hidden=8, out_features=None, pool=[True, True, True, False])
    unpooled.load_state_dict(pooled.state_dict())  # same parameter and buffer names
    assert unpooled.num_features == 8 * 3 * 3 and pooled.num_features == 8
    x = torch.randn(4, 1, 28, 28)
    last_map = unpooled.trunk.blocks(x)
    assert last_map.shape == (4, 8, 3, 3)
    torch.testing.assert_close(unpooled.features(x), last_map.flatten(1))
    torch.testing.assert_close(pooled.features(x), F.max_pool2d(last_map, 2).flatten(1))  # pooling is all that differs
    with_head = build_model("conv4", hidden=8, out_features=5, pool=[True, True, False, False])
    assert with_head(x).shape == (4, 5) and with_head.num_features == 8 * 7 * 7
    assert build_model("conv4", hidden=8, out_features=None, pool=False, image_size=10).num_features == 8 * 10 * 10


def test_one_image_with_a_1x1_last_map_under_batch_statistics_is_an_input_error_naming_bn_stats_support():
    torch.manual_seed(0)
    model = build_model("conv4", image_size=8, hidden=4, pool=[True, True, True, False], out_features=None)
    xs, ys, xq = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), torch.randn(1, 1, 8, 8)
    with pytest.raises(InputError, match=r"more than one value per channel.*\[1, 4, 1, 1\].*bn_stats: support"):
        MetaLearner(model, "protonet", device="cpu").predict(xs, ys, xq)
    support = MetaLearner(model, build_algorithm("protonet", bn_stats="support"), device="cpu")
    assert support.predict(xs, ys, xq).shape == (1, 2)  # the support set's statistics: no error
    assert MetaLearner(model, "protonet", device="cpu").predict(xs, ys, xq.repeat(2, 1, 1, 1)).shape == (2, 2)


@pytest.mark.parametrize("value", [None, "no", [True, True], [1, 1, 1, 1], 0])
def test_conv4_pool_bad_values(value):
    with pytest.raises(ConfigError, match="pool must be true / false or a list of 4"):
        build_model("conv4", pool=value)


def test_conv4_pool_short_run_learns_saves_and_loads(tmp_path, single_thread):
    """The unpooled trunk through MetaLearner: ProtoNet learns on toy classes, and save / load keep it."""
    torch.manual_seed(0)
    tasks = EpisodeSampler(toy(), 4, 1, 3, seed=0)
    model = build_model("conv4", in_channels=1, hidden=8, image_size=16, out_features=None,
                        pool=[True, True, True, False])
    learner = MetaLearner(model, build_algorithm("protonet"), device="cpu", meta_lr=0.003)
    before = learner.evaluate(tasks, 20, progress=False).accuracy
    learner.fit(tasks, iterations=30, meta_batch_size=2, progress=False)
    assert learner.evaluate(tasks, 20, progress=False).accuracy > max(before, 0.5)  # 4-way: chance 0.25
    learner.save(tmp_path / "learner.pt")
    again = MetaLearner.load(tmp_path / "learner.pt")
    assert again.model.num_features == 8 * 2 * 2
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(again.model.features(x), learner.model.features(x))


@pytest.mark.parametrize("name,kwargs,shape", [
    ("conv4", dict(in_channels=1, hidden=8, image_size=28), (5, 1, 28, 28)),
    ("resnet12", dict(in_channels=1, widths=SMALL, image_size=16), (5, 1, 16, 16)),
])
def test_feature_norm_gives_scaled_unit_features_of_the_same_trunk(name, kwargs, shape):
    torch.manual_seed(0)
    raw = build_model(name, out_features=None, **kwargs)
    scaled = build_model(name, out_features=None, feature_norm=2.5, **kwargs)
    scaled.load_state_dict(raw.state_dict())  # the same weights, the same keys (init_from still maps)
    x = torch.randn(*shape)
    f, g = raw.features(x), scaled.features(x)
    torch.testing.assert_close(g.norm(dim=1), torch.full((shape[0],), 2.5))
    torch.testing.assert_close(g, 2.5 * f / f.norm(dim=1, keepdim=True))
    g.sum().backward()  # gradients reach the trunk through the normalisation
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in scaled.parameters())
    assert build_model(name, out_features=None, **kwargs).trunk.feature_norm is None  # default: raw features


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_feature_norm_bad_values(value):
    with pytest.raises(ConfigError, match="feature_norm must be a number > 0"):
        build_model("conv4", feature_norm=value)


def test_feature_norm_prototype_head_is_a_cosine_classifier_of_scale_2_s_squared():
    """The docstring's claim: on features of length ``s`` the prototype-initialised head's softmax is
    that of a cosine classifier ``2 s^2 cos(f, c_k)`` (1-shot: prototypes are unit-length support features)."""
    from metamtl.models.backbones import scaled_unit
    from metamtl.models.heads import initial_head_params
    g = torch.Generator().manual_seed(0)
    s = 5 ** 0.5
    support, query = scaled_unit(torch.rand(5, 64, generator=g), s), scaled_unit(torch.rand(9, 64, generator=g), s)
    w, b = initial_head_params("proto", support, torch.arange(5), 5, 64, support)
    cosine = 2 * s * s * F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T
    torch.testing.assert_close(F.softmax(query @ w.T + b, -1), F.softmax(cosine, -1))
