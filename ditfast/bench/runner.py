"""Runs the plan: for each case, each variant's forward (inference, no_grad), forward + backward,
CUDA-graph replay (launch-bound shapes), peak memory and compile time; then the speedups of
ditfast over every alternative. Failures are recorded per variant, never fatal. The results JSON is
rewritten after every case, so a run cut short still leaves its numbers behind.
"""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import cases as C
from . import env, report
from .peaks import measure_peaks
from .timing import Timer
from .variants import (
    Built,
    VariantSpec,
    attention_choice,
    auto_backends,
    backend_availability,
    compile_unavailable,
    flat_tensors,
    raise_recompile_limit,
    reset_compiled,
)

SCHEMA = "ditfast-bench/1"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
LEVEL_WEIGHTS = {"ops": 2.0, "attention": 1.5, "blocks": 3.0, "train": 1.5, "models": 2.0}


@dataclass
class Options:
    levels: tuple = C.LEVELS
    device: str = "auto"
    dtype: Optional[str] = None
    quick: bool = False
    full: bool = False
    tiny: Optional[bool] = None  # None: tiny shapes exactly when running on CPU
    compile: Optional[bool] = None  # None: on, except a CPU --quick run
    graph: bool = True
    backends: Optional[List[str]] = None  # forced ditfast backends to try; None: all
    filter: Optional[str] = None
    time_limit: Optional[float] = None
    warmup: Optional[int] = None
    max_reps: Optional[int] = None
    budget_s: Optional[float] = None
    threads: Optional[int] = None  # torch CPU threads; None: 1 in the CPU smoke, else torch's default
    argv: List[str] = field(default_factory=list)


class Context:
    """Everything a level's variant builders need: device, dtype, the timer, switches."""

    def __init__(self, opts: Options):
        dev = opts.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        self.device = torch.device(dev)
        self.is_cuda = self.device.type == "cuda"
        self.dtype = DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if self.is_cuda else torch.float32)
        self.tiny = (not self.is_cuda) if opts.tiny is None else opts.tiny
        self.smoke = not self.is_cuda  # a CPU run is a demonstration, never a speed claim
        self.quick = opts.quick
        if opts.compile is False:
            self.compile_reason = "off (--no-compile)"
        elif opts.compile is None and self.smoke and opts.quick:
            self.compile_reason = "off in a CPU --quick smoke (compiling dominates it); run without --quick"
        else:
            self.compile_reason = compile_unavailable(self.device)
        # A CPU smoke compiles the ops only by default: blocks and models take minutes to compile there.
        self.compile_small_only = opts.compile is None and self.smoke
        self.graph = opts.graph and self.is_cuda
        self.backends = opts.backends
        # CPU smoke: the first (untimed) call is the warm-up, and a few repetitions show that it works;
        # a slow call (the Triton interpreter: seconds) is timed once.
        warmup = opts.warmup if opts.warmup is not None else (3 if self.is_cuda else 0)
        max_reps = opts.max_reps or (200 if self.is_cuda else (5 if opts.quick else 20))
        budget = opts.budget_s or (0.4 if self.is_cuda else (0.05 if opts.quick else 0.3))
        min_reps = 5 if self.is_cuda else 1
        self.timer = Timer(self.device, warmup=warmup, min_reps=min(min_reps, max_reps), max_reps=max_reps,
                           budget_s=budget, flush_l2=True)
        self.auto = auto_backends(self.device)
        # the automatic op backend(s), attention aside (its choice depends on the shapes)
        self.auto_ops = "+".join(sorted({b for op, b in self.auto.items() if b and op != "joint_attention"})) or None

    def auto_label(self, H: int, Dh: int) -> str:
        """"<op backend> | attn <attention backend>": what ditfast runs automatically in a block."""
        return f"{self.auto_ops} | attn {attention_choice(self.device, self.dtype, H, Dh)}"
        self.peaks: dict = {}

    def compile_off(self, level: str) -> Optional[str]:
        """Why the torch.compile peers do not run at ``level`` (None: they run)."""
        if self.compile_reason:
            return self.compile_reason
        if self.compile_small_only and level not in ("ops", "attention"):
            return "off for blocks and models in the CPU smoke (minutes of compiling); --compile turns it on"
        return None


