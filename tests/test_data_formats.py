"""The datasets beyond MNIST and CIFAR-10, read from small files written here in each official format
(CIFAR-100 python pickles, SVHN's .mat, GTSRB's .ppm folders and CSV, an ImageFolder tree of PNGs, an .npz),
loaded through the registry; their errors when files are absent (no network) or malformed; and the config
checker refusing a missing data file before any trial. Never touches the network."""

import csv
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from poisonsweep.engine.config import ConfigError, check_data, sweep_from_mapping
from poisonsweep.tasks.data import DATASETS, DataNotFoundError, DatasetFileError, load_dataset, sources


@pytest.fixture
def offline(monkeypatch):
    """A download attempt fails as it does without network; returns the attempts."""
    calls = []

    def no_network(name, root):
        calls.append((name, Path(root)))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sources, "torchvision_download", no_network)
    monkeypatch.delenv(sources.DATA_ROOT_ENV, raising=False)
    return calls


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------------------- writers of the official formats


def write_cifar100(root: Path, n_train=30, n_test=12):
    """cifar-100-python/{train,test,meta}: pickled dicts as the official tarball holds them."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        fine[0] = 99
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
                         b"coarse_labels": [v // 5 for v in fine], b"data": rows}, f)
        written[name] = (rows, fine)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f)
    return written


def write_svhn(folder: Path, n_train=20, n_test=10):
    """train_32x32.mat / test_32x32.mat: X (32, 32, 3, n) uint8, y (n, 1) with labels 1..10 (10 = digit 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)
        savemat(folder / name, {"X": x, "y": y})
        written[name] = (x, y)
    return written


def write_ppm(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PPM")


def write_gtsrb(root: Path, classes=3, per_class=2, n_test=4):
    """gtsrb/GTSRB/Training/<00000..>/*.ppm + GT-<class>.csv, gtsrb/GTSRB/Final_Test/Images/*.ppm and
    gtsrb/GT-final_test.csv, as the official zips unpack (the layout torchvision's GTSRB reads)."""
    base = root / "gtsrb"
    colours = {}
    for c in range(classes):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        for i in range(per_class):
            size = 40 + 10 * i  # GTSRB images vary in size
            write_ppm(folder / f"00000_{i:05d}.ppm", np.full((size, size + 3, 3), 20 * c + i, np.uint8))
            colours[(c, i)] = 20 * c + i
        (folder / f"GT-{c:05d}.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n")
    images = base / "GTSRB" / "Final_Test" / "Images"
    rows = []
    for i in range(n_test):
        write_ppm(images / f"{i:05d}.ppm", np.full((31, 29, 3), 200 + i, np.uint8))
        rows.append([f"{i:05d}.ppm", 29, 31, 5, 5, 24, 26, (i * 2) % classes])
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        writer.writerows(rows)
    return [row[-1] for row in rows]


def write_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class=3):
    """root/{train,test}/<class>/<n>.png, each image one flat colour that encodes its class and index."""
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class if split == "train" else 1):
                Image.fromarray(np.full((12, 20, 3), 50 * c + i, np.uint8)).save(folder / f"{i}.png")


# ---------------------------------------------------------------------------- CIFAR-100


def test_cifar100_fine_labels_channel_order_and_metadata(offline, tmp_path):
    written = write_cifar100(tmp_path)
    d = load_dataset("cifar100", root=str(tmp_path))
    assert DATASETS.get("cifar100").num_classes == 100 and d.num_classes == 100
    assert d.x_train.shape == (30, 3, 32, 32) and d.x_test.shape == (12, 3, 32, 32)
    rows, fine = written["train"]
    assert d.y_train.tolist() == fine and d.y_test.tolist() == written["test"][1]
    assert np.array_equal(as_uint8(d.x_train[4]), rows[4].reshape(3, 32, 32))  # red plane, then green, blue
    assert offline == []


