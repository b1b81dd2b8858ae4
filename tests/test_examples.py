"""Each script in examples/ runs in its tiny CPU mode (``--tiny --device cpu``) as a user would run it, and
its patched output agrees with the unpatched one.

The scripts run in this process (``runpy``, with ``sys.argv`` and ``sys.path`` as ``python
examples/NAME.py`` sets them), so diffusers is imported once for all of them. Without ``transformers``
the FLUX and SD3 examples time the transformer alone, and say so; with it, the whole pipeline.
"""
import re
import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name, monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / f"{name}.py"), *args])
    monkeypatch.syspath_prepend(str(EXAMPLES))
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["flux", "sd3", "dit"])
def test_example_runs_tiny_on_cpu(name, monkeypatch, capsys):
    out = _run(name, monkeypatch, capsys, "--tiny", "--device", "cpu")
    for line in ("diffusers:", "ditfast.patch:", "speed-up:", "largest difference:", "tiny random"):
        assert line in out, out
    diff = float(re.search(r"largest difference:\s+(\S+)", out).group(1))
    assert diff < 1e-4, out  # fp32 on CPU: patched and unpatched agree to rounding


def test_every_example_is_tested():
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == {"flux", "sd3", "dit"}
