"""Tests for cifarlab.data.sources: every fixture is generated here, nothing is downloaded."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.data.sources import images, load_source
from cifarlab.data.sources.cache import _read_cache
from cifarlab.data.sources.images import ImageSet, SourceData
from cifarlab.errors import UserError

NAMES = [f"name{i}" for i in range(10)]
ROWS = 20  # per batch


# ------------------------------------------------------------------------------ CIFAR fixtures


def _batch_rows(seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [(seed + i) % 10 for i in range(ROWS)]
    return rng.integers(0, 256, (ROWS, 3072), dtype=np.uint8), labels


def py2_pickle(obj: object) -> bytes:
    """Pickle as Python 2 + numpy 1 wrote the official files: str are BINSTRING, arrays
    refer to numpy.core.multiarray (Python 3 cannot produce this by itself)."""
    if isinstance(obj, dict):
        return b"}(" + b"".join(py2_pickle(k) + py2_pickle(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(map(py2_pickle, obj)) + b"e"
    if isinstance(obj, tuple):
        return b"(" + b"".join(map(py2_pickle, obj)) + b"t"
    if isinstance(obj, str):
        obj = obj.encode()
    if isinstance(obj, bytes):
        return b"T" + len(obj).to_bytes(4, "little") + obj
    if obj is None or isinstance(obj, bool):
        return {None: b"N", True: b"\x88", False: b"\x89"}[obj]
    if isinstance(obj, int):
        return b"J" + obj.to_bytes(4, "little", signed=True)
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    dtype = b"cnumpy\ndtype\n" + py2_pickle(("u1", 0, 1)) + b"R"
    dtype += py2_pickle((3, "|", None, None, None, -1, -1, 0)) + b"b"
    # _reconstruct(ndarray, (0,), 'b'), then __setstate__((1, shape, dtype, False, raw))
    array = b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n"
    array += py2_pickle((0,)) + py2_pickle("b") + b"tR"
    state = b"(" + py2_pickle(1) + py2_pickle(obj.shape) + dtype + py2_pickle(False)
    return array + state + py2_pickle(obj.tobytes()) + b"tb"


def write_batches(folder: Path, *, labels_test: list[int] | None = None,
                  py2: bool = False) -> Path:
    """A cifar-10-batches-py folder in the official layout: pickle protocol 2, written by
    Python 3 (bytes keys) or, with `py2`, byte for byte as Python 2 wrote the real files."""

    def dump(obj: dict) -> bytes:
        return b"\x80\x02" + py2_pickle(obj) + b"." if py2 else pickle.dumps(obj, protocol=2)

    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = _batch_rows(i)
        if i == 0:  # known pixels: R(3, 5) = 200, G(7, 1) = 100, B(31, 31) = 50 in row 0
            data[0] = 0
            data[0, 3 * 32 + 5], data[0, 1024 + 7 * 32 + 1], data[0, 2048 + 1023] = 200, 100, 50
        if name == "test_batch" and labels_test is not None:
            labels = labels_test
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"x.png"] * ROWS}
        (folder / name).write_bytes(dump(entry))
    meta = {b"num_cases_per_batch": ROWS, b"label_names": [n.encode() for n in NAMES],
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(dump(meta))
    return folder


def tar_folder(folder: Path, archive: Path, arcname: str | None = None) -> Path:
    with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as tar:
        tar.add(folder, arcname=arcname if arcname is not None else folder.name)
    return archive


def check_cifar(data: SourceData) -> None:
    assert data.train.images.shape == (5 * ROWS, 32, 32, 3)
    assert data.train.images.dtype == np.uint8 and data.train.images.flags.c_contiguous
    assert data.train.labels.dtype == np.int64
    assert data.train.classes == NAMES and data.test is not None and data.test.classes == NAMES
    first = data.train.images[0]
    assert (first[3, 5, 0], first[7, 1, 1], first[31, 31, 2]) == (200, 100, 50)
    assert int(first.sum()) == 350
    assert data.train.labels.tolist() == [(b + i) % 10 for b in range(5) for i in range(ROWS)]
    raw, labels = _batch_rows(5)
    assert data.test.labels.tolist() == labels
    # Row 0 of the test batch, channel G, pixel (2, 9): plane 1, offset 2 * 32 + 9.
    assert data.test.images[0, 2, 9, 1] == raw[0, 1024 + 2 * 32 + 9]


@pytest.mark.parametrize("py2", [False, True])
def test_batches_folder_and_tar(tmp_path: Path, py2: bool) -> None:
    folder = write_batches(tmp_path / "cifar-10-batches-py", py2=py2)
    if not py2:  # a batch re-pickled with the newest protocol (numpy uses _frombuffer there)
        batch = pickle.loads((folder / "data_batch_4").read_bytes())
        (folder / "data_batch_4").write_bytes(pickle.dumps(batch, protocol=5))
    check_cifar(load_source(str(folder), tmp_path / "root"))
    # The folder holding cifar-10-batches-py works too (torchvision's download root).
    check_cifar(load_source(str(tmp_path), tmp_path / "root2"))
    archive = tar_folder(folder, tmp_path / "cifar-10-python.tar.gz")
    check_cifar(load_source(str(archive), tmp_path / "root"))


def test_batch_labels_out_of_range(tmp_path: Path) -> None:
    folder = write_batches(tmp_path / "b", labels_test=[3] * (ROWS - 1) + [10])
    with pytest.raises(UserError, match=r"test_batch: label 10 out of range 0\.\.9"):
        load_source(str(folder), tmp_path / "root")


def test_batch_missing_file(tmp_path: Path) -> None:
    folder = write_batches(tmp_path / "b")
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3 missing"):
        load_source(str(folder), tmp_path / "root")


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    folder = write_batches(tmp_path / "b")
    pwned = tmp_path / "pwned"
    (folder / "data_batch_2").write_bytes(
        pickle.dumps({b"data": _Evil(pwned), b"labels": [0]}, protocol=2))
    refused = r"data_batch_2: refuses to load: it asks to import \S*system"
    with pytest.raises(UserError, match=refused):
        load_source(str(folder), tmp_path / "root")
    assert not pwned.exists()
    # Also inside an archive.
    (folder / "batches.meta").write_bytes(pickle.dumps(_Evil(pwned), protocol=2))
    with pytest.raises(UserError, match="batches.meta: refuses to load"):
        load_source(str(tar_folder(folder, tmp_path / "evil.tar.gz")), tmp_path / "root")
    assert not pwned.exists()


def test_garbage_pickle(tmp_path: Path) -> None:
    folder = write_batches(tmp_path / "b")
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(garbage")
    with pytest.raises(UserError, match="test_batch: not a readable CIFAR-10 batch file"):
        load_source(str(folder), tmp_path / "root")


# ------------------------------------------------------------------------------ image fixtures

RED, GREEN, BLUE = (220, 20, 30), (10, 200, 40), (30, 40, 210)


def image_bytes(mode: str, fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    """A solid image; the colour depends on the mode (all map to known RGB values)."""
    if mode == "RGB":
        im = Image.new("RGB", size, RED)
    elif mode == "L":
        im = Image.new("L", size, 90)
    elif mode == "RGBA":
        im = Image.new("RGBA", size, (*GREEN, 128))  # alpha is dropped
    elif mode == "P":
        im = Image.new("RGB", size, BLUE).convert("P", palette=Image.ADAPTIVE, colors=4)
    elif mode == "CMYK":
        im = Image.new("CMYK", size, (0, 255, 255, 0))
    elif mode == "I;16":
        im = Image.fromarray(np.full(size[::-1], 257 * 70, dtype=np.uint16))
    else:
        raise AssertionError(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


EXPECTED = {"RGB": RED, "L": (90, 90, 90), "RGBA": GREEN, "P": BLUE, "I;16": (70, 70, 70),
            "CMYK": (255, 0, 0)}


def write_tree(base: Path, classes: dict[str, list[tuple[str, str, str]]]) -> None:
    """classes: name -> [(file name, mode, format)]; adds files that must be ignored."""
    for name, files in classes.items():
        (base / name).mkdir(parents=True, exist_ok=True)
        for fname, mode, fmt in files:
            (base / name / fname).write_bytes(image_bytes(mode, fmt))
        (base / name / "notes.txt").write_text("not an image")
        (base / name / ".DS_Store").write_bytes(b"\x00junk")
    (base / "README.md").write_text("ignored")


TREE = {
    "dog": [("a.png", "L", "PNG"), ("b.png", "RGBA", "PNG"), ("c.jpg", "CMYK", "JPEG")],
    "cat": [("x.png", "RGB", "PNG"), ("y.jpg", "RGB", "JPEG"),
            ("jpeg-named.png", "RGB", "JPEG")],  # decided by content, not by extension
    "ant": [("p.png", "P", "PNG"), ("q.png", "I;16", "PNG")],
}


def check_tree(s: ImageSet) -> None:
    assert s.classes == ["ant", "cat", "dog"]
    assert s.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert s.images.shape == (8, 32, 32, 3) and s.images.dtype == np.uint8
    assert s.images.flags.c_contiguous
    expected = [EXPECTED[m] for c in sorted(TREE) for _, m, _ in sorted(TREE[c])]
    for img, (r, g, b) in zip(s.images, expected, strict=True):  # JPEG is lossy: a small tolerance
        assert np.abs(img.astype(int) - [r, g, b]).max() <= 4, (img[0, 0], (r, g, b))


@pytest.mark.parametrize("layout", ["flat", "top", "tar", "tgz-top"])
def test_image_folder_layouts(tmp_path: Path, layout: str) -> None:
    src = tmp_path / "src"
    write_tree(src / "photos" if layout in ("top", "tgz-top") else src, TREE)
    if layout == "tar":
        spec = tar_folder(src, tmp_path / "images.tar", arcname="")
    elif layout == "tgz-top":
        spec = tar_folder(src / "photos", tmp_path / "images.tgz")
    else:
        spec = src
    data = load_source(str(spec), tmp_path / "root")
    check_tree(data.train)
    assert data.test is None


@pytest.mark.parametrize("as_tar", [False, True])
def test_train_test_layout(tmp_path: Path, as_tar: bool) -> None:
    src = tmp_path / "data"
    write_tree(src / "train", TREE)
    write_tree(src / "test", {"dog": [("t.png", "L", "PNG")], "cat": [("t.jpg", "RGB", "JPEG")],
                              "ant": [("t.png", "P", "PNG"), ("u.png", "RGB", "PNG")]})
    spec = tar_folder(src, tmp_path / "data.tar.gz") if as_tar else src
    data = load_source(str(spec), tmp_path / "root")
    check_tree(data.train)
    assert data.test is not None and data.test.classes == ["ant", "cat", "dog"]
    assert data.test.labels.tolist() == [0, 0, 1, 2]
    assert tuple(data.test.images[1, 5, 5]) == RED


def test_train_test_classes_differ(tmp_path: Path) -> None:
    write_tree(tmp_path / "d" / "train", {"cat": [("a.png", "RGB", "PNG")],
                                          "dog": [("a.png", "RGB", "PNG")]})
    write_tree(tmp_path / "d" / "test", {"cat": [("a.png", "RGB", "PNG")],
                                         "cow": [("a.png", "RGB", "PNG")]})
    with pytest.raises(UserError, match=r"only in train: \['dog'\], only in test: \['cow'\]"):
        load_source(str(tmp_path / "d"), tmp_path / "root")


def test_empty_class_folder(tmp_path: Path) -> None:
    write_tree(tmp_path / "d", {"cat": [("a.png", "RGB", "PNG")], "dog": []})
    with pytest.raises(UserError, match=r"d/dog: empty class folder"):
        load_source(str(tmp_path / "d"), tmp_path / "root")


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no class folders"):
        load_source(str(tmp_path / "d"), tmp_path / "root")


def test_images_in_wrong_places(tmp_path: Path) -> None:
    write_tree(tmp_path / "d", {"cat": [("a.png", "RGB", "PNG")], "cat/sub/deep": [
        ("x.png", "RGB", "PNG")]})
    with pytest.raises(UserError, match=r"d/cat/sub/deep/x\.png: image in a subfolder"):
        load_source(str(tmp_path / "d"), tmp_path / "root")
    write_tree(tmp_path / "e", {"cat": [("a.png", "RGB", "PNG")]})
    (tmp_path / "e" / "stray.png").write_bytes(image_bytes("RGB", "PNG"))
    with pytest.raises(UserError, match=r"e/stray\.png: image outside a class folder"):
        load_source(str(tmp_path / "e"), tmp_path / "root")


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_undecodable_image(tmp_path: Path, damage: str) -> None:
    write_tree(tmp_path / "d", {"cat": [("a.jpg", "RGB", "JPEG")], "dog": [("b.png", "L", "PNG")]})
    bad = tmp_path / "d" / "dog" / "bad.png"
    good = image_bytes("RGB", "PNG")
    bad.write_bytes({"truncated": good[: len(good) // 2], "empty": b"", "text": b"hello"}[damage])
    with pytest.raises(UserError, match=r"dog/bad\.png: cannot decode image"):
        load_source(str(tmp_path / "d"), tmp_path / "root")
    tar = tar_folder(tmp_path / "d", tmp_path / "d.tar.gz")
    with pytest.raises(UserError, match=r"member d/dog/bad\.png\): cannot decode image"):
        load_source(str(tar), tmp_path / "root")


def test_wrong_size_and_resize(tmp_path: Path) -> None:
    (tmp_path / "d" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "cat" / "big.png").write_bytes(image_bytes("RGB", "PNG", (48, 40)))
    (tmp_path / "d" / "cat" / "ok.jpg").write_bytes(image_bytes("L", "JPEG"))
    with pytest.raises(UserError, match=r"big\.png: image is 48x40, not 32x32;.*data\.resize=true"):
        load_source(str(tmp_path / "d"), tmp_path / "root")
    data = load_source(str(tmp_path / "d"), tmp_path / "root", resize=True)
    assert data.train.images.shape == (2, 32, 32, 3)
    assert np.abs(data.train.images[0].astype(int) - RED).max() <= 1  # solid stays solid


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--data .*nope: no such file or folder; pass .*synthetic"):
        load_source(str(tmp_path / "nope"), tmp_path / "root")
    with pytest.raises(UserError, match="--data is empty"):
        load_source("  ", tmp_path / "root")
    garbage = tmp_path / "junk.tar.gz"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(UserError, match=r"junk\.tar\.gz: cannot read it as a \.tar/\.tar\.gz"):
        load_source(str(garbage), tmp_path / "root")
    write_tree(tmp_path / "d", TREE)
    whole = tar_folder(tmp_path / "d", tmp_path / "d.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut\.tar\.gz: cannot read it"):
        load_source(str(tmp_path / "cut.tar.gz"), tmp_path / "root")
    for spec in ("synthetic:5", "synthetic:abc", "synthetic:2.5", "synthetic:"):
        with pytest.raises(UserError, match="N must be a whole number from 10"):
            load_source(spec, tmp_path / "root")


# ----------------------------------------------------------------------------------- the cache


def test_cache_hit_rebuild_and_invalidation(tmp_path: Path, monkeypatch) -> None:
    write_tree(tmp_path / "d", TREE)
    root = tmp_path / "root"
    first = load_source(str(tmp_path / "d"), root)
    (cache,) = (root / "cache").glob("*.npz")

    def broken(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    with monkeypatch.context() as m:
        m.setattr(images, "_decode_chunk", broken)
        again = load_source(str(tmp_path / "d"), root)
    np.testing.assert_array_equal(again.train.images, first.train.images)
    np.testing.assert_array_equal(again.train.labels, first.train.labels)
    assert again.train.classes == first.train.classes and again.test is None

    cache.write_bytes(b"PK\x03\x04 not really a zip")  # corrupt: rebuilt
    check_tree(load_source(str(tmp_path / "d"), root).train)
    assert _read_cache(cache) is not None

    # A changed file is a new source: decoded again, the stale cache file is replaced.
    (tmp_path / "d" / "cat" / "x.png").write_bytes(image_bytes("L", "PNG"))
    changed = load_source(str(tmp_path / "d"), root)
    assert tuple(changed.train.images[3, 0, 0]) == (90, 90, 90)  # cat/x.png
    assert len(list((root / "cache").glob("*.npz"))) == 1


def test_unwritable_cache_is_skipped(tmp_path: Path) -> None:
    write_tree(tmp_path / "d", TREE)
    root = tmp_path / "root-is-a-file"
    root.write_text("")  # <root>/cache cannot be created
    check_tree(load_source(str(tmp_path / "d"), root).train)


@pytest.mark.parametrize("workers", [0, 2])
def test_chunked_decoding_matches(tmp_path: Path, monkeypatch, workers: int) -> None:
    """Many chunks, decoded in a process pool or in this process, give the same arrays."""
    write_tree(tmp_path / "d", {f"c{i}": [(f"{j}.png", "RGB", "PNG") for j in range(5)]
                                for i in range(3)})
    (tmp_path / "d" / "c1" / "2.png").write_bytes(image_bytes("L", "JPEG"))
    serial = load_source(str(tmp_path / "d"), tmp_path / "r1")
    monkeypatch.setattr(images, "_CHUNK", 2)
    monkeypatch.setattr(images, "_workers", lambda: workers)
    pooled = load_source(str(tmp_path / "d"), tmp_path / "r2")
    np.testing.assert_array_equal(pooled.train.images, serial.train.images)
    np.testing.assert_array_equal(pooled.train.labels, serial.train.labels)
    (tmp_path / "d" / "c2" / "4.png").write_bytes(b"broken")  # an error inside a worker
    with pytest.raises(UserError, match=r"c2/4\.png: cannot decode image"):
        load_source(str(tmp_path / "d"), tmp_path / "r2")


# ------------------------------------------------------------------------------------ synthetic


def test_synthetic_shapes_balance_determinism(tmp_path: Path) -> None:
    data = load_source("synthetic", tmp_path / "root")
    assert data.train.images.shape == (2000, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.train.labels.dtype == np.int64 and len(data.train.classes) == 10
    assert data.test is not None and data.test.images.shape == (400, 32, 32, 3)
    assert np.bincount(data.train.labels).tolist() == [200] * 10
    assert np.bincount(data.test.labels).tolist() == [40] * 10
    again = load_source("synthetic:2000", tmp_path / "root")
    np.testing.assert_array_equal(again.train.images, data.train.images)
    np.testing.assert_array_equal(again.test.images, data.test.images)
    assert not np.array_equal(data.train.images[:400], data.test.images)
    assert data.train.images.std() > 30  # patterns, not flat colour
    small = load_source("synthetic:25")
    assert len(small.train.labels) == 25 and len(small.test.labels) == 100
    assert np.bincount(small.train.labels).max() - np.bincount(small.train.labels).min() <= 1
    assert not (tmp_path / "root").exists()  # not cached


def test_synthetic_is_learnable() -> None:
    """Nearest class mean on translation-invariant features (|FFT| of grey) beats chance."""
    data = load_source("synthetic:1000")

    def features(images: np.ndarray) -> np.ndarray:
        grey = images.astype(np.float32).mean(-1)
        mag = np.abs(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True))).reshape(len(grey), -1)
        return mag / (np.linalg.norm(mag, axis=1, keepdims=True) + 1e-6)

    train, test = features(data.train.images), features(data.test.images)
    means = np.stack([train[data.train.labels == c].mean(0) for c in range(10)])
    pred = ((test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == data.test.labels).mean() > 0.6


# -------------------------------------------------------------------------------------- cifar10


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cifar10_offline_error(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{_closed_port()}/c.tar.gz")
    root = tmp_path / "root"
    with pytest.raises(UserError, match="downloading CIFAR-10 into") as e:
        load_source("cifar10", root)
    message = str(e.value)
    assert "--data /path/to/cifar-10-python.tar.gz" in message and str(root) in message
    assert "\n" not in message
    assert not root.exists()  # the failed download left no empty folder behind


def test_cifar10_existing_folder_needs_no_network(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{_closed_port()}/c.tar.gz")
    write_batches(tmp_path / "root" / "cifar-10-batches-py")
    check_cifar(load_source("CIFAR10", tmp_path / "root"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[int]:
    """A local HTTP server of `folder`'s files (no network); yields its port."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_cifar10_download_from_local_server(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import CIFAR10

    folder = write_batches(tmp_path / "served" / "cifar-10-batches-py")
    archive = tar_folder(folder, tmp_path / "served" / "cifar-10-python.tar.gz")
    with serve(archive.parent) as port:
        monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{port}/{archive.name}")
        monkeypatch.setattr(CIFAR10, "tgz_md5", _md5(archive))
        monkeypatch.setattr(CIFAR10, "train_list", [[n, _md5(folder / n)] for n, _ in
                                                    CIFAR10.train_list])
        monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
        root = tmp_path / "root"
        check_cifar(load_source("cifar10", root))
        assert (root / "cifar-10-batches-py" / "batches.meta").is_file()
        assert list((root / "cache").glob("cifar-10-batches-py-*.npz"))
        # A wrong checksum is a failed download, not a crash.
        monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)
        with pytest.raises(UserError, match="downloading CIFAR-10 into"):
            load_source("cifar10", tmp_path / "root2")


