"""The official CIFAR-10 and CIFAR-100 pickles: the batch and meta files of
`cifar-10-batches-py` and `cifar-100-python`, read with a restricted unpickler (the files
are untrusted) and checked, to images, labels and class names."""

from __future__ import annotations

import functools
import io
import pickle

import numpy as np

from cifarlab.data.sources.images import SIZE, ImageSet, SourceData, _reason
from cifarlab.errors import UserError

BATCH_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = ["train", "test", "meta"]


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
