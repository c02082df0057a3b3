"""File formats of the datasets beyond MNIST and CIFAR-10: CIFAR-100 python batches, SVHN's ``.mat`` files,
GTSRB's folders of ``.ppm`` images, any torchvision ``ImageFolder`` tree, and a plain ``.npz`` of arrays.

Each reader returns ``Arrays`` (uint8 or float images ``(n, C, H, W)``, int64 labels) and raises
``DatasetFileError`` naming the file when what it reads is not what the format promises.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

from poisonsweep.tasks.data.readers import Arrays, DatasetFileError, _checked_labels, _read_cifar_batch, _unpickle

CIFAR100_FILES = {"train": "train", "test": "test", "meta": "meta"}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
GTSRB_CLASSES = 43


def read_cifar100(files: dict[str, Path]) -> Arrays:
    """CIFAR-100 arrays from the official python pickles ``train``, ``test`` and ``meta`` (fine labels, 100 classes)."""
    meta = _unpickle(files["meta"], "bytes")
    names = meta.get(b"fine_label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != 100:
        raise DatasetFileError(files["meta"], "expected a dict whose b'fine_label_names' lists 100 class names")
    x_train, y_train = _read_cifar_batch(files["train"], label_key=b"fine_labels", num_classes=100)
    x_test, y_test = _read_cifar_batch(files["test"], label_key=b"fine_labels", num_classes=100)
    return x_train, y_train, x_test, y_test


def _read_svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as error:  # scipy raises ValueError, TypeError, OSError... on a bad file
        raise DatasetFileError(path, f"not a readable MATLAB file ({type(error).__name__}: {error})") from error
    if "X" not in mat or "y" not in mat:
        raise DatasetFileError(path, "expected the variables X and y (SVHN cropped-digits format)")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DatasetFileError(path, f"X must be uint8 of shape (32, 32, 3, n), got {x.dtype} {x.shape}")
    labels = y.reshape(-1)
    if labels.size != x.shape[3]:
        raise DatasetFileError(path, f"{x.shape[3]} images but {labels.size} labels")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) and not np.all(labels == np.rint(labels))):
        raise DatasetFileError(path, f"labels must be integers 1..10, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DatasetFileError(path, f"labels must lie in 1..10 (10 is the digit 0), found {labels.min()}..{labels.max()}")
    labels[labels == 10] = 0  # SVHN writes the digit 0 as label 10 (as torchvision maps it)
    # X[:, :, :, i] is image i as (row, column, channel)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


def read_svhn(files: dict[str, Path]) -> Arrays:
    """SVHN cropped digits (format 2) from ``train_32x32.mat`` and ``test_32x32.mat``; label 10 becomes 0."""
    return (*_read_svhn_split(files["train"]), *_read_svhn_split(files["test"]))


def _read_image(path: Path, size: int, mode: str) -> np.ndarray:
    """One image file as uint8 ``(C, size, size)``: converted to ``mode`` ("RGB" or "L"), resized bilinearly
    (with PIL's antialiasing, as torchvision's ``Resize`` on a PIL image)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError) as error:
        raise DatasetFileError(path, f"not a readable image ({type(error).__name__}: {error})") from error
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _read_images(samples: list[tuple[str, int]], size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    channels = 1 if mode == "L" else 3
    x = np.empty((len(samples), channels, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        x[i] = _read_image(Path(path), size, mode)
    return x, np.array([label for _, label in samples], dtype=np.int64)


def _gtsrb_test_samples(csv_path: Path, images: Path) -> list[tuple[str, int]]:
    try:
        with open(csv_path, newline="") as stream:
            rows = list(csv.DictReader(stream, delimiter=";", skipinitialspace=True))
        samples = [(str(images / row["Filename"]), int(row["ClassId"])) for row in rows]
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as error:
        raise DatasetFileError(csv_path, "expected ';'-separated rows with Filename and ClassId columns "
                                         f"(GTSRB's GT-final_test.csv) ({type(error).__name__}: {error})") from error
    _checked_labels(csv_path, np.array([label for _, label in samples], dtype=np.int64), GTSRB_CLASSES)
    missing = [path for path, _ in samples if not Path(path).is_file()]
    if missing:
        raise DatasetFileError(csv_path, f"it lists {len(missing)} images missing from {images}, e.g. {missing[0]}")
    return samples


def read_gtsrb(files: dict[str, Path], size: int = 32) -> Arrays:
    """GTSRB in torchvision's layout: ``Training/<class 00000..00042>/*.ppm`` and ``Final_Test/Images/*.ppm``
    labelled by ``GT-final_test.csv``. A training image's class is its folder's number, the ClassId the CSV
    uses (for all 43 folders that is also the sorted index torchvision's ``make_dataset`` gives). The images
    (15 to 250 pixels a side) are resized to ``size`` x ``size``, not cropped to their ROI (as BackdoorBench
    and torchvision's class use them)."""
    from torchvision.datasets.folder import find_classes, make_dataset

    training = files["train"]
    classes, _ = find_classes(training)
    if not all(name.isdigit() and int(name) < GTSRB_CLASSES for name in classes):
        raise DatasetFileError(training, f"class folders must be numbered 00000..{GTSRB_CLASSES - 1:05d}; found "
                                         f"{', '.join(classes[:5])}")
    class_to_idx = {name: int(name) for name in classes}
    try:
        train = make_dataset(str(training), class_to_idx, extensions=(".ppm",))
    except FileNotFoundError as error:
        raise DatasetFileError(training, " ".join(str(error).split())) from error
    test = _gtsrb_test_samples(files["test_labels"], files["test"])
    return (*_read_images(train, size, "RGB"), *_read_images(test, size, "RGB"))


IMAGE_MODES = {1: "L", 3: "RGB"}


def read_image_folder(root: Path, size: int, channels: int) -> tuple[Arrays, list[str]]:
    """A torchvision ``ImageFolder`` tree with a ``train/`` and a ``test/`` split: ``<split>/<class>/<image>``.

    The classes are the sorted folder names of ``train/`` (torchvision's ``find_classes``); ``test/`` may lack a
    class but may not add one. Every image is converted to ``channels`` (1: grey, 3: RGB) and resized to
    ``size`` x ``size``. Returns the arrays and the class names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        raise DatasetFileError(root, "expected the folders train/ and test/, each <class>/<image> (ImageFolder layout)")
    splits = {}
    try:
        classes, class_to_idx = find_classes(root / "train")
    except FileNotFoundError as error:
        raise DatasetFileError(root / "train", " ".join(str(error).split())) from error
    for split in ("train", "test"):
        folder = root / split
        names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DatasetFileError(folder, f"class folders {unknown} are not among train/'s classes {classes}")
        try:
            samples = make_dataset(str(folder), {c: class_to_idx[c] for c in names}, extensions=IMG_EXTENSIONS,
                                   allow_empty=split == "test")
        except FileNotFoundError as error:
            raise DatasetFileError(folder, " ".join(str(error).split())) from error
        if not samples:
            raise DatasetFileError(folder, f"no images (extensions {', '.join(IMG_EXTENSIONS)})")
        splits[split] = _read_images(samples, size, IMAGE_MODES[channels])
    return (*splits["train"], *splits["test"]), classes


ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _checked_images(path: Path, key: str, x: np.ndarray, layout: str) -> np.ndarray:
    if x.ndim == 3:  # (n, H, W): one grey channel
        x = x[:, None]
    elif x.ndim == 4 and layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DatasetFileError(path, f"{key} must have shape (n, C, H, W) or (n, H, W), got {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetFileError(path, f"{key} must be uint8 (0..255) or float (0..1) images, got {x.dtype}")
    if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise DatasetFileError(path, f"float {key} must be finite and lie in [0, 1], found "
                                     f"{np.nanmin(x)}..{np.nanmax(x)}; scale it or store uint8 0..255")
    return np.ascontiguousarray(x, dtype=np.float32)


def read_arrays(path: Path, *, layout: str = "NCHW", num_classes: int | None = None) -> tuple[Arrays, int]:
    """An ``.npz`` with ``x_train, y_train, x_test, y_test``: uint8 (0..255) or float (0..1) images of any
    channel count and size, ``(n, C, H, W)`` (``layout="NHWC"``: ``(n, H, W, C)``) or ``(n, H, W)`` (grey),
    and integer labels ``0..K-1``. ``num_classes`` None: K is the largest label + 1. Returns the arrays and K.
    The file is read without pickles (``allow_pickle=False``)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ARRAY_KEYS if key not in npz.files]
            if missing:
                raise DatasetFileError(path, f"it lacks {', '.join(missing)} (an arrays .npz holds "
                                             f"{', '.join(ARRAY_KEYS)}; found {', '.join(npz.files) or 'none'})")
            raw = {key: npz[key] for key in ARRAY_KEYS}
    except DatasetFileError:
        raise
    except Exception as error:  # not a zip, a pickled object array, a truncated member...
        raise DatasetFileError(path, f"not a readable .npz ({type(error).__name__}: {error})") from error
    x_train = _checked_images(path, "x_train", raw["x_train"], layout)
    x_test = _checked_images(path, "x_test", raw["x_test"], layout)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetFileError(path, f"x_train images are {x_train.shape[1:]} but x_test images are {x_test.shape[1:]}")
    if len(x_train) == 0 or len(x_test) == 0:
        raise DatasetFileError(path, "x_train and x_test must each hold at least one image")
    for key in ("y_train", "y_test"):
        labels = raw[key]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetFileError(path, f"{key} must be a 1-d integer array, got {labels.dtype} {labels.shape}")
        if labels.min() < 0:
            raise DatasetFileError(path, f"{key} must hold labels 0..K-1, found {labels.min()}")
    classes = num_classes or int(max(raw["y_train"].max(), raw["y_test"].max())) + 1
    y_train = _checked_labels(path, raw["y_train"], classes)
    y_test = _checked_labels(path, raw["y_test"], classes)
    for key, x, y in (("y_train", x_train, y_train), ("y_test", x_test, y_test)):
        if len(x) != len(y):
            raise DatasetFileError(path, f"{key} has {len(y)} labels for {len(x)} images")
    return (x_train, y_train, x_test, y_test), classes
