"""Where training images come from: every source becomes uint8 NHWC arrays plus class names.

`load_source(spec, root)` accepts:

- ``"cifar10"``: CIFAR-10, downloaded into `root` with torchvision the first time; read from
  ``<root>/cifar-10-batches-py`` (no network) once that folder exists.
- ``"cifar100"``: CIFAR-100 the same way, from ``<root>/cifar-100-python``.
- A ``cifar-10-batches-py`` folder (or a folder holding one), or a ``cifar-10-python.tar.gz``:
  the official pickled batches, read with a restricted unpickler (the files are untrusted).
- A ``cifar-100-python`` folder (or a folder holding one), or a ``cifar-100-python.tar.gz``:
  its ``train``, ``test`` and ``meta`` pickles, read the same way; the labels are the 100
  fine classes, or with `label_set="coarse"` the 20 superclasses.
- An image folder, or a ``.tar``/``.tar.gz``/``.tgz`` of one: ``<class>/<image>`` at the top
  or under one top folder, optionally split as ``train/<class>/...`` and ``test/<class>/...``.
- ``"synthetic"`` / ``"synthetic:N"``: generated, learnable stripe/shape images, N for
  training (default 2000, at most 1,000,000) and max(N // 5, 100) for test; not cached.

Sources read from disk are decoded once and cached as ``.npz`` under ``<root>/cache``.
The keywords ``cifar10`` and ``synthetic`` win over a folder of that name; write ``./cifar10``
to mean the folder.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import re
import sys
import tarfile
import uuid
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cifarlab.errors import UserError

if TYPE_CHECKING:  # PIL itself is imported where images are decoded
    from PIL.Image import Image as PILImage

SIZE = 32
CACHE_VERSION = 1
SYNTHETIC_TRAIN = 2000
SYNTHETIC_CLASSES = [
    "hstripes_wide", "hstripes_narrow", "vstripes_wide", "vstripes_narrow", "grid",
    "crosshatch", "rings", "spokes", "disk", "circle",
]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Formats PIL may use: decided by content, but never plugins that shell out (EPS -> Ghostscript).
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
BATCH_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = ["train", "test", "meta"]
_CHUNK = 512  # images per decode task: big enough to amortise inter-process traffic
_ACCEPTED = (
    "pass a cifar-10-batches-py or cifar-100-python folder (or its .tar.gz), an image folder "
    "(or its .tar/.tar.gz), 'cifar10', 'cifar100' or 'synthetic[:N]'"
)


@dataclass
class ImageSet:
    images: np.ndarray  # uint8, (N, 32, 32, 3), RGB, C-contiguous
    labels: np.ndarray  # int64, (N,), values in [0, len(classes))
    classes: list[str]


@dataclass
class SourceData:
    train: ImageSet
    test: ImageSet | None  # None when the source holds no test split
    is_cifar100: bool = False  # the only source with a choice of labels (label_set)


def load_source(
    spec: str, root: str | Path = "data", *, resize: bool = False, label_set: str = "fine"
) -> SourceData:
    """Load the images that `spec` names (see the module docstring for the accepted forms).

    `root` holds downloads and the decode cache. Images that are not 32x32 are refused
    unless `resize` is true; then they are resized to exactly 32x32 with PIL's bicubic filter
    (aspect ratio not kept, no cropping). Alpha is dropped, as torchvision's ImageFolder does.
    Image-folder images come in ImageFolder order: by class rank, then by file name.
    `label_set`: CIFAR-100's "fine" (100) or "coarse" (20) classes; other sources have one.
    Raises UserError for anything wrong with the input.
    """
    text = str(spec).strip()
    word = text.lower()
    if not text:
        raise UserError(f"--data is empty; {_ACCEPTED}")
    coarse = label_set == "coarse"
    if word == "synthetic" or word.startswith("synthetic:"):
        return _not_coarse(_synthetic(text), coarse, text)
    root = Path(root).expanduser()
    if word == "cifar10":
        path = _download(root, "cifar10")
    elif word == "cifar100":
        path = _download(root, "cifar100")
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise UserError(f"--data {text}: no such file or folder; {_ACCEPTED}")
    path = path.resolve()
    if path.is_dir() and (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    elif path.is_dir() and (path / CIFAR100_FOLDER).is_dir():
        path = path / CIFAR100_FOLDER
    if not (path.is_dir() or path.is_file()):
        raise UserError(f"--data {text}: not a file or folder; {_ACCEPTED}")
    cache = _cache_path(path, root, resize, coarse)
    data = _read_cache(cache)
    if data is None:
        if path.is_dir():
            data = _load_dir(path, resize, coarse)
        else:
            data = _load_archive(path, resize, coarse)
        _write_cache(cache, data)
    return _not_coarse(data, coarse and not data.is_cifar100, text)


def _not_coarse(data: SourceData, coarse: bool, spec: str) -> SourceData:
    if coarse:
        raise UserError(f"--data {spec}: data.label_set=coarse needs CIFAR-100 (its 20 "
                        "superclasses); this source has one set of classes; e.g. --set "
                        "data.label_set=fine, or --data cifar100")
    return data


# ---------------------------------------------------------------------------- cifar10 download


def _download(root: Path, name: str) -> Path:
    """`<root>/cifar-10-batches-py` (name "cifar10") or `<root>/cifar-100-python`
    ("cifar100"), downloaded and checked with torchvision if absent."""
    # Imported here: torchvision is slow to import and only this path needs it.
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset = CIFAR10 if name == "cifar10" else CIFAR100
    title = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    folder = root / dataset.base_folder
    if folder.is_dir():
        return folder
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    # CIFAR10(root, download=True) would also unpickle every batch with plain pickle.load;
    # use its download step (same URL and checksums) and read with the restricted reader.
    created_root = not root.exists()
    try:
        download_and_extract_archive(dataset.url, str(root), filename=dataset.filename,
                                     md5=dataset.tgz_md5)
        bad = [n for n, md5 in dataset.train_list + dataset.test_list
               if not check_integrity(str(folder / n), md5)]
        if bad:
            raise RuntimeError(f"{', '.join(bad)} missing or corrupted after extraction")
    except (OSError, RuntimeError, ValueError, EOFError, tarfile.TarError, zlib.error) as e:
        if created_root and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # leave nothing behind a failed first download
        raise UserError(
            f"--data {name}: downloading {title} into {root} failed ({_reason(e)}); without "
            f"internet, pass --data /path/to/{dataset.filename} or a {dataset.base_folder} "
            f"folder, or put {dataset.filename} in {root}"
        ) from None
    return folder


def _reason(e: BaseException) -> str:
    text = " ".join(str(getattr(e, "reason", None) or e).split())  # URLError keeps it in .reason
    return text or type(e).__name__


# ----------------------------------------------------------------------------------- the cache


def _fingerprint(path: Path) -> list:
    """Cheap identity of a file or folder: (relpath, size, mtime_ns) of each entry."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    entries = []
    for rel, st in _walk(path):
        entries.append([rel, st.st_size if not rel.endswith("/") else -1, st.st_mtime_ns])
    return sorted(entries)


