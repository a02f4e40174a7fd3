"""Test-time support augmentation: copies reach the adaptation, are seeded, saved and configurable."""
from __future__ import annotations

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.config import config_from_dict
from metamtl.data import ClassDataset, Preprocessing
from metamtl.data.augment import SupportAugment
from metamtl.errors import ConfigError
from metamtl.models import build_model
from metamtl.models.heads import class_means
from metamtl.tasks import EpisodeSampler, episode_generator


def toy_dataset(classes=20, per_class=8, size=12):
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(classes, 1, size, size, generator=g)
    noise = torch.rand(classes * per_class, 1, size, size, generator=g)
    images = ((protos.repeat_interleave(per_class, 0) * 0.7 + 0.3 * noise) * 255).to(torch.uint8)
    prep = Preprocessing(size=(size, size), channels=1)
    return ClassDataset(images, torch.arange(classes).repeat_interleave(per_class),
                        [f"c{i}" for i in range(classes)], name="toy", preprocessing=prep)


def protonet(**kw):
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=None)
    return MetaLearner(model, build_algorithm("protonet"), preprocessing=toy_dataset().preprocessing,
                       device="cpu", **kw)


def test_prototypes_average_every_augmented_copy():
    ds = toy_dataset()
    ep = EpisodeSampler(ds, 5, 2, 3, seed=0).episode(0).to("cpu")
    tta = SupportAugment({"name": "affine", "p": 1.0}, copies=3, seed=7)
    learner = protonet(support_augment=tta)
    adapted = learner.adapt(ep.support_x, ep.support_y).adapted
    x, y = tta.expand(ep.support_x, ep.support_y, episode_generator(7, 0, stream=3))
    with torch.no_grad():
        expected = class_means(learner.model.trunk(x), y, 5)
    assert x.shape[0] == 30
    torch.testing.assert_close(adapted.prototypes, expected)
    plain = protonet().adapt(ep.support_x, ep.support_y).adapted.prototypes
    assert not torch.allclose(plain, expected)


def test_identical_copies_change_nothing_and_evaluation_is_seeded():
    ds = toy_dataset()
    test = EpisodeSampler(ds, 5, 1, 3, seed=1)
    learner = protonet()
    plain = learner.evaluate(test, 6, progress=False)
    # copies that are exact duplicates: same class means, same BatchNorm statistics
    same = learner.evaluate(test, 6, progress=False, support_augment={"copies": 4, "augment": {"name": "affine", "p": 0.0}})
    assert same.per_episode_accuracy == plain.per_episode_accuracy
    assert same.shots == 1  # the episode's setting, not the expanded support size
    spec = {"copies": 4, "augment": {"name": "affine", "p": 1.0, "rotation": 30}}
    a = learner.evaluate(test, 6, progress=False, support_augment=spec)
    b = learner.evaluate(test, 6, progress=False, support_augment=spec)
    assert a.per_episode_loss == b.per_episode_loss != plain.per_episode_loss


def test_support_augment_is_saved_and_set_from_the_config(tmp_path):
    learner = protonet(support_augment={"copies": 2})
    loaded = MetaLearner.load(learner.save(tmp_path / "l.pt"), device="cpu")
    assert loaded.support_augment == SupportAugment(copies=2)
    assert "support_augment" not in loaded.config()["learner"]  # resuming does not compare it
    cfg = config_from_dict({"eval": {"support_augment": {"copies": 3, "augment": {"name": "affine", "shift": 1}}}})
    assert cfg.eval.support_augment["copies"] == 3
    with pytest.raises(ConfigError, match="eval.support_augment: unknown support_augment key 'copy'"):
        config_from_dict({"eval": {"support_augment": {"copy": 3}}})
    with pytest.raises(ConfigError, match="copies must be an integer >= 1"):
        protonet(support_augment={"copies": 0})


def test_support_copies_of_normalised_input_are_augmented_as_pixels_and_normalised_again():
    from metamtl.inputs import support_copies

    pre = Preprocessing(size=(8, 8), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x, y = pre.normalize(images), torch.arange(4)
    tta = SupportAugment({"name": "color_jitter", "brightness": 0.01, "contrast": 0.0, "saturation": 0.0}, copies=2)
    out, out_y = support_copies(x, y, tta, 3, pre)
    assert torch.equal(out[:4], x) and torch.equal(out_y, y.repeat(2))
    # the same jitter applied to the stored pixels, then normalised: what training would see
    pixels = tta.augment(images.float() / 255, episode_generator(tta.seed, 3, stream=3))
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out[4:], (pixels - mean) / std, atol=1e-5, rtol=1e-5)
    assert (out[4:] - x).abs().max() < 0.1  # a 1% brightness change stays small (was clamped to [0, 1])
