"""Timers: CUDA events on a GPU (warm-up, L2 flushed before every timed call, median of many), a
CUDA-graph replay timer for launch-bound shapes, peak-memory probes, and a wall-clock timer for the
CPU smoke (which is a demonstration, never a speed claim).

The number of timed repetitions adapts to the call's cost: a few calls estimate it, then as many
repetitions as fit in ``budget_s`` are taken, clamped to [min_reps, max_reps].
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Timing:
    """Summary of the timed repetitions of one call, in milliseconds."""

    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    method: str  # "cuda-events", "cuda-graph" or "wall-clock"

    def to_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_ms: List[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def summarize(times_ms: List[float], method: str) -> Timing:
    """Median, min and the 20th / 80th percentiles of a list of times."""
    if not times_ms:
        raise ValueError("no timings to summarize")
    s = sorted(times_ms)
    return Timing(statistics.median(s), s[0], _quantile(s, 0.2), _quantile(s, 0.8), len(s), method)


def choose_reps(est_ms: float, budget_s: float, min_reps: int, max_reps: int) -> int:
    """How many repetitions of a call estimated at ``est_ms`` fit in ``budget_s`` (clamped)."""
    if est_ms <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, (budget_s * 1e3) // est_ms)))


class Timer:
    """Times zero-argument callables on one device.

    CUDA: each timed call is bracketed by CUDA events recorded on the current stream, after a write
    of a buffer larger than L2 (so no call finds its inputs cached); the median is reported.
    CPU: wall clock around each call (CPU ops are synchronous), GC paused while timing.
    """

    def __init__(self, device: torch.device, *, warmup: int = 3, min_reps: int = 5, max_reps: int = 200,
                 budget_s: float = 0.4, flush_l2: bool = True):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.warmup, self.min_reps, self.max_reps, self.budget_s = warmup, min_reps, max_reps, budget_s
        self.method = "cuda-events" if self.is_cuda else "wall-clock"
        self._flush_buf = None
        self.flush_bytes = 0
        if self.is_cuda and flush_l2:
            props = torch.cuda.get_device_properties(self.device)
            l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
            self.flush_bytes = max(4 * l2, 256 * 2**20)
            self._flush_buf = torch.empty(self.flush_bytes, dtype=torch.int8, device=self.device)

    # ------------------------------------------------------------------------------------------ basics
    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        if self._flush_buf is not None:
            self._flush_buf.zero_()

    def describe(self) -> dict:
        return {
            "method": self.method,
            "warmup": self.warmup,
            "min_reps": self.min_reps,
            "max_reps": self.max_reps,
            "budget_s_per_measurement": self.budget_s,
            "statistic": "median",
            "l2_flush_bytes": self.flush_bytes,
        }

    def first_call_s(self, fn: Callable[[], object]) -> float:
        """Seconds for one synchronized call: for a torch.compile variant this is its compile time."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        del out
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------ timing
    def _estimate_ms(self, fn: Callable[[], object]) -> float:
        """Cost of one call: one call, then ten more if that one was short (a steadier estimate)."""
        calls, total = 0, 0.0
        for batch in (1, 10):
            self.sync()
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            self.sync()
            total += time.perf_counter() - t0
            calls += batch
            if total > 0.02 * self.budget_s:  # already a sizeable share of the budget
                break
        return total * 1e3 / calls

    def time(self, fn: Callable[[], object], *, flush: bool = True, method: Optional[str] = None,
             est_ms: Optional[float] = None) -> Timing:
        """Warm up, estimate, then time ``reps`` calls one by one; return their summary.

        ``est_ms``: a known cost of one call (e.g. a first call); if it is a sizeable share of the
        budget already, the estimating calls are skipped.
        """
        for _ in range(self.warmup):
            fn()
        if est_ms is None or est_ms < 0.02 * self.budget_s * 1e3:
            est_ms = self._estimate_ms(fn)
        reps = choose_reps(est_ms, self.budget_s, self.min_reps, self.max_reps)
        if self.is_cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for s, e in zip(starts, ends):
                if flush:
                    self.flush()
                s.record()
                fn()
                e.record()
            self.sync()
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            times = []
            gc_was_enabled = gc.isenabled()
            gc.disable()  # no collection inside a timed call (collecting first costs too much here)
            try:
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
            finally:
                if gc_was_enabled:
                    gc.enable()
        return summarize(times, method or self.method)

    def time_graph(self, fn: Callable[[], object]) -> Timing:
        """Capture ``fn`` (a forward without autograd) in a CUDA graph and time its replays.

        This removes the CPU launch overhead, which dominates small, launch-bound shapes.
        """
        if not self.is_cuda:
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.sync()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up on a side stream, as torch.cuda.graphs recommends
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        try:
            return self.time(graph.replay, method="cuda-graph")
        finally:
            del out, graph
            self.sync()

    # ------------------------------------------------------------------------------------------ memory
    def peak_memory_mb(self, fn: Callable[[], object]) -> Optional[float]:
        """Peak CUDA memory of one call above what was allocated before it (MiB); None on CPU."""
        if not self.is_cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        del out
        return (peak - base) / 2**20
