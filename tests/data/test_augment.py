"""Training augmentation: crops equal a reflect-padded reference, flips mirror, episodes stay seeded."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metamtl.config import config_from_dict
from metamtl.data import ClassDataset
from metamtl.data.augment import ColorJitter, Compose, RandomAffine, RandomCropFlip, SupportAugment, build_augment
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
    with pytest.raises(ConfigError, match="unknown key 'rotate' for augmentation 'crop_flip'"):
        build_augment({"padding": 2, "rotate": 90})
    with pytest.raises(ConfigError, match=r"unknown augmentation \['affine'\]\. .*Valid augmentations: .*affine"):
        build_augment({"name": ["affine"]})  # was a bare TypeError (unhashable list)
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


def test_augment_too_large_for_the_images_is_refused_when_the_sampler_is_built():
    # before: accepted here, raised at the first training episode (after data set-up and model build)
    ds = ClassDataset(images(n=20, h=9, w=7), torch.arange(4).repeat_interleave(5), list("abcd"), name="tiny")
    with pytest.raises(ConfigError, match=r"augment of 'tiny' \(images \[3, 9, 7\]\).*padding 8 must be smaller"):
        EpisodeSampler(ds, 2, 1, 1, augment={"padding": 8})
    assert EpisodeSampler(ds, 2, 1, 1, augment={"padding": 6}).augment.padding == 6


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


# -- random affine ---------------------------------------------------------------------------------
def affine_reference(x, mats):
    """Per-pixel bilinear resampling, zeros outside: output pixel p' takes source A^-1 (p' - t)."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, h, w, dtype=torch.float64)
    xf = x.double()
    for k in range(n):
        inv = torch.linalg.inv(mats[k, :, :2])
        t = mats[k, :, 2]
        for i in range(h):
            for j in range(w):
                p = torch.tensor([j + 0.5 - w / 2, i + 0.5 - h / 2], dtype=torch.float64)
                sx, sy = (inv @ (p - t)).tolist()
                sx, sy = sx + w / 2 - 0.5, sy + h / 2 - 0.5  # source pixel coordinates
                x0, y0 = int(torch.floor(torch.tensor(sx))), int(torch.floor(torch.tensor(sy)))
                for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                    for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                        if 0 <= yy < h and 0 <= xx < w:
                            out[k, :, i, j] += wy * wx * xf[k, :, yy, xx]
    return out


def test_affine_matches_a_per_pixel_reference():
    x = images(n=8, c=2, h=9, w=7).float()
    aug = RandomAffine(rotation=30, shear=0.3, scale=(0.7, 1.3), shift=2, p=0.7)
    mats = aug.matrices(8, torch.Generator().manual_seed(4))
    out = aug(x, torch.Generator().manual_seed(4))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out.double(), affine_reference(x, mats), atol=1e-3)
    # uint8 in, uint8 out: the same images rounded
    out8 = aug(x.to(torch.uint8), torch.Generator().manual_seed(4))
    assert out8.dtype == torch.uint8
    assert (out8.double() - affine_reference(x, mats)).abs().max() <= 0.5 + 1e-3


def test_affine_parts_follow_their_ranges_and_probability():
    aug = RandomAffine()  # rotation 10 deg, shear 0.3, scale 0.8-1.2, shift 2 px, p = 0.5
    m = aug.matrices(4000, torch.Generator().manual_seed(0))
    a, t = m[:, :, :2], m[:, :, 2]
    shifted = (t != 0).any(1)
    assert 0.45 < shifted.double().mean() < 0.55 and t.abs().max() <= 2.0
    det = torch.linalg.det(a)  # rotation and shear keep areas: det = zoom^2
    zoom = det.sqrt()
    assert zoom.min() >= 0.8 - 1e-9 and zoom.max() <= 1.2 + 1e-9
    assert 0.45 < ((zoom - 1).abs() > 1e-9).double().mean() < 0.55
    untouched = ((a == torch.eye(2, dtype=a.dtype)).flatten(1).all(1) & ~shifted).double().mean()
    assert 0.04 < untouched < 0.09  # 1/16 of the images get no part at all


