"""Inference with an ExecuTorch program (`.pte`, from `cifarlab export --format executorch`):
ExecuTorch's Python runtime, its graph lowered to XNNPACK.

A `.pte` carries the export's metadata as JSON in a constant method, METADATA_METHOD (a
uint8 tensor of its UTF-8 bytes); its `forward` takes float32 RGB in [0, 1], NCHW, at most
MAX_BATCH images a call (ExecuTorch plans its memory for that bound), and gives the logits.
ExecuTorch's Python runtime links against torch, so unlike onnxruntime and OpenVINO it needs
torch installed; on a phone or a board the same file runs in ExecuTorch's C++ runtime.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.deploy import runtime
from cifarlab.errors import UserError, import_package

METADATA_METHOD = "cifarlab_metadata"
MAX_BATCH = 256
INSTALL = "pip install 'cifarlab[executorch]' (executorch>=1.5 runs with this torch)"
FIX = "give a file written by cifarlab export --format executorch"


@contextlib.contextmanager
def quiet_native_log() -> Iterator[None]:
    """ExecuTorch's C++ runtime logs to file descriptor 2 (CPU probing, load errors): held
    back while a program loads, so that a bad file is refused in one line."""
    import ctypes

    libc = ctypes.CDLL(None)
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 2)  # the runtime's log reaches both, by build
            yield
    finally:
        libc.fflush(None)  # what C's stdio still buffers goes to /dev/null too
        os.dup2(saved, 2)
        os.close(saved)


def load_runtime() -> Any:
    import_package("executorch", "executorch", "a .pte file", INSTALL)
    with quiet_native_log():
        try:
            from executorch.runtime import Runtime

            return Runtime.get()
        except ImportError as e:  # the wheel's native library does not match this torch
            raise UserError(f"ExecuTorch's runtime cannot load ({runtime._first_line(e)}); "
                            f"install an executorch built for this torch: {INSTALL}") from None


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    from executorch.extension.pybindings import portable_lib

    reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
    if reset is not None:
        reset(threads)


class ExecuTorchClassifier:
    """A `.pte` classifier: the interface of runtime.OnnxClassifier."""

    runtime_name = "executorch"

    def __init__(self, path: str | Path, threads: int | None = None,
                 name: str | None = None) -> None:
        import torch

        self.torch = torch
        self.path = Path(path)
        self.name = name or str(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file")
        et = load_runtime()
        with quiet_native_log():
            set_threads(threads)
            try:
                # the program reads its buffers from this memory: held as long as it runs
                self.data = self.path.read_bytes()
                program = self.program = et.load_program(self.data)
                names = set(program.method_names)
                if METADATA_METHOD not in names or "forward" not in names:
                    raise UserError(f"{self.name}: an ExecuTorch program without cifarlab's "
                                    f"metadata; {FIX}")
                raw = program.load_method(METADATA_METHOD).execute([])[0]
                self.method = program.load_method("forward")
            except UserError:
                raise
            except Exception as e:  # ExecuTorch raises RuntimeError with an error code
                raise UserError(f"{self.name}: not a readable ExecuTorch program "
                                f"({runtime._first_line(e)}); {FIX}") from None
        try:
            self.metadata = {str(k): str(v) for k, v in json.loads(
                bytes(raw.numpy().astype(np.uint8)).decode()).items()}
        except (ValueError, AttributeError, TypeError):
            raise UserError(f"{self.name}: its metadata is not JSON; {FIX}") from None
        self.values = runtime.check_metadata(self.name, self.metadata)
        self.classes: list[str] = self.values["classes"]
        quantized = self.values.get("quantization") is not None
        self.label = f"executorch xnnpack {'int8' if quantized else 'fp32'}"

    def meta(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch in [0, 1] (MAX_BATCH images a call at most)."""
        if len(x) > MAX_BATCH:
            return np.concatenate([self.run(x[i : i + MAX_BATCH])
                                   for i in range(0, len(x), MAX_BATCH)])
        try:
            with quiet_native_log():
                out = self.method.execute([self.torch.from_numpy(np.ascontiguousarray(x))])[0]
        except Exception as e:  # ExecuTorch raises RuntimeError with an error code
            raise UserError(f"{self.name}: ExecuTorch could not run it "
                            f"({runtime._first_line(e)}); {FIX}") from None
        return runtime.check_output(self.name, out.numpy().astype(np.float32, copy=False),
                                    len(x), len(self.classes))

    def logits(self, images: np.ndarray, batch: int = MAX_BATCH) -> np.ndarray:
        return runtime.batched_logits(self.run, images, len(self.classes),
                                      min(batch, MAX_BATCH))