def test_cifar100_without_meta_is_incomplete_and_a_bad_meta_names_the_file(offline, tmp_path):
    write_cifar100(tmp_path)
    meta = tmp_path / "cifar-100-python" / "meta"
    with open(meta, "wb") as f:
        pickle.dump({b"fine_label_names": [b"a"] * 10}, f)
    with pytest.raises(DatasetFileError, match=r"meta is unreadable: .*100 class names"):
        load_dataset("cifar100", root=str(tmp_path))
    meta.unlink()
    with pytest.raises(DataNotFoundError, match=r"incomplete, missing meta"):
        load_dataset("cifar100", root=str(tmp_path))


# ---------------------------------------------------------------------------- SVHN


@pytest.mark.parametrize("folder", ["svhn", ""])
def test_svhn_mat_layout_and_label_10_is_digit_0(offline, tmp_path, folder):
    written = write_svhn(tmp_path / folder)
    d = load_dataset("svhn", root=str(tmp_path))
    x, y = written["train_32x32.mat"]
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (10, 3, 32, 32)
    assert d.y_train.tolist() == [v % 10 for v in y[:, 0].tolist()]  # 1..9 stay, 10 -> 0
    assert 0 in d.y_train.tolist() and 10 not in d.y_train.tolist()
    image = as_uint8(d.x_train[7])
    assert image[1, 5, 9] == x[5, 9, 1, 7]  # channel 1, row 5, column 9 of image 7
    assert np.array_equal(image.transpose(1, 2, 0), x[:, :, :, 7])


def test_svhn_with_a_label_outside_1_to_10_names_the_file(offline, tmp_path):
    write_svhn(tmp_path / "svhn")
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[0], [3]]})
    with pytest.raises(DatasetFileError, match=r"test_32x32\.mat is unreadable: labels must lie in 1\.\.10"):
        load_dataset("svhn", root=str(tmp_path))


# ---------------------------------------------------------------------------- GTSRB


def test_gtsrb_folders_csv_and_resize(offline, tmp_path):
    test_labels = write_gtsrb(tmp_path)
    d = load_dataset("gtsrb", root=str(tmp_path), params={"size": 16})
    assert DATASETS.get("gtsrb").num_classes == 43 and d.num_classes == 43
    assert d.x_train.shape == (6, 3, 16, 16) and d.x_test.shape == (4, 3, 16, 16)
    assert d.y_train.tolist() == [0, 0, 1, 1, 2, 2]  # class = the sorted folder's index
    assert d.y_test.tolist() == test_labels
    # flat images stay flat through the resize: each keeps its colour
    assert [int(v) for v in as_uint8(d.x_train)[:, 0, 8, 8]] == [0, 1, 20, 21, 40, 41]
    assert [int(v) for v in as_uint8(d.x_test)[:, 2, 0, 0]] == [200, 201, 202, 203]
    assert load_dataset("gtsrb", root=str(tmp_path)).in_shape == (3, 32, 32)  # the default size


def test_gtsrb_csv_naming_a_missing_image_names_the_csv(offline, tmp_path):
    write_gtsrb(tmp_path)
    (tmp_path / "gtsrb" / "GTSRB" / "Final_Test" / "Images" / "00002.ppm").unlink()
    with pytest.raises(DatasetFileError, match=r"GT-final_test\.csv is unreadable: it lists 1 images missing"):
        load_dataset("gtsrb", root=str(tmp_path))


# ---------------------------------------------------------------------------- image_folder


def test_image_folder_classes_resize_and_grey(tmp_path):
    write_image_folder(tmp_path / "pets")
    d = load_dataset("image_folder", params={"path": str(tmp_path / "pets"), "size": 8})
    assert d.x_train.shape == (9, 3, 8, 8) and d.x_test.shape == (3, 3, 8, 8) and d.num_classes == 3
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and d.y_test.tolist() == [0, 1, 2]
    assert [int(v) for v in as_uint8(d.x_train)[:, 1, 3, 3]] == [0, 1, 2, 50, 51, 52, 100, 101, 102]
    grey = load_dataset("image_folder", params={"path": str(tmp_path / "pets"), "size": 10, "channels": 1})
    assert grey.in_shape == (1, 10, 10)


