"""`alexnet evaluate --images DIR`: top-1/top-5 over the usual one-folder-per-class layout."""
from __future__ import annotations

import numpy as np
import pytest

from common.cli import main
from common.images import ImageError, labelled_images, model_input, top_k
from common.parity import to_backend_layout
from common.spec import book_alexnet
from common.weights import init_weights, save_weights

SPEC = book_alexnet()
NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def write_images(root, folders: dict[str, int], seed: int = 0):
    """``count`` random grey PNGs in each named folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for folder, count in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / folder / f"{i}.png")


def test_folders_named_as_classes_map_by_name_and_others_by_sorted_order(tmp_path):
    # Fashion-MNIST's names hold a "/", which no folder can: the sorted-order rule serves them
    write_images(tmp_path / "sorted", {f"c{i:02d}": 1 for i in range(10)})
    found, rule = labelled_images(tmp_path / "sorted", SPEC)
    assert [label for _, label in found] == list(range(10)) and "sorted" in rule
    named = SPEC.with_num_classes(3)  # classes "class 0" ... "class 2"
    write_images(tmp_path / "named", {"class 2": 2, "class 0": 1})
    found, rule = labelled_images(tmp_path / "named", named)
    assert [label for _, label in found] == [0, 2, 2] and "named" in rule


@pytest.mark.parametrize("layout, message", [
    ({}, "holds no class folders"),
    ({"a": 1, "b": 1}, "folder 'a' is none of the 10 class names, and there are 2 folders for 10 classes"),
])
def test_a_folder_that_cannot_be_labelled_is_refused(tmp_path, layout, message):
    tmp_path.joinpath("root").mkdir()
    write_images(tmp_path / "root", layout)
    with pytest.raises(ImageError, match=message):
        labelled_images(tmp_path / "root", SPEC)


def test_evaluate_reports_the_top1_and_top5_the_model_gives(backend, tmp_path, capsys):
    write_images(tmp_path / "images", {f"c{i}": 2 for i in range(10)}, seed=1)
    weights = init_weights(SPEC, 3)
    save_weights(tmp_path / "w.npz", weights)
    assert main(["evaluate", "--backend", backend.NAME, "--weights", str(tmp_path / "w.npz"),
                 "--images", str(tmp_path / "images"), "--device", "cpu", "--batch", "7"]) == 0
    out = capsys.readouterr().out
    # the same numbers computed directly: every image through the model, ranked by top_k
    found, _ = labelled_images(tmp_path / "images", SPEC)
    x = np.stack([model_input(SPEC, path) for path, _ in found])
    logits = backend.forward(backend.build(SPEC, weights=weights, device="cpu"), to_backend_layout(x, backend.LAYOUT))
    ranked = [[i for i, _ in best] for best in top_k(logits, 5)]
    top1 = np.mean([r[0] == label for r, (_, label) in zip(ranked, found)])
    top5 = np.mean([label in r for r, (_, label) in zip(ranked, found)])
    assert f"top-1 {top1:.4f}, top-5 {top5:.4f} on 20 images" in out


def test_pretrained_weights_need_an_image_folder(capsys):
    assert main(["evaluate", "--backend", "pt", "--pretrained", "torchvision"]) == 2
    assert "evaluate them on a folder of images (--images DIR)" in capsys.readouterr().err
