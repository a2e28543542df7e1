"""The decode cache: each source read from disk is decoded once and kept as `.npz` under
`<root>/cache`, keyed by its path, the resize flag and CIFAR-100's label set, and checked
against a cheap fingerprint of its files (sizes and mtimes); written atomically, rebuilt
when damaged."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

from cifarlab.data.sources.folders import _walk
from cifarlab.data.sources.images import SIZE, ImageSet, SourceData

CACHE_VERSION = 1


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