def _cache_path(path: Path, root: Path, resize: bool, coarse: bool = False) -> Path:
    # CIFAR-100's coarse labels are cached apart (other sources refuse them).
    key = [str(path), resize] + (["coarse"] if coarse else [])
    where = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8]
    what = hashlib.sha256(json.dumps([CACHE_VERSION, _fingerprint(path)]).encode())
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)[:40] or "data"
    return root / "cache" / f"{slug}-{where}-{what.hexdigest()[:16]}.npz"


def _read_cache(cache: Path) -> SourceData | None:
    """The cached data, or None when absent or unreadable (then it is rebuilt)."""
    try:
        with open(cache, "rb") as f, np.load(f, allow_pickle=False) as z:
            classes = [str(c) for c in z["classes"]]
            sets = [_checked_set(z[f"{s}_images"], z[f"{s}_labels"], classes)
                    if f"{s}_images" in z.files else None for s in ("train", "test")]
            is_cifar100 = bool(z["is_cifar100"]) if "is_cifar100" in z.files else False
    except Exception:  # any damage to a cache file just means: decode again
        return None
    return None if sets[0] is None else SourceData(sets[0], sets[1], is_cifar100)


def _checked_set(images: np.ndarray, labels: np.ndarray, classes: list[str]) -> ImageSet:
    n = len(labels)
    if (images.dtype != np.uint8 or images.shape != (n, SIZE, SIZE, 3)
            or labels.dtype != np.int64 or labels.shape != (n,)
            or (n and not 0 <= labels.min() <= labels.max() < len(classes))):
        raise ValueError("inconsistent cached arrays")
    return ImageSet(np.ascontiguousarray(images), labels, classes)