def test_affine_shift_moves_content_by_the_drawn_offset():
    x = torch.zeros(64, 1, 21, 21)
    x[:, :, 10, 10] = 1.0
    aug = RandomAffine(rotation=0, shear=0, scale=(1, 1), shift=3, p=1.0)
    m = aug.matrices(64, torch.Generator().manual_seed(2))
    out = aug(x, torch.Generator().manual_seed(2))
    ii, jj = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
    mass = out[:, 0].sum((1, 2))
    cx = (out[:, 0] * jj).sum((1, 2)) / mass - 10
    cy = (out[:, 0] * ii).sum((1, 2)) / mass - 10
    assert torch.allclose(torch.stack([cx, cy], 1).double(), m[:, :, 2], atol=1e-4)
    assert torch.allclose(mass, torch.ones(64), atol=1e-4)  # bilinear splitting keeps the mass


def test_affine_identity_settings_and_untouched_images():
    x = images(n=16, c=1, h=28, w=28)
    assert torch.equal(RandomAffine(p=0.0)(x), x)
    assert torch.equal(RandomAffine(rotation=0, shear=0, scale=(1, 1), shift=0, p=1.0)(x), x)
    g = torch.Generator().manual_seed(1)
    aug = RandomAffine(p=0.2)
    m = aug.matrices(16, torch.Generator().manual_seed(1))
    out = aug(x, g)
    idle = ((m[:, :, :2] == torch.eye(2, dtype=m.dtype)).flatten(1).all(1) & (m[:, :, 2] == 0).all(1))
    assert idle.any() and (~idle).any()
    assert torch.equal(out[idle], x[idle]) and not torch.equal(out[~idle], x[~idle])


def test_affine_in_the_sampler_and_configs():
    ds = class_dataset(size=16)
    plain = EpisodeSampler(ds, 5, 1, 2, seed=3)
    aug = EpisodeSampler(ds, 5, 1, 2, seed=3, augment={"name": "affine", "rotation": 10})
    from metamtl.tasks.sampler import episode_seed

    for i in range(3):
        p, a = plain[i], aug[i]
        assert p.classes == a.classes and torch.equal(a.query_x, aug[i].query_x)
        g = torch.Generator().manual_seed(episode_seed(3, i, stream=2))
        t = RandomAffine(rotation=10)
        assert torch.equal(a.support_x, t(p.support_x, g)) and torch.equal(a.query_x, t(p.query_x, g))
    both = build_augment([{"padding": 1, "flip": False}, {"name": "affine", "shift": 1}])
    assert isinstance(both, Compose) and build_augment(both.config()) == both
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x = images(4, 1, 12, 12)
    assert torch.equal(both(x, g1), RandomAffine(shift=1)(RandomCropFlip(1, False)(x, g2), g2))
    assert build_augment(RandomAffine().config()) == RandomAffine()
    cfg = config_from_dict({"data": {"train_augment": {"name": "affine", "rotation": 5}}})
    assert build_augment(cfg.data.train_augment) == RandomAffine(rotation=5)
    with pytest.raises(ConfigError, match="unknown key 'rotate' for augmentation 'affine'. Did you mean 'rotation'"):
        config_from_dict({"data": {"train_augment": {"name": "affine", "rotate": 5}}})
    with pytest.raises(ConfigError, match="unknown augmentation 'afine'. Did you mean 'affine'"):
        build_augment({"name": "afine"})


