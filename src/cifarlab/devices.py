"""Where and how a run computes: the device, the precision, the memory layout of the model
and its batches, and torch.compile.

On CUDA `amp auto` is fp16 autocast with a GradScaler. On the CPU the choice is measured:
oneDNN runs bfloat16 convolutions natively only on CPUs with AVX512_BF16 or AMX (where they
can be several times faster than float32); elsewhere bfloat16 is emulated and slower, so it
is refused when asked for, and `auto` keeps float32. Where it is native, `auto` times a few
training steps of the run's own model at its batch size in both precisions and takes
bfloat16 only when it is clearly faster (MIN_BF16_SPEEDUP). The measured speed-up is kept
per machine, model and batch (speed_cache.py), so that every run of the same command takes
the same precision and one seed gives one result; a resumed run keeps the precision it
started with (train.py). The choice and its reason are said at the start of the run and
written into its report.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import speed_cache
from cifarlab.errors import UserError

MIN_BF16_SPEEDUP = 1.15  # below this, float32's exact numerics win
TIMED_STEPS = 3  # per precision, after one warm-up step
MAX_TIMED_BATCH = 256  # the timing batch: the run's, capped so that timing stays short


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast dtype; None: float32
    reason: str  # why, in words, for the log and the report

    @property
    def name(self) -> str:
        return {None: "float32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_capability() -> str:
    """The CPU's vector extension as PyTorch dispatches to it (e.g. AVX2, AVX512)."""
    return torch.backends.cpu.get_cpu_capability()


def native_cpu_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (AVX512_BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of setting `amp`, or None for float32, without measuring: `auto`
    on the CPU is float32 here (see choose)."""
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]


def check_amp(amp: str, device: torch.device) -> None:
    """Refuse a precision this device cannot run well, before any work is done."""
    if device.type == "cpu" and amp == "bf16" and not native_cpu_bf16():
        raise UserError(f"--amp bf16: this CPU ({cpu_capability()}) has no native bfloat16 "
                        "in oneDNN (it needs AVX512_BF16 or AMX), so bfloat16 would run "
                        "emulated and slower than float32; use --amp auto or --amp off")


def choose(amp: str, device: torch.device, model: nn.Module, batch_size: int,
           layout: torch.memory_format, num_classes: int, started: str | None = None
           ) -> Precision:
    """The precision a run trains in, and why. `started`: the precision a resumed CPU run
    started with (Precision.name), which `auto` keeps where this CPU runs it natively."""
    check_amp(amp, device)
    if amp == "auto" and device.type == "cpu" and (
            started == "float32" or started == "bf16" and native_cpu_bf16()):
        kind = "float32" if started == "float32" else "bfloat16 autocast"
        return Precision(None if started == "float32" else torch.bfloat16,
                         f"{kind}: as the run started")
    if amp != "auto" or device.type == "cuda":
        dtype = resolve_amp(amp, device)
        how = "asked for" if amp != "auto" else "the CUDA default"
        kind = "float32" if dtype is None else f"{Precision(dtype, '').name} autocast"
        return Precision(dtype, f"{kind} ({how})")
    if not native_cpu_bf16():
        return Precision(None, f"float32: this CPU ({cpu_capability()}) has no native "
                               "bfloat16 in oneDNN")
    batch = min(batch_size, MAX_TIMED_BATCH)

    def measure() -> float:
        fp32, bf16 = (step_seconds(model, batch, layout, num_classes, dtype)
                      for dtype in (None, torch.bfloat16))
        return fp32 / bf16

    speedup, before = speed_cache.kept(speedup_key(model, batch, layout, num_classes), measure)
    when = (f" (measured before for this CPU, model and batch; kept in "
            f"{speed_cache.cache_dir() / 'speeds.json'})" if before else "")
    if speedup >= MIN_BF16_SPEEDUP:
        return Precision(torch.bfloat16, f"bfloat16 autocast: measured {speedup:.2f}x "
                                         f"float32's speed on this CPU's native bfloat16{when}")
    return Precision(None, f"float32: bfloat16 measured only {speedup:.2f}x float32's speed "
                           f"here (needs {MIN_BF16_SPEEDUP}x){when}")


def speedup_key(model: nn.Module, batch: int, layout: torch.memory_format,
                num_classes: int) -> str:
    """What bfloat16's speed-up over float32 depends on, as speed_cache's key: the CPU, torch
    and its threads, the model's layers and trainable shapes, the batch and the layout."""
    shapes = ",".join(f"{tuple(p.shape)}{'' if p.requires_grad else 'f'}"
                      for p in model.parameters())
    layers = hashlib.sha256(f"{model}|{shapes}".encode()).hexdigest()[:16]
    return (f"bf16/float32 step | {speed_cache.cpu_name()} | {cpu_capability()} | torch "
            f"{torch.__version__} | {torch.get_num_threads()} threads | oneDNN ISA "
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'all')} | "
            f"{type(model).__name__} {layers} | batch {batch} | "
            f"{'channels_last' if layout == torch.channels_last else 'nchw'} | "
            f"{num_classes} classes")


