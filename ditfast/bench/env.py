"""Where a result came from: device, library versions, git commit, date. Recorded in every JSON."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional, Tuple

import torch


def _dist_version(*names: str) -> Optional[str]:
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    import ditfast

    cudnn = None
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _dist_version("triton", "pytorch-triton"),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "ditfast": ditfast.__version__,
        "diffusers": _dist_version("diffusers"),
        "flash_attn": _dist_version("flash_attn", "flash-attn"),
        "liger_kernel": _dist_version("liger_kernel", "liger-kernel"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sm_count": p.multi_processor_count,
            "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        }
    return {"type": device.type, "name": _cpu_name(), "threads": torch.get_num_threads()}


def git_commit(start: Optional[Path] = None) -> Tuple[str, Optional[bool]]:
    """(commit sha, dirty) of the checkout ditfast runs from; ("unknown", None) outside a git checkout.

    ``DITFAST_BENCH_COMMIT`` overrides it (for a copy of the tree without its .git folder).
    """
    override = os.environ.get("DITFAST_BENCH_COMMIT")
    if override:
        return override, None
    root = start or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown", None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (folder names for results)."""
    s = re.sub(r"^nvidia\s+", "", text.strip().lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "device"
