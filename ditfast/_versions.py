"""The torch / triton versions ditfast supports, checked once at import.

"Supported" means tested: CI runs the whole suite on ``TORCH_NEWEST_TESTED`` and a subset that covers
every op's forward and backward on every backend, the patch tests and the training tests on
``TORCH_OLDEST`` (``scripts/test_torch_versions.sh``). pyproject.toml declares the same lower bounds.

- torch older than ``TORCH_OLDEST`` fails at import, with a message naming the supported range: ditfast
  relies on ``torch.library.custom_op`` / ``register_autograd`` behaviour and DTensor APIs that older
  releases lack or implement differently.
- torch newer than ``TORCH_NEWEST_TESTED`` imports with a one-time warning: nothing known breaks, but no
  run has checked it.
- Triton is optional (CPU-only machines, macOS); when present, one older than ``TRITON_OLDEST`` makes
  the Triton backend unavailable with that reason (see ``ditfast.kernels.triton``), not the import.
"""
from __future__ import annotations

import re
import warnings

TORCH_OLDEST = (2, 11)
TORCH_NEWEST_TESTED = (2, 14)
TRITON_OLDEST = (3, 6)


def parse(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '2.14.1+cu130' or '2.15.0.dev20260101'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"cannot read a version number from {version!r}")
    return int(m.group(1)), int(m.group(2))


def _fmt(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def supported_range() -> str:
    return f"torch >= {_fmt(TORCH_OLDEST)} (tested {_fmt(TORCH_OLDEST)} to {_fmt(TORCH_NEWEST_TESTED)})"


def check_torch(version: str) -> None:
    """Raise ImportError for a torch older than supported; warn once for one newer than tested."""
    v = parse(version)
    if v < TORCH_OLDEST:
        raise ImportError(
            f"ditfast needs {supported_range()}, found torch {version}. "
            f"Upgrade with: pip install 'torch>={_fmt(TORCH_OLDEST)}'"
        )
    if v > TORCH_NEWEST_TESTED:
        warnings.warn(
            f"ditfast was tested with torch {_fmt(TORCH_OLDEST)} to {_fmt(TORCH_NEWEST_TESTED)}; torch {version} "
            "is newer and untested. Please report problems.",
            RuntimeWarning,
            stacklevel=3,
        )


def triton_unsupported_reason(version: str) -> str | None:
    """None if this Triton is supported, else why the Triton backend is off."""
    if parse(version) < TRITON_OLDEST:
        return f"triton {version} is older than the supported {_fmt(TRITON_OLDEST)}; pip install 'triton>={_fmt(TRITON_OLDEST)}'"
    return None
