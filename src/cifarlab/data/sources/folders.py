"""Image folders and tar archives of them: the walk over a folder (hidden files left out),
one streaming pass over a `.tar`/`.tar.gz`, and the class layout (`<class>/<image>`,
optionally under `train/` and `test/`) in torchvision ImageFolder's order. A folder or
archive of CIFAR batch files is handed to `cifar`."""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifarlab.data.sources.cifar import (
    BATCH_FILES,
    CIFAR100_FILES,
    CIFAR100_FOLDER,
    _read_batches,
    _read_cifar100,
)
from cifarlab.data.sources.images import (
    _ACCEPTED,
    ImageSet,
    SourceData,
    _decode_all,
    _reason,
    read_regular_file,
)
from cifarlab.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _load_dir(path: Path, resize: bool, coarse: bool = False) -> SourceData:
    if (path / "batches.meta").is_file() or (path / "data_batch_1").is_file():
        files = {n: read_regular_file(path / n) for n in BATCH_FILES if (path / n).is_file()}
        return _read_batches(files, str(path))
    if path.name == CIFAR100_FOLDER or (path / "meta").is_file() or (path / "train").is_file():
        files = {n: read_regular_file(path / n) for n in CIFAR100_FILES if (path / n).is_file()}
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
    items = ((str(p), read_regular_file(p)) for p in files)
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


# ----------------------------------------------------------------------------- the class layout


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
