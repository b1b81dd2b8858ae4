"""ditfast.integrations: run third-party model implementations on ditfast, in place.

``patch(model)`` / ``unpatch(model)`` for diffusers' FLUX.1, SD3 / SD3.5 and DiT transformers (or a
pipeline holding one); see :mod:`ditfast.integrations.diffusers`. Importing this package does not
import diffusers: blocks are recognised by their class names.
"""
from .diffusers import SUPPORTED_BLOCKS, UnsupportedModelError, is_patched, patch, unpatch

__all__ = ["patch", "unpatch", "is_patched", "UnsupportedModelError", "SUPPORTED_BLOCKS"]
