"""Timing, the peaks every number is compared with, and where a result came from.

On CUDA every time is ``triton.testing.do_bench`` (warm-up, an L2 flush before each call, CUDA
events, quantiles of the repetitions); launch-bound forwards also get
``triton.testing.do_bench_cudagraph``. On CPU (the smoke: a demonstration, never a speed claim) a
plain wall-clock median of a few calls. The peaks (device-to-device copy bandwidth, large-matmul
TFLOP/s) are measured with the same timer in the same run, not looked up in a spec sheet.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median first: the number reported
METHOD = {True: "triton.testing.do_bench: median of the repetitions, L2 flushed before each, CUDA events",
          False: "wall clock: median of a few calls (CPU smoke, not a speed claim)"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, *, quick: bool = False, graph: bool = False) -> dict:
    """{"ms" (median), "p20_ms", "p80_ms", "method"} of ``fn``; on CUDA ``graph`` replays a CUDA graph."""
    if device.type == "cuda":
        import triton.testing as tt

        warmup, rep = (10, 40) if quick else (25, 100)  # milliseconds, as do_bench counts them
        if graph:
            ms = tt.do_bench_cudagraph(fn, rep=rep, quantiles=list(QUANTILES))
        else:
            ms = tt.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
        method = "triton.testing.do_bench_cudagraph" if graph else "triton.testing.do_bench (L2 flushed)"
        return {"ms": ms[0], "p20_ms": ms[1], "p80_ms": ms[2], "method": method}
    times = []
    budget_s, reps = (0.05, 3) if quick else (0.3, 10)
    t_end = time.perf_counter() + budget_s
    while len(times) < reps and (len(times) < 1 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    s = sorted(times)
    return {"ms": statistics.median(s), "p20_ms": s[len(s) // 5], "p80_ms": s[(4 * len(s)) // 5],
            "method": f"wall clock, median of {len(s)}"}


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronized call (for a torch.compile variant: its compilation)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory of one call above what was allocated before it (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_peaks(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> dict:
    """Copy bandwidth (GB/s, read + write counted) and matmul TFLOP/s (bf16/fp16 on a GPU, fp32 on CPU)."""
    cuda = device.type == "cuda"
    nbytes = 2**30 if cuda else (16 if quick else 64) * 2**20
    src = torch.randint(0, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src), device, quick=quick)["ms"]
    del src, dst
    n = 8192 if cuda else (256 if quick else 512)
    mm_dtype = (dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16) if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=mm_dtype) for _ in range(2))
    t_mm = bench(lambda: a @ b, device, quick=quick)["ms"]
    name = str(mm_dtype).replace("torch.", "")
    return {"copy": {"gbps": 2 * nbytes / (t_copy * 1e-3) / 1e9, "ms": t_copy,
                     "what": f"device-to-device copy of {nbytes // 2**20} MiB (read + write counted)"},
            "matmul": {"tflops": 2.0 * n**3 / (t_mm * 1e-3) / 1e12, "ms": t_mm, "dtype": name,
                       "what": f"{n}x{n} @ {n}x{n} matmul in {name}"}}


# ----------------------------------------------------------------------------------------- provenance
def _version(*names: str) -> Optional[str]:
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    import ditfast

    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton", "pytorch-triton"), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "ditfast": ditfast.__version__, "diffusers": _version("diffusers"),
            "flash_attn": _version("flash_attn", "flash-attn"), "numpy": _version("numpy")}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1)}
    name = platform.processor() or platform.machine()
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"type": device.type, "name": name or "cpu", "threads": torch.get_num_threads()}


def git_commit() -> Tuple[str, Optional[bool]]:
    """(sha, dirty) of the checkout; DITFAST_BENCH_COMMIT overrides it (a copy of the tree without .git)."""
    if os.environ.get("DITFAST_BENCH_COMMIT"):
        return os.environ["DITFAST_BENCH_COMMIT"], None
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown", None
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                            capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(device: torch.device, dtype: torch.dtype) -> dict:
    """The "meta" block of every results file: device, versions, commit, date, dtype, mode."""
    commit, dirty = git_commit()
    return {"device": device_info(device), "versions": versions(), "commit": commit, "dirty": dirty,
            "date": utc_now(), "dtype": str(dtype).replace("torch.", ""),
            "mode": "gpu" if device.type == "cuda" else "cpu-smoke"}


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'h200' (the folder of a device's results)."""
    s = re.sub(r"[^a-z0-9]+", "-", re.sub(r"^nvidia\s+", "", text.strip().lower())).strip("-")
    return s or "device"
