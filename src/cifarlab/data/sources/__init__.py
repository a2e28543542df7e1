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

The formats live one family to a module: `cifar` (the pickled CIFAR-10 and CIFAR-100
batches), `folders` (image folders and tar archives of them), `synthetic`, and `download`
(fetching CIFAR-10/100 with torchvision). `images` holds what they all yield (ImageSet,
SourceData) and the decode step they share, `cache` the decode cache. This module holds
`load_source`: it tells the forms apart and reads a source through the cache.
"""

from __future__ import annotations

from pathlib import Path

from cifarlab.data.sources.cache import _cache_path, _read_cache, _write_cache
from cifarlab.data.sources.cifar import CIFAR100_FOLDER
from cifarlab.data.sources.download import _download
from cifarlab.data.sources.folders import _load_archive, _load_dir
from cifarlab.data.sources.images import _ACCEPTED, SourceData
from cifarlab.data.sources.synthetic import _synthetic
from cifarlab.errors import UserError


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


def named_source(source: str) -> bool:
    """A data source named by a keyword (no path): cifar10, cifar100, synthetic[:N], or a
    test source's auto / none."""
    word = source.strip().lower()
    return word in ("cifar10", "cifar100", "synthetic", "auto", "none") or word.startswith(
        "synthetic:")