class Budget:
    """Splits --time-limit over the levels' target cases (by weight), then the rest of the plan."""

    def __init__(self, limit_s: Optional[float], plan: List[C.Case]):
        self.end = None if limit_s is None else time.monotonic() + limit_s
        self.target_levels = [lv for lv in C.LEVELS if any(c.target and c.level == lv for c in plan)]
        self.level_end: Dict[str, float] = {}

    def deadline(self, case: C.Case) -> Optional[float]:
        if self.end is None or not case.target:
            return self.end
        if case.level not in self.level_end:
            rest = self.target_levels[self.target_levels.index(case.level):]
            share = LEVEL_WEIGHTS[case.level] / sum(LEVEL_WEIGHTS[lv] for lv in rest)
            now = time.monotonic()
            self.level_end[case.level] = now + max(0.0, self.end - now) * share
        return self.level_end[case.level]

    @staticmethod
    def expired(deadline: Optional[float]) -> bool:
        return deadline is not None and time.monotonic() > deadline


class Progress:
    """A one-line progress bar on a terminal; one line per finished case otherwise (logs)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def start(self, label: str) -> None:
        if self.tty:
            filled = int(self.width * self.done / max(1, self.total))
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:60]:<60}")
            self.stream.flush()

    def finish(self, label: str, summary: str) -> None:
        self.done += 1
        if not self.tty:
            self.stream.write(f"[{self.done}/{self.total}] {label}: {summary}\n")
            self.stream.flush()
        elif self.done == self.total:
            self.stream.write("\r" + " " * (self.width + 75) + "\r")
            self.stream.flush()


def classify(exc: BaseException) -> tuple:
    """(status, reason) for an exception raised while building or running a variant."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {text}"[:400]
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "error", "out of memory: " + text[:300]
    unsupported = ("ditfast backend", "unknown ditfast backend", "No available kernel", "not supported",
                   "is not available", "not implemented for")
    if isinstance(exc, (ImportError, NotImplementedError)) or any(s in text for s in unsupported):
        return "skipped", reason
    return "error", reason


