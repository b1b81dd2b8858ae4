"""Runs the plan: for each case, each variant's forward (under no_grad), forward + backward (autograd.grad
of its inputs and parameters), a CUDA-graph replay for launch-bound shapes, peak memory and, for
torch.compile variants, the compile time; then the speedup of ditfast over every alternative.
A failure is recorded against its variant, never fatal. The JSON is rewritten (atomically) after every
case, so a run cut short keeps what it measured; ``--time-limit`` stops new measurements, and what it
cut is recorded as skipped.

A sticky CUDA error (an illegal address, a launch failure: the process's CUDA context is dead) is detected
after any exception by probing ``torch.cuda.synchronize()``: the variant is recorded as the culprit, the
run stops with ``meta.aborted`` = {op, backend, shape, error} written, and the command exits with status 3
(``python -m ditfast.bench --resume`` continues in a fresh process, keeping the cases already measured).
``$DITFAST_GPU_RUN_EXCLUDE`` ("op:backend,...", set by benchmarks/gpu_run.sh) skips the variants that
would run an excluded backend for that op (for blocks and models: any variant whose backend label names it).
"""
from __future__ import annotations

import fnmatch
import gc
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from . import cases as C
from . import report, timing
from .report import add_speedups  # noqa: F401  (runner -> report, never back)
from .variants import Built, VariantSpec, skipped

SCHEMA = "ditfast-bench/2"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Options:
    levels: tuple = C.LEVELS
    device: str = "auto"
    dtype: Optional[str] = None  # default: bf16 on a GPU, fp32 on CPU
    quick: bool = False
    compile: Optional[bool] = None  # None: on, except in a CPU --quick smoke
    graph: bool = True
    backends: Optional[List[str]] = None  # forced ditfast backends to measure; None: all
    filter: Optional[str] = None
    time_limit: Optional[float] = None
    argv: List[str] = field(default_factory=list)
    resume: Optional[dict] = None  # an earlier (aborted) results dict of the same run: its complete cases are kept


class Context:
    """What the variant builders need: device, dtype, switches, the peaks."""

    def __init__(self, opts: Options):
        dev = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        self.device = torch.device(dev)
        self.is_cuda = self.device.type == "cuda"
        self.smoke = not self.is_cuda  # a CPU run is a demonstration, never a speed claim
        self.dtype = DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if self.is_cuda else torch.float32)
        self.quick, self.backends, self.graph = opts.quick, opts.backends, opts.graph and self.is_cuda
        self.peaks: dict = {}
        self.aborted: Optional[dict] = None  # set when the CUDA context died (a sticky error)
        self.exclude = parse_exclude(os.environ.get(EXCLUDE_ENV))
        if opts.compile is False:
            self.compile_off = "off (--no-compile)"
        elif opts.compile is None and self.smoke and opts.quick:
            self.compile_off = "off in a CPU --quick smoke (compiling dominates it); --compile turns it on"
        elif self.is_cuda and importlib_missing("triton"):
            self.compile_off = "torch.compile on CUDA needs triton"
        else:
            self.compile_off = None
        # a CPU smoke compiles ops and attention only: blocks and models take minutes to compile there
        self.compile_small_only = opts.compile is None and self.smoke

    def compile_spec(self, name: str, case: C.Case, build: Callable[[], Built], **kw) -> VariantSpec:
        why = self.compile_off
        if why is None and self.compile_small_only and case.level not in ("ops", "attention"):
            why = "off for blocks and models in the CPU smoke (minutes of compiling); --compile turns it on"
        return skipped(name, "peer", why) if why else VariantSpec(name, "peer", build, compiled=True, **kw)


EXCLUDE_ENV = "DITFAST_GPU_RUN_EXCLUDE"
EXIT_CONTEXT_LOST = 3


def parse_exclude(text: Optional[str]) -> List[tuple]:
    """"joint_attention:triton,norm_modulate:*" -> [("joint_attention", "triton"), ("norm_modulate", "*")]."""
    out = []
    for item in (text or "").replace(";", ",").split(","):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) >= 2 and parts[0] and parts[1]:
            out.append((parts[0], parts[1]))
    return out