def test_image_folder_test_split_with_an_unknown_class_names_the_folder(tmp_path):
    write_image_folder(tmp_path / "pets")
    (tmp_path / "pets" / "test" / "yak").mkdir()
    with pytest.raises(DatasetFileError, match=r"pets/test is unreadable: class folders \['yak'\]"):
        load_dataset("image_folder", params={"path": str(tmp_path / "pets")})


def test_image_folder_with_a_corrupt_image_names_it(tmp_path):
    write_image_folder(tmp_path / "pets")
    bad = tmp_path / "pets" / "train" / "dog" / "1.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetFileError, match=r"dog/1\.png is unreadable: not a readable image"):
        load_dataset("image_folder", params={"path": str(tmp_path / "pets")})


# ---------------------------------------------------------------------------- arrays


def save_arrays(path: Path, **overrides):
    rng = np.random.default_rng(3)
    arrays = {"x_train": rng.integers(0, 256, (12, 2, 5, 7), dtype=np.uint8), "y_train": np.arange(12) % 4,
              "x_test": rng.integers(0, 256, (6, 2, 5, 7), dtype=np.uint8), "y_test": np.arange(6) % 3}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return arrays


def test_arrays_uint8_any_channels_and_size(tmp_path):
    arrays = save_arrays(tmp_path / "mine.npz")
    d = load_dataset("arrays", params={"path": str(tmp_path / "mine.npz")})
    assert d.in_shape == (2, 5, 7) and d.num_classes == 4  # the largest label + 1
    assert np.array_equal(as_uint8(d.x_train), arrays["x_train"]) and d.y_test.tolist() == arrays["y_test"].tolist()
    d = load_dataset("arrays", params={"path": str(tmp_path / "mine.npz"), "num_classes": 9})
    assert d.num_classes == 9


def test_arrays_float_nhwc_and_grey(tmp_path):
    x = np.random.default_rng(0).random((4, 6, 6, 3)).astype(np.float64)
    save_arrays(tmp_path / "nhwc.npz", x_train=x, x_test=x[:2], y_train=np.array([0, 1, 0, 1]), y_test=np.array([1, 0]))
    d = load_dataset("arrays", params={"path": str(tmp_path / "nhwc.npz"), "layout": "NHWC"})
    assert d.in_shape == (3, 6, 6) and torch.allclose(d.x_train[1, 2], torch.from_numpy(x[1, :, :, 2]).float())
    grey = np.zeros((4, 9, 9), np.uint8)
    save_arrays(tmp_path / "grey.npz", x_train=grey, x_test=grey, y_train=np.arange(4), y_test=np.arange(4))
    assert load_dataset("arrays", params={"path": str(tmp_path / "grey.npz")}).in_shape == (1, 9, 9)


@pytest.mark.parametrize("overrides, message", [
    ({"y_test": None}, r"it lacks y_test"),
    ({"x_test": np.zeros((6, 3, 5, 7), np.uint8)}, r"x_train images are \(2, 5, 7\) but x_test images are \(3, 5, 7\)"),
    ({"x_train": np.full((12, 2, 5, 7), 2.0)}, r"float x_train must be finite and lie in \[0, 1\]"),
    ({"x_train": np.zeros((12, 2, 5, 7), np.int32)}, r"x_train must be uint8 \(0\.\.255\) or float"),
    ({"y_train": np.arange(12) - 1}, r"y_train must hold labels 0\.\.K-1, found -1"),
    ({"y_train": np.zeros(11, np.int64)}, r"y_train has 11 labels for 12 images"),
    ({"y_train": np.zeros(12)}, r"y_train must be a 1-d integer array"),
])
def test_arrays_bad_content_is_one_line_naming_the_file(tmp_path, overrides, message):
    arrays = save_arrays(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in {**arrays, **overrides}.items() if v is not None})
    with pytest.raises(DatasetFileError, match=r"bad\.npz is unreadable: " + message) as info:
        load_dataset("arrays", params={"path": str(tmp_path / "bad.npz")})
    assert "\n" not in str(info.value)