def _write_cache(cache: Path, data: SourceData) -> None:
    """Write atomically (temp file + rename); a cache that cannot be written is skipped."""
    arrays = {"classes": np.array(data.train.classes, dtype=str),
              "train_images": data.train.images, "train_labels": data.train.labels,
              "is_cifar100": np.array(data.is_cifar100)}
    if data.test is not None:
        arrays.update(test_images=data.test.images, test_labels=data.test.labels)
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)
        tmp = None
        # Older versions of the same source (same path and resize flag) are dead weight now.
        for old in cache.parent.glob(cache.name.rsplit("-", 1)[0] + "-*.npz"):
            if old != cache:
                old.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------ reading files and tars


def _hidden(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _walk(top: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relpath, stat) of every non-hidden entry below `top`; folders end with '/'."""

    def fail(e: OSError) -> None:
        raise e

    try:
        for folder, dirs, files in os.walk(top, onerror=fail):
            dirs[:] = [d for d in dirs if not _hidden([d])]
            rel = Path(folder).relative_to(top)
            for name in dirs:
                yield (rel / name).as_posix() + "/", os.stat(os.path.join(folder, name))
            for name in files:
                if not _hidden([name]):
                    yield (rel / name).as_posix(), os.stat(os.path.join(folder, name))
    except OSError as e:
        raise UserError(f"{e.filename or top}: cannot read ({e.strerror or e}); check the "
                        "file's permissions or remove it") from None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); check the file") from None


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _load_dir(path: Path, resize: bool, coarse: bool = False) -> SourceData:
    if (path / "batches.meta").is_file() or (path / "data_batch_1").is_file():
        return _read_batches({n: _read_file(path / n) for n in BATCH_FILES if (path / n).is_file()},
                             str(path))
    if path.name == CIFAR100_FOLDER or (path / "meta").is_file() or (path / "train").is_file():
        files = {n: _read_file(path / n) for n in CIFAR100_FILES if (path / n).is_file()}
        return _read_cifar100(files, str(path), coarse)
    tree = _Node()
    files = []
    for rel, _ in _walk(path):
        parts = rel.rstrip("/").split("/")
        if rel.endswith("/"):
            tree.add(parts, None)
        elif _is_image(rel):
            tree.add(parts, len(files))
            files.append(path / rel)
    splits = _layout(tree, str(path))  # check the layout before the slow part
    items = ((str(p), _read_file(p)) for p in files)
    return _assemble(splits, _decode_all(items, resize))


def _load_archive(path: Path, resize: bool, coarse: bool = False) -> SourceData:
    """Read a tar in one pass, in stream order (random access into a .tar.gz is slow)."""
    tree, batches, cifar100 = _Node(), {}, {}

    def images() -> Iterator[tuple[str, bytes]]:
        try:
            with tarfile.open(path, "r|*") as tar:
                for m in tar:
                    parts = [p for p in m.name.split("/") if p not in ("", ".")]
                    if m.name.startswith("/") or ".." in parts:
                        where = "an absolute path" if m.name.startswith("/") else "'..' in it"
                        raise UserError(f"--data {path}: member {m.name!r} has {where}, which "
                                        "could point outside the data set; pack the archive "
                                        "with paths relative to its top folder")
                    if not parts or _hidden(parts):
                        continue
                    if m.isdir():
                        tree.add(parts, None)
                    elif m.isfile() and parts[-1] in BATCH_FILES:
                        batches[parts[-1]] = tar.extractfile(m).read()
                    elif (m.isfile() and parts[-1] in CIFAR100_FILES and len(parts) > 1
                          and parts[-2] == CIFAR100_FOLDER):
                        cifar100[parts[-1]] = tar.extractfile(m).read()
                    elif m.isfile() and _is_image(parts[-1]):
                        tree.add(parts, tree.count)
                        yield f"{path} (member {m.name})", tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise UserError(f"--data {path}: cannot read it as a .tar/.tar.gz ({_reason(e)}); "
                            f"the file is damaged or of another kind; {_ACCEPTED}") from None

    pixels = _decode_all(images(), resize)
    if (batches or cifar100) and tree.count:
        raise UserError(f"{path}: holds both CIFAR batch files and images; pass an archive "
                        "with one or the other")
    if batches:
        return _read_batches(batches, str(path))
    if cifar100:
        return _read_cifar100(cifar100, f"{path}/{CIFAR100_FOLDER}", coarse)
    return _assemble(_layout(tree, str(path)), pixels)


# ------------------------------------------------------------------------------- CIFAR batches


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol 2 as codecs.encode(str, "latin1"); no other codec.
    if encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"refuses codec {encoding!r}")
    return text.encode("latin1")


class _Refused(pickle.UnpicklingError):
    pass


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers; refuses all other imports."""

    def find_class(self, module: str, name: str) -> object:
        reconstruct, frombuffer = _np_rebuilders()
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.numeric", "_frombuffer"): frombuffer,  # pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_encode,
            ("codecs", "encode"): _latin1_encode,
        }
        if (module, name) not in allowed:
            raise _Refused(f"it asks to import {module}.{name}")
        return allowed[module, name]


