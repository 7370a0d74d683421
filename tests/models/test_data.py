"""Tests for stochgrad.models.data: npz and IDX round trips, validation errors, the fallback."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stochgrad.models import data
from stochgrad.models.data import (
    default_mnist_path,
    dynamic_binarize,
    load_mnist,
    read_idx,
    threshold_binarize,
)

N_TRAIN, N_TEST = 20, 7


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, size=(N_TRAIN, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=N_TRAIN).astype(np.uint8),
        "x_test": rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=N_TEST).astype(np.uint8),
    }


def _write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_idx_dir(directory: Path, arrays: dict[str, np.ndarray], *, gz: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in data.IDX_NAMES.items():
        _write_idx(directory / stem, arrays[key], gz=gz)
    return directory


def _check_round_trip(ds: data.Digits, arrays: dict[str, np.ndarray], validation: int) -> None:
    cut = N_TRAIN - validation
    x_train = arrays["x_train"].reshape(N_TRAIN, -1).astype(np.float32) / 255.0
    assert ds.source == "mnist"
    assert ds.image_shape == (28, 28) and ds.num_features == 784
    for split in (ds.train, ds.valid, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1] == 784
        assert torch.all((split.x >= 0.0) & (split.x <= 1.0))
    np.testing.assert_array_equal(ds.train.x.numpy(), x_train[:cut])
    np.testing.assert_array_equal(ds.valid.x.numpy(), x_train[cut:])
    np.testing.assert_array_equal(ds.train.y.numpy(), arrays["y_train"][:cut])
    np.testing.assert_array_equal(ds.valid.y.numpy(), arrays["y_train"][cut:])
    np.testing.assert_array_equal(
        ds.test.x.numpy(), arrays["x_test"].reshape(N_TEST, -1).astype(np.float32) / 255.0
    )
    np.testing.assert_array_equal(ds.test.y.numpy(), arrays["y_test"])


def test_npz_round_trip_file_and_directory(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "mnist.npz", **arrays)
    _check_round_trip(load_mnist(tmp_path / "mnist.npz", validation=5), arrays, 5)
    _check_round_trip(load_mnist(tmp_path, validation=5), arrays, 5)  # directory with npz
    _check_round_trip(load_mnist(str(tmp_path / "mnist.npz"), validation=0), arrays, 0)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = _arrays(1)
    directory = _write_idx_dir(tmp_path / "idx", arrays, gz=gz)
    _check_round_trip(load_mnist(directory, validation=4), arrays, 4)


def test_idx_dotted_names_are_found(tmp_path):
    arrays = _arrays(2)
    directory = tmp_path / "dots"
    directory.mkdir()
    for key, stem in data.IDX_NAMES.items():
        _write_idx(directory / stem.replace("-idx", ".idx"), arrays[key], gz=False)
    _check_round_trip(load_mnist(directory, validation=3), arrays, 3)


def test_read_idx_errors(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(bytes([0, 0, 0x0D, 3]) + bytes(12))
    with pytest.raises(ValueError, match="magic number"):
        read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(short)
    truncated = tmp_path / "trunc"
    _write_idx(truncated, np.zeros((3, 28, 28), np.uint8), gz=False)
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"declares shape \(3, 28, 28\)"):
        read_idx(truncated)
    labels = tmp_path / "labels"
    _write_idx(labels, np.zeros(3, np.uint8), gz=False)
    with pytest.raises(ValueError, match="1 dimension.*expected 3"):
        read_idx(labels, ndim=3)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read as gzip"):
        read_idx(not_gzip)


def test_idx_directory_missing_files(tmp_path):
    arrays = _arrays()
    directory = _write_idx_dir(tmp_path / "idx", arrays, gz=True)
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="missing IDX file.*t10k-labels-idx1-ubyte"):
        load_mnist(directory, validation=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("y_test"), r"missing key\(s\) \['y_test'\].*found keys"),
        (
            lambda a: a.update(x_train=a["x_train"].astype(np.float32)),
            "x_train has dtype float32; expected uint8",
        ),
        (
            lambda a: a.update(x_test=a["x_test"].reshape(N_TEST, 784)),
            r"x_test has shape \(7, 784\); expected \(N, 28, 28\)",
        ),
        (
            lambda a: a.update(y_train=a["y_train"][:-1]),
            r"y_train has shape \(19,\); expected \(20,\)",
        ),
        (
            lambda a: a.update(y_test=a["y_test"].astype(np.float64)),
            "y_test has dtype float64; expected an integer dtype",
        ),
        (
            lambda a: a.update(y_train=np.full(N_TRAIN, 12, np.int64)),
            r"labels in \[12, 12\]; expected 0..9",
        ),
    ],
)
def test_npz_validation_errors(tmp_path, change, message):
    arrays = _arrays()
    change(arrays)
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_mnist(tmp_path / "m.npz", validation=5)


def test_argument_and_path_errors(tmp_path):
    np.savez(tmp_path / "mnist.npz", **_arrays())
    with pytest.raises(ValueError, match="binarize must be one of"):
        load_mnist(tmp_path, binarize="otsu")
    with pytest.raises(ValueError, match="validation=20 leaves no training images"):
        load_mnist(tmp_path, validation=20)
    with pytest.raises(ValueError, match="non-negative int"):
        load_mnist(tmp_path, validation=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nowhere.npz")
    (tmp_path / "mnist.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"expected a \.npz file"):
        load_mnist(tmp_path / "mnist.txt")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_mnist(tmp_path / "broken.npz")


def test_binarisation(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "mnist.npz", **arrays)
    grey = load_mnist(tmp_path, validation=5)
    hard = load_mnist(tmp_path, validation=5, binarize="threshold")
    torch.testing.assert_close(hard.train.x, (grey.train.x >= 0.5).float())
    dyn = load_mnist(tmp_path, validation=5, binarize="dynamic", seed=3)
    again = load_mnist(tmp_path, validation=5, binarize="dynamic", seed=3)
    assert set(torch.unique(dyn.train.x).tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(dyn.train.x, again.train.x)  # seeded
    # pixels of intensity 0 never light up, intensity 1 always does
    assert torch.all(dyn.train.x[grey.train.x == 0] == 0)
    assert torch.all(dyn.train.x[grey.train.x == 1] == 1)


def test_binarize_helpers():
    x = torch.tensor([0.0, 0.49, 0.5, 1.0])
    assert threshold_binarize(x).tolist() == [0.0, 0.0, 1.0, 1.0]
    g1 = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    p = torch.full((20000,), 0.3)
    a, b = dynamic_binarize(p, g1), dynamic_binarize(p, g2)
    torch.testing.assert_close(a, b)
    # mean of 20000 Bernoulli(0.3): sd 0.0032, a 6-sd window (false alarm ~2e-9)
    assert abs(a.mean().item() - 0.3) < 6 * (0.3 * 0.7 / 20000) ** 0.5


def test_default_path_and_fallback(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    assert default_mnist_path(tmp_path / "work") is None
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    np.savez(shared / "mnist.npz", **_arrays())
    assert default_mnist_path(tmp_path / "work") == (shared / "mnist.npz").resolve()
    assert default_mnist_path(tmp_path) == (shared / "mnist.npz").resolve()

    monkeypatch.chdir(tmp_path / "work")
    found = load_mnist(validation=5)  # ../shared/data/mnist.npz relative to cwd
    assert found.source == "mnist" and len(found.train) == 15

    (shared / "mnist.npz").unlink()
    with pytest.warns(UserWarning, match="falling back to scikit-learn's shipped 8x8 digits"):
        ds = load_mnist()
    assert ds.source == "sklearn_digits" and ds.path is None and ds.image_shape == (8, 8)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (1197, 300, 300)
    assert ds.num_features == 64 and ds.train.x.dtype == torch.float32
    assert 0.0 <= ds.train.x.min() and ds.train.x.max() == 1.0
    assert ds.train.y.dtype == torch.int64


def test_real_mnist(real_mnist):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_mnist(real_mnist)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (50000, 10000, 10000)
    assert ds.train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    train_counts = torch.bincount(torch.cat([ds.train.y, ds.valid.y]), minlength=10)
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_counts = torch.bincount(ds.test.y, minlength=10)
    assert test_counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.train.x.shape == (50000, 784) and ds.train.x.max() == 1.0
    # mean intensity of this rendering (data/README.md): 0.124
    assert (
        abs(ds.test.x.mean().item() - 0.124) < 0.005
        or abs(torch.cat([ds.train.x, ds.valid.x]).mean().item() - 0.124) < 0.005
    )
