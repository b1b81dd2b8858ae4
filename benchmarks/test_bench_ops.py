"""Op-level microbenchmarks (pytest-benchmark): each ditfast op against its reference, eager and
under torch.compile, and each forced backend, forward and forward + backward.

    pytest benchmarks/test_bench_ops.py --benchmark-only [--benchmark-json out.json]

On CPU the shapes are tiny and the numbers are a smoke, not a speed claim.
"""
import pytest
import torch

from ditfast.bench import cases as C
from ditfast.bench.level_ops import op_variants

from .conftest import ON_GPU, run_variant

ELT = 2 if ON_GPU else 4  # bf16 on a GPU, fp32 on CPU (the harness's defaults)
CASES = C.op_cases(ELT, tiny=not ON_GPU, quick=False, full=False)
VARIANTS = ["ditfast", "eager", "compile", "ditfast:triton", "ditfast:cuda", "liger"]


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}[{c.label}]")
def test_op(benchmark, bench_ctx, case, variant, direction):
    torch.manual_seed(0)
    run_variant(benchmark, bench_ctx, case, op_variants(case, bench_ctx), variant, direction)