@functools.cache
def _np_rebuilders() -> tuple[object, object]:
    # The functions numpy itself pickles arrays with, taken from numpy rather than imported
    # by name: numpy 2 renamed numpy.core to numpy._core.
    a = np.zeros(1, np.uint8)
    return a.__reduce__()[0], a.__reduce_ex__(5)[0]


def _unpickle(data: bytes, name: str, title: str = "CIFAR-10") -> dict:
    """One pickled batch or meta dict; `title` ("CIFAR-10" or "CIFAR-100") for messages."""
    official = f"{title.lower()}-python.tar.gz"
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as e:
        raise UserError(f"{name}: refuses to load: {e}; this is not a {title} batch file "
                        f"(use the official {official})") from None
    except Exception as e:  # a damaged pickle fails in many ways; all mean a bad file
        raise UserError(f"{name}: not a readable {title} batch file ({type(e).__name__}: "
                        f"{_reason(e)}); use the official {official}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{name}: not a {title} batch file (holds a {type(obj).__name__}, "
                        f"not a dict); use the official {official}")
    # Python 2 wrote str keys; latin1 turns them into str, files written by Python 3 keep bytes.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batches(files: dict[str, bytes], where: str) -> SourceData:
    missing = [n for n in BATCH_FILES if n not in files]
    if missing:
        raise UserError(f"{where}: {', '.join(missing)} missing; a cifar-10-batches-py folder "
                        f"holds {', '.join(BATCH_FILES)}")
    classes = _class_names(files, "batches.meta", "label_names", where)
    return SourceData(_pixels_and_labels(files, BATCH_FILES[:5], where, classes, "labels"),
                      _pixels_and_labels(files, ["test_batch"], where, classes, "labels"))


def _read_cifar100(files: dict[str, bytes], where: str, coarse: bool) -> SourceData:
    """CIFAR-100's `train`, `test` and `meta` pickles; fine or coarse labels and names."""
    missing = [n for n in CIFAR100_FILES if n not in files]
    if missing:
        raise UserError(f"{where}: {', '.join(missing)} missing; a {CIFAR100_FOLDER} folder "
                        f"holds {', '.join(CIFAR100_FILES)}")
    kind = "coarse" if coarse else "fine"
    classes = _class_names(files, "meta", f"{kind}_label_names", where, "CIFAR-100")
    return SourceData(*(_pixels_and_labels(files, [n], where, classes, f"{kind}_labels",
                                           "meta", "CIFAR-100") for n in ("train", "test")),
                      is_cifar100=True)


