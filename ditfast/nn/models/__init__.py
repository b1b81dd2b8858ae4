"""Whole models assembled from ditfast.nn blocks, with upstream top-level parameter names so upstream
checkpoints load with ``strict=True`` (diffusers checkpoints: convert with :mod:`ditfast.convert`).

- :class:`DiT` (facebookresearch/DiT): ``dit_models["DiT-XL/2"]()`` or ``DiT.from_config("DiT-XL/2")``.
- :class:`MMDiT` (SD3 / SD3.5, Stability-AI ``mmditx.py``): configs "sd3-medium", "sd3.5-medium", "sd3.5-large".
- :class:`Flux` (FLUX.1, black-forest-labs): configs "flux-dev", "flux-schnell".

Build a full-size model without allocating it under ``with torch.device("meta"):``.
"""
from .dit import DIT_CONFIGS, DiT, dit_models
from .flux import FLUX_CONFIGS, Flux, flux_models
from .sd3 import MMDIT_CONFIGS, MMDiT, mmdit_models

__all__ = [
    "DiT",
    "dit_models",
    "DIT_CONFIGS",
    "MMDiT",
    "mmdit_models",
    "MMDIT_CONFIGS",
    "Flux",
    "flux_models",
    "FLUX_CONFIGS",
]
