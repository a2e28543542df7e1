"""Checkpoint format: atomic saves and safe loads.

A checkpoint is a plain dict of tensors and built-in types, so it loads with
`weights_only=True` (no code can run when it is read):
    format, version    "cifarlab-checkpoint", 1
    model              state dict of the unwrapped model
    model_args         {"name", "num_classes", **arch_args}: `create_model`'s arguments
                       (plain types; older checkpoints hold {"name", "num_classes",
                       "width"}, which are a ResNet-18's arguments still)
    classes, mean, std what prediction needs: class names and the normalisation
    config             the run's resolved config (Config.to_dict())
    run_id             the id of the run folder it was written into (its `run_id` file)
    epoch, val_acc     the epoch (1-based) it was taken after, and its validation accuracy
    train_state        last.pt only: optimizer, scheduler, scaler, early stopping, RNG states,
                       and with EMA on its weights and update count ({"weights", "updates"})
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from cifarlab.errors import UserError
from cifarlab.models import create_model

FORMAT = "cifarlab-checkpoint"
VERSION = 1
TMP_SUFFIX = ".tmp"
# A run folder's id, written when the run starts; every checkpoint of the run carries it.
RUN_ID_FILE = "run_id"


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None],
                 check: Callable[[Path], None] | None = None) -> None:
    """Write a file so that `path` always holds either its old or its new contents:
    a temporary file in the same folder, flush and fsync, `check(temporary path)` (which
    raises when the file is not good), rename over, fsync the folder.
    On any error the temporary file is removed and the old file is left as it was."""
    path = Path(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file beside `path`, `.NAME.<random>.tmp`, open for writing. Created with mode
    0666 less the umask, as open() creates files (0644 under umask 022): mkstemp's 0600
    would stay with the file once renamed, and make every checkpoint, report and model
    private whatever the umask."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def new_run_id() -> str:
    return uuid.uuid4().hex


def read_run_id(folder: str | Path) -> str | None:
    """The id in a run folder's `run_id` file; None when there is none (runs from before
    run ids, or not a run folder)."""
    try:
        text = (Path(folder) / RUN_ID_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{Path(folder) / RUN_ID_FILE}: cannot read it ({e}); check the "
                        "file") from None
    return text or None


def write_run_id(folder: str | Path, run_id: str) -> None:
    write_atomic(Path(folder) / RUN_ID_FILE, lambda f: f.write(f"{run_id}\n".encode()))


def save_atomic(payload: dict[str, Any], path: str | Path) -> None:
    write_atomic(path, lambda f: torch.save(payload, f))


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete temporary files that a killed process left behind; return them."""
    leftovers = sorted(Path(folder).glob(f".*{TMP_SUFFIX}"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


# The files a run rewrites or appends to in its folder (train.py, report.py, prune.py), and
# the folder it writes TensorBoard's event files into.
RUN_FILES = ("config.yaml", "train.log", "metrics.csv", "last.pt", "best.pt", "result.json",
             RUN_ID_FILE, "prune.json", "report.md", "report.html", "curves.png",
             "confusion.png")
RUN_SUBFOLDERS = ("tensorboard",)


def check_not_a_run_file(path: str | Path, flag: str = "-o") -> None:
    """Refuse an output that would replace one of a run's own files (its checkpoints,
    settings, metrics, log or report) in a run folder (one with a run id): `export -o
    RUN/best.pt` would otherwise replace the trained model with an ONNX file."""
    path = Path(path)
    if path.name in RUN_FILES and (path.parent / RUN_ID_FILE).is_file():
        raise UserError(f"{flag} {path}: that is the run's own {path.name}, which this would "
                        "replace; choose another file name")


def check_run_files(folder: str | Path, names: tuple[str, ...] = RUN_FILES + RUN_SUBFOLDERS
                    ) -> None:
    """Refuse a run folder where one of `names` is a symbolic link, or a file the run writes
    is not a regular file. Appending follows a link (a run's log would go into a file
    elsewhere), a link's target would be read as the run's own checkpoint or settings, and a
    FIFO would block the run."""
    folder = Path(folder)
    for name in names:
        path = folder / name
        if path.is_symlink():
            problem = "a symbolic link"
        elif name in RUN_FILES and path.exists() and not path.is_file():
            problem = "not a regular file"
        else:
            continue
        raise UserError(f"{path}: {problem}, where the run keeps its own {name}; a run "
                        "folder's files must be regular files in it: replace it with the file "
                        "itself, or remove it")


def in_run_folder(path: str | Path) -> Path:
    """`path` itself, or for a run folder its best.pt (UserError when it has none)."""
    path = Path(path)
    if not path.is_dir():
        return path
    best = path / "best.pt"
    if not best.is_file():
        raise UserError(f"checkpoint {path}: a folder without best.pt; give a run folder that "
                        "has finished an epoch, or a checkpoint file (.pt)")
    return best


# The first bytes of files that are often passed by mistake.
_SIGNATURES = [
    (b"\x89PNG\r\n\x1a\n", "it starts like a PNG image"),
    (b"\xff\xd8\xff", "it starts like a JPEG image"),
    (b"GIF8", "it starts like a GIF image"),
    (b"%PDF", "it starts like a PDF document"),
    (b"\x1f\x8b", "it starts like a gzip file"),
    (b"\x93NUMPY", "it starts like a NumPy .npy file"),
    (b"\x89HDF", "it starts like an HDF5 file"),
]


def _sniff(path: Path) -> str | None:
    """Why the file cannot be a checkpoint, judged by its first bytes; None if it may be."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "empty file"
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return f"not a PyTorch checkpoint file ({kind})"
    if head.startswith(b"PK\x03\x04"):  # torch.save's format: a zip archive
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            return "truncated or damaged zip archive"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "a zip archive, but not a PyTorch checkpoint (no data.pkl inside)"
        return None
    if head.startswith(b"\x80"):  # a pickle: torch's legacy format
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        text = head[: e.start].decode("utf-8") if e.start > len(head) - 4 else None
    if text is not None and "\0" not in text:
        return "not a checkpoint (text file)"
    return "not a PyTorch checkpoint file (unrecognised contents)"


def load(path: str | Path) -> dict[str, Any]:
    """Read a cifarlab checkpoint with weights_only=True; UserError if it is not one."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path}: a folder, not a file; give a .pt file (or, to "
                        "evaluate or predict, a run folder holding best.pt)")
    if not path.is_file():
        raise UserError(f"checkpoint {path}: " + ("not a regular file (a FIFO, a socket or a "
                        "device); give the checkpoint file itself" if path.exists()
                        else "no such file"))
    try:
        reason = _sniff(path)
        ckpt = None if reason else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        reason = _reason(e)
    if reason:
        raise UserError(f"checkpoint {path}: not a readable cifarlab checkpoint: {reason}; "
                        "give a best.pt or last.pt written by cifarlab train")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"checkpoint {path}: not a cifarlab checkpoint (no '{FORMAT}' marker)")
    missing = {"model", "model_args", "classes", "mean", "std"} - set(ckpt)
    if missing:
        raise UserError(f"checkpoint {path}: incomplete, missing {sorted(missing)}")
    for name, tensor in ckpt["model"].items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(
            torch.isfinite(tensor).all()
        ):
            raise UserError(f"checkpoint {path}: weight '{name}' holds NaN or infinite values")
    return ckpt


