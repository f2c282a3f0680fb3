import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffusion_models import data
from diffusion_models.data import DataError

REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    """Write uint8 `arr` in the IDX format (big-endian dims after a 0x0000 08 nd magic)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def cifar_batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"x", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"f"] * n}
    return pickle.dumps(batch, protocol=2)


def write_cifar_tar(path: Path, batches: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def make_mnist(root: Path, n_train=12, n_test=5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d = root / "mnist"
    d.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (imgs, labels)
    return arrays


# ------------------------------------------------------------------------------ digits

def test_digits_splits_are_fixed_disjoint_and_discrete():
    tr, va, te = (data.load("digits", s) for s in ("train", "val", "test"))
    assert tr.images.shape == (1200, 1, 8, 8) and va.images.shape == (300, 1, 8, 8)
    assert te.images.shape == (297, 1, 8, 8)
    assert tr.levels == va.levels == te.levels == 17
    assert tr.images.dtype == np.uint8 and tr.images.max() <= 16
    assert set(np.unique(tr.labels)) == set(range(10))
    # disjoint: together they are exactly the 1797 UCI images
    from sklearn.datasets import load_digits
    allimg = load_digits().images.astype(np.uint8).reshape(1797, -1)
    both = np.concatenate([tr.images, va.images, te.images]).reshape(1797, -1)
    key = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert key(both) == key(allimg)
    for split, ds in (("train", tr), ("val", va), ("test", te)):  # deterministic
        assert np.array_equal(data.load("digits", split).images, ds.images)
    # another split seed moves validation images, never the test split
    other = {s: data.load("digits", s, split_seed=1) for s in ("val", "test")}
    assert not np.array_equal(other["val"].images, va.images)
    assert np.array_equal(other["test"].images, te.images)
    assert len(data.load("digits", "val", val_size=100)) == 100


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        data.load("svhn")
    with pytest.raises(DataError, match="unknown split 'valid'"):
        data.load("digits", "valid")


# ------------------------------------------------------------------------------ IDX

@pytest.mark.parametrize("compress", [True, False])
def test_idx_roundtrip(tmp_path, compress):
    arr = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    p = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(p, arr, compress)
    assert np.array_equal(data.read_idx(p), arr)


def test_idx_truncated_names_file(tmp_path):
    arr = np.zeros((4, 28, 28), np.uint8)
    p = tmp_path / "trunc-images-idx3-ubyte"
    write_idx(p, arr, compress=False)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"trunc-images-idx3-ubyte: truncated or corrupt IDX file"):
        data.read_idx(p)


def test_idx_bad_magic_and_bad_gzip(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(p)
    g = tmp_path / "junk.gz"
    g.write_bytes(gzip.compress(b"\x00" * 100)[:20])
    with pytest.raises(DataError, match=r"corrupt or truncated gzip file .*junk\.gz"):
        data.read_idx(g)
    with pytest.raises(DataError, match="missing data file"):
        data.read_idx(tmp_path / "nope.gz")


def test_mnist_load_from_native_files(tmp_path):
    arrays = make_mnist(tmp_path)
    tr = data.load("mnist", "train", tmp_path, check=False, val_size=4)
    va = data.load("mnist", "val", tmp_path, check=False, val_size=4)
    te = data.load("mnist", "test", tmp_path, check=False)
    assert tr.images.shape == (8, 1, 28, 28) and va.images.shape == (4, 1, 28, 28) and tr.levels == 256
    # validation is carved from the official training images, the official test set stays the test set
    key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert key(np.concatenate([tr.images[:, 0], va.images[:, 0]])) == key(arrays["train"][0])
    assert np.array_equal(te.labels, arrays["t10k"][1])


def test_mnist_checksum_mismatch_is_an_error(tmp_path):
    make_mnist(tmp_path)
    with pytest.raises(DataError, match=r"corrupt data file: .*train-images-idx3-ubyte\.gz has md5"):
        data.load("mnist", "train", tmp_path)


def test_real_dataset_missing_says_how_to_fetch(tmp_path):
    with pytest.raises(DataError, match=r"missing data file: .*mnist.*fetch mnist"):
        data.load("mnist", "train", tmp_path)


# ------------------------------------------------------------------------------ Fashion-MNIST

def make_fashion(root: Path, monkeypatch, n_train=12, n_test=5, mtime=0, level=9):
    """Fixture IDX files of Fashion-MNIST's names under root/fashion_mnist, gzip-compressed
    with `level` and `mtime`, and the dataset's pins replaced by their contents' SHA-256."""
    import hashlib

    rng = np.random.default_rng(1)
    d = root / "fashion_mnist"
    d.mkdir(parents=True, exist_ok=True)
    arrays, contents = {}, {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (("images", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          ("labels", rng.integers(0, 10, n, dtype=np.uint8))):
            ndim = 3 if kind == "images" else 1
            raw = bytes([0, 0, 0x08, ndim]) + b"".join(int(x).to_bytes(4, "big") for x in arr.shape) + arr.tobytes()
            name = f"{prefix}-{kind}-idx{ndim}-ubyte.gz"
            (d / name).write_bytes(gzip.compress(raw, compresslevel=level, mtime=mtime))
            contents[name] = hashlib.sha256(raw).hexdigest()
            arrays[prefix, kind] = arr
    sp = data.spec("fashion_mnist")
    monkeypatch.setitem(data.SPECS, "fashion_mnist", type(sp)(**{**sp.__dict__, "contents": contents,
                                                                   "system_dirs": ()}))
    return arrays


@pytest.mark.parametrize("level, mtime", [(9, 0), (1, 1234567890)])  # two gzip encodings of one content
def test_fashion_mnist_loads_from_either_gzip_variant(tmp_path, monkeypatch, level, mtime):
    arrays = make_fashion(tmp_path, monkeypatch, mtime=mtime, level=level)
    tr = data.load("fashion_mnist", "train", tmp_path, val_size=4)
    va = data.load("fashion_mnist", "val", tmp_path, val_size=4)
    te = data.load("fashion_mnist", "test", tmp_path)
    assert (tr.shape, tr.levels, len(tr), len(va), len(te)) == ((1, 28, 28), 256, 8, 4, 5)
    assert np.array_equal(te.images[:, 0], arrays["t10k", "images"]) and np.array_equal(te.labels, arrays["t10k", "labels"])
    key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert key(np.concatenate([tr.images[:, 0], va.images[:, 0]])) == key(arrays["train", "images"])


def test_fashion_mnist_refuses_a_changed_byte_and_names_the_file(tmp_path, monkeypatch):
    make_fashion(tmp_path, monkeypatch)
    f = tmp_path / "fashion_mnist" / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[-1] ^= 1  # one pixel of the last test image
    f.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"corrupt data file: .*t10k-images-idx3-ubyte\.gz: its decompressed "
                                        r"content has SHA-256 [0-9a-f]{64}, expected"):
        data.load("fashion_mnist", "test", tmp_path)
    data.load("fashion_mnist", "train", tmp_path, val_size=4)  # the other files still load
    f.write_bytes(f.read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match="corrupt or truncated gzip file"):
        data.load("fashion_mnist", "test", tmp_path)


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    sp = data.spec("fashion_mnist")
    assert sp.system_dirs == ("/usr/share/datasets/fashion-mnist",)  # where Debian's package puts it
    nowhere = str(tmp_path / "usr-share")  # this machine may have it installed
    monkeypatch.setitem(data.SPECS, "fashion_mnist", type(sp)(**{**sp.__dict__, "system_dirs": (nowhere,)}))
    with pytest.raises(DataError, match=rf"missing data file: .*fashion_mnist/train-images-idx3-ubyte\.gz "
                                        rf"\(nor in {nowhere}\).*apt-get install dataset-fashion-mnist"):
        data.load("fashion_mnist", "train", tmp_path / "empty")


def test_fashion_mnist_pins_are_the_official_content():
    """Where the Debian package is installed (not at test time in CI): its files pass the pins,
    and the arrays are the published dataset (60,000 / 10,000 balanced, mean pixel 72.94)."""
    if not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist not installed (the other Fashion-MNIST tests use fixtures)")
    tr = data.load("fashion_mnist", "train", "data/raw", val_size=5000)
    te = data.load("fashion_mnist", "test", "data/raw")
    assert (len(tr), len(te)) == (55_000, 10_000) and np.bincount(te.labels).tolist() == [1000] * 10
    assert te.images.shape[1:] == (1, 28, 28)


# ------------------------------------------------------------------------------ CIFAR-10

def test_cifar_tarball_and_folder(tmp_path):
    batches = {f"data_batch_{i}": cifar_batch(3, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(4, 9)
    root = tmp_path / "cifar10"
    root.mkdir()
    write_cifar_tar(root / "cifar-10-python.tar.gz", batches)
    tr = data.load("cifar10", "train", tmp_path, check=False, val_size=5)
    va = data.load("cifar10", "val", tmp_path, check=False, val_size=5)
    te = data.load("cifar10", "test", tmp_path, check=False)
    assert tr.images.shape == (10, 3, 32, 32) and va.images.shape == (5, 3, 32, 32)
    assert te.images.shape == (4, 3, 32, 32)
    allx, ally = data.read_cifar10(root / "cifar-10-python.tar.gz", "train")
    first = pickle.loads(batches["data_batch_1"])
    # CIFAR rows are channel-major: 1024 R, then 1024 G, then 1024 B values
    assert np.array_equal(allx[0, 1].ravel(), first[b"data"][0, 1024:2048])
    assert ally[:3].tolist() == first[b"labels"]
    assert sorted(tr.labels.tolist() + va.labels.tolist()) == sorted(ally.tolist())
    folder = tmp_path / "extracted"
    folder.mkdir()
    for name, blob in batches.items():
        (folder / name).write_bytes(blob)
    imgs, labels = data.read_cifar10(folder, "test")
    assert np.array_equal(imgs, te.images) and np.array_equal(labels, te.labels)


def test_cifar_corrupt_batch_and_archive(tmp_path):
    batches = {f"data_batch_{i}": cifar_batch(2, i) for i in range(1, 6)}
    batches["data_batch_3"] = batches["data_batch_3"][:50]  # truncated pickle
    batches["test_batch"] = cifar_batch(2, 7)
    p = tmp_path / "c.tar.gz"
    write_cifar_tar(p, batches)
    with pytest.raises(DataError, match=r"c\.tar\.gz:data_batch_3: corrupt CIFAR-10 batch"):
        data.read_cifar10(p, "train")
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match=r"corrupt or truncated archive .*c\.tar\.gz"):
        data.read_cifar10(p, "train")


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    blob = pickle.dumps({b"data": Evil(), b"labels": []})
    with pytest.raises(DataError, match="forbidden global"):
        data.read_cifar_batch(blob, "evil")


# ------------------------------------------------------------------------------ pins

def test_data_dvc_pins_match_reader_checksums():
    pins = yaml.safe_load((REPO / "data.dvc").read_text())
    assert pins.get("frozen") is True
    pinned = {(Path(o["path"]).parent.name, Path(o["path"]).name): o["md5"] for o in pins["outs"]}
    expected = {(name, f): md5 for name in data.names() for f, md5 in data.spec(name).files.items()}
    assert pinned == expected and ("fashion_mnist", "t10k-labels-idx1-ubyte.gz") in pinned


def test_prepared_roundtrip_and_corruption(tmp_path):
    ds = data.load("digits", "test")
    p = tmp_path / "test.npz"
    data.save_prepared(ds, p)
    back = data.load_prepared(p)
    assert np.array_equal(back.images, ds.images) and back.levels == 17 and back.name == "digits"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt prepared data"):
        data.load_prepared(p)
    with pytest.raises(DataError, match="missing prepared data"):
        data.load_prepared(tmp_path / "none.npz")
