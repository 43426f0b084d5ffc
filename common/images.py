"""Image files in, network inputs out, and the names of the classes that come back.

* ``torchvision`` variant: exactly torchvision's ``AlexNet_Weights.IMAGENET1K_V1.transforms()``
  (``ImageClassification(crop_size=224)``) on a PIL image: the short side resized to 256
  with PIL's bilinear filter (antialiased: PIL widens the filter when it shrinks), the long
  side ``int(256 * long / short)``; a 224x224 centre crop at ``int(round((size - 224) / 2))``;
  scaled to [0, 1]; ImageNet mean and std per RGB channel. Images in another mode (RGBA,
  palette, grey, CMYK) are converted to RGB first.
* ``book`` variant (trained on Fashion-MNIST): the image in grey, brought to Fashion-MNIST's
  28x28 the same way (short side to 28, centre crop), then the training pipeline itself
  (``common.data.preprocess``: bilinear up to the model's input, the dataset's mean and std),
  so a Fashion-MNIST image saved as PNG gives exactly the input the model was trained on.

Pillow is imported only when an image is read.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .spec import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224
FASHION_SIZE = 28
IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")  # torchvision's _IMAGENET_CATEGORIES


class ImageError(ValueError):
    """An image file that cannot be read, or a variant without a known preprocessing."""


def open_image(path: str | os.PathLike, mode: str):
    """The image at ``path`` as a PIL image in ``mode`` ("RGB" or "L"), fully decoded."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as error:
        raise ImportError(f"reading images needs Pillow ({error}): pip install pillow") from error
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        raise ImageError(f"{path}: not a readable image ({error})") from None  # a huge image too: bad input


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's ``resize(img, [short])``: the short side becomes ``short``, the long side
    ``int(short * long / short_side)`` (truncated)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``center_crop``: ``int(round((size - crop) / 2.0))``, Python's round."""
    if crop > height or crop > width:
        raise ImageError(f"a {crop}x{crop} crop does not fit a {height}x{width} image")
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _resize_and_crop(image, short: int, crop: int):
    from PIL import Image

    height, width = resized_size(image.height, image.width, short)
    if (height, width) != (image.height, image.width):  # torchvision returns the image untouched then
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    top, left = center_crop_box(height, width, crop)
    return image.crop((left, top, left + crop, top + crop))


def imagenet_input(image, *, resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP) -> np.ndarray:
    """(3, crop, crop) float32 from a PIL image or a path, as torchvision's ImageNet transforms give it."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, "RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    pixels = np.asarray(_resize_and_crop(image, resize, crop), dtype=np.uint8)  # (H, W, 3)
    x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def fashion_input(image, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """(1, H, W) float32 from a PIL image or a path: grey, 28x28 like Fashion-MNIST, then the
    training pipeline up to ``size``."""
    from .data import preprocess

    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, "L")
    elif image.mode != "L":
        image = image.convert("L")
    pixels = np.asarray(_resize_and_crop(image, FASHION_SIZE, FASHION_SIZE), dtype=np.uint8)
    return preprocess(pixels[None], size)[0]


def model_input(spec: ModelSpec, image) -> np.ndarray:
    """One NCHW example for ``spec`` from an image (path or PIL image)."""
    if spec.name == "torchvision":
        if spec.input_shape != (3, IMAGENET_CROP, IMAGENET_CROP):
            raise ImageError(f"the torchvision variant's preprocessing gives 3x{IMAGENET_CROP}x{IMAGENET_CROP}, "
                             f"not {'x'.join(map(str, spec.input_shape))}")
        return imagenet_input(image)
    if spec.name == "book":
        return fashion_input(image, spec.input_size)
    raise ImageError(f"no image preprocessing is defined for the {spec.name!r} variant; use torchvision or book")


def imagenet_class_names() -> list[str]:
    names = IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    if len(names) != 1000:  # pragma: no cover - the shipped file is tested
        raise ImageError(f"{IMAGENET_CLASSES_FILE}: {len(names)} names, expected 1000")
    return names


def class_names(spec: ModelSpec) -> list[str]:
    """The names of ``spec``'s outputs: ImageNet's 1000 (torchvision's list), Fashion-MNIST's ten,
    or ``class <i>`` for a classifier of another width."""
    if spec.name == "torchvision" and spec.num_classes == 1000:
        return imagenet_class_names()
    if spec.name == "book":
        from .data import CLASS_NAMES

        if spec.num_classes == len(CLASS_NAMES):
            return list(CLASS_NAMES)
    return [f"class {i}" for i in range(spec.num_classes)]


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})


def labelled_images(root: str | os.PathLike, spec: ModelSpec) -> tuple[list[tuple[Path, int]], str]:
    """Every image under ``root/<class folder>/`` with its class index, and how folders were matched.

    The usual one-folder-per-class layout. A folder named exactly as one of ``spec``'s classes
    (``class_names``) is that class. Otherwise, with exactly as many folders as classes, the
    sorted folder order is the class order: torchvision's ``ImageFolder`` rule, under which
    ImageNet's WordNet-ID folders (n01440764 ...) sort into its class indices."""
    root = Path(root)
    if not root.is_dir():
        raise ImageError(f"{root}: no such folder of class folders")
    folders = sorted(entry for entry in root.iterdir() if entry.is_dir())
    if not folders:
        raise ImageError(f"{root}: holds no class folders (expected {root}/<class>/<image>)")
    names = class_names(spec)
    index = {name: i for i, name in enumerate(names)}
    if all(folder.name in index for folder in folders):
        labels, rule = {folder: index[folder.name] for folder in folders}, "folders named as the classes"
    elif len(folders) == len(names):
        labels, rule = {folder: i for i, folder in enumerate(folders)}, "sorted folder order (ImageFolder's rule)"
    else:
        unknown = next(folder.name for folder in folders if folder.name not in index)
        raise ImageError(f"{root}: folder {unknown!r} is none of the {len(names)} class names, and there are "
                         f"{len(folders)} folders for {len(names)} classes, so sorted order cannot stand for them")
    found = [(path, labels[folder]) for folder in folders for path in sorted(folder.rglob("*"))
             if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise ImageError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return found, rule


def top_k(logits: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """Per row, the ``k`` most probable classes (index, softmax probability), most probable first;
    ties go to the lower index, so every backend lists the same classes for the same numbers."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(int(i), float(row[i])) for i in indices] for row, indices in zip(probs, order)]
