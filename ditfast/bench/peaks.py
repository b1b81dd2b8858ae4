"""The two peaks every number is compared with, measured in the same run on the same device:
the bandwidth of a large device-to-device copy (GB/s, read + write counted) and the throughput of
a large matmul (TFLOP/s; bf16 on a GPU). They are measured, not looked up in a spec sheet.
"""
from __future__ import annotations

import torch

from .timing import Timer


def copy_sizes(is_cuda: bool, quick: bool) -> int:
    """Bytes of the copied buffer: 1 GiB on a GPU (far beyond L2), small on CPU."""
    if is_cuda:
        return 2**30
    return 16 * 2**20 if quick else 64 * 2**20


def matmul_size(is_cuda: bool, quick: bool) -> int:
    if is_cuda:
        return 8192
    return 256 if quick else 512


def matmul_dtype(is_cuda: bool, run_dtype: torch.dtype) -> torch.dtype:
    """bf16 (or the run's fp16) on a GPU; fp32 on CPU, where bf16 matmuls are not a fair peak."""
    if not is_cuda:
        return torch.float32
    return run_dtype if run_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def measure_peaks(timer: Timer, run_dtype: torch.dtype, *, quick: bool = False) -> dict:
    device = timer.device
    nbytes = copy_sizes(timer.is_cuda, quick)
    src = torch.randint(0, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    t_copy = timer.time(lambda: dst.copy_(src), flush=False)  # the buffer is larger than L2 already
    moved = 2 * nbytes  # read src + write dst
    del src, dst

    n = matmul_size(timer.is_cuda, quick)
    dt = matmul_dtype(timer.is_cuda, run_dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    t_mm = timer.time(lambda: a @ b, flush=False)
    flops = 2.0 * n * n * n
    del a, b
    return {
        "copy": {
            "gbps": moved / (t_copy.median_ms * 1e-3) / 1e9,
            "bytes_moved": moved,
            "ms": t_copy.median_ms,
            "what": f"device-to-device copy of {nbytes / 2**20:.0f} MiB (read + write counted)",
        },
        "matmul": {
            "tflops": flops / (t_mm.median_ms * 1e-3) / 1e12,
            "flops": flops,
            "ms": t_mm.median_ms,
            "dtype": str(dt).replace("torch.", ""),
            "what": f"{n}x{n} @ {n}x{n} matmul in {str(dt).replace('torch.', '')}",
        },
    }
