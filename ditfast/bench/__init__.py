"""ditfast.bench: the benchmark suite (``python -m ditfast.bench``).

Levels: ``ops`` (the fused ops in GB/s), ``attention`` (TFLOP/s per backend), ``blocks`` (DiT / SD3 /
FLUX blocks), ``train`` (a DiT-XL/2 block stack's forward + backward and peak memory) and ``models``
(whole diffusers transformers, patched by ditfast or not). Every ditfast number stands next to the
alternatives measured in the same run (the reference eager and under torch.compile, diffusers, SDPA's
kernels, flash-attn / Liger-Kernel when installed) and next to the peaks measured in the same run.
Without a GPU it runs a CPU smoke at tiny shapes, labelled as such: it is never a speed claim.

Modules: ``cases`` (shapes, bytes / FLOPs formulas), ``timing`` (CUDA-event and wall-clock timers),
``peaks`` (copy bandwidth, matmul TFLOP/s), ``level_*`` (the variants of each level), ``runner``,
``report`` (table, JSON, README table), ``plots``, ``cli``.
"""
from .cli import main

__all__ = ["main"]
