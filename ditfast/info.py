"""``python -m ditfast.info``: what ditfast can run on this machine, and why not where it can't.

Prints the versions, the devices, the backend families, and for every op the implementation the
dispatcher (ditfast/_backend.py) picks for bf16 and fp32 inputs, with every implementation's reasons
against it: the same resolution the ops run.
"""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, _backend, _ext, ops  # noqa: F401  (ops registers the implementations)
from .ops import cuda_impl

_WIDTH = 128  # the row width the report asks about (a head dim; any modulate width up to the limits)


def _versions() -> list[str]:
    lines = [f"ditfast {__version__}  python {platform.python_version()}  torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError as exc:
        lines.append(f"triton: not importable ({exc})")
    lines.append(f"CUDA runtime in torch: {torch.version.cuda}")
    return lines


def _table_line() -> str:
    """Whether a measured backend table steers the automatic choice on this GPU."""
    path = cuda_impl._table_path()
    try:
        block = cuda_impl.load_table(path).get(torch.cuda.get_device_name(0))
    except (OSError, ValueError) as exc:
        return f"measured backend table {path}: unreadable ({exc}); the fixed order applies"
    if not block:
        return f"measured backend table {path}: no entries for this GPU; the fixed order applies"
    return f"measured backend table {path}: {len(block.get('entries', []))} entries for this GPU"


def _spec(device: str, dtype: torch.dtype) -> _backend.Spec:
    if device == "cuda":
        index = torch.cuda.current_device()
        return _backend.Spec("cuda", dtype, _WIDTH, _backend.capability_of(index), index)
    return _backend.Spec(device, dtype, _WIDTH)


def _choice(op: str, spec: _backend.Spec) -> str:
    try:
        return _backend.resolve_name(op, _backend.current_request(op), spec)
    except RuntimeError as exc:
        return f"error: {str(exc).splitlines()[0]}"


def report() -> str:
    out = _versions()
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    if "cuda" in devices:
        p = torch.cuda.get_device_properties(0)
        out.append(f"GPU: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        out.append("GPU: none visible to torch; ops run on CPU (reference, or the compiled extension)")
    out.append(f"ditfast._C build: {_ext.build_info()}")
    req = _backend.current_request()
    out.append(f"requested backend: {req.name or 'automatic'} ({req.source})")
    for dev in devices:
        out.append("")
        out.append(f"backend families on {dev}:")
        for fam in _backend.FAMILIES:
            ok, why = _backend.availability(fam, dev)
            out.append(f"  {fam:<10} {'yes' if ok else 'no ':<4} {why}")
        if dev == "cuda":
            out.append(_table_line())
        out.append(f"ops on {dev} (the choice for bf16 / fp32 inputs of width {_WIDTH}; implementations):")
        for op in _backend.ops():
            picks = " / ".join(_choice(op, _spec(dev, dt)) for dt in (torch.bfloat16, torch.float32))
            out.append(f"  {op:<30} -> {picks:<24} [{', '.join(_backend.implemented(op))}]")
        for dtype in (torch.bfloat16, torch.float32):
            out.append(_backend.explain("joint_attention", _spec(dev, dtype)))
    return "\n".join(out)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
