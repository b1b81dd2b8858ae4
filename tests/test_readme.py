"""Every ```python block of README.md runs as written, on CPU (or on the GPU when there is one).

Each block runs on its own, in a fresh namespace, in a subprocess-free ``exec``: a reader who copies one
block gets a program that runs. A block whose first line is

    # readme-test: skip (needs <what>)

is not run, and the test reports the reason: only blocks that need a real checkpoint from the Hub or
several processes may say so, and there are at most ``MAX_SKIPPED`` of them.
"""
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"#\s*readme-test:\s*skip\s*\((needs .+)\)\s*$")
ALLOWED_SKIPS = ("checkpoint", "process")  # a reason must name one of these
MAX_SKIPPED = 5


def python_blocks(text: str):
    """(line number, code) of each ```python block, indentation of list items removed."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```python\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, start, body = len(m.group(1)), i + 1, []
        i += 1
        while not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        blocks.append((start + 1, "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def _skip_reason(code: str):
    m = SKIP.match(code.lstrip().splitlines()[0]) if code.strip() else None
    return m.group(1) if m else None


def test_readme_has_python_blocks_and_few_skips():
    assert len(BLOCKS) >= 3
    reasons = [r for r in (_skip_reason(c) for _, c in BLOCKS) if r]
    assert len(reasons) <= MAX_SKIPPED, reasons
    for r in reasons:
        assert any(word in r for word in ALLOWED_SKIPS), f"not a reason to skip a README block: {r!r}"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code):
    reason = _skip_reason(code)
    if reason:
        pytest.skip(f"README.md:{line} {reason}")
    if "diffusers" in code:
        pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' deprecation notices and the like
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
