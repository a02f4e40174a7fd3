"""Training augmentation: crops equal a reflect-padded reference, flips mirror, episodes stay seeded."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metamtl.config import config_from_dict
from metamtl.data import ClassDataset
from metamtl.data.augment import RandomCropFlip, build_augment
from metamtl.errors import ConfigError, TaskError
from metamtl.experiment import build_tasks
from metamtl.tasks import EpisodeSampler


def images(n=6, c=3, h=9, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def reference(x, padding, seed, flip):
    """Crop/flip one image at a time with F.pad(mode='reflect'), drawing the same numbers."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    shift = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=g)
    mirrored = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    padded = F.pad(x.float(), (padding,) * 4, mode="reflect")
    out = []
    for i in range(n):
        dy, dx = int(shift[0, i]), int(shift[1, i])
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out.append(crop.flip(-1) if mirrored[i] else crop)
    return torch.stack(out).to(torch.uint8)


@pytest.mark.parametrize("padding,flip", [(3, False), (3, True), (0, True), (1, True)])
def test_crop_and_flip_match_a_per_image_reference(padding, flip):
    x = images()
    out = RandomCropFlip(padding, flip)(x, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, reference(x, padding, 5, flip))


def test_augmentation_changes_images_but_keeps_their_pixels():
    x = images(n=32)
    out = RandomCropFlip(2, True)(x, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(1)
    assert int(changed.sum()) >= 28  # P(no shift and no flip) = 1/50 per image
    # a flip alone permutes each row's pixels: same multiset per row
    flips = RandomCropFlip(0, True)(x, torch.Generator().manual_seed(0))
    assert torch.equal(flips.sort(-1).values, x.sort(-1).values)
    assert not torch.equal(flips, x)
    assert torch.equal(RandomCropFlip(0, False)(x), x)


def test_bad_augment_settings_are_refused():
    with pytest.raises(ConfigError, match="padding must be an integer >= 0"):
        RandomCropFlip(-1)
    with pytest.raises(ConfigError, match="flip must be true or false"):
        RandomCropFlip(2, flip="yes")
    with pytest.raises(ConfigError, match="smaller than the image size"):
        RandomCropFlip(9)(images())
    with pytest.raises(ConfigError, match=r"\[N, C, H, W\]"):
        RandomCropFlip(1)(torch.zeros(4, 5, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="unknown augment option"):
        build_augment({"padding": 2, "rotate": 90})
    assert build_augment(True) == RandomCropFlip(8, True) and build_augment(None) is None


def class_dataset(classes=10, per_class=6, size=12):
    x = images(classes * per_class, 3, size, size, seed=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ClassDataset(x, labels, [f"c{i}" for i in range(classes)], name="toy")


def test_sampler_augments_the_same_episode_and_stays_reproducible():
    ds = class_dataset()
    plain = EpisodeSampler(ds, 5, 1, 2, seed=3)
    aug = EpisodeSampler(ds, 5, 1, 2, seed=3, augment={"padding": 2, "flip": True})
    for i in range(5):
        p, a, again = plain[i], aug[i], aug[i]
        assert p.classes == a.classes and torch.equal(p.query_y, a.query_y)
        assert torch.equal(a.support_x, again.support_x) and torch.equal(a.query_x, again.query_x)
        assert not torch.equal(p.query_x, a.query_x)
        # the augmented images are the plain ones, cropped/flipped with the documented stream
        from metamtl.tasks.sampler import episode_seed

        g = torch.Generator().manual_seed(episode_seed(3, i, stream=2))
        t = RandomCropFlip(2, True)
        assert torch.equal(a.support_x, t(p.support_x, g)) and torch.equal(a.query_x, t(p.query_x, g))
    assert aug.with_settings(shots=2).augment == aug.augment
    assert "augment=RandomCropFlip(padding=2, flip=True)" in repr(aug)


def test_augment_needs_images():
    feats = ClassDataset(torch.randn(20, 4), torch.arange(4).repeat_interleave(5), list("abcd"), name="feats")
    with pytest.raises(TaskError, match="augment needs an image dataset"):
        EpisodeSampler(feats, 2, 1, 1, augment=True)


def test_config_augments_train_episodes_only(tmp_path):
    from PIL import Image

    for split in ("train", "val", "test"):
        for c in range(3):
            d = tmp_path / "data" / split / f"{split}{c}"
            d.mkdir(parents=True)
            for i in range(3):
                pixels = images(1, 3, 12, 12, seed=c * 10 + i)[0].permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(d / f"{i}.png")
    cfg = config_from_dict({
        "data": {"name": "folder", "root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"),
                 "train_augment": {"padding": 2}},
        "tasks": {"ways": 3, "shots": 1, "queries": 2},
        "eval": {"settings": [{"ways": 3, "shots": 1}], "queries": 2},
    })
    tasks = build_tasks(cfg)
    assert tasks["train"].augment == RandomCropFlip(2, True)
    assert tasks["val"].augment is None and tasks["test"].augment is None
    with pytest.raises(ConfigError, match="data.train_augment: augment padding must be an integer >= 0"):
        config_from_dict({"data": {"train_augment": {"padding": -3}}})
    with pytest.raises(ConfigError, match="unknown key 'pad'"):
        config_from_dict({"data": {"train_augment": {"pad": 3}}})
    with pytest.raises(ConfigError, match="sinusoid tasks have none"):
        build_tasks(config_from_dict({"data": {"name": "sinusoid", "train_augment": {}},
                                      "algorithm": {"name": "maml"}, "model": {"name": "mlp"}}))
