"""MNIST for the conditional-computation experiment, with a shipped fallback.

``load_mnist`` reads MNIST from a user-given location in either of its two common layouts and
returns float32 images in ``[0, 1]`` flattened to ``(N, 784)`` plus int64 labels, split into
train / validation / test:

* the Keras ``mnist.npz`` layout: keys ``x_train (60000, 28, 28) uint8``, ``y_train (60000,)``,
  ``x_test (10000, 28, 28) uint8``, ``y_test (10000,)``;
* the four IDX files of LeCun's distribution (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), gzipped
  (``.gz``) or not, in one directory.

Split. The 60 000 training images are split in their stored order: the first
``60000 - validation`` are the training set, the last ``validation`` (10 000 by default) the
validation set. This is the split of the classic ``mnist.pkl.gz`` (50k / 10k / 10k) used by the
Theano-era papers, including Bengio, Léonard & Courville (2013); it is fixed and independent of
``seed``.

Binarisation. ``binarize="threshold"`` sets pixels ``>= 0.5`` to 1 (0.5 itself goes to 1);
``binarize="dynamic"`` draws each pixel once from ``Bernoulli(intensity)`` with a generator
seeded by ``seed`` (a fixed stochastic binarisation). For a fresh draw every epoch, keep the
grey levels (``binarize=None``) and call :func:`dynamic_binarize` in the training loop.

Fallback. With ``path=None`` the loader looks for ``mnist.npz`` under ``../shared/data`` and
``./shared/data`` (see :func:`default_mnist_path`); when neither exists it warns and returns
scikit-learn's shipped 8x8 digits instead (1797 images, 64 features scaled from 0..16 to
[0, 1]), split in stored order into 1197 train / 300 validation / 300 test. That fallback is a
smoke-test dataset, not MNIST: results on it are not comparable with the paper.

References: Y. LeCun, C. Cortes, C. Burges, "The MNIST database of handwritten digits";
Bengio, Léonard & Courville (2013), arXiv:1308.3432, section 6.
"""

from __future__ import annotations

import gzip
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BINARIZE_CHOICES",
    "Digits",
    "Split",
    "default_mnist_path",
    "dynamic_binarize",
    "load_mnist",
    "read_idx",
    "threshold_binarize",
]

BINARIZE_CHOICES = (None, "threshold", "dynamic")
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned byte data, 3 or 1 dimensions
_FALLBACK_VALID = 300
_FALLBACK_TEST = 300


@dataclass(frozen=True)
class Split:
    """One part of the data: ``x (N, D) float32`` in [0, 1] and ``y (N,) int64`` labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Digits:
    """Train / validation / test splits and where they came from.

    ``source`` is ``"mnist"`` or ``"sklearn_digits"`` (the fallback); ``path`` the file or
    directory read (``None`` for the fallback); ``image_shape`` the (height, width) of an image.
    """

    train: Split
    valid: Split
    test: Split
    source: str
    path: str | None
    image_shape: tuple[int, int]
    binarize: str | None

    @property
    def num_features(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def num_classes(self) -> int:
        return 10


def default_mnist_path(cwd: str | Path | None = None) -> Path | None:
    """``mnist.npz`` under ``../shared/data`` or ``./shared/data`` of ``cwd``, else ``None``."""
    base = Path.cwd() if cwd is None else Path(cwd)
    for candidate in (
        base / ".." / "shared" / "data" / "mnist.npz",
        base / "shared" / "data" / "mnist.npz",
    ):
        if candidate.is_file():
            return candidate.resolve()
    return None


def threshold_binarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``1[x >= threshold]`` as float32."""
    return (x >= threshold).to(torch.float32)


