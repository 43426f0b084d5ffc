"""Image preprocessing for `alexnet predict`, against numbers worked out by hand on tiny images,
and the class names shipped with the project."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from common import images
from common.cli import main
from common.data import CLASS_NAMES, preprocess
from common.spec import get_spec

Image = pytest.importorskip("PIL.Image")

MEAN, STD = np.array(images.IMAGENET_MEAN), np.array(images.IMAGENET_STD)


def test_imagenet_preprocessing_by_hand_on_a_4x6_image():
    """Short side 4 -> 2 halves the image: 2x3, then the 2x2 centre crop (left = round(0.5) = 0).

    PIL's bilinear filter, widened 2x to antialias, weighs the input columns of output column 0
    (centre at 1.0) by the triangle at distances 0.25, 0.25, 0.75: 3/7, 3/7, 1/7 once
    normalised (the image edge cuts the fourth tap); column 1 (centre 3.0) by 1/8, 3/8, 3/8, 1/8.
    Rows are all equal, so the vertical pass keeps them. A plain (non-antialiased) bilinear
    resize would give 35 instead of 50 in the first column.
    """
    red = np.array([0, 70, 140, 210, 35, 105])
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = red, 255 - red, 128
    x = images.imagenet_input(Image.fromarray(pixels, "RGB"), resize=2, crop=2)
    # R: 3/7*0 + 3/7*70 + 1/7*140 = 50; 70/8 + 3*140/8 + 3*210/8 + 35/8 = 144.375 -> 144
    # G: 3/7*255 + 3/7*185 + 1/7*115 = 205; 255 - 144.375 = 110.625 -> 111; B: 128
    expected_pixels = np.array([[50, 144], [205, 111], [128, 128]], np.float64)
    expected = (expected_pixels / 255 - MEAN[:, None]) / STD[:, None]
    assert x.shape == (3, 2, 2) and x.dtype == np.float32
    assert np.abs(x - expected[:, None, :]).max() < 1e-6


@pytest.mark.parametrize("size, short, expected", [
    ((480, 640), 256, (256, 341)),  # int(256 * 640 / 480) = int(341.33)
    ((640, 480), 256, (341, 256)),
    ((300, 300), 256, (256, 256)),
    ((63, 1000), 256, (256, 4063)),  # upscaling follows the same rule
])
def test_resized_size_is_torchvisions_rule(size, short, expected):
    assert images.resized_size(*size, short) == expected


def test_center_crop_offsets_round_like_torchvision():
    assert images.center_crop_box(256, 341, 224) == (16, 58)  # round(58.5) = 58: Python's round, as torchvision's
    assert images.center_crop_box(257, 259, 224) == (16, 18)  # round(16.5) = 16, round(17.5) = 18
    with pytest.raises(images.ImageError, match="a 224x224 crop does not fit a 200x300 image"):
        images.center_crop_box(200, 300, 224)


def test_any_mode_becomes_rgb_and_full_size_input_is_224():
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 4), np.uint8), "RGBA")
    x = images.imagenet_input(rgba)
    assert x.shape == (3, 224, 224)
    assert np.array_equal(x, images.imagenet_input(rgba.convert("RGB")))


def test_fashion_preprocessing_is_the_training_pipeline():
    """A 28x28 grey image gives exactly the input training made of it; bigger images are
    brought to 28x28 first (short side, centre crop)."""
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), np.uint8)
    x = images.fashion_input(Image.fromarray(pixels, "L"))
    assert np.array_equal(x, preprocess(pixels[None], (224, 224))[0])
    wide = Image.fromarray(np.full((56, 84, 3), 200, np.uint8), "RGB")
    y = images.fashion_input(wide, (65, 65))
    assert y.shape == (1, 65, 65) and np.allclose(y, y[0, 0, 0])  # a flat image stays flat


def test_class_names():
    names = images.imagenet_class_names()
    assert len(names) == len(set(names)) == 1000
    assert (names[0], names[281], names[999]) == ("tench", "tabby", "toilet tissue")
    # torchvision's list (torchvision 0.28.0, models/_meta.py), byte for byte
    digest = hashlib.sha256(images.IMAGENET_CLASSES_FILE.read_bytes()).hexdigest()
    assert digest == "ee4fa67b1dd46919ef87529b70e25bdd1ec9ebd350de3ad426e6640eb70320a1"
    assert images.class_names(get_spec("torchvision")) == names
    assert images.class_names(get_spec("book")) == list(CLASS_NAMES)
    assert images.class_names(get_spec("torchvision", num_classes=3)) == ["class 0", "class 1", "class 2"]


def test_top_k_orders_by_probability_and_breaks_ties_by_index():
    logits = np.array([[0.0, 2.0, 1.0, 2.0, -1.0]])
    best = images.top_k(logits, 3)[0]
    assert [i for i, _ in best] == [1, 3, 2]
    total = np.exp(logits).sum()
    assert np.allclose([p for _, p in best], np.exp([2.0, 2.0, 1.0]) / total)


def test_unreadable_images_and_unknown_variants_are_one_line_errors(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(images.ImageError, match="notes.png: not a readable image"):
        images.imagenet_input(tmp_path / "notes.png")
    with pytest.raises(images.ImageError, match="absent.jpg: no such image file"):
        images.imagenet_input(tmp_path / "absent.jpg")
    with pytest.raises(images.ImageError, match="no image preprocessing is defined for the 'paper' variant"):
        images.model_input(get_spec("paper"), tmp_path / "notes.png")


def test_predict_with_book_weights_names_fashion_classes(tmp_path, capsys):
    """The book variant is found from the weights' shapes; the answer uses Fashion-MNIST's names."""
    pytest.importorskip("torch")
    from common.weights import init_weights, save_weights

    save_weights(tmp_path / "book.npz", init_weights(get_spec("book"), 0))
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (28, 28), np.uint8), "L").save(tmp_path / "item.png")
    assert main(["predict", "--backend", "pt", "--weights", str(tmp_path / "book.npz"),
                 str(tmp_path / "item.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"PyTorch, book variant, weights {tmp_path / 'book.npz'}"
    ranked = out[2:]
    assert len(ranked) == 5 and all(line.split("%  ")[1].rsplit(" (", 1)[0] in CLASS_NAMES for line in ranked)
    assert main(["predict", "--backend", "pt", "--weights", str(tmp_path / "book.npz"), "--variant", "torchvision",
                 str(tmp_path / "item.png")]) == 2
    assert "do not fit spec 'torchvision'" in capsys.readouterr().err
