"""Raw images given to ``predict`` / ``adapt`` / ``preprocess`` are read unambiguously and faithfully.

Numpy batches are read by their number of dimensions alone: ``(N, H, W)`` is N grey images for
any N (3 grey images are never one RGB image), ``(N, C, H, W)`` and ``(N, H, W, C)`` by the axis
holding 1, 3 or 4 channels.  Pixel values are scaled by type (16-bit by 65535, never clipped at
255), and NaN/inf, out-of-range floats and signed integers are refused like non-finite tensors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metamtl.data import Preprocessing
from metamtl.errors import InputError

from .conftest import tiny_learner

pytestmark = pytest.mark.reliability("bad_input")

GREY = Preprocessing(size=(12, 12), channels=1)
RGB = Preprocessing(size=(12, 12), channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)


def images(n: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """``n`` distinct uint8 images ``(n, 12, 12)`` or ``(n, 12, 12, channels)``."""
    g = np.random.default_rng(seed)
    shape = (n, 12, 12) if channels == 1 else (n, 12, 12, channels)
    return g.integers(0, 256, shape, dtype=np.uint8)


def one_by_one(prep: Preprocessing, batch: np.ndarray) -> torch.Tensor:
    """The reference: each image given on its own as a PIL image."""
    return torch.cat([prep([Image.fromarray(im)]) for im in batch])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_a_grey_batch_n_h_w_is_n_images_for_any_n(n):
    batch = images(n)
    out = GREY(batch)
    assert out.shape == (n, 1, 12, 12)  # n = 3 is not one RGB image, n = 1 not a 12-channel one
    assert torch.equal(out, one_by_one(GREY, batch))


@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_colour_batches_in_either_layout_give_the_same_images(n, layout):
    batch = images(n, 3)
    given = batch if layout == "NHWC" else np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    assert torch.equal(RGB(given), one_by_one(RGB, batch))
    assert torch.equal(RGB(torch.from_numpy(given)), one_by_one(RGB, batch))  # uint8 tensors alike


def test_an_ambiguous_layout_is_refused_not_guessed():
    with pytest.raises(InputError, match=r"cannot tell the channel axis of an image batch of shape \[2, 3, 12, 3\]"):
        RGB(np.zeros((2, 3, 12, 3), np.uint8))
    with pytest.raises(InputError, match=r"neither axis 1 nor axis 3"):
        RGB(np.zeros((2, 5, 12, 7), np.uint8))
    with pytest.raises(InputError, match=r"\(N, H, W\), \(N, C, H, W\) or \(N, H, W, C\), got \[1, 2, 12, 12, 3\]"):
        RGB(np.zeros((1, 2, 12, 12, 3), np.uint8))


@pytest.mark.parametrize("dtype, top", [(np.uint16, 65535), (np.uint32, 2**32 - 1)])
def test_wider_unsigned_integers_are_scaled_by_their_range(dtype, top):
    levels = np.linspace(0, top, 144).reshape(1, 12, 12).astype(dtype)
    out = GREY.decode(levels[0])
    expected = np.rint(levels[0].astype(np.float64) * 255.0 / top)
    assert np.array_equal(out[0].numpy(), expected.astype(np.uint8))
    assert len(out.unique()) > 100  # not clipped to 255 above the first levels


def test_floats_in_0_1_and_0_255_and_bool_are_read_by_one_rule_per_batch():
    batch = images(4)
    assert torch.equal(GREY(batch / 255.0), GREY(batch))
    assert torch.equal(GREY(batch.astype(np.float32)), GREY(batch))
    dark = batch.astype(np.float64)
    dark[0] = dark[0] / 255.0  # one dark image inside a 0..255 batch stays dark (not rescaled alone)
    assert GREY(dark)[0].max() <= 1 / 255 + 1e-6
    mask = np.zeros((2, 12, 12), bool)
    mask[:, :6] = True
    assert GREY(mask).unique().tolist() == [0.0, 1.0]


@pytest.mark.parametrize("bad, message", [
    pytest.param(np.full((2, 12, 12), np.nan, np.float32), "contains NaN or infinite values", id="nan"),
    pytest.param(np.full((2, 12, 12), np.inf), "contains NaN or infinite values", id="inf"),
    pytest.param(np.full((2, 12, 12), -0.5), r"float values in \[-0.5, -0.5\], outside the pixel ranges", id="normalised-floats"),
    pytest.param(np.full((2, 12, 12), 300.0), r"outside the pixel ranges 0..1 and 0..255", id="floats-above-255"),
    pytest.param(np.zeros((2, 12, 12), np.int64), r"signed integers \(int64\).*astype\(np.uint8\)", id="int64"),
    pytest.param(np.zeros((2, 12, 12), np.int16), r"signed integers \(int16\)", id="int16"),
    pytest.param(np.zeros((2, 12, 12), np.complex64), r"dtype complex64", id="complex"),
])
def test_bad_pixel_values_are_refused_by_predict_adapt_and_preprocess(bad, message):
    learner = tiny_learner("proto")
    labels = [0, 1]
    good = images(2)
    with pytest.raises(InputError, match=message):
        learner.preprocess(bad)
    with pytest.raises(InputError, match=message):
        learner.adapt(bad, labels)
    with pytest.raises(InputError, match=message):
        learner.predict(good, labels, bad)


def test_nan_in_a_pil_float_image_is_refused():
    im = Image.fromarray(np.full((12, 12), np.nan, np.float32), mode="F")
    with pytest.raises(InputError, match="NaN or infinite"):
        tiny_learner("proto").predict([im, im], [0, 1], [im])


def test_predict_reads_a_numpy_grey_batch_like_the_same_images_as_pil():
    learner = tiny_learner("proto")
    support, query = images(3, seed=1), images(3, seed=2)  # 3 images: the (3, H, W) case
    labels = [0, 1, 2]
    as_arrays = learner.predict(support, labels, query)
    as_pil = learner.predict([Image.fromarray(x) for x in support], labels, [Image.fromarray(x) for x in query])
    assert as_arrays.shape == (3, 3) and torch.allclose(as_arrays, as_pil)
    sixteen = learner.predict((support.astype(np.uint16) * 257), labels, query.astype(np.uint16) * 257)
    assert torch.allclose(sixteen, as_arrays)  # 16-bit copies of the same images: the same logits
