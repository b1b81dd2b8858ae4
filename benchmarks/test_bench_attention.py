"""Attention microbenchmarks (pytest-benchmark): ditfast.ops.joint_attention (automatic and each
forced backend), the reference eager and compiled, SDPA's kernels and flash-attn when installed,
at the shapes of REFERENCE.md (tiny ones on CPU: a smoke, not a speed claim).

    pytest benchmarks/test_bench_attention.py --benchmark-only
"""
import pytest
import torch

from ditfast.bench import cases as C
from ditfast.bench.level_ops import ATTENTION_BACKENDS, SDPA_KERNELS, attention_variants

from .conftest import ON_GPU, run_variant

CASES = C.attention_cases(tiny=not ON_GPU, quick=False, full=False)
VARIANTS = (["ditfast", "eager", "compile"] + [f"ditfast:{b}" for b in ATTENTION_BACKENDS]
            + [f"sdpa:{k}" for k in SDPA_KERNELS] + ["flash_attn", "flash_attn3", "flash_attn4"])


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_attention(benchmark, bench_ctx, case, variant, direction):
    torch.manual_seed(0)
    run_variant(benchmark, bench_ctx, case, attention_variants(case, bench_ctx), variant, direction)