@pytest.mark.parametrize("kwargs,match", [
    ({"rotation": -1}, "rotation"), ({"shear": "a"}, "shear"), ({"scale": (1.2, 0.8)}, "low <= high"),
    ({"scale": 1.1}, "scale must be"), ({"shift": -2}, "shift"), ({"p": 1.5}, r"p \(probability"),
    ({"fill": "black"}, "fill must be one of"),
    ({"scale": (0.8, float("inf"))}, r"scale must be a finite number >= 0.001, got inf"),
    ({"shift": float("nan")}, r"shift \(pixels\) must be a finite number"), ({"shear": float("inf")}, "shear must be a finite"),
])
def test_bad_affine_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RandomAffine(**kwargs)


def test_support_augment_adds_labelled_copies():
    x = images(6, 1, 12, 12).float()
    y = torch.arange(3).repeat(2)
    tta = SupportAugment({"name": "affine", "p": 1.0}, copies=4)
    ex, ey = tta.expand(x, y, torch.Generator().manual_seed(0))
    assert ex.shape == (24, 1, 12, 12) and torch.equal(ey, y.repeat(4))
    assert torch.equal(ex[:6], x) and not torch.equal(ex[6:12], x)
    again, _ = tta.expand(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(ex, again)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert tta.expand(nhwc, y)[0].is_contiguous(memory_format=torch.channels_last)
    assert SupportAugment(copies=1).expand(x, y)[0] is x
    assert SupportAugment().augment == RandomAffine()
    with pytest.raises(ConfigError, match="copies must be an integer >= 1"):
        SupportAugment(copies=0)


def jitter_reference(x, factors):
    """torchvision's adjust_brightness / contrast / saturation, one image at a time (float [0, 1])."""
    TF = pytest.importorskip("torchvision.transforms.functional")
    out = []
    for img, (b, c, s) in zip(x, factors.tolist()):
        img = TF.adjust_contrast(TF.adjust_brightness(img, b), c)
        out.append(TF.adjust_saturation(img, s) if img.shape[0] == 3 else img)
    return torch.stack(out)


def test_color_jitter_matches_torchvision_per_image():
    x8 = images(n=8, c=3, h=9, w=7)
    aug = ColorJitter(brightness=0.4, contrast=0.5, saturation=0.6, p=0.75)
    f = aug.factors(8, torch.Generator().manual_seed(3))
    ref = jitter_reference(x8.float() / 255, f)
    out = aug(x8.float() / 255, torch.Generator().manual_seed(3))
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    out8 = aug(x8, torch.Generator().manual_seed(3))  # uint8 in, uint8 out: the same, rounded once
    assert out8.dtype == torch.uint8 and (out8.double() - 255 * ref.double()).abs().max() <= 0.5 + 1e-3
    left = (f == 1).all(1)  # images drawn with p's complement come back untouched
    assert left.any() and (~left).any() and torch.equal(out8[left], x8[left])
    assert torch.equal(out[left], x8[left].float() / 255)  # float images too, bit for bit
    grey = images(n=5, c=1)  # one channel: brightness and contrast only
    g = ColorJitter()(grey.float() / 255, torch.Generator().manual_seed(1))
    assert torch.allclose(g, jitter_reference(grey.float() / 255, ColorJitter().factors(5, torch.Generator().manual_seed(1))),
                          atol=1e-5)


def test_color_jitter_ranges_identity_and_configs():
    f = ColorJitter(brightness=0.2, contrast=0.0, saturation=0.4).factors(4000, torch.Generator().manual_seed(0))
    assert f[:, 0].min() >= 0.8 and f[:, 0].max() <= 1.2 and torch.equal(f[:, 1], torch.ones(4000, dtype=f.dtype))
    assert f[:, 2].min() >= 0.6 and f[:, 2].max() <= 1.4 and f[:, 2].std() > 0.2
    x = images(n=6)
    assert torch.equal(ColorJitter(p=0)(x), x) and torch.equal(ColorJitter(0, 0, 0)(x), x)
    both = build_augment([{"padding": 8, "flip": True}, {"name": "color_jitter"}])
    assert isinstance(both, Compose) and both.augments[1] == ColorJitter() and build_augment(both.config()) == both
    cfg = config_from_dict({"data": {"train_augment": [{"padding": 2}, {"name": "color_jitter", "saturation": 0.1}]}})
    assert build_augment(cfg.data.train_augment).augments[1] == ColorJitter(saturation=0.1)
    from metamtl.tasks.sampler import episode_seed

    ds = class_dataset(size=16)
    plain, jit = EpisodeSampler(ds, 5, 1, 2, seed=3), EpisodeSampler(ds, 5, 1, 2, seed=3, augment={"name": "color_jitter"})
    p, a = plain[1], jit[1]
    g = torch.Generator().manual_seed(episode_seed(3, 1, stream=2))
    assert p.classes == a.classes and not torch.equal(a.support_x, p.support_x)
    assert torch.equal(a.support_x, ColorJitter()(p.support_x, g)) and torch.equal(a.query_x, ColorJitter()(p.query_x, g))


@pytest.mark.parametrize("kwargs,match", [
    ({"brightness": 1.5}, r"brightness must be a number in \[0, 1\]"), ({"contrast": -0.1}, "contrast"),
    ({"saturation": "lots"}, "saturation"), ({"p": 2}, r"p \(probability"),
])
def test_bad_color_jitter_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ColorJitter(**kwargs)
    with pytest.raises(ConfigError, match="grey .* or RGB"):
        ColorJitter()(images(n=2, c=2))


@pytest.mark.parametrize("idle, busy", [
    (RandomAffine(p=0.0), RandomAffine(p=0.5)),
    (RandomAffine(rotation=0, shear=0, scale=(1, 1), shift=0), RandomAffine()),
    (ColorJitter(p=0.0), ColorJitter(p=0.5)),
    (ColorJitter(brightness=0, contrast=0, saturation=0), ColorJitter()),
])
def test_identity_settings_draw_the_documented_numbers_too(idle, busy):
    """p=0 or an identity range drew nothing, so a sweep over p changed every later augmentation
    on the same stream; the documented 9*N / 4*N numbers are now drawn whatever the settings."""
    x = images(n=6, c=3, h=16, w=16)

    def after(aug):
        g = torch.Generator().manual_seed(0)
        out = aug(x, g)
        return out, torch.rand(5, generator=g)

    (out, next_idle), (_, next_busy) = after(idle), after(busy)
    assert torch.equal(out, x) and torch.equal(next_idle, next_busy)
    # what Compose([idle, ColorJitter()]) jitters with is what follows the busy one on the stream
    g = torch.Generator().manual_seed(0)
    busy(x, g)
    assert torch.equal(after(Compose([idle, ColorJitter()]))[0], ColorJitter()(x, g))


@pytest.mark.parametrize("augment", [None, {"padding": 2, "flip": True}, {"name": "affine"}])
def test_episodes_do_not_depend_on_the_default_dtype(augment):
    """Before: torch.rand without dtype drew other numbers under torch.set_default_dtype(torch.float64),
    so episode i (and evaluate's results) changed with the global default dtype."""
    from metamtl.tasks import Sinusoid

    ds = class_dataset()
    sources = [EpisodeSampler(ds, 5, 1, 2, seed=3, augment=augment),
               EpisodeSampler(ds, 3, 2, 2, seed=1, augment=augment), Sinusoid(shots=5, queries=5, seed=2)]
    before = [[s.episode(i) for i in range(3)] for s in sources]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        after = [[s.episode(i) for i in range(3)] for s in sources]
    finally:
        torch.set_default_dtype(old)
    for eps_a, eps_b in zip(before, after):
        for a, b in zip(eps_a, eps_b):
            for x, y in ((a.support_x, b.support_x), (a.query_x, b.query_x), (a.support_y, b.support_y)):
                assert x.dtype == y.dtype and torch.equal(x, y)
