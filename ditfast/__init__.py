"""ditfast: fused kernels and drop-in blocks for Diffusion Transformers (DiT, SD3 / SD3.5, FLUX.1).

Layers: ``ditfast.ops`` (functional API with backend dispatch), ``ditfast.reference`` (plain-PyTorch
ground truth), ``ditfast.nn`` (blocks with upstream parameter names). Importing ditfast never touches
the GPU, and works without Triton or the compiled extension. A torch older than the supported range
(``ditfast._versions``) fails here, with a message naming the range.
"""
import torch as _torch

from . import _versions

_versions.check_torch(_torch.__version__)

from . import ops, reference  # noqa: E402
from ._backend import BACKENDS, use_backend  # noqa: E402
from .integrations import is_patched, patch, unpatch

__version__ = "0.1.0"


def __getattr__(name):  # keep `import ditfast` light: nn pulls in more modules
    if name in ("nn", "parallel"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'ditfast' has no attribute {name!r}")


__all__ = ["ops", "reference", "nn", "use_backend", "BACKENDS", "patch", "unpatch", "is_patched", "__version__"]
