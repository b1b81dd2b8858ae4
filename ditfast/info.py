"""``python -m ditfast.info``: what ditfast can run on this machine, and why not where it can't.

Prints the versions, the devices, and for every op and backend whether it is available and the
backend the automatic choice would take; then the attention backends' table.
"""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, _backend, _ext, ops  # noqa: F401  (ops registers the implementations)


def _versions() -> list[str]:
    lines = [f"ditfast {__version__}  python {platform.python_version()}  torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError as exc:
        lines.append(f"triton: not importable ({exc})")
    lines.append(f"CUDA runtime in torch: {torch.version.cuda}")
    return lines


def _devices() -> list[str]:
    types = ["cpu"]
    if torch.cuda.is_available():
        types.insert(0, "cuda")
    return types


def _table_line() -> str:
    """Whether a measured backend table steers the automatic choice on this GPU."""
    from .ops import cuda_impl

    path = cuda_impl._table_path()
    try:
        block = cuda_impl.load_table(path).get(torch.cuda.get_device_name(0))
    except (OSError, ValueError) as exc:
        return f"measured backend table {path}: unreadable ({exc}); the fixed order applies"
    if not block:
        return f"measured backend table {path}: no entries for this GPU; the fixed order applies"
    return f"measured backend table {path}: {len(block.get('entries', []))} entries for this GPU"


def report() -> str:
    out = _versions()
    devs = _devices()
    if "cuda" in devs:
        p = torch.cuda.get_device_properties(0)
        out.append(f"GPU: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        out.append("GPU: none visible to torch; ops run on CPU (reference, or the compiled extension)")
    build = getattr(_ext, "build_info", lambda: None)()
    if build:
        out.append(f"ditfast._C build: {build}")
    out.append(f"requested backend: {_backend.requested_backend() or 'automatic'}  (DITFAST_BACKEND / ditfast.use_backend)")
    for dev in devs:
        out.append("")
        out.append(f"backends on {dev}:")
        for name in _backend.BACKENDS:
            ok, why = _backend.availability(name, dev)
            out.append(f"  {name:<10} {'yes' if ok else 'no ':<4} {why}")
        if dev == "cuda":
            out.append(_table_line())
        note = " where the table has no entry" if dev == "cuda" else ""
        out.append(f"ops on {dev} (automatic choice{note}; implemented by):")
        for op in _backend.ops():
            chosen = _backend.chosen_name(op, torch.device(dev)) if hasattr(_backend, "chosen_name") else "?"
            out.append(f"  {op:<30} -> {chosen:<10} [{', '.join(_backend.implemented(op))}]")
        report_fn = getattr(ops.attention, "backend_report", None)
        if report_fn is not None:
            out.append(f"attention backends on {dev}:")
            for name, ok, why in report_fn(dev):
                out.append(f"  {name:<15} {'yes' if ok else 'no ':<4} {why}")
    return "\n".join(out)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
