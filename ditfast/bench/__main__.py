"""``python -m ditfast.bench``: see ditfast/bench/cli.py (``--help``)."""
import os
import sys


def _with_interpreter() -> None:
    """Without a GPU, run the Triton kernels under the interpreter (TRITON_INTERPRET=1) so the smoke
    shows them working. The variable must be set before triton is imported; if ditfast already
    imported it, restart this command once with the variable set."""
    if "TRITON_INTERPRET" in os.environ:
        return
    import importlib.util

    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        os.execv(sys.executable, [sys.executable, "-m", "ditfast.bench", *sys.argv[1:]])


def _quiet_without_cuda() -> None:
    """On a machine without a GPU, torch.compile's C++ backend imports torch.utils.cpp_extension, which logs
    "No CUDA runtime is found, using CUDA_HOME=..." -- true, and no news in a CPU smoke: silenced."""
    import logging

    import torch

    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


if __name__ == "__main__":
    _with_interpreter()
    _quiet_without_cuda()
    from ditfast.bench.cli import main

    sys.exit(main())