# ------------------------------------------------------------------------------------- cifar100

FINE = [f"fine{i}" for i in range(100)]
COARSE = [f"coarse{i}" for i in range(20)]


def write_cifar100(folder: Path, *, py2: bool = False, fine_test: list[int] | None = None,
                   ) -> Path:
    """A cifar-100-python folder in the official layout: train, test and meta pickles."""

    def dump(obj: dict) -> bytes:
        return b"\x80\x02" + py2_pickle(obj) + b"." if py2 else pickle.dumps(obj, protocol=2)

    folder.mkdir(parents=True)
    for i, name in enumerate(["train", "test"]):
        data, _ = _batch_rows(10 + i)
        fine = [(7 * k + i) % 100 for k in range(ROWS)]
        if name == "test" and fine_test is not None:
            fine = fine_test
        entry = {b"filenames": [b"x.png"] * ROWS, b"batch_label": name.encode(),
                 b"fine_labels": fine, b"coarse_labels": [f % 20 for f in fine], b"data": data}
        (folder / name).write_bytes(dump(entry))
    meta = {b"fine_label_names": [n.encode() for n in FINE],
            b"coarse_label_names": [n.encode() for n in COARSE]}
    (folder / "meta").write_bytes(dump(meta))
    return folder


def check_cifar100(data: SourceData, coarse: bool) -> None:
    names, count = (COARSE, 20) if coarse else (FINE, 100)
    assert data.train.classes == names and data.test is not None and data.test.classes == names
    assert data.train.images.shape == (ROWS, 32, 32, 3) and data.test.images.shape[0] == ROWS
    fine = [(7 * k) % 100 for k in range(ROWS)]
    assert data.train.labels.tolist() == [f % count for f in fine]
    raw, _ = _batch_rows(11)
    assert data.test.images[3, 4, 5, 2] == raw[3, 2048 + 4 * 32 + 5]