def excluded_by(rules: List[tuple], case: "C.Case", spec: VariantSpec) -> Optional[str]:
    """The rule ("op:backend") that excludes ``spec`` of ``case``, or None. At the ops and attention levels a
    rule matches the case's op and the variant's backend; for blocks and models (many ops), any rule whose
    backend the variant's backend label names (the automatic row's "triton+compiled | attn triton")."""
    if not rules or spec.kind == "peer" or not spec.backend:
        return None
    tokens = set(re.split(r"[^A-Za-z0-9_]+", str(spec.backend))) | {str(spec.backend)}
    for op, backend in rules:
        hit = any(fnmatch.fnmatch(t, backend) for t in tokens)
        if hit and (case.level not in ("ops", "attention") or fnmatch.fnmatch(case.name, op)):
            return f"{op}:{backend}"
    return None


def context_error(ctx: "Context") -> Optional[str]:
    """Why the CUDA context can run no more work (None: it can, or the run is not on CUDA)."""
    if not ctx.is_cuda:
        return None
    try:
        torch.cuda.synchronize(ctx.device)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure here: the context is gone
        return f"{type(exc).__name__}: {str(exc).strip()[:300]}"


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def classify(exc: BaseException) -> tuple:
    """(status, reason) of an exception raised while building or running a variant."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {text}"[:400]
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "error", "out of memory: " + text[:300]
    unsupported = ("ditfast backend", "No available kernel", "not supported", "is not available", "not implemented for",
                   "cannot run")
    if isinstance(exc, (ImportError, NotImplementedError)) or any(s in text for s in unsupported):
        return "skipped", reason
    return "error", reason


def _free(collect: bool = False) -> None:
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a dead context re-raises its sticky error here: probed by the caller
            pass


def _flat(out) -> List[torch.Tensor]:
    """The tensors of a (possibly nested) output that autograd can differentiate."""
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def callables(built: Built):
    """(forward under no_grad, forward + backward with fixed random output gradients, nothing accumulated)."""
    def fwd():
        with torch.no_grad():
            return built.forward()

    grads: list = []

    def fwd_bwd():
        outs = _flat(built.forward())
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        return torch.autograd.grad(outs, built.leaves, grads, allow_unused=True)

    return fwd, fwd_bwd


def _measure(ctx: Context, fn, case: C.Case, direction: str) -> dict:
    first = timing.first_call_s(fn, ctx.device)  # a torch.compile variant compiles here
    rec = timing.bench(fn, ctx.device, quick=ctx.quick)
    rec["first_call_s"] = first
    rec["peak_mem_mb"] = timing.peak_memory_mb(fn, ctx.device)
    rec["rate"] = C.rate((case.work or {}).get(direction), rec["ms"], case.metric)
    peak = report.peak_for(ctx.peaks, case.metric) if ctx.is_cuda else None  # CPU: cache-resident, meaningless
    rec["pct_peak"] = 100.0 * rec["rate"] / peak if rec["rate"] and peak else None
    return rec


def measure_variant(ctx: Context, case: C.Case, spec: VariantSpec, deadline: Optional[float]) -> dict:
    rec = {"name": spec.name, "kind": spec.kind, "backend": spec.backend, "compiled": spec.compiled, "status": "skipped",
           "reason": spec.reason, "fwd": None, "fwd_bwd": None, "graph": None, "compile_s": None, "speedup": {}, "notes": []}
    if spec.build is None:
        return rec
    rule = excluded_by(ctx.exclude, case, spec)
    if rule or ctx.aborted:
        rec["reason"] = (f"excluded ({rule}): a sticky CUDA error earlier in this GPU run" if rule else
                         "not run: the CUDA context was lost earlier in this process")
        return rec
    if deadline is not None and time.monotonic() > deadline:
        rec["reason"] = "time limit reached (--time-limit)"
        return rec
    try:
        built = spec.build()
        rec["notes"] += built.notes
        fwd, fwd_bwd = callables(built)
        rec["fwd"] = _measure(ctx, fwd, case, "fwd")
        rec["status"], rec["reason"] = "ok", None
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded reason
        rec["status"], rec["reason"] = classify(exc)
        _lost(ctx, case, spec, rec)
        _free(collect=True)
        return rec
    try:
        if case.graph and ctx.graph and not spec.compiled:
            try:
                rec["graph"] = timing.bench(fwd, ctx.device, quick=ctx.quick, graph=True)
            except Exception as exc:  # noqa: BLE001
                rec["graph"] = {"ms": None, "reason": classify(exc)[1]}
        why = spec.fwd_only or (None if built.leaves else "nothing to differentiate")
        if why is None and deadline is not None and time.monotonic() > deadline:
            why = "time limit reached (--time-limit)"
        if why is None and ctx.smoke and ctx.quick and spec.backend == "triton":
            why = "Triton interpreter: forward only in a --quick smoke"
        if why:
            rec["fwd_bwd"] = {"ms": None, "reason": why}
        else:
            try:
                rec["fwd_bwd"] = _measure(ctx, fwd_bwd, case, "fwd_bwd")
            except Exception as exc:  # noqa: BLE001
                rec["fwd_bwd"] = {"ms": None, "reason": classify(exc)[1]}
                _lost(ctx, case, spec, rec, rec["fwd_bwd"])
        if spec.compiled:
            rec["compile_s"] = {d: rec[d]["first_call_s"] for d in ("fwd", "fwd_bwd") if (rec[d] or {}).get("ms")}
    finally:
        del built
        _free()
    return rec


def _lost(ctx: Context, case: C.Case, spec: VariantSpec, rec: dict, where: Optional[dict] = None) -> None:
    """After an exception: if the CUDA context is dead, name this variant the culprit."""
    dead = context_error(ctx)
    if dead and not ctx.aborted:
        ctx.aborted = {"op": case.name, "backend": spec.backend or spec.name, "shape": case.label, "case": case.key,
                       "variant": spec.name, "error": dead}
        target = where if where is not None else rec
        target["reason"] = f"CUDA context lost here (sticky error; the culprit): {target.get('reason')}"[:600]


def variants_for(case: C.Case, ctx: Context) -> List[VariantSpec]:
    from . import variants as V

    make = {"ops": V.op_variants, "attention": V.attention_variants, "blocks": V.block_variants,
            "train": V.block_variants, "models": V.model_variants}[case.level]
    return make(case, ctx)


def case_record(case: C.Case, dtype: torch.dtype) -> dict:
    return {"level": case.level, "case": case.name, "label": case.label, "key": case.key, "dims": case.dims,
            "dtype": str(dtype).replace("torch.", ""), "metric": case.metric, "target": case.target,
            "graph": case.graph, "work": None, "variants": [], "fastest": {}, "notes": [], "elapsed_s": 0.0}


def run_case(ctx: Context, case: C.Case, deadline: Optional[float]) -> dict:
    t0 = time.monotonic()
    rec = case_record(case, ctx.dtype)
    torch.manual_seed(0)
    try:
        specs = variants_for(case, ctx)
    except Exception as exc:  # noqa: BLE001 - e.g. the inputs do not fit in memory
        rec["notes"].append(f"case setup failed: {classify(exc)[1]}")
        specs = []
    rec["variants"] = [measure_variant(ctx, case, s, deadline) for s in specs]
    rec["work"] = dict(case.work) if case.work else None
    add_speedups(rec)
    if any(s.compiled for s in specs):
        torch._dynamo.reset()  # drop the compiled graphs (their memory) between cases
    del specs
    _free(collect=ctx.is_cuda)
    rec["elapsed_s"] = time.monotonic() - t0
    return rec


def case_summary(rec: dict) -> str:
    by = {v["name"]: v for v in rec["variants"]}
    d = by.get("ditfast")
    if not d or not d.get("fwd"):
        return f"ditfast {d['status'] + ': ' + str(d['reason']) if d else 'missing'} ({rec['elapsed_s']:.1f} s)"
    parts = [f"ditfast {d['fwd']['ms']:.4g} ms"] + [f"{s:.2f}x vs {n}" for n in ("eager", "compile", "diffusers", "sdpa")
                                                    if (s := by.get(n, {}).get("speedup", {}).get("fwd"))]
    return ", ".join(parts) + f" ({rec['elapsed_s']:.1f} s)"


def run(opts: Options, *, out_json: Optional[str] = None, stream=None) -> dict:
    """Run the benchmark; returns the results dict (and keeps ``out_json`` up to date). Progress goes to
    ``stream`` (stderr): one line per finished case. The CPU smoke runs single-threaded (tiny shapes)."""
    ctx = Context(opts)
    stream = stream or sys.stderr
    threads = torch.get_num_threads()
    if ctx.smoke:
        torch.set_num_threads(1)
    try:
        import torch._dynamo.config as dcfg  # many shapes per compiled function: no fallback to eager

        dcfg.recompile_limit = max(256, getattr(dcfg, "recompile_limit", 8))
        levels = tuple(dict.fromkeys(opts.levels))  # the order asked for (gpu_run.sh puts models first in a tier)
        elt = torch.empty((), dtype=ctx.dtype).element_size()
        plan = C.plan(levels, elt, tiny=ctx.smoke, quick=opts.quick)
        if opts.filter:
            plan = [c for c in plan if opts.filter.lower() in c.key.lower()]
        meta = timing.provenance(ctx.device, ctx.dtype)
        meta.update(shapes="tiny" if ctx.smoke else ("quick" if opts.quick else "default"), levels=list(levels),
                    argv=list(opts.argv), time_limit_s=opts.time_limit,
                    compile=ctx.compile_off or "on (torch.compile, dynamic=False; first-call time reported)",
                    timing=timing.METHOD[ctx.device.type == "cuda"],
                    note=report.SMOKE_NOTE if ctx.smoke else report.GPU_NOTE)
        results = {"schema": SCHEMA, "meta": meta, "peaks": {}, "results": [], "targets": []}
        t0 = time.monotonic()
        done = {}
        if opts.resume:  # a fresh process after a lost CUDA context: keep the complete cases, drop the culprit's
            lost = (opts.resume.get("meta") or {}).get("aborted") or {}
            done = {c["key"]: c for c in opts.resume.get("results", []) if c["key"] != lost.get("case") and c["variants"]}
            meta["aborted_runs"] = list((opts.resume.get("meta") or {}).get("aborted_runs") or []) + ([lost] if lost else [])
        if ctx.exclude:
            meta["excluded"] = [f"{o}:{b}" for o, b in ctx.exclude]
        ctx.peaks = results["peaks"] = (opts.resume or {}).get("peaks") or timing.measure_peaks(ctx.device, ctx.dtype, quick=opts.quick)
        deadline = None if opts.time_limit is None else t0 + opts.time_limit
        for i, case in enumerate(plan):
            if case.key in done:
                rec = done[case.key]
            elif ctx.aborted:
                rec = case_record(case, ctx.dtype)
                rec["notes"].append("skipped: the CUDA context was lost earlier in this process (rerun with --resume)")
            elif deadline is not None and time.monotonic() > deadline:
                rec = case_record(case, ctx.dtype)
                rec["notes"].append("skipped: time limit reached (--time-limit)")
            else:
                rec = run_case(ctx, case, deadline)
            results["results"].append(rec)
            if ctx.aborted:
                results["meta"]["aborted"] = ctx.aborted
            results["targets"] = report.compute_targets(results)
            results["meta"]["elapsed_s"] = time.monotonic() - t0
            if out_json:
                report.write_json(results, out_json)
            summary = case_summary(rec) if rec["variants"] else rec["notes"][0]
            stream.write(f"[{i + 1}/{len(plan)}] {case.key}: {summary}\n")
            stream.flush()
        if out_json and not plan:
            report.write_json(results, out_json)
        return results
    finally:
        torch.set_num_threads(threads)