def test_arrays_label_beyond_declared_classes_and_a_pickled_npz_are_refused(tmp_path):
    save_arrays(tmp_path / "a.npz")
    with pytest.raises(DatasetFileError, match=r"labels must lie in \[0, 3\)"):
        load_dataset("arrays", params={"path": str(tmp_path / "a.npz"), "num_classes": 3})
    save_arrays(tmp_path / "obj.npz", y_test=np.array([object()] * 6))
    with pytest.raises(DatasetFileError, match=r"obj\.npz is unreadable: not a readable \.npz"):
        load_dataset("arrays", params={"path": str(tmp_path / "obj.npz")})


# ---------------------------------------------------------------------------- absent files


@pytest.mark.parametrize("name, ways", [
    ("cifar100", ["cifar-100-python", "cifar-100-python.tar.gz", "CIFAR100('DIR', download=True)"]),
    ("svhn", ["svhn/ (torchvision layout: train_32x32.mat, test_32x32.mat): not found",
              "files directly in the root", "SVHN('DIR/svhn', split='test', download=True)"]),
    ("gtsrb", ["gtsrb/ (torchvision layout", "GTSRB_Final_Test_GT.zip", "GTSRB('DIR', split='train', download=True)"]),
])
def test_absent_files_without_network_list_every_way_to_provide_them(offline, tmp_path, name, ways):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(name, root=str(tmp_path / "root"))
    for text in [*ways, str(tmp_path / "root"), "torchvision download", "Name or service not known", "--data-root"]:
        assert text in str(info.value)
    assert offline == [(name, tmp_path / "root")]


def test_downloads_ask_torchvision_for_each_split(monkeypatch, tmp_path):
    import torchvision.datasets

    calls = []
    for cls in ("SVHN", "GTSRB", "CIFAR100"):
        monkeypatch.setattr(torchvision.datasets, cls, lambda root, cls=cls, **kw: calls.append((cls, root, kw)))
    for name in ("svhn", "gtsrb", "cifar100"):
        sources.torchvision_download(name, tmp_path)
    assert calls == [("SVHN", str(tmp_path / "svhn"), {"split": "train", "download": True}),
                     ("SVHN", str(tmp_path / "svhn"), {"split": "test", "download": True}),
                     ("GTSRB", str(tmp_path), {"split": "train", "download": True}),
                     ("GTSRB", str(tmp_path), {"split": "test", "download": True}),
                     ("CIFAR100", str(tmp_path), {"train": True, "download": True})]


@pytest.mark.parametrize("name, kind", [("arrays", "file"), ("image_folder", "folder")])
def test_a_missing_user_path_is_one_line(tmp_path, monkeypatch, name, kind):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError, match=rf"'nope' is not an existing {kind} \(relative to the working "
                                                 rf"directory {tmp_path}\)") as info:
        load_dataset(name, params={"path": "nope"})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- the config checker


def sweep(data: dict, **extra):
    return sweep_from_mapping({"name": "t", "data": data, "model": {"name": "mlp"}, "detectors": ["loss"], **extra})


def test_config_checker_refuses_a_missing_arrays_file_before_any_trial(tmp_path):
    checked = sweep({"name": "arrays", "params": {"path": str(tmp_path / "absent.npz")}})
    with pytest.raises(ConfigError, match=r"data.name 'arrays': .*absent\.npz' is not an existing file"):
        check_data(checked)
    save_arrays(tmp_path / "there.npz")
    check_data(sweep({"name": "arrays", "params": {"path": str(tmp_path / "there.npz")}, "n_train": 8}))