def _class_names(files: dict[str, bytes], meta_name: str, key: str, where: str,
                 title: str = "CIFAR-10") -> list[str]:
    meta = _unpickle(files[meta_name], f"{where}/{meta_name}", title)
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise UserError(f"{where}/{meta_name}: no {key} list; use the official files")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _pixels_and_labels(files: dict[str, bytes], batch_names: list[str], where: str,
                       classes: list[str], label_key: str, meta_name: str = "batches.meta",
                       title: str = "CIFAR-10") -> ImageSet:
    """The images (NHWC) and labels (`label_key`) of some batch files, checked."""
    images, labels = [], []
    for n in batch_names:
        name = f"{where}/{n}"
        batch = _unpickle(files[n], name, title)
        data, lab = batch.get("data"), batch.get(label_key)
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                or data.shape[1] != 3 * SIZE * SIZE):
            raise UserError(f"{name}: 'data' is not a uint8 array of shape (N, 3072); "
                            "use the official files")
        try:
            lab = np.asarray(lab, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            lab = None
        if lab is None or lab.shape != (len(data),):
            raise UserError(f"{name}: '{label_key}' is not a list of {len(data)} integers; "
                            "use the official files")
        bad = lab[(lab < 0) | (lab >= len(classes))]
        if len(bad):
            raise UserError(f"{name}: label {bad[0]} out of range 0..{len(classes) - 1} "
                            f"({meta_name} names {len(classes)} classes); fix the labels")
        # Rows are R plane, G plane, B plane, each 32x32 row-major: to NHWC.
        images.append(data.reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1))
        labels.append(lab)
    return ImageSet(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels),
                    classes)


# -------------------------------------------------------------------------------- image folders


@dataclass
class _Node:
    """A folder of an image tree: subfolders and image files (name -> decode order)."""

    dirs: dict[str, _Node] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    count: int = 0  # images added below the root so far (only kept on the root)

    def add(self, parts: list[str], index: int | None) -> None:
        node = self
        for p in parts[:-1]:
            node = node.dirs.setdefault(p, _Node())
        if index is None:
            node.dirs.setdefault(parts[-1], _Node())
        else:
            node.files[parts[-1]] = index
            self.count += 1

    def images(self) -> Iterator[str]:
        yield from self.files
        for name, sub in self.dirs.items():
            yield from (f"{name}/{f}" for f in sub.images())


def _layout(tree: _Node, where: str) -> dict[str, tuple[list[str], list[int], list[int]]]:
    """Split name -> (classes, decode indices, labels), ordered like torchvision ImageFolder."""
    base, at = tree, where
    if not tree.files and len(tree.dirs) == 1:
        (name, top), = tree.dirs.items()
        if top.dirs and not top.files:  # one top folder that holds class (or train/test) folders
            base, at = top, f"{where}/{name}"
    if "train" in base.dirs and "test" in base.dirs:
        extra = sorted(set(base.dirs) - {"train", "test"}) + sorted(base.files)
        if extra:
            raise UserError(f"{at}/{extra[0]}: unexpected next to train/ and test/; move it "
                            "away or use only <class>/<image> folders")
        splits = {s: _classes(base.dirs[s], f"{at}/{s}") for s in ("train", "test")}
        if splits["train"][0] != splits["test"][0]:
            tr, te = set(splits["train"][0]), set(splits["test"][0])
            raise UserError(f"{at}: train and test have different class folders (only in "
                            f"train: {sorted(tr - te)}, only in test: {sorted(te - tr)}); give "
                            "both the same classes")
        return splits
    return {"train": _classes(base, at)}


def _classes(node: _Node, where: str) -> tuple[list[str], list[int], list[int]]:
    if node.files:
        raise UserError(f"{where}/{min(node.files)}: image outside a class folder; expected "
                        "<class>/<image> (e.g. cat/0001.png)")
    if not node.dirs:
        raise UserError(f"{where}: no class folders; expected <class>/<image> (e.g. "
                        f"cat/0001.png), optionally under train/ and test/; {_ACCEPTED}")
    classes = sorted(node.dirs)
    indices, labels = [], []
    for label, name in enumerate(classes):
        sub = node.dirs[name]
        nested = next((f"{d}/{f}" for d, n in sub.dirs.items() for f in n.images()), None)
        if nested:
            raise UserError(f"{where}/{name}/{nested}: image in a subfolder of a class folder; "
                            "expected <class>/<image>")
        if not sub.files:
            raise UserError(f"{where}/{name}: empty class folder (no images); add images or "
                            "remove the folder")
        for f in sorted(sub.files):
            indices.append(sub.files[f])
            labels.append(label)
    return classes, indices, labels


