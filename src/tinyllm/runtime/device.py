"""Which device to run on (train, sample, serve, bench), at what precision, and whether the model fits on it.

Why it is shaped this way: the choices differ per device and each has a reason.
- bf16 autocast: on CUDA when the GPU supports bf16. On a CPU, having bf16 instructions is not
  enough: bf16 was 1.3-1.75x as fast as fp32 on a Zen 4 and ~6x (GEMMs) on a Xeon with AMX, but
  0.55-0.7x on a Xeon with AVX512_BF16 and no AMX (README, "Speed and quality"). So "auto" on a
  CPU with bf16 units times one GEMM both ways (~0.1 s) and picks bf16 only when it is clearly
  faster; without bf16 units bf16 is emulated, and "auto" stays in fp32 without measuring. MPS
  stays in fp32 under "auto" because bf16 support there depends on the macOS version.
- TF32 matmuls on CUDA: free speed for training at this scale, and loss curves are unaffected;
  but only when `train.dtype` is not "fp32" (a user who asks for fp32 gets it), and only while the
  trainer runs: `use_tf32` returns what puts the process's settings back.
- `torch.backends.cpu.get_cpu_capability()` reports only "AVX512", not the bf16 extension, so the
  CPU check reads the kernel's feature flags.
- On a CPU, glibc's habit of unmapping large freed blocks costs a page fault per 4 KB per step:
  `keep_freed_memory` turns it off (README, "Speed and quality"). It is process-wide and cannot be
  undone cleanly, so only entry points that own their process call it (`tinyllm train`, the
  bench children), never the library: a notebook that trains keeps its malloc as it was.
- A model too big for the device is a size the user chose, so `build_model` turns the allocator's
  error into one that names the knobs to turn, rather than a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator

import torch

from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT, GPTConfig


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; a named device that is missing is a UserError."""
    cuda, mps = torch.cuda.is_available(), _mps_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise UserError("train.device is cuda but torch sees no CUDA GPU: use --set train.device=auto")
    if name == "mps" and not mps:
        raise UserError("train.device is mps but this torch has no MPS support: use --set train.device=auto")
    return torch.device(name)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic units (Linux feature flags; elsewhere False)."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def has_bf16_units(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively; elsewhere bf16 is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def recorded_choice(device: torch.device, dtype: str, recorded: str) -> tuple[str, str | None]:
    """The `train.dtype` to decide with when a run recorded what "auto" chose (`train.auto_dtype`),
    and a line for the log when that choice is not kept: bf16 on a device without bf16 units (the
    run began on another machine), where emulated bf16 trained at half fp32's speed."""
    if dtype != "auto" or not recorded:
        return dtype, None
    if recorded == "bf16" and not has_bf16_units(device):
        return "auto", (f"this run chose bf16 where it started (train.auto_dtype), but this {device.type} "
                        f"has no bf16 units: training in fp32")
    return recorded, None


def autocast_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `train.dtype` on `device`; None means plain fp32."""
    if dtype == "fp32":
        return None
    if dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() and cpu_bf16_speedup() >= _BF16_MIN_SPEEDUP else None
    return None


# bf16 must beat fp32 by this much to be chosen: below it the measurement is within noise, and
# fp32 is the more accurate of two equals.
_BF16_MIN_SPEEDUP = 1.15


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a training-sized GEMM on this CPU (best of 3, interleaved)."""
    a32, b32 = torch.randn(2048, 256), torch.randn(256, 2048)  # [B*T, C] @ [C, 8C]: 2 GFLOP
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {"fp32": math.inf, "bf16": math.inf}
    for _ in range(4):
        for name, (a, b) in (("fp32", (a32, b32)), ("bf16", (a16, b16))):
            started = time.perf_counter()
            torch.mm(a, b)
            best[name] = min(best[name], time.perf_counter() - started)
    return best["fp32"] / best["bf16"]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes; a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_tf32(device: torch.device, dtype: str) -> Callable[[], None]:
    """TF32 matmuls on CUDA unless `dtype` (train.dtype) is "fp32"; returns what restores the settings."""
    if device.type != "cuda" or dtype == "fp32":
        return lambda: None
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    if matmul == "highest":  # "high" is TF32; a user's "medium" (bf16 passes) is left alone
        torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True

    def restore() -> None:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn

    return restore


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for the next step instead of returning it to the kernel.

    A training step allocates and frees the same large tensors every time (activations, their
    gradients, the loss's chunk buffers). glibc serves each allocation over 32 MB with its own
    mmap and unmaps it on free, so every step faults all of that memory in again (2.4 GB a step
    for the seed preset at micro-batch 16). With mmap off and the heap never trimmed, the second
    step on reuses the first one's pages: no faults, faster steps, about the same peak memory
    (README, "Speed and quality"). torch asks for 64-byte-aligned blocks, a little more
    than a freed block of the same size holds, so a block is reused once its neighbours coalesce:
    the heap settles within a few steps, then stays put.

    True when the setting took (Linux with glibc); jemalloc or tcmalloc preloaded keep memory
    their own way, and the setting is then harmless.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, say): nothing to set
        return False


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def compile_blocker(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device` here, or None: such a run trains without it."""
    if device.type == "mps":
        return "torch.compile does not support MPS well enough yet"
    if device.type == "cpu":  # inductor builds C++ kernels
        compilers = [os.environ.get("CXX") or "", "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "it needs a C++ compiler on a CPU (g++ or clang++; none found)"
    return None


def describe_precision(dtype: torch.dtype | None) -> str:
    return "bf16 autocast" if dtype is torch.bfloat16 else "fp32"


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block (sampling, evaluation) without moving the training RNG streams."""
    # The CPU stream always; the GPU's own stream too on CUDA (MPS sampling seeds its own generator).
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def build_model(cfg: GPTConfig, device: torch.device) -> GPT:
    """The model on `device`; a size the device cannot hold is the user's to fix, not a traceback."""
    try:
        return GPT(cfg).to(device)
    except (RuntimeError, MemoryError) as e:  # CPU: RuntimeError "can't allocate"; CUDA: OutOfMemoryError
        if not isinstance(e, MemoryError) and not re.search(r"allocate|out of memory", str(e), re.IGNORECASE):
            raise
        raise UserError(
            f"the model ({cfg.n_layer} layers x {cfg.n_embd} wide, block_size {cfg.block_size}, vocab_size "
            f"{cfg.vocab_size}) does not fit in {device.type} memory ({' '.join(str(e).split())[:160]}): "
            "make it smaller (model.n_layer, model.n_embd, model.block_size)"
        ) from None
