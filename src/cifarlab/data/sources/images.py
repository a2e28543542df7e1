"""What every source yields and the step they share: `ImageSet` / `SourceData` (uint8
32x32 RGB arrays, labels and class names), `decode_image` (one image file to RGB, with
PIL, imported lazily) and the chunked decode of a stream of image files, in a process pool
when it pays; also the message naming what --data accepts, which every source cites."""

from __future__ import annotations

import collections
import functools
import io
import multiprocessing
import os
import stat
import sys
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cifarlab.errors import UserError

if TYPE_CHECKING:  # PIL itself is imported where images are decoded
    from PIL.Image import Image as PILImage

SIZE = 32
# Memory per pixel while an image is decoded and converted: RGBA, its RGB copy, and the
# float64 grey of 16-bit images; refusing larger images beats a MemoryError halfway.
BYTES_PER_PIXEL = 24
# Formats PIL may use: decided by content, but never plugins that shell out (EPS -> Ghostscript).
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
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


def _reason(e: BaseException) -> str:
    text = " ".join(str(getattr(e, "reason", None) or e).split())  # URLError keeps it in .reason
    return text or type(e).__name__


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
        # Pillow's decompression-bomb warning is left out: check_pixels says it in one line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_formats())
        check_pixels(name, *im.size)  # from the header, before the pixels are decoded
        im.load()
        return _to_rgb(im)
    except UserError:
        raise
    except Exception as e:  # PIL fails on damaged files with many exception types
        if not data:
            reason = "empty file"
        elif isinstance(e, UnidentifiedImageError):
            reason = "not a PNG, JPEG or other image file"
        else:
            reason = _reason(e)
        raise UserError(f"{name}: cannot decode image ({reason}); replace or delete "
                        "the file") from None


def max_pixels() -> int:
    """The largest image decoded: Pillow's decompression-bomb threshold, or what this
    machine's free memory holds at BYTES_PER_PIXEL, whichever is smaller."""
    from PIL import Image

    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not a POSIX system: Pillow's threshold alone
        free = sys.maxsize
    bomb = Image.MAX_IMAGE_PIXELS or sys.maxsize  # None: the user switched Pillow's off
    return min(bomb, free // BYTES_PER_PIXEL)


def check_pixels(name: str, width: int, height: int) -> None:
    limit = max_pixels()
    if width * height > limit:
        raise UserError(f"{name}: image is {width}x{height} ({width * height:,} pixels), over "
                        f"the {limit:,} pixels this tool decodes on this machine; shrink it "
                        "first (the model sees 32x32)")


def read_regular_file(path: str | os.PathLike[str], kind: str = "file") -> bytes:
    """The bytes of a regular file; UserError for anything else (a FIFO would block the read
    forever, a device never end) or a file that cannot be read, naming `kind` and `path`."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then tells what it is.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UserError(f"{path}: no such {kind}; check the path") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e}); check the file") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path}: not a regular file (a folder, a FIFO or a device); give "
                            f"the {kind} itself")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e}); check the file") from None
    finally:
        os.close(fd)


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
