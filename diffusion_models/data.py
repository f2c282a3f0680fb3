"""Datasets as discrete images: integer pixels in {0..L-1}, shape [N, C, H, W].

Readers parse the native formats themselves (IDX for MNIST and Fashion-MNIST, python-pickle
batches for CIFAR-10); the default dataset, `digits`, is the UCI hand-written digits bundled
with scikit-learn, so the default pipeline needs no network. Real files are pinned by
checksum in the top-level `data.dvc`; `load` verifies them against the same checksums below
(Fashion-MNIST by the SHA-256 of each file's decompressed content, so the official download
and a distribution's recompressed copy both pass).
"""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .runtime import digest, file_digest


class DataError(RuntimeError):
    """Missing, truncated or corrupt data; the message names the file and what was expected."""


@dataclass(frozen=True)
class Dataset:
    name: str
    split: str
    images: np.ndarray  # uint8 [N, C, H, W] in {0..levels-1}
    labels: np.ndarray  # int64 [N]
    levels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Spec:
    shape: tuple[int, int, int]
    levels: int
    files: dict[str, str]  # native file name -> published md5 (also pinned in data.dvc)
    fid_samples: int       # default number of generated samples for FID/KID/PR
    seeds: int             # default training runs (seeds) per model
    val_size: int          # default validation split, carved from the (official) training images
    # native file name -> SHA-256 of its decompressed content: when given, what verification
    # checks instead of the md5 (which pins only the official download)
    contents: dict[str, str] = field(default_factory=dict)
    system_dirs: tuple[str, ...] = ()  # where a system package installs the files (after root/<name>)
    install: str = ""  # how to get the files, for the error a missing one raises


MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_FILES = {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
FASHION_FILES = {  # the official download (zalandoresearch/fashion-mnist)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_CONTENTS = {  # the same files decompressed (Debian's dataset-fashion-mnist recompresses them)
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

SPECS = {
    "digits": Spec((1, 8, 8), 17, {}, 2000, 3, 300),
    "mnist": Spec((1, 28, 28), 256, MNIST_FILES, 10_000, 1, 5000),
    "cifar10": Spec((3, 32, 32), 256, CIFAR10_FILES, 10_000, 1, 5000),
    "fashion_mnist": Spec((1, 28, 28), 256, FASHION_FILES, 10_000, 1, 5000, FASHION_CONTENTS,
                          ("/usr/share/datasets/fashion-mnist",),
                          "`apt-get install dataset-fashion-mnist` (Debian, Ubuntu), or "
                          "`python -m diffusion_models fetch fashion_mnist` where the network is reachable"),
}
# train: what models (and the FID classifier) are fitted on; val: held out from training, where
# defaults are chosen and training curves are scored; test: the final tables only
SPLITS = ("train", "val", "test")


def names() -> list[str]:
    return list(SPECS)


def spec(name: str) -> Spec:
    if name not in SPECS:
        raise DataError(f"unknown dataset '{name}'; available: {', '.join(SPECS)}")
    return SPECS[name]


# ----------------------------------------------------------------------------- readers


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"missing data file: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"corrupt or truncated gzip file {path}: {e}") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST's native format), gzip-compressed or not, as uint8."""
    return parse_idx(_read_bytes(Path(path)), Path(path))


def parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """The uint8 array of IDX content `raw` (decompressed) read from `path`."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (expected magic 0x0000 08 nd)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: expected unsigned-byte IDX data (type 0x08), got 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"{path}: truncated or corrupt IDX file: header says shape {dims} "
            f"({expected} bytes), file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: only numpy arrays and builtins, no arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name} in a data batch")


def read_cifar_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR-10 python batch: uint8 [N,3,32,32] images and int64 [N] labels."""
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as e:  # any unpickling failure means the file is not a valid batch
        raise DataError(f"{source}: corrupt CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(labels) != len(images):
        raise DataError(
            f"{source}: expected data [N, 3072] with N labels, got data {images.shape} "
            f"and {len(labels)} labels"
        )
    return images.reshape(-1, 3, 32, 32), labels


def read_cifar10(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 from the python tarball or from its extracted folder."""
    path = Path(path)
    members = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    blobs: list[tuple[bytes, str]] = []
    if path.is_dir():
        for m in members:
            f = path / m
            if not f.is_file():
                raise DataError(f"missing data file: {f}")
            blobs.append((f.read_bytes(), str(f)))
    else:
        if not path.is_file():
            raise DataError(f"missing data file: {path}")
        try:
            with tarfile.open(path, "r:gz") as tar:
                by_name = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for m in members:
                    if m not in by_name:
                        raise DataError(f"{path}: archive has no member '{m}'")
                    blobs.append((tar.extractfile(by_name[m]).read(), f"{path}:{m}"))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"corrupt or truncated archive {path}: {e}") from None
    parts = [read_cifar_batch(b, src) for b, src in blobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def locate(root: Path, name: str, fname: str) -> Path:
    """Native file `fname` of dataset `name`: root/<name>/<fname>, else the first of the
    dataset's system directories that holds it."""
    sp = spec(name)
    places = [Path(root) / name] + [Path(d) for d in sp.system_dirs]
    for place in places:
        if (place / fname).is_file():
            return place / fname
    how = sp.install or f"`python -m diffusion_models fetch {name}` where the network is reachable"
    raise DataError(f"missing data file: {places[0] / fname}"
                    + (f" (nor in {', '.join(map(str, places[1:]))})" if len(places) > 1 else "")
                    + f": dataset '{name}' is not installed; get it with {how}")


def verified_content(root: Path, name: str, fname: str, check: bool = True) -> bytes:
    """The decompressed content of native file `fname`, checked (with `check`) against its
    pinned SHA-256."""
    path = locate(root, name, fname)
    raw = _read_bytes(path)
    want = spec(name).contents[fname]
    if check and (got := digest(raw, algorithm="sha256")) != want:
        raise DataError(f"corrupt data file: {path}: its decompressed content has SHA-256 {got}, "
                        f"expected {want} (the official {fname})")
    return raw


def verify(root: Path, name: str) -> None:
    """Check the real dataset's native files against their pinned checksums (the SHA-256 of
    the content where the dataset pins one, else the file's md5)."""
    sp = spec(name)
    for fname, md5 in sp.files.items():
        if fname in sp.contents:
            verified_content(root, name, fname)
            continue
        f = locate(root, name, fname)
        got = file_digest(f, "md5")
        if got != md5:
            raise DataError(f"corrupt data file: {f} has md5 {got}, expected {md5} (data.dvc)")


# ----------------------------------------------------------------------------- loading


def _digits(test_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1797 digits, and the indices of the test split: `test_size` of them, drawn with a
    fixed seed (0) independent of the train/val split's, so the test split never moves."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # [1797, 1, 8, 8] in {0..16}
    if not 0 < test_size < len(images):
        raise DataError(f"digits: test_size must be in (0, {len(images)}), got {test_size}")
    perm = np.random.default_rng(0).permutation(len(images))
    return images, bunch.target.astype(np.int64), perm[:test_size]


def split_indices(n: int, val_size: int, split: str, split_seed: int) -> np.ndarray:
    """Sorted indices of `split` ('train' or 'val') among n training images: a seeded
    permutation, its first val_size the validation split, the rest the training split."""
    if not 0 < val_size < n:
        raise DataError(f"val_size must be in (0, {n}), got {val_size}")
    perm = np.random.default_rng(split_seed).permutation(n)
    return np.sort(perm[:val_size] if split == "val" else perm[val_size:])


def load(name: str, split: str = "train", root: str | Path = "data/raw", *,
         split_seed: int = 0, test_size: int = 297, val_size: int | None = None,
         check: bool = True) -> Dataset:
    """Load `split` (train | val | test) of dataset `name` as integer images in {0..levels-1}.

    test: digits, `test_size` images drawn once with a fixed seed; the real datasets, the
    official test set. val: `val_size` (None: the dataset's default) of the remaining (official
    training) images, drawn with `split_seed`; train: the rest. The three are disjoint."""
    sp = spec(name)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of {SPLITS}")
    root = Path(root)
    if name == "digits":
        images, labels, test_idx = _digits(test_size)
        if split == "test":
            idx = np.sort(test_idx)
        else:
            rest = np.setdiff1d(np.arange(len(images)), test_idx)  # sorted
            idx = rest[split_indices(len(rest), val_size or sp.val_size, split, split_seed)]
        images, labels = images[idx], labels[idx]
    else:
        official = "test" if split == "test" else "train"
        if name == "fashion_mnist":  # each file checked by its content as it is read
            prefix = "train" if official == "train" else "t10k"
            images, labels = (parse_idx(verified_content(root, name, f, check), locate(root, name, f))
                              for f in (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"))
            images, labels = images[:, None], labels.astype(np.int64)
        elif check:
            verify(root, name)
        if name == "mnist":
            prefix = "train" if official == "train" else "t10k"
            images = read_idx(root / name / f"{prefix}-images-idx3-ubyte.gz")[:, None]
            labels = read_idx(root / name / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        elif name == "cifar10":
            images, labels = read_cifar10(root / name / "cifar-10-python.tar.gz", official)
        if split != "test":
            idx = split_indices(len(images), val_size or sp.val_size, split, split_seed)
            images, labels = images[idx], labels[idx]
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.shape[1:] != sp.shape or len(labels) != len(images):
        raise DataError(f"{name}/{split}: expected images [N, {sp.shape}] and N labels, "
                        f"got {images.shape} and {len(labels)} labels")
    if images.max(initial=0) >= sp.levels:
        raise DataError(f"{name}/{split}: pixel value {images.max()} outside 0..{sp.levels - 1}")
    return Dataset(name, split, images, np.asarray(labels, np.int64), sp.levels)


# ----------------------------------------------------------------------------- prepared


def save_prepared(ds: Dataset, path: str | Path) -> None:
    from .runtime import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=ds.images, labels=ds.labels, levels=ds.levels,
                     name=ds.name, split=ds.split)


def load_prepared(path: str | Path) -> Dataset:
    """Read a split written by the prepare stage."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing prepared data: {path} (run the prepare stage: `dvc repro prepare`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return Dataset(str(z["name"]), str(z["split"]), z["images"], z["labels"], int(z["levels"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"corrupt prepared data {path}: {e}") from None