def dynamic_binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw of ``Bernoulli(x)`` per pixel: ``1[u < x]`` with ``u ~ U(0, 1)`` from ``generator``.

    Requires: ``x`` in [0, 1]. The expectation of the result is ``x``.
    """
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    return (u < x).to(torch.float32)


def load_mnist(
    path: str | Path | None = None,
    *,
    binarize: str | None = None,
    validation: int = 10000,
    seed: int = 0,
) -> Digits:
    """Load MNIST (Keras npz or IDX files) as float32 ``(N, 784)`` in [0, 1] with int64 labels.

    ``path``: an ``.npz`` file, a directory holding ``mnist.npz`` or the four IDX files
    (optionally ``.gz``), or ``None`` for :func:`default_mnist_path` and, failing that, the
    shipped 8x8 digits with a warning. ``binarize``: ``None``, ``"threshold"`` (at 0.5) or
    ``"dynamic"`` (one seeded Bernoulli draw). ``validation``: how many of the last training
    images form the validation split. ``seed``: seeds the dynamic binarisation only.

    Raises ``ValueError`` for a missing file, a wrong key, shape, dtype or label range, naming
    what was found and what was expected; ``FileNotFoundError`` when ``path`` does not exist.
    """
    if binarize not in BINARIZE_CHOICES:
        raise ValueError(f"binarize must be one of {BINARIZE_CHOICES}, got {binarize!r}")
    if not isinstance(validation, int) or validation < 0:
        raise ValueError(f"validation must be a non-negative int, got {validation!r}")

    if path is None:
        path = default_mnist_path()
        if path is None:
            warnings.warn(
                "MNIST not found at ../shared/data/mnist.npz or ./shared/data/mnist.npz and no "
                "path given: falling back to scikit-learn's shipped 8x8 digits (1797 images, 64 "
                "features). Results on it are a smoke test, not comparable with MNIST; pass "
                "path=... (a Keras mnist.npz or a directory of IDX files) for the real data.",
                UserWarning,
                stacklevel=2,
            )
            return _finish(*_load_sklearn_digits(validation), binarize=binarize, seed=seed)

    raw, source_path = _read_raw(Path(path))
    x_train, y_train, x_test, y_test = _validate_raw(raw, source_path)
    n_train = x_train.shape[0]
    if validation >= n_train:
        raise ValueError(
            f"validation={validation} leaves no training images: {source_path} holds "
            f"{n_train} training images; expected validation < {n_train}"
        )
    cut = n_train - validation
    parts = (
        (x_train[:cut], y_train[:cut]),
        (x_train[cut:], y_train[cut:]),
        (x_test, y_test),
    )
    return _finish(parts, "mnist", str(source_path), (28, 28), binarize=binarize, seed=seed)


# ----------------------------------------------------------------------------- reading


def _read_raw(path: Path) -> tuple[dict[str, np.ndarray], Path]:
    if not path.exists():
        raise FileNotFoundError(
            f"MNIST path {str(path)!r} does not exist; expected a Keras mnist.npz file or a "
            f"directory holding it or the four IDX files ({', '.join(IDX_NAMES.values())})"
        )
    if path.is_dir():
        npz = path / "mnist.npz"
        if npz.is_file():
            return _read_npz(npz), npz
        return _read_idx_dir(path), path
    if path.suffix == ".npz":
        return _read_npz(path), path
    raise ValueError(
        f"cannot read {str(path)!r}: expected a .npz file (Keras mnist.npz layout) or a "
        "directory of IDX files"
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise ValueError(f"{path}: not a readable .npz archive (no zip signature)")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as archive:
            found = sorted(archive.files)
            missing = [k for k in NPZ_KEYS if k not in found]
            if missing:
                raise ValueError(
                    f"{path}: missing key(s) {missing}; found keys {found}, expected the Keras "
                    f"mnist.npz keys {list(NPZ_KEYS)}"
                )
            return {k: archive[k] for k in NPZ_KEYS}
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # truncated archive
        raise ValueError(f"{path}: not a readable .npz archive ({err})") from err


def _find_idx(directory: Path, stem: str) -> Path | None:
    # LeCun's names use '-' before 'idx'; some mirrors use '.' ("train-images.idx3-ubyte").
    alt = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", alt, alt + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    files = {key: _find_idx(directory, stem) for key, stem in IDX_NAMES.items()}
    missing = [IDX_NAMES[k] for k, f in files.items() if f is None]
    if missing:
        present = sorted(p.name for p in directory.iterdir())
        raise ValueError(
            f"{directory}: no mnist.npz and missing IDX file(s) {missing} (plain or .gz); found "
            f"{present[:20]}{' ...' if len(present) > 20 else ''}"
        )
    out: dict[str, np.ndarray] = {}
    for key, file in files.items():
        assert file is not None
        out[key] = read_idx(file, ndim=3 if key.startswith("x") else 1)
    return out


def read_idx(file: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (unsigned-byte data; gzipped when the name ends in ``.gz``).

    Format: a big-endian header ``0x0000 0x08 <ndim>``, then ``ndim`` big-endian uint32
    sizes, then the data. ``ndim``, when given, is the number of dimensions expected.
    """
    file = Path(file)
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as f:
            data = f.read()
    except OSError as err:  # e.g. a plain file named .gz
        raise ValueError(
            f"{file}: cannot read as {'gzip' if file.suffix == '.gz' else 'IDX'} ({err})"
        ) from err
    if len(data) < 4:
        raise ValueError(f"{file}: {len(data)} bytes, too short for an IDX header (4 bytes)")
    magic = int.from_bytes(data[:4], "big")
    dims = data[3]
    if magic >> 8 != 0x08 or dims not in _IDX_MAGIC:
        raise ValueError(
            f"{file}: IDX magic number {magic:#010x}; expected {_IDX_MAGIC[3]:#010x} (images) "
            f"or {_IDX_MAGIC[1]:#010x} (labels), unsigned-byte data"
        )
    if ndim is not None and dims != ndim:
        raise ValueError(f"{file}: IDX file has {dims} dimension(s); expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"{file}: truncated IDX header ({len(data)} bytes, expected {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = int(np.prod(shape)) + header
    if len(data) != expected:
        raise ValueError(
            f"{file}: {len(data)} bytes; the header declares shape {shape}, expected "
            f"{expected} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _validate_raw(raw: dict[str, np.ndarray], path: Path) -> tuple[np.ndarray, ...]:
    out = []
    for part in ("train", "test"):
        x, y = raw[f"x_{part}"], raw[f"y_{part}"]
        if x.dtype != np.uint8:
            raise ValueError(
                f"{path}: x_{part} has dtype {x.dtype}; expected uint8 grey levels 0..255"
            )
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"{path}: x_{part} has shape {x.shape}; expected (N, 28, 28)")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{path}: y_{part} has shape {y.shape}; expected ({x.shape[0]},), one label per "
                f"image of x_{part}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: y_{part} has dtype {y.dtype}; expected an integer dtype")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(
                f"{path}: y_{part} has labels in [{y.min()}, {y.max()}]; expected 0..9"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{path}: x_{part} is empty; expected at least one image")
        out += [x.reshape(x.shape[0], -1), y]
    return tuple(out)


def _load_sklearn_digits(validation: int):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # (1797, 64), 0..16 -> [0, 1]
    y = bunch.target.astype(np.int64)
    n_valid = min(validation, _FALLBACK_VALID)
    pool = len(x) - _FALLBACK_TEST
    cut = pool - n_valid
    parts = ((x[:cut], y[:cut]), (x[cut:pool], y[cut:pool]), (x[pool:], y[pool:]))
    return parts, "sklearn_digits", None, (8, 8)


def _finish(parts, source, path, image_shape, *, binarize, seed) -> Digits:
    generator = torch.Generator().manual_seed(seed)
    splits = []
    for x, y in parts:
        xt = torch.from_numpy(np.ascontiguousarray(x))
        xt = xt.to(torch.float32) / 255.0 if xt.dtype == torch.uint8 else xt.to(torch.float32)
        if binarize == "threshold":
            xt = threshold_binarize(xt)
        elif binarize == "dynamic":
            xt = dynamic_binarize(xt, generator)
        splits.append(Split(xt.contiguous(), torch.from_numpy(np.asarray(y, dtype=np.int64))))
    return Digits(*splits, source=source, path=path, image_shape=image_shape, binarize=binarize)