def test_config_checker_checks_dataset_params_without_data():
    with pytest.raises(ConfigError) as info:
        sweep({"name": "arrays"})
    assert "data.params.path is required by dataset 'arrays' (a string)" in str(info.value)
    with pytest.raises(ConfigError, match=r"data.params.size must be an int in \[8, 512\]"):
        sweep({"name": "image_folder", "params": {"path": "x", "size": 4}})
    with pytest.raises(ConfigError, match=r"data.params.colour is not a parameter of 'gtsrb'"):
        sweep({"name": "gtsrb", "params": {"colour": 1}})
    with pytest.raises(ConfigError, match=r"poison.params.shift must be an int in \[1, 42\] \(gtsrb has 43"):
        sweep({"name": "gtsrb"}, poison={"method": "one_shift", "params": {"shift": 43}})


def test_dataset_params_enter_identity_but_parameterless_ids_are_unchanged(tmp_path):
    from poisonsweep.engine.resolve import identity

    digits = sweep({"name": "digits"}).trials[0]
    assert "params" not in identity(digits)["data"]  # the ids of earlier sweeps still match
    a, b = (sweep({"name": "arrays", "params": {"path": p}}).trials[0] for p in ("a.npz", "b.npz"))
    assert identity(a)["data"]["params"] == {"path": "a.npz", "layout": "NCHW", "num_classes": None}
    assert identity(a) != identity(b)


def test_a_users_file_content_is_part_of_the_identity_and_a_changed_file_is_refused(tmp_path):
    from poisonsweep.engine.resolve import trial_id
    from poisonsweep.tasks.trial import load_trial_data

    path = tmp_path / "mine.npz"
    save_arrays(path)
    data = {"name": "arrays", "params": {"path": str(path)}}
    before = sweep(data).trials[0]
    assert trial_id(sweep(data).trials[0]) == trial_id(before)  # same content, same trial
    assert len(load_trial_data(before["data"]).y_train) == 12
    save_arrays(path, y_test=np.arange(6) % 2)  # the same path, other labels
    after = sweep(data).trials[0]
    assert trial_id(after) != trial_id(before)
    with pytest.raises(DatasetFileError, match=r"mine\.npz is unreadable: its content .* is not what the sweep was "
                                               r"checked with"):
        load_trial_data(before["data"])


def test_an_image_folders_fingerprint_covers_every_image(tmp_path):
    from poisonsweep.tasks.data import dataset_fingerprint

    write_image_folder(tmp_path / "pets")
    params = {"path": str(tmp_path / "pets")}
    first = dataset_fingerprint("image_folder", params)
    assert first == dataset_fingerprint("image_folder", params) and dataset_fingerprint("digits", {}) is None
    Image.fromarray(np.full((12, 20, 3), 7, np.uint8)).save(tmp_path / "pets" / "test" / "dog" / "0.png")
    assert dataset_fingerprint("image_folder", params) != first


def test_gtsrb_class_is_the_folders_number_and_image_folder_needs_both_splits(offline, tmp_path):
    write_gtsrb(tmp_path, classes=3)
    training = tmp_path / "gtsrb" / "GTSRB" / "Training"
    (training / "00001").rename(training / "00007")  # a subset of the classes: 0, 2, 7
    d = load_dataset("gtsrb", root=str(tmp_path), params={"size": 8})
    assert d.y_train.tolist() == [0, 0, 2, 2, 7, 7]
    (training / "signs").mkdir()
    with pytest.raises(DatasetFileError, match=r"Training is unreadable: class folders must be numbered"):
        load_dataset("gtsrb", root=str(tmp_path))
    write_image_folder(tmp_path / "pets")
    (tmp_path / "pets" / "test").rename(tmp_path / "pets" / "val")
    with pytest.raises(DatasetFileError, match=r"pets is unreadable: expected the folders train/ and test/"):
        load_dataset("image_folder", params={"path": str(tmp_path / "pets")})


def test_a_trial_whose_users_file_is_gone_gets_the_loaders_message(tmp_path):
    from poisonsweep.tasks.trial import load_trial_data

    save_arrays(tmp_path / "mine.npz")
    trial = sweep({"name": "arrays", "params": {"path": str(tmp_path / "mine.npz")}}).trials[0]
    (tmp_path / "mine.npz").unlink()
    with pytest.raises(DataNotFoundError, match=r"mine\.npz' is not an existing file"):
        load_trial_data(trial["data"])