def _reason(error: Exception) -> str:
    """The informative part of torch.load's error, in words: for a refused pickle, what it
    asked for. torch's advice to load with weights_only=False (running whatever code the
    file holds) is never passed on."""
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    text = str(error)
    wanted = re.search(r"GLOBAL ([\w.]+)", text)
    if wanted:
        return f"it asks to import {wanted.group(1)}, which a checkpoint never does; refused, " \
               "nothing in it was run"
    if isinstance(error, pickle.UnpicklingError) or "pickle" in type(error).__name__.lower():
        return "damaged or foreign pickle data"
    if "zip archive" in text or "PytorchStreamReader" in text:
        return "truncated or damaged zip archive"
    if isinstance(error, EOFError):
        return "the file ends too early (truncated)"
    return "damaged or foreign contents"


def build_model(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """The checkpoint's model with its weights, in eval mode, on the CPU."""
    args = ckpt["model_args"]
    if len(ckpt["classes"]) != args["num_classes"]:
        raise UserError(f"checkpoint {path}: {len(ckpt['classes'])} class names for "
                        f"{args['num_classes']} outputs")
    try:
        model = create_model(**args)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"checkpoint {path}: cannot build {args['name']} from its model "
                        f"arguments ({str(e).splitlines()[0]})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"checkpoint {path}: weights do not fit {args['name']} ({first})") from None
    return model.eval()


def tta_flip(ckpt: dict[str, Any]) -> bool:
    """Whether the checkpoint's run scored images with their mirror images (config.tta_flip)."""
    return bool(ckpt.get("config", {}).get("tta_flip", False))


def tta_translate(ckpt: dict[str, Any]) -> bool:
    """Whether the checkpoint's run also scored shifted copies (config.tta_translate)."""
    return bool(ckpt.get("config", {}).get("tta_translate", False))
