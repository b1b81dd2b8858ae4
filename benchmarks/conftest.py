"""pytest-benchmark microbenchmarks of the ops and of attention: ``pytest benchmarks/ --benchmark-only``.

They reuse ditfast.bench's cases (real shapes on a GPU, tiny ones on CPU) and variants (ditfast,
the reference eager and compiled, each forced backend, SDPA's kernels, ...), so every name matches
the ``python -m ditfast.bench`` table. The project's test command never collects this folder
(pyproject's testpaths) and its addopts keep ``--benchmark-disable``; asking for ``--benchmark-only``
here turns timing back on. On a GPU each round is synchronized and preceded (untimed) by an L2 flush.
"""
from __future__ import annotations

import pytest
import torch

ON_GPU = torch.cuda.is_available()
ROUNDS, WARMUP = (50, 5) if ON_GPU else (10, 1)


def pytest_configure(config):
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True  # overrides the --benchmark-disable of pyproject's addopts


@pytest.fixture(scope="session")
def bench_ctx():
    from ditfast.bench.runner import Context, Options

    # quick=True on CPU: no torch.compile peers (minutes of compiling for a smoke)
    ctx = Context(Options(device="cuda" if ON_GPU else "cpu", quick=not ON_GPU))
    from ditfast.bench.peaks import measure_peaks

    ctx.peaks = measure_peaks(ctx.timer, ctx.dtype, quick=not ON_GPU)
    return ctx


def run_variant(benchmark, ctx, case, specs, name: str, direction: str) -> None:
    """Benchmark one variant of ``case`` (skips with the harness's reason when it cannot run)."""
    from ditfast.bench import cases as C
    from ditfast.bench.runner import callables

    spec = next((s for s in specs if s.name == name), None)
    if spec is None:
        pytest.skip(f"no variant {name!r} for this case")
    if spec.build is None:
        pytest.skip(spec.reason)
    built = spec.build()
    fwd, fwd_bwd = callables(built)
    fn = fwd if direction == "fwd" else fwd_bwd
    if direction == "fwd_bwd" and (spec.fwd_bwd_reason or not built.leaves):
        pytest.skip(spec.fwd_bwd_reason or "nothing to differentiate")
    try:
        fn()  # first call: compiles a torch.compile variant, surfaces "unsupported" errors early
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])

    def timed():
        fn()
        ctx.timer.sync()

    def setup():
        ctx.timer.flush()
        ctx.timer.sync()

    benchmark.group = f"{case.key} {direction}"
    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    if benchmark.stats is None:  # --benchmark-disable (the project's default): ran once, nothing timed
        return
    median_ms = benchmark.stats.stats.median * 1e3
    rate = C.rate(case.work.get(direction), median_ms, case.metric)
    benchmark.extra_info.update(metric=case.metric, work=case.work.get(direction), rate=rate,
                                device=ctx.device.type, dtype=str(ctx.dtype), smoke=ctx.smoke)