def step_seconds(model: nn.Module, batch_size: int, layout: torch.memory_format,
                 num_classes: int, dtype: torch.dtype | None) -> float:
    """Median seconds of a forward-backward-SGD step of a copy of `model` on random data,
    drawn without touching the global generator (the run's seed stays the run's)."""
    with torch.random.fork_rng(devices=[]):
        return _step_seconds(model, batch_size, layout, num_classes, dtype)


def _step_seconds(model: nn.Module, batch_size: int, layout: torch.memory_format,
                  num_classes: int, dtype: torch.dtype | None) -> float:
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, num_classes, (batch_size,))
    times = []
    for i in range(TIMED_STEPS + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:  # the first step allocates and picks kernels
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# oneDNN's largest vector block, in float32 channels: 8 with AVX2, 16 with AVX-512.
ONEDNN_MAX_BLOCK = 16


def channels_last_is_safe(model: nn.Module) -> bool:
    """Whether `model` can train in channels-last memory on a CPU.

    oneDNN's weight gradient of a 1x1 convolution with a stride above 1 (a ResNet shortcut)
    with channels-last input and fewer input channels than its vector block hangs, aborts or
    is silently wrong (uxlfoundation/oneDNN#6035; measured with AVX2 kernels on an AMD EPYC:
    9 % to 99 % relative error at 2, 4, 6 and 7 input channels, a hang or an abort at 3 and
    5; correct from 8 on, and on AVX-512 kernels). Narrow and pruned networks reach such
    channel counts; contiguous NCHW input takes other kernels, which are correct.
    """
    return not any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
        and m.in_channels // m.groups < ONEDNN_MAX_BLOCK
        for m in model.modules())


def memory_format(device: torch.device | str, model: nn.Module | None = None
                  ) -> torch.memory_format:
    """The layout of image batches and of `model` on `device`.

    CUDA: channels-last, which cuDNN's fastest kernels want. CPU: channels-last too where
    `channels_last_is_safe(model)` (measured 14-42 % faster than NCHW on 2 cores,
    BENCHMARKS.md), contiguous NCHW otherwise and where no model is given.
    """
    if torch.device(device).type == "cuda":
        return torch.channels_last
    safe = model is not None and channels_last_is_safe(model)
    return torch.channels_last if safe else torch.contiguous_format


def compiled(fn: Callable[..., Any], mode: str, device: torch.device | str) -> Callable[..., Any]:
    """A module or function under torch.compile in `mode` (settings_rules.COMPILE_MODES) for
    `device`, or itself for "off".

    "reduce-overhead" replays the compiled code as CUDA graphs, which removes the launch
    overhead that bounds a GPU on 32x32 images. Shapes are static: the last, smaller batch
    of an epoch compiles once more instead of making every graph shape-generic.
    A compiled module shares its parameters with the original, which stays the one that is
    evaluated and saved (its state_dict keys carry no compile prefix).

    On the CPU, inductor's layout optimisation would turn every convolution channels-last,
    straight into the oneDNN fault that `memory_format` avoids; it is switched off there,
    so that the compiled step keeps the layouts it is given (the options of `mode` plus that
    one: torch.compile takes a mode or options, not both).
    """
    if mode == "off":
        return fn
    if torch.device(device).type == "cpu":
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), "layout_optimization": False}
        return torch.compile(fn, options=options, dynamic=False)
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


def check_compile(mode: str, device: torch.device) -> None:
    """Refuse a compile mode that cannot work here, before any work is done: torch.compile
    generates Triton kernels for CUDA and C++ for the CPU."""
    if mode == "off":
        return
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError(f"--compile {mode}: torch.compile needs Triton on CUDA GPUs and it "
                            "is not installed; pip install triton, or use --compile off")
        return
    if mode == "reduce-overhead":
        raise UserError("--compile reduce-overhead replays CUDA graphs, which a CPU does not "
                        "have; on the CPU use --compile default (or max-autotune)")
    try:  # a private helper of inductor: without it, a missing compiler shows at compile time
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return
    try:
        get_cpp_compiler()
    except RuntimeError:
        raise UserError(f"--compile {mode}: torch.compile on the CPU needs a C++ compiler and "
                        "none was found; install g++ (or set CXX), or use --compile off"
                        ) from None
