"""`cifar10` / `cifar100`: the official archive downloaded into `<root>` with torchvision
(imported lazily) the first time and its files checked against torchvision's MD5 sums;
once the folder is there, it is read as any other CIFAR folder, with no network."""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

from cifarlab.data.sources.images import _reason
from cifarlab.errors import UserError


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