def _assemble(splits: dict, pixels: np.ndarray) -> SourceData:
    sets = {}
    for split, (classes, idx, lab) in splits.items():
        idx = np.asarray(idx, dtype=np.int64)
        # Archives usually list files in this order already: then skip a 150 MB gather.
        same = len(idx) == len(pixels) and np.array_equal(idx, np.arange(len(idx)))
        sets[split] = ImageSet(pixels if same else pixels[idx], np.asarray(lab, np.int64), classes)
    return SourceData(sets["train"], sets.get("test"))


@functools.cache
def _formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    return tuple(f for f in _PIL_FORMATS if f in Image.OPEN)


def decode_image(name: str, data: bytes) -> PILImage:
    """Decode one image file's bytes to RGB (alpha dropped, 16-bit grey scaled to 8 bits);
    UserError naming `name` if it is not a readable PNG, JPEG or other supported image."""
    from PIL import Image, UnidentifiedImageError

    try:
        # No `with`: the bytes are in memory, and closing the file would free the pixels.
        im = Image.open(io.BytesIO(data), formats=_formats())
        im.load()
        return _to_rgb(im)
    except Exception as e:  # PIL fails on damaged files with many exception types
        if not data:
            reason = "empty file"
        elif isinstance(e, UnidentifiedImageError):
            reason = "not a PNG, JPEG or other image file"
        else:
            reason = _reason(e)
        raise UserError(f"{name}: cannot decode image ({reason}); replace or delete "
                        "the file") from None


def _decode_chunk(items: list[tuple[str, bytes]], resize: bool) -> np.ndarray:
    """Decode images (display name, file bytes) to uint8 (n, 32, 32, 3); UserError if one fails."""
    from PIL import Image

    out = np.empty((len(items), SIZE, SIZE, 3), np.uint8)
    for i, (name, data) in enumerate(items):
        rgb = decode_image(name, data)
        if rgb.size != (SIZE, SIZE):
            if not resize:
                raise UserError(f"{name}: image is {rgb.size[0]}x{rgb.size[1]}, not 32x32; "
                                "resize it, or pass --set data.resize=true")
            rgb = rgb.resize((SIZE, SIZE), Image.BICUBIC)
        out[i] = np.asarray(rgb)
    return out