@pytest.mark.parametrize("py2", [False, True])
def test_cifar100_folder_and_tar_fine_and_coarse(tmp_path: Path, py2: bool) -> None:
    folder = write_cifar100(tmp_path / "cifar-100-python", py2=py2)
    archive = tar_folder(folder, tmp_path / "cifar-100-python.tar.gz")
    root = tmp_path / "root"
    for coarse in (False, True):  # one cache each: the second must not read the first's
        label_set = "coarse" if coarse else "fine"
        check_cifar100(load_source(str(folder), root, label_set=label_set), coarse)
        check_cifar100(load_source(str(tmp_path), root, label_set=label_set), coarse)
        check_cifar100(load_source(str(archive), root, label_set=label_set), coarse)
    # From the cache, both again.
    check_cifar100(load_source(str(archive), root), False)
    check_cifar100(load_source(str(archive), root, label_set="coarse"), True)


def test_coarse_labels_only_for_cifar100(tmp_path: Path) -> None:
    folder = write_batches(tmp_path / "cifar-10-batches-py")
    for spec in (str(folder), "synthetic:20"):
        with pytest.raises(UserError, match="label_set=coarse needs CIFAR-100"):
            load_source(spec, tmp_path / "root", label_set="coarse")


def test_cifar100_bad_files(tmp_path: Path) -> None:
    folder = write_cifar100(tmp_path / "c", fine_test=[3] * (ROWS - 1) + [100])
    with pytest.raises(UserError, match=r"test: label 100 out of range 0\.\.99 \(meta names 100"):
        load_source(str(folder), tmp_path / "root")
    (folder / "meta").unlink()
    with pytest.raises(UserError, match="meta missing; a cifar-100-python folder holds"):
        load_source(str(folder), tmp_path / "root")
    folder = write_cifar100(tmp_path / "cifar-100-python")
    (folder / "train").write_bytes(pickle.dumps({b"data": _Evil(tmp_path / "pwned")},
                                                protocol=2))
    with pytest.raises(UserError, match="train: refuses to load: .* not a CIFAR-100 batch file"):
        load_source(str(folder), tmp_path / "root")
    assert not (tmp_path / "pwned").exists()


