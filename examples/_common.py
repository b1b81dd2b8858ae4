"""What the three examples share: the command line, the choice between a tiny random model and the
real checkpoint, timing on the device present, and the report.

Not part of ditfast: each example imports this file from its own folder (``python examples/flux.py``
puts ``examples/`` on ``sys.path``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def has_transformers() -> bool:
    """FLUX's and SD3's pipelines need the ``transformers`` package (their text encoders)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Setup:
    real: bool            # the real checkpoint (from_pretrained) rather than tiny random weights
    device: torch.device
    dtype: torch.dtype
    args: argparse.Namespace


def parse(description: str, *, model: str, steps: int, size: int) -> Setup:
    """The examples' common options; ``model``, ``steps`` and ``size`` are the real run's defaults."""
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--real", action="store_true",
                      help="load the real checkpoint with from_pretrained (the default when CUDA is present)")
    mode.add_argument("--tiny", action="store_true",
                      help="tiny random weights, no download (the default without CUDA)")
    p.add_argument("--model", default=model, help=f"Hub id or local folder for --real (default {model})")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default: {steps} real, 2 tiny)")
    p.add_argument("--size", type=int, default=None, help=f"image height = width (default: {size} real, tiny: small)")
    p.add_argument("--runs", type=int, default=None, help="timed calls before and after patching (default: 3 real, 1 tiny)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    real = args.real or (device.type == "cuda" and not args.tiny)
    if args.dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.steps = args.steps or (steps if real else 2)
    args.size = args.size or (size if real else None)
    args.runs = args.runs or (3 if real else 1)
    return Setup(real, device, dtype, args)


def to(module, device: torch.device, dtype: torch.dtype):
    """``module.to(device, dtype)``, passing the dtype only when it changes something (diffusers warns
    about any dtype given to ``to``)."""
    return module.to(device) if dtype == torch.float32 else module.to(device, dtype)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value of a sensible scale. diffusers initializes several layers
    (adaLN outputs, ``proj_out``) to zero, which would make a freshly built tiny model's output
    independent of most of its blocks, and so a comparison of patched and unpatched runs meaningless."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue  # e.g. DiT's fixed sin-cos position table
            r = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                value = r / p[0].numel() ** 0.5
            elif "norm" in name:
                value = 1 + 0.2 * r
            else:
                value = 0.2 * r
            p.copy_(value.to(p.dtype))
    return module


def timed(fn: Callable[[], torch.Tensor], device: torch.device, runs: int):
    """(output of the last call, seconds per call): one untimed warm-up call, then ``runs`` timed
    calls; CUDA events on a GPU, ``time.perf_counter`` on the CPU. The median is reported."""
    out = fn()  # warm-up: first-call costs (kernel compilation, caches, cuDNN autotuning) are not timed
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def report(what: str, setup: Setup, before, after) -> float:
    """Print the two timings, the speed-up and the largest difference of the outputs; returns the
    difference. ``before`` / ``after``: (output tensor, seconds) from :func:`timed`."""
    (out0, t0), (out1, t1) = before, after
    diff = (out0.float() - out1.float()).abs().max().item()
    scale = out0.float().abs().max().item()
    where = f"{setup.device.type}, {str(setup.dtype).replace('torch.', '')}"
    calls = "1 call" if setup.args.runs == 1 else f"the median of {setup.args.runs} calls"
    print(f"{what} ({where}; {calls} after a warm-up)")
    print(f"  diffusers:          {t0 * 1e3:10.1f} ms")
    print(f"  ditfast.patch:      {t1 * 1e3:10.1f} ms")
    print(f"  speed-up:           {t0 / t1:10.2f}x")
    print(f"  largest difference: {diff:10.3g}  (output values up to {scale:.3g})")
    if not setup.real:
        print("  (tiny random model: this shows that the example runs and that the outputs agree; "
              "its timing is no speed claim)")
    return diff
