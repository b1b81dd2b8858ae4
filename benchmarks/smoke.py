"""Real-shape smoke: every ditfast op on every backend, forward and backward, at the FLUX.1-dev and
SD3.5-large shapes in bf16 -- the GPU run's first measurement (benchmarks/gpu_run.sh, tier 2).

For each (op, shape) the plain-PyTorch reference runs once in fp32 (the truth) and once in bf16 (the
yardstick); every backend's output and input gradients are then judged by the project's rule
(ditfast.testing.assert_by_rule: |fast - ref_fp32| <= 2 |ref_bf16 - ref_fp32| + atol, per tensor)
and timed with triton.testing.do_bench (a wall-clock median on CPU). Rates are GB/s for the
memory-bound ops and TFLOP/s for attention, each also as a % of the copy bandwidth / bf16 matmul peak
measured at the start of the same run. Triton rows carry the registers / spills / CTAs per SM of the
offline sm_90 compile (benchmarks/sm90_report.json) when that report exists.

    python benchmarks/smoke.py --out smoke.json [--tiny] [--time-limit S] [--sm90-report FILE]
                               [--exclude OP:BACKEND[:SHAPE],...] [--resume]

--tiny (the CPU rehearsal): tiny shapes, Triton under its interpreter, the extension's CPU kernels.
The JSON (schema "ditfast-smoke/1", checked by ``validate``) is rewritten atomically after every op.

A sticky CUDA error (an illegal address or a launch failure leaves the process's CUDA context unusable)
would make every later row fail for one kernel. After any exception the context is probed with
``torch.cuda.synchronize()``; when it is dead the row is recorded as the culprit, the JSON is written with
``aborted`` = {op, backend, shape, error}, and the process exits with status 3 (EXIT_CONTEXT_LOST).
gpu_run.sh then reruns the smoke in a fresh process with ``--resume`` (the ops already done are kept)
and ``--exclude op:backend`` (also $DITFAST_GPU_RUN_EXCLUDE, which the later tiers read too).
On CPU the %pk columns stay empty: tiny tensors live in the caches, a "% of copy bandwidth" means nothing.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

# torch's "No CUDA runtime is found" (printed by torch.utils.cpp_extension on a machine without a GPU)
# and the CUDA-initialisation warnings say nothing the smoke's own first line does not
warnings.filterwarnings("ignore", message=".*(CUDA initialization|No CUDA runtime).*")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # the same message, logged

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    import torch as _t  # the interpreter must be switched on before triton is imported

    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch

from ditfast import _backend, ops, reference, testing
from ditfast.bench import cases as C
from ditfast.bench import report, timing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from outcome import SMOKE_SCHEMA as SCHEMA, STATUSES, smoke_table as table, validate_smoke as validate  # noqa: E402

SHAPES = {  # B, text tokens, image tokens, width, heads, head dim (docs/upstream.md)
    "FLUX.1-dev": dict(B=1, Lt=512, Li=4096, D=3072, H=24, Dh=128),
    "SD3.5-large": dict(B=1, Lt=333, Li=4096, D=2432, H=38, Dh=64),
}
TINY = {"FLUX.1-dev tiny": dict(B=1, Lt=7, Li=16, D=96, H=3, Dh=32),
        "SD3.5-large tiny": dict(B=1, Lt=5, Li=12, D=80, H=5, Dh=16)}
EXIT_CONTEXT_LOST = 3  # the CUDA context died (a sticky error): rerun in a fresh process, excluding the culprit
EXCLUDE_ENV = "DITFAST_GPU_RUN_EXCLUDE"  # "op:backend[:shape],..." (fnmatch patterns), set by gpu_run.sh
OPS = ("norm_modulate", "norm_modulate_dual", "gated_residual", "gated_residual_norm_modulate", "rms_norm",
       "apply_rope", "qk_norm_rope", "prepare_attention", "joint_attention")


# ----------------------------------------------------------------------------------------- inputs
def make_case(op: str, s: dict, device, dtype):
    """(leaves, call(fn, *leaves), work {"fwd", "fwd_bwd"}, metric) for ``op`` at shape ``s``."""
    B, L, D, H, Dh = s["B"], s["Lt"] + s["Li"], s["D"], s["H"], s["Dh"]
    g = lambda *shape, scale=1.0: (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()  # noqa: E731
    elt = torch.empty((), dtype=dtype).element_size()
    pos = torch.arange(L, device=device)
    cos, sin = ops.rope_freqs(pos[:, None], (Dh,))  # fp32 tables, no grad
    if op in ("norm_modulate", "norm_modulate_dual", "gated_residual", "gated_residual_norm_modulate"):
        n_vec = {"norm_modulate": 2, "norm_modulate_dual": 4, "gated_residual": 1, "gated_residual_norm_modulate": 3}[op]
        ys = [g(B, L, D)] if op.startswith("gated") else []
        leaves = [g(B, L, D)] + ys + [g(B, D, scale=0.1) for _ in range(n_vec)]
        return leaves, lambda fn, *a: fn(*a), C.modulate_bytes(op, B, L, D, elt), "GB/s"
    if op == "rms_norm":
        return [g(B, L, H, Dh), g(Dh)], lambda fn, x, w: fn(x, w), C.head_op_bytes(op, B, L, H, Dh, elt), "GB/s"
    if op == "apply_rope":
        return [g(B, L, H, Dh)], lambda fn, x: fn(x, cos, sin), C.head_op_bytes(op, B, L, H, Dh, elt), "GB/s"
    if op == "qk_norm_rope":  # q, k: strided views of a packed qkv projection, as in the blocks
        return ([g(B, L, 3, H, Dh), g(Dh), g(Dh)], lambda fn, qkv, qw, kw: fn(qkv[:, :, 0], qkv[:, :, 1], qw, kw, cos, sin),
                C.head_op_bytes(op, B, L, H, Dh, elt), "GB/s")
    if op == "prepare_attention":  # two streams (text, image), each a packed qkv; FLUX-style norms + joint RoPE
        def call(fn, txt, img, wq0, wk0, wq1, wk1):
            (q0, k0, v0), (q1, k1, v1) = txt.unbind(2), img.unbind(2)
            return fn((q0, q1), (k0, k1), (v0, v1), q_weights=(wq0, wq1), k_weights=(wk0, wk1), rope=(cos, sin))
        N = B * L * H * Dh
        tables = 2 * L * (Dh // 2) * 4
        work = {"fwd": 6 * N * elt + tables, "fwd_bwd": 6 * N * elt + 8 * N * elt + 2 * tables}
        return [g(B, s["Lt"], 3, H, Dh), g(B, s["Li"], 3, H, Dh)] + [g(Dh) for _ in range(4)], call, work, "GB/s"
    if op == "joint_attention":
        return [g(B, L, H, Dh) for _ in range(3)], lambda fn, q, k, v: fn(q, k, v), C.attention_flops(B, H, L, L, Dh), "TFLOP/s"
    raise ValueError(f"unknown op {op!r}")


def backends_of(op: str, device: torch.device) -> List[tuple]:
    """[(backend, runner(fn) or None, skip reason)] of every implementation of ``op``, reference first."""
    if op == "joint_attention":
        out = []
        for name, ok, why in ops.backend_report(device.type):
            run = (lambda n: lambda *a, **kw: ops.joint_attention(*a, backend=n, **kw))(name)
            out.append((name, run if ok else None, None if ok else why))
        return sorted(out, key=lambda r: r[0] != "reference")
    out = []
    for name in _backend.implemented(op):
        ok, why = _backend.availability(name, device.type)
        fn = getattr(ops, op)

        def run(*a, name=name, fn=fn, **kw):
            with _forced(name):
                return fn(*a, **kw)
        out.append((name, run if ok else None, None if ok else why))
    return sorted(out, key=lambda r: r[0] != "reference")


def _forced(name: str):
    try:
        return _backend.use_backend(name, strict=True)  # never a silent fallback to another backend
    except TypeError:  # a registry without strict mode raises on a missing op anyway
        return _backend.use_backend(name)


# ----------------------------------------------------------------------------------------- sticky errors
def parse_exclude(text: Optional[str]) -> List[tuple]:
    """"joint_attention:triton,rms_norm:cuda:FLUX*" -> [(op, backend, shape pattern)]."""
    out = []
    for item in (text or "").replace(";", ",").split(","):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) >= 2 and parts[0] and parts[1]:
            out.append((parts[0], parts[1], ":".join(parts[2:]) or "*"))
    return out


def excluded(rules: List[tuple], op: str, backend: str, shape: str = "") -> Optional[str]:
    """The rule (as text) that excludes (op, backend, shape), or None."""
    for o, b, sh in rules:
        if fnmatch.fnmatch(op, o) and fnmatch.fnmatch(backend, b) and fnmatch.fnmatch(shape or "", sh):
            return f"{o}:{b}" + ("" if sh == "*" else f":{sh}")
    return None


INJECT_ENV = "DITFAST_GPU_RUN_INJECT_STICKY"  # "op:backend": the rehearsal's simulated sticky error (gpu_run.sh)
_INJECTED: dict = {}


def inject(op: str, backend: str) -> None:
    """In a rehearsal, the first run of the $DITFAST_GPU_RUN_INJECT_STICKY row fails as an illegal address
    does on a GPU, and the "context" stays dead for the rest of this process."""
    rule = parse_exclude(os.environ.get(INJECT_ENV))
    if rule and not _INJECTED and excluded(rule, op, backend):
        _INJECTED["error"] = "RuntimeError: CUDA error: an illegal memory access was encountered (injected by the rehearsal)"
        raise RuntimeError(_INJECTED["error"])


def context_error(device) -> Optional[str]:
    """Why the CUDA context can run no more work (None: it can, or this is not CUDA)."""
    if _INJECTED:
        return _INJECTED["error"]
    if getattr(device, "type", device) != "cuda":
        return None
    try:
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure here: the context is gone
        return f"{type(exc).__name__}: {str(exc).strip()[:300]}"


class ContextLost(RuntimeError):
    """A sticky CUDA error: nothing more can run in this process."""


# ----------------------------------------------------------------------------------------- checking
def _flat(out) -> List[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def run_once(fn: Callable, call: Callable, leaves: List[torch.Tensor], grads: Optional[List[torch.Tensor]]):
    """(outputs, input gradients) of ``call(fn, *leaves)``, with ``grads`` as output gradients."""
    outs = _flat(call(fn, *leaves))
    if grads is None:
        return outs, None
    gs = [gr.to(o.dtype) for gr, o in zip(grads, outs)]
    return [o.detach() for o in outs], list(torch.autograd.grad(outs, leaves, gs, allow_unused=True))


def judge(fast: List, ref32: List, low: List, names: List[str]) -> dict:
    """Per tensor: max error vs fp32, the bf16 reference's own error, and the rule's verdict."""
    out = {}
    for name, f, r, lp in zip(names, fast, ref32, low):
        if f is None or r is None:
            out[name] = {"err": None, "yard": None, "ok": False, "why": "no gradient"}
            continue
        r64 = r.double()
        err = (f.double() - r64).abs().nan_to_num(nan=float("inf")).max().item() if f.numel() else 0.0
        yard = (lp.double() - r64).abs().max().item() if lp.numel() else 0.0
        bound = 2 * yard + 1e-5 * max(1.0, r64.abs().max().item() if r.numel() else 0.0)  # for display
        rec = {"err": err, "yard": yard, "bound": bound}
        try:  # the verdict is the project's rule itself
            testing.assert_by_rule(f, r, lp, name=name)
            out[name] = dict(rec, ok=True)
        except AssertionError as exc:
            out[name] = dict(rec, ok=False, why=str(exc)[:300])
    return out


def smoke_op(op: str, label: str, s: dict, ctx: dict) -> List[dict]:
    device, dtype = ctx["device"], ctx["dtype"]
    torch.manual_seed(0)
    leaves, call, work, metric = make_case(op, s, device, dtype)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    ref = getattr(reference, op)
    out32 = _flat(call(ref, *leaves32))
    gen = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen).to(device) for o in out32]
    out32, g32 = run_once(ref, call, leaves32, grads)
    low, glow = run_once(ref, call, leaves, grads)
    names = [f"out[{i}]" for i in range(len(out32))] + [f"grad[{i}]" for i in range(len(leaves))]
    rows = []
    for name, run, why in backends_of(op, device):
        row = {"op": op, "shape": label, "dims": dict(s), "backend": name, "metric": metric, "status": "skipped",
               "reason": why, "checks": {}, "max_err_over_bound": None, "fwd": None, "fwd_bwd": None,
               "sm90": report.sm90_for(op, ctx["sm90"], label) if "triton" in name else None}
        rows.append(row)
        if run is None:
            continue
        rule = excluded(ctx["exclude"], op, name, label)
        if rule:
            row["reason"] = f"excluded ({rule}): a sticky CUDA error earlier in this GPU run"
            continue
        if ctx["deadline"] is not None and time.monotonic() > ctx["deadline"]:
            row["reason"] = "time limit reached (--time-limit)"
            continue
        try:
            inject(op, name)
            fast, gfast = run_once(run, call, leaves, grads)
            row["checks"] = judge(fast + gfast, out32 + g32, low + glow, names)
            row["status"] = "ok" if all(c["ok"] for c in row["checks"].values()) else "fail"
            row["reason"] = None if row["status"] == "ok" else "; ".join(
                f"{k}: {c.get('why')}" for k, c in row["checks"].items() if not c["ok"])[:600]
            ratios = [c["err"] / c["bound"] for c in row["checks"].values() if c["err"] is not None]
            row["max_err_over_bound"] = max(ratios) if ratios else None
            del fast, gfast

            def fwd():
                with torch.no_grad():
                    return call(run, *leaves)

            def fwd_bwd():
                outs = _flat(call(run, *leaves))
                return torch.autograd.grad(outs, leaves, [gr.to(o.dtype) for gr, o in zip(grads, outs)], allow_unused=True)

            for key, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                t = timing.bench(fn, device, quick=True)
                t["rate"] = C.rate(work[key], t["ms"], metric)
                peak = report.peak_for(ctx["peaks"], metric) if device.type == "cuda" else None
                t["pct_peak"] = 100.0 * t["rate"] / peak if t["rate"] and peak else None
                row[key] = t
        except Exception as exc:  # noqa: BLE001 - recorded, never fatal
            row["status"], row["reason"] = "error", f"{type(exc).__name__}: {str(exc).strip()[:400]}"
            dead = context_error(device)
            if dead:
                row["reason"] = f"CUDA context lost here (sticky error; the culprit): {row['reason']}"[:600]
                ctx["aborted"] = {"op": op, "backend": name, "shape": label, "error": dead}
                raise ContextLost(dead, rows) from exc
        finally:
            if device.type == "cuda" and "aborted" not in ctx:
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU rehearsal)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS")
    p.add_argument("--ops", default=",".join(OPS), help="comma list of ops")
    p.add_argument("--sm90-report", default=None)
    p.add_argument("--exclude", default=None, metavar="OP:BACKEND[:SHAPE],...",
                   help=f"rows not to run (fnmatch patterns; added to ${EXCLUDE_ENV})")
    p.add_argument("--resume", action="store_true", help="keep the (shape, op) groups --out already holds, run the rest")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    shapes = TINY if args.tiny or device.type == "cpu" else SHAPES
    t0 = time.monotonic()
    meta = timing.provenance(device, torch.bfloat16)
    meta.update(shapes=shapes, timing=timing.METHOD[device.type == "cuda"], rule="ditfast.testing.assert_by_rule")
    peaks = timing.measure_peaks(device, torch.bfloat16, quick=device.type != "cuda")
    sm90 = report.load_sm90(args.sm90_report)
    deadline = None if args.time_limit is None else t0 + args.time_limit
    if os.environ.get("DITFAST_BENCH_DEADLINE"):  # absolute (epoch seconds), set by gpu_run.sh
        abs_deadline = time.monotonic() + float(os.environ["DITFAST_BENCH_DEADLINE"]) - time.time()
        deadline = abs_deadline if deadline is None else min(deadline, abs_deadline)
    rules = parse_exclude(os.environ.get(EXCLUDE_ENV)) + parse_exclude(args.exclude)
    ctx = {"device": device, "dtype": torch.bfloat16, "peaks": peaks, "sm90": sm90, "deadline": deadline, "exclude": rules}
    res = {"schema": SCHEMA, "meta": meta, "peaks": peaks, "sm90_source": sm90["source"] if sm90 else None,
           "rows": [], "summary": {}}
    done, earlier = set(), []
    if args.resume and os.path.isfile(args.out):
        try:
            with open(args.out) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old and old.get("schema") == SCHEMA:
            lost = old.get("aborted") or {}
            keep = [r for r in old["rows"] if (r["shape"], r["op"]) != (lost.get("shape"), lost.get("op"))]
            done = {(r["shape"], r["op"]) for r in keep}
            res["rows"], earlier = keep, list(old.get("aborted_runs") or []) + ([lost] if lost else [])
            res["peaks"] = peaks = old.get("peaks") or peaks
            ctx["peaks"] = peaks
    if earlier:
        res["aborted_runs"] = earlier  # the culprits of the earlier processes of this tier
    if rules:
        res["excluded"] = [f"{o}:{b}" + ("" if sh == "*" else f":{sh}") for o, b, sh in rules]
    print(f"smoke on {meta['device']['name']}: peaks copy {report.fmt(peaks['copy']['gbps'])} GB/s, "
          f"matmul {report.fmt(peaks['matmul']['tflops'])} TFLOP/s; sm_90 report: {res['sm90_source'] or 'no offline report'}",
          flush=True)
    lost = None
    for label, s in shapes.items():
        for op in [o for o in args.ops.split(",") if o]:
            if (label, op) in done or lost:
                continue
            t1 = time.monotonic()
            try:
                rows = smoke_op(op, label, s, ctx)
            except ContextLost as exc:  # the rows measured so far, then stop: nothing more can run here
                lost, rows = ctx["aborted"], exc.args[1] if len(exc.args) > 1 else []
            except Exception as exc:  # noqa: BLE001 - the reference itself failed: one error row
                rows = [{"op": op, "shape": label, "dims": dict(s), "backend": "reference", "metric": "GB/s",
                         "status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:400]}", "checks": {},
                         "max_err_over_bound": None, "fwd": None, "fwd_bwd": None, "sm90": None}]
                dead = context_error(device)
                if dead:
                    lost = ctx["aborted"] = {"op": op, "backend": "reference", "shape": label, "error": dead}
            if lost:
                res["aborted"] = lost
            res["rows"] += rows
            res["summary"] = {"counts": {st: sum(r["status"] == st for r in res["rows"]) for st in STATUSES},
                              "elapsed_s": time.monotonic() - t0}
            report.write_json(res, args.out)
            print(f"[{label}] {op}: " + ", ".join(f"{r['backend']} {r['status']}" for r in rows)
                  + f" ({time.monotonic() - t1:.1f} s)", flush=True)
    if not res["summary"]:
        res["summary"] = {"counts": {st: sum(r["status"] == st for r in res["rows"]) for st in STATUSES},
                          "elapsed_s": time.monotonic() - t0}
        report.write_json(res, args.out)
    print("\n" + table(res) + f"\n\nsmoke: {res['summary']['counts']} in {res['summary']['elapsed_s']:.0f} s -> {args.out}")
    problems = validate(res)
    if problems:
        print("smoke JSON fails its schema:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 2
    if lost:
        print(f"smoke: CUDA context lost at {lost['op']}/{lost['backend']}/{lost['shape']} ({lost['error']}); "
              f"rerun in a fresh process: --resume --exclude {lost['op']}:{lost['backend']}", flush=True)
        return EXIT_CONTEXT_LOST
    return 0 if res["summary"]["counts"]["fail"] == res["summary"]["counts"]["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