def test_cifar100_download_from_local_server(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import CIFAR100

    assert CIFAR100.tgz_md5 == "eb9058c3a382ffc7106e4002c42a8d85"  # what a download checks
    assert CIFAR100.filename == "cifar-100-python.tar.gz"
    folder = write_cifar100(tmp_path / "served" / "cifar-100-python")
    archive = tar_folder(folder, tmp_path / "served" / "cifar-100-python.tar.gz")
    with serve(archive.parent) as port:
        monkeypatch.setattr(CIFAR100, "url", f"http://127.0.0.1:{port}/{archive.name}")
        monkeypatch.setattr(CIFAR100, "tgz_md5", _md5(archive))
        monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
        monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
        root = tmp_path / "root"
        check_cifar100(load_source("cifar100", root, label_set="coarse"), True)
        assert (root / "cifar-100-python" / "meta").is_file()
        check_cifar100(load_source("CIFAR100", root), False)  # no second download
        monkeypatch.setattr(CIFAR100, "tgz_md5", "0" * 32)
        with pytest.raises(UserError, match="downloading CIFAR-100 into .*cifar-100-python"):
            load_source("cifar100", tmp_path / "root2")
    assert not (tmp_path / "root2" / "cifar-100-python").exists()


def test_cifar100_offline_error(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "url", f"http://127.0.0.1:{_closed_port()}/c.tar.gz")
    with pytest.raises(UserError, match="--data /path/to/cifar-100-python.tar.gz"):
        load_source("cifar100", tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_cifar100_coarse_run_trains_and_evaluates_on_superclasses(tmp_path: Path, capsys
                                                                   ) -> None:
    from cifarlab.cli import main

    folder = write_cifar100(tmp_path / "cifar-100-python")
    args = ["train", "--data", str(folder), "--data-root", str(tmp_path / "root"), "--epochs",
            "1", "--workers", "0", "--set", "model.width=4", "--set", "data.label_set=coarse",
            "--out", str(tmp_path / "runs"), "--name", "coarse"]
    assert main(args) == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "coarse"
    result = json.loads((run / "result.json").read_text())
    assert result["classes"] == COARSE
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(folder), "--data-root",
                 str(tmp_path / "root"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == ROWS
