"""``python -m ditfast.info``: what ditfast can run on this machine, and why not where it can't.

Prints the versions, the devices, the backend families, the request in force (per op where an op
has its own variable, such as DITFAST_ATTENTION_BACKEND), and for every op the implementation the
next call runs for bf16 and fp32 inputs (the dispatcher's own resolution, ditfast/_backend.py,
request included), with every implementation's reasons against it. Compiled-extension kernels are
labelled by the device they run on: ``compiled C++ CPU`` / ``compiled CUDA``.
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
    """What the next call of ``op`` runs for inputs like ``spec``: the name ops resolve, labelled."""
    try:
        return _backend.label(op, _backend.resolve_name(op, _backend.current_request(op), spec), spec.device_type)
    except RuntimeError as exc:
        return f"error: {str(exc).splitlines()[0]}"


def _request_lines() -> list[str]:
    req = _backend.current_request()
    out = [f"requested backend: {req.name or 'automatic'} ({req.source})"]
    for op in _backend.ops():
        op_req = _backend.current_request(op)
        if op_req != req:  # an op's own variable (DITFAST_ATTENTION_BACKEND) overrides for that op
            out.append(f"  {op}: {op_req.name or 'automatic'} ({op_req.source})")
    return out


def report() -> str:
    out = _versions()
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    if "cuda" in devices:
        p = torch.cuda.get_device_properties(0)
        out.append(f"GPU: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        out.append("GPU: none visible to torch; ops run on CPU (reference, or the compiled extension)")
    out.append(f"ditfast._C build: {_ext.build_info()}")
    out.extend(_request_lines())
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
            out.append(f"  {op:<30} -> {picks:<40} [{', '.join(_backend.implemented(op))}]")
        for dtype in (torch.bfloat16, torch.float32):
            spec = _spec(dev, dtype)
            out.append(_backend.explain("joint_attention", spec, _backend.current_request("joint_attention")))
            out.append(f"  runs: {_choice('joint_attention', spec)}")
    out.append("")
    out.extend(patch_lines())
    return "\n".join(out)


def patch_lines() -> list[str]:
    """The diffusers blocks ``ditfast.patch`` runs, what they serve and what falls back."""
    from .integrations import diffusers as integration

    out = ["ditfast.patch runs these diffusers blocks (any other call: diffusers' own forward, warned once):"]
    for block in integration.SUPPORTED_BLOCKS:
        serves, falls_back = integration.FAMILIES.get(block, ("", ""))
        out.append(f"  {block:<28} {serves}; falls back for: {falls_back}")
    return out


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