def _to_rgb(im):  # PIL.Image.Image; PIL is imported lazily
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # convert("RGB") clips these at 255; map 16-bit grey to 8 bits instead.
        a = np.asarray(im, dtype=np.float64)
        scale = 1.0 if im.mode == "F" else 257.0
        grey = np.clip(np.rint(a / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the direct P -> RGB path warns about transparency
    return im if im.mode == "RGB" else im.convert("RGB")


def _workers() -> int:
    # fork: workers start at once, without re-importing __main__ (spawn would import torch
    # again in each). Elsewhere (macOS, Windows) decode in this process.
    if not sys.platform.startswith("linux"):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cpus or 1, 8) if cpus and cpus > 1 else 0


def _batches(items: Iterable[tuple[str, bytes]]) -> Iterator[list[tuple[str, bytes]]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == _CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def _decode_all(items: Iterable[tuple[str, bytes]], resize: bool) -> np.ndarray:
    """Decode a stream of images in order, chunk by chunk, in a process pool when it pays."""
    results: list[np.ndarray] = []
    pending: collections.deque[Future] = collections.deque()
    pool: ProcessPoolExecutor | None = None
    workers, first = 0, None
    try:
        for i, chunk in enumerate(_batches(items)):
            if i == 0:  # held back: a set that fits in one chunk is decoded in this process
                first = chunk
                continue
            if i == 1:
                workers = _workers()
                if workers:
                    pool = ProcessPoolExecutor(workers,
                                               mp_context=multiprocessing.get_context("fork"))
                    pending.append(pool.submit(_decode_chunk, first, resize))
                else:
                    results.append(_decode_chunk(first, resize))
                first = None
            if pool is None:
                results.append(_decode_chunk(chunk, resize))
                continue
            pending.append(pool.submit(_decode_chunk, chunk, resize))
            while len(pending) > 4 * workers:  # bound the bytes held in flight
                results.append(pending.popleft().result())
        if first is not None:
            results.append(_decode_chunk(first, resize))
        results.extend(f.result() for f in pending)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if not results:
        return np.empty((0, SIZE, SIZE, 3), np.uint8)
    return np.concatenate(results)


# ------------------------------------------------------------------------------------ synthetic


def _synthetic(spec: str) -> SourceData:
    """`synthetic[:N]`: N training images (default 2000) and max(N // 5, 100) test images.

    Ten balanced classes of 32x32 patterns that a small CNN learns in a few epochs and that
    survive flips, small rotations, crops, colour jitter and erasing: horizontal / vertical
    stripes at two frequencies, an axis-aligned grid, a diagonal cross-hatch, concentric
    rings, radial spokes, a filled disk and a circle outline. Every class is symmetric under
    a horizontal flip, and colours are random per image (two random colours of different
    brightness, either one in front), so only the structure tells the classes apart.
    Per image: random phase, centre, frequency (+-10 %), size, colours and pixel noise.
    Deterministic: train uses seed 0, test seed 1.
    """
    _, colon, count = spec.partition(":")
    if colon:
        try:
            n = int(count.strip())
        except ValueError:
            n = -1
        if not 10 <= n <= 1_000_000:
            raise UserError(f"--data {spec}: N must be a whole number from 10 to 1000000 "
                            "(e.g. synthetic:2000)")
    else:
        n = SYNTHETIC_TRAIN
    train = ImageSet(*_synthetic_images(n, seed=0), list(SYNTHETIC_CLASSES))
    test = ImageSet(*_synthetic_images(max(n // 5, 100), seed=1), list(SYNTHETIC_CLASSES))
    return SourceData(train, test)


def _synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([0xC1FA, seed])
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    p = np.empty((n, SIZE, SIZE), np.float32)
    for c in range(10):
        sel = np.flatnonzero(labels == c)
        k = len(sel)

        def draw(low: float, high: float, k: int = k) -> np.ndarray:
            return rng.uniform(low, high, (k, 1, 1)).astype(np.float32)

        x, y = xx - draw(10, 22), yy - draw(10, 22)  # centred for rings, spokes and shapes
        phase, f = draw(0, 2 * np.pi), draw(0.9, 1.1) * (2 * np.pi / SIZE)  # f: one cycle
        p[sel] = _PATTERNS[c](x, y, phase, f, draw(6, 10))
    # Two colours: random hue, clearly different brightness, either one in front.
    dark = rng.uniform(20, 110, (n, 1)) + rng.uniform(-30, 30, (n, 3))
    light = dark + rng.uniform(90, 140, (n, 1)) + rng.uniform(-30, 30, (n, 3))
    swap = rng.random(n) < 0.5
    fg = np.where(swap[:, None], dark, light).astype(np.float32)[:, None, None, :]
    bg = np.where(swap[:, None], light, dark).astype(np.float32)[:, None, None, :]
    img = bg + (fg - bg) * p[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * 8
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def _wave(t: np.ndarray) -> np.ndarray:  # a sine mapped to [0, 1]
    return 0.5 + 0.5 * np.sin(t)


def _radius(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y)


# One per class of SYNTHETIC_CLASSES: (x, y, phase, f = one cycle per image, size) -> [0, 1].
_PATTERNS = [
    lambda x, y, ph, f, s: _wave(3 * f * y + ph),
    lambda x, y, ph, f, s: _wave(6 * f * y + ph),
    lambda x, y, ph, f, s: _wave(3 * f * x + ph),
    lambda x, y, ph, f, s: _wave(6 * f * x + ph),
    lambda x, y, ph, f, s: 0.5 * (_wave(4 * f * x + ph) + _wave(4 * f * y + 2 * ph)),
    lambda x, y, ph, f, s: 0.5 * (_wave(2.8 * f * (x + y) + ph) + _wave(2.8 * f * (x - y) - ph)),
    lambda x, y, ph, f, s: _wave(4 * f * _radius(x, y) + ph),
    lambda x, y, ph, f, s: _wave(6 * np.arctan2(y, x) + ph),
    lambda x, y, ph, f, s: np.clip(s - _radius(x, y) + 0.5, 0, 1),  # filled disk, soft edge
    lambda x, y, ph, f, s: np.clip(1.5 - np.abs(_radius(x, y) - s), 0, 1),  # ring ~3 px wide
]
