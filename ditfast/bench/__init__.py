"""ditfast.bench: the benchmark suite (``python -m ditfast.bench``).

Levels: ``ops`` (the fused ops in GB/s), ``attention`` (TFLOP/s per backend), ``blocks`` (DiT / SD3 /
FLUX blocks), ``train`` (a DiT-XL/2 block stack's forward + backward and peak memory) and ``models``
(whole diffusers transformers, patched by ditfast or not). Every ditfast number stands next to the
alternatives measured in the same run (the reference eager and under torch.compile, diffusers, SDPA)
and next to the copy / matmul peaks measured in the same run. On CUDA the timer is
``triton.testing.do_bench``. Without a GPU it runs a CPU smoke at tiny shapes, labelled as such: it is
never a speed claim.

Modules: ``cases`` (shapes, bytes / FLOPs formulas), ``timing`` (timer, peaks, provenance),
``variants`` (what is measured per level), ``runner``, ``report`` (JSON, tables, README table, plot),
``cli``.
"""
from .cli import main

__all__ = ["main"]