def _free(collect: bool = False) -> None:
    """Return cached CUDA memory; ``collect`` also runs the garbage collector (slow: per case only)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _direction(ctx: Context, fn: Callable[[], object], case: C.Case, direction: str) -> dict:
    timer = ctx.timer
    first = timer.first_call_s(fn)  # includes torch.compile's compilation for compiled variants
    # not est_ms=first: a first call that compiles (Triton JIT, torch.compile) would make the timer
    # take its minimum repetitions for this variant only; it estimates after its warm-up instead
    t = timer.time(fn)
    rec = {"ms": t.median_ms, **{k: v for k, v in t.to_dict().items() if k != "median_ms"}}
    rec["first_call_s"] = first
    rec["peak_mem_mb"] = timer.peak_memory_mb(fn)
    work = (case.work or {}).get(direction)
    rec["rate"] = C.rate(work, t.median_ms, case.metric)
    peak = report.peak_for(ctx.peaks, case.metric)
    rec["pct_peak"] = 100.0 * rec["rate"] / peak if rec["rate"] and peak else None
    return rec


def callables(built: Built) -> Tuple[Callable[[], object], Callable[[], object]]:
    """(forward under no_grad, forward + backward) of a built variant.

    The backward is ``torch.autograd.grad`` of the outputs with fixed random output gradients,
    with respect to the variant's leaves (inputs and parameters): new gradient tensors every call,
    nothing accumulated into ``.grad``.
    """
    def fwd():
        with torch.no_grad():
            return built.forward()

    grads: list = []

    def fwd_bwd():
        outs = flat_tensors(built.forward())
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        return torch.autograd.grad(outs, built.leaves, grads, allow_unused=True)

    return fwd, fwd_bwd


def measure_variant(ctx: Context, case: C.Case, spec: VariantSpec, deadline: Optional[float]) -> dict:
    rec = {"name": spec.name, "kind": spec.kind, "backend": spec.backend, "compiled": spec.compiled,
           "status": "skipped", "reason": spec.reason, "fwd": None, "fwd_bwd": None, "graph": None,
           "compile_s": None, "speedup": {}, "notes": []}
    if spec.build is None:
        return rec
    if Budget.expired(deadline):
        rec["reason"] = "time limit reached (--time-limit)"
        return rec
    try:
        built = spec.build()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded reason
        rec["status"], rec["reason"] = classify(exc)
        _free(collect=True)
        return rec
    rec["notes"] += built.notes
    fwd, fwd_bwd = callables(built)

    try:
        try:
            rec["fwd"] = _direction(ctx, fwd, case, "fwd")
            rec["status"], rec["reason"] = "ok", None
        except Exception as exc:  # noqa: BLE001
            rec["status"], rec["reason"] = classify(exc)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                _free(collect=True)
            return rec
        if case.graph and ctx.is_cuda and built.graphable and not spec.compiled:
            if not ctx.graph:
                rec["graph"] = {"ms": None, "reason": "off (--no-graph)"}
            else:
                try:
                    t = ctx.timer.time_graph(fwd)
                    rec["graph"] = {"ms": t.median_ms, **{k: v for k, v in t.to_dict().items() if k != "median_ms"}}
                except Exception as exc:  # noqa: BLE001
                    rec["graph"] = {"ms": None, "reason": classify(exc)[1]}
        if spec.fwd_bwd_reason:
            rec["fwd_bwd"] = {"ms": None, "reason": spec.fwd_bwd_reason}
        elif ctx.smoke and ctx.quick and spec.backend == "triton" and spec.kind == "backend":
            rec["fwd_bwd"] = {"ms": None, "reason": "Triton interpreter: forward only in a --quick smoke"}
        elif not built.leaves:
            rec["fwd_bwd"] = {"ms": None, "reason": "nothing to differentiate"}
        elif Budget.expired(deadline):
            rec["fwd_bwd"] = {"ms": None, "reason": "time limit reached (--time-limit)"}
        else:
            try:
                rec["fwd_bwd"] = _direction(ctx, fwd_bwd, case, "fwd_bwd")
            except Exception as exc:  # noqa: BLE001
                rec["fwd_bwd"] = {"ms": None, "reason": classify(exc)[1]}
        if spec.compiled:
            rec["compile_s"] = {d: rec[d]["first_call_s"] for d in ("fwd", "fwd_bwd")
                                if rec.get(d) and rec[d].get("ms") is not None}
    finally:
        del built
        _free()
    return rec


def add_speedups(case_rec: dict) -> None:
    """speedup[d] = variant ms / ditfast ms (how many times faster ditfast is); fastest per direction."""
    by_name = {v["name"]: v for v in case_rec["variants"]}
    base = by_name.get("ditfast")
    case_rec["fastest"] = {}
    for d in ("fwd", "fwd_bwd", "graph"):
        timed = [(v[d]["ms"], v["name"]) for v in case_rec["variants"] if v.get(d) and v[d].get("ms")]
        if timed:
            case_rec["fastest"][d] = min(timed)[1]
        b = base[d]["ms"] if base and base.get(d) and base[d].get("ms") else None
        for v in case_rec["variants"]:
            ms = v[d]["ms"] if v.get(d) and v[d].get("ms") else None
            v["speedup"][d] = (ms / b) if (ms and b) else None


def variants_for(case: C.Case, ctx: Context) -> List[VariantSpec]:
    if case.level == "ops":
        from .level_ops import op_variants

        return op_variants(case, ctx)
    if case.level == "attention":
        from .level_ops import attention_variants

        return attention_variants(case, ctx)
    if case.level in ("blocks", "train"):
        from .level_blocks import block_variants

        return block_variants(case, ctx)
    from .level_models import model_variants

    return model_variants(case, ctx)


def case_record(case: C.Case, dtype: torch.dtype) -> dict:
    """The JSON record of a case, before any variant is measured."""
    return {"level": case.level, "case": case.name, "label": case.label, "key": case.key, "dims": case.dims,
            "dtype": str(dtype).replace("torch.", ""), "metric": case.metric, "target": case.target,
            "graph": case.graph, "work": dict(case.work) if case.work else None, "variants": [], "fastest": {},
            "notes": [], "elapsed_s": 0.0}


def run_case(ctx: Context, case: C.Case, deadline: Optional[float]) -> dict:
    t0 = time.monotonic()
    rec = case_record(case, ctx.dtype)
    torch.manual_seed(0)
    try:
        specs = variants_for(case, ctx)
    except Exception as exc:  # noqa: BLE001 - e.g. inputs do not fit in memory
        rec["notes"].append(f"case setup failed: {classify(exc)[1]}")
        specs = []
    for spec in specs:
        rec["variants"].append(measure_variant(ctx, case, spec, deadline))
    rec["work"] = dict(case.work) if case.work else None
    add_speedups(rec)
    if any(s.compiled for s in specs):
        reset_compiled()
    del specs
    _free(collect=ctx.is_cuda)  # CPU smoke: tiny tensors, and a collection costs ~0.5 s with torch loaded
    rec["elapsed_s"] = time.monotonic() - t0
    return rec


def case_summary(rec: dict) -> str:
    by = {v["name"]: v for v in rec["variants"]}
    d = by.get("ditfast")
    if not d or not d.get("fwd"):
        return f"ditfast {d['status'] if d else 'missing'} ({rec['elapsed_s']:.1f} s)"
    parts = [f"ditfast {d['fwd']['ms']:.4g} ms"]
    for name in ("eager", "compile", "diffusers"):
        s = by.get(name, {}).get("speedup", {}).get("fwd")
        if s:
            parts.append(f"{s:.2f}x vs {name}")
    return ", ".join(parts) + f" ({rec['elapsed_s']:.1f} s)"


def run(opts: Options, *, out_json: Optional[str] = None, progress_stream=None) -> dict:
    """Run the benchmark; returns the results dict (and keeps ``out_json`` up to date).

    The CPU smoke runs single-threaded unless ``opts.threads`` says otherwise: its tiny shapes gain
    nothing from threads, and a busy machine makes multi-threaded timings of them erratic.
    """
    ctx = Context(opts)
    before = torch.get_num_threads()
    threads = opts.threads or (1 if ctx.smoke else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(ctx, opts, out_json, progress_stream)
    finally:
        torch.set_num_threads(before)


def _run(ctx: Context, opts: Options, out_json: Optional[str], progress_stream) -> dict:
    raise_recompile_limit()
    levels = tuple(lv for lv in C.LEVELS if lv in opts.levels)
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    plan = C.plan(levels, elt, tiny=ctx.tiny, quick=opts.quick, full=opts.full)
    if opts.filter:
        plan = [c for c in plan if opts.filter.lower() in c.key.lower()]
    commit, dirty = env.git_commit()
    results = {
        "schema": SCHEMA,
        "meta": {
            "device": env.device_info(ctx.device),
            "versions": env.versions(),
            "commit": commit,
            "dirty": dirty,
            "date": env.utc_now(),
            "mode": "cpu-smoke" if ctx.smoke else "gpu",
            "shapes": "tiny" if ctx.tiny else ("full" if opts.full else ("quick" if opts.quick else "default")),
            "quick": opts.quick,
            "dtype": str(ctx.dtype).replace("torch.", ""),
            "levels": list(levels),
            "argv": list(opts.argv),
            "timing": ctx.timer.describe(),
            "time_limit_s": opts.time_limit,
            "backends": backend_availability(ctx.device.type),
            "auto_backends": ctx.auto,
            "compile": ctx.compile_reason or ("ops and attention only (CPU smoke)" if ctx.compile_small_only
                                              else "on (torch.compile, dynamic=False; first-call time reported)"),
            "note": report.SMOKE_NOTE if ctx.smoke else report.GPU_NOTE,
        },
        "peaks": {},
        "results": [],
        "targets": [],
    }
    t0 = time.monotonic()
    ctx.peaks = results["peaks"] = measure_peaks(ctx.timer, ctx.dtype, quick=opts.quick)
    budget = Budget(None if opts.time_limit is None else max(0.0, opts.time_limit - (time.monotonic() - t0)), plan)
    progress = Progress(len(plan), progress_stream)
    for case in plan:
        deadline = budget.deadline(case)
        progress.start(case.key)
        if Budget.expired(deadline):
            rec = case_record(case, ctx.dtype)
            rec["notes"].append("skipped: time limit reached (--time-limit)")
        else:
            rec = run_case(ctx, case, deadline)
        results["results"].append(rec)
        results["targets"] = report.compute_targets(results)
        results["meta"]["elapsed_s"] = time.monotonic() - t0
        if out_json:
            report.write_json(results, out_json)
        progress.finish(case.key, case_summary(rec) if rec["variants"] else rec["notes"][0])
    results["meta"]["elapsed_s"] = time.monotonic() - t0
    results["targets"] = report.compute_targets(results)
    if out_json:
        report.write_json(results, out_json)
    return results
