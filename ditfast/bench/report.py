"""Output of the benchmark: the JSON (atomic writes, schema check), the performance targets as measured
ratios, the terminal table, the README's Markdown table, one PNG, and the offline sm_90 compile report
(registers, spills, CTAs per SM of each Triton kernel) printed next to the kernels it describes.

Reading a row: "ms" is the median time of one call; the rate is GB/s (memory-bound ops: bytes that must
move / time) or TFLOP/s (attention, blocks, models); "%pk" is that rate as a percentage of the peak
measured in the same run (copy bandwidth or bf16 matmul); "ditfast x" is this variant's time divided by
ditfast's (above 1: ditfast is faster than this alternative).
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence

SMOKE_NOTE = ("CPU smoke: tiny shapes on the reference ops (and the Triton interpreter where enabled). "
              "These timings show that the harness works; they are NOT a speed claim.")
GPU_NOTE = "GPU run: real shapes, triton.testing.do_bench medians (L2 flushed), peaks measured in the same run."
MARK_START, MARK_END = "<!-- ditfast-bench:start -->", "<!-- ditfast-bench:end -->"
DIRS = ("fwd", "fwd_bwd")
SM90_ENV = "DITFAST_SM90_REPORT"
SM90_DEFAULT = os.path.join("benchmarks", "sm90_report.json")


def peak_for(peaks: dict, metric: str) -> Optional[float]:
    key, field = ("copy", "gbps") if metric == "GB/s" else ("matmul", "tflops")
    return ((peaks or {}).get(key) or {}).get(field)


def _variant(case: dict, name: str) -> Optional[dict]:
    return next((v for v in case.get("variants", []) if v["name"] == name), None)


def _get(v: Optional[dict], d: str, key: str = "ms"):
    return (v.get(d) or {}).get(key) if v else None


# ------------------------------------------------------------------------------------------- targets
GOALS = {  # (level, vs): (threshold, unit, description) -- the project's performance goals (docs/design.md)
    ("ops", "copy"): (85.0, "%", "% of copy bandwidth"),
    ("ops", "eager"): (3.5, "x", "vs eager reference"),
    ("ops", "compile"): (1.15, "x", "vs compiled reference"),
    ("blocks", "eager"): (1.4, "x", "vs eager reference"),
    ("blocks", "compile"): (1.1, "x", "vs compiled reference"),
}
AUTO_GOAL = 0.97  # the automatic attention choice within 3 % (timing noise) of the fastest backend


def _target(name: str, case: dict, goal, values: dict, smoke: bool, note: str = "") -> dict:
    threshold, unit = goal if goal else (None, "x")
    vals = [x for x in values.values() if x is not None]
    met = None if smoke or threshold is None or not vals else all(x >= threshold for x in vals)
    return {"name": name, "case": case["key"], "goal": None if threshold is None else f">= {threshold:g}{unit}",
            "threshold": threshold, "unit": unit, "values": values, "met": met,
            "note": "; ".join(x for x in (note, "CPU smoke, not evaluated" if smoke else "") if x)}


def compute_targets(results: dict) -> List[dict]:
    """The performance targets as measured ratios, for the target cases present in ``results``."""
    smoke = results.get("meta", {}).get("mode") != "gpu"
    out = []
    for case in results.get("results", []):
        if not case.get("target") or not case.get("variants"):
            continue
        level, label, base = case["level"], f"{case['case']} [{case['label']}]", _variant(case, "ditfast")
        speed = lambda o: {d: ((_variant(case, o) or {}).get("speedup") or {}).get(d) for d in DIRS}  # noqa: E731
        if level == "ops":
            thr, unit, desc = GOALS[("ops", "copy")]
            out.append(_target(f"{label}: {desc}", case, (thr, unit), {d: _get(base, d, "pct_peak") for d in DIRS}, smoke))
        if level in ("ops", "blocks"):
            for other in ("eager", "compile"):
                thr, unit, desc = GOALS[(level, other)]
                out.append(_target(f"{label}: {desc}", case, (thr, unit), speed(other), smoke))
        if level in ("blocks", "train", "models"):
            for other in ("diffusers", "diffusers+compile") + (("eager", "compile") if level == "train" else ()):
                if _get(_variant(case, other), "fwd"):
                    out.append(_target(f"{label}: vs {other}", case, None, speed(other), smoke))
        if level == "attention":
            values, notes = {}, [f"ditfast chose {base.get('backend')}"] if base else []
            for d in DIRS:
                fastest = case.get("fastest", {}).get(d)
                f_ms, b_ms = _get(_variant(case, fastest), d) if fastest else None, _get(base, d)
                values[d] = f_ms / b_ms if (f_ms and b_ms) else None
                if fastest:
                    notes.append(f"fastest {d}: {fastest}")
            out.append(_target(f"{label}: automatic choice vs fastest backend", case, (AUTO_GOAL, "x"), values, smoke,
                               "; ".join(notes)))
    return out


# ------------------------------------------------------------------------------------------- JSON
def _clean(obj):
    """JSON-safe copy: NaN / inf become None, tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(results: dict, path: str) -> None:
    """Write atomically: a temporary file in the same folder, renamed over the target."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(results), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def add_speedups(case_rec: dict) -> None:
    """speedup[d] = variant ms / ditfast ms (above 1: ditfast is faster); the fastest variant per direction."""
    ms = lambda v, d: (v.get(d) or {}).get("ms")  # noqa: E731
    base = next((v for v in case_rec["variants"] if v["name"] == "ditfast"), None)
    case_rec["fastest"] = {}
    for d in ("fwd", "fwd_bwd", "graph"):
        timed = [(ms(v, d), v["name"]) for v in case_rec["variants"] if ms(v, d)]
        if timed:
            case_rec["fastest"][d] = min(timed)[1]
        b = ms(base, d) if base else None
        for v in case_rec["variants"]:
            v["speedup"][d] = ms(v, d) / b if (ms(v, d) and b) else None


def merge(runs: Sequence[dict], sources: Sequence[str] = ()) -> dict:
    """One results dict from the tiers of one GPU run (gpu_run.sh writes ops, blocks and peers apart):
    cases in order of first appearance; a case measured again (the peers tier re-runs the target shapes
    with the torch.compile peers) contributes the variants the first one lacked, and the speedups and
    targets are recomputed. The first run's meta is kept, with the sources listed."""
    if not runs:
        raise ValueError("nothing to merge")
    out = json.loads(json.dumps(runs[0]))
    by_key = {c["key"]: c for c in out["results"]}
    for run in runs[1:]:
        for case in json.loads(json.dumps(run["results"])):
            first = by_key.get(case["key"])
            if first is None:
                out["results"].append(case)
                by_key[case["key"]] = case
                continue
            have = {v["name"]: v for v in first["variants"]}
            for v in case["variants"]:
                if v["status"] == "ok" and (have.get(v["name"]) or {}).get("status") != "ok":
                    first["variants"] = [x for x in first["variants"] if x["name"] != v["name"]] + [v]
    for case in out["results"]:
        add_speedups(case)
    out["meta"]["merged_from"] = list(sources)
    out["meta"]["elapsed_s"] = sum(r["meta"].get("elapsed_s") or 0 for r in runs)
    out["targets"] = compute_targets(out)
    return out


META_KEYS = ("device", "versions", "commit", "date", "mode", "dtype", "timing", "shapes")
CASE_KEYS = ("level", "case", "label", "key", "dims", "dtype", "metric", "target", "work", "variants", "fastest")
VARIANT_KEYS = ("name", "kind", "backend", "status", "reason", "fwd", "fwd_bwd", "graph", "compile_s", "speedup")
MEASURE_KEYS = ("ms", "p20_ms", "p80_ms", "method", "rate", "pct_peak", "peak_mem_mb", "first_call_s")


def validate(results: dict) -> List[str]:
    """Problems of a results dict against the schema (empty: valid)."""
    errs: List[str] = []
    need = lambda obj, keys, where: errs.extend(f"{where}: missing {k!r}" for k in keys if k not in obj)  # noqa: E731
    need(results, ("schema", "meta", "peaks", "results", "targets"), "top level")
    if errs:
        return errs
    if not str(results["schema"]).startswith("ditfast-bench/"):
        errs.append(f"schema: unexpected {results['schema']!r}")
    meta = results["meta"]
    need(meta, META_KEYS, "meta")
    need(meta.get("versions", {}), ("python", "torch", "triton", "cuda", "ditfast"), "meta.versions")
    need(meta.get("device", {}), ("name", "type"), "meta.device")
    if meta.get("mode") not in ("gpu", "cpu-smoke"):
        errs.append(f"meta.mode: {meta.get('mode')!r} is not 'gpu' or 'cpu-smoke'")
    for name, keys in (("copy", ("gbps",)), ("matmul", ("tflops", "dtype"))):
        need(results["peaks"].get(name, {}), keys, f"peaks.{name}")
    for i, case in enumerate(results["results"]):
        where = f"results[{i}]"
        need(case, CASE_KEYS, where)
        if case.get("metric") not in ("GB/s", "TFLOP/s"):
            errs.append(f"{where}.metric: {case.get('metric')!r}")
        for j, v in enumerate(case.get("variants", [])):
            vw = f"{where}.variants[{j}] ({v.get('name')})"
            need(v, VARIANT_KEYS, vw)
            if v.get("status") not in ("ok", "skipped", "error"):
                errs.append(f"{vw}.status: {v.get('status')!r}")
            if v.get("status") != "ok" and not v.get("reason"):
                errs.append(f"{vw}: status {v.get('status')!r} without a reason")
            if v.get("status") == "ok" and _get(v, "fwd") is None:
                errs.append(f"{vw}: status ok without a forward time")
            for d in DIRS if v.get("status") == "ok" else ():
                m = v.get(d)
                if m and m.get("ms") is not None:
                    need(m, MEASURE_KEYS, f"{vw}.{d}")
                    if not m["ms"] > 0:
                        errs.append(f"{vw}.{d}.ms: {m['ms']!r} is not positive")
                elif m is not None and not m.get("reason"):
                    errs.append(f"{vw}.{d}: not measured and no reason")
    for i, t in enumerate(results["targets"]):
        need(t, ("name", "case", "goal", "values", "met"), f"targets[{i}]")
    return errs


# ------------------------------------------------------------------------------------------- sm_90 report
def load_sm90(path: Optional[str] = None) -> Optional[dict]:
    """The offline sm_90 compile report (``python tests/compile_sm90.py --report FILE.json``: a list of
    {kernel, config, shape, registers, spills, shared_bytes, ctas_per_sm, waves}) as {"source", "entries"},
    from ``path``, $DITFAST_SM90_REPORT or benchmarks/sm90_report.json; None when there is none."""
    for p in (path, os.environ.get(SM90_ENV), SM90_DEFAULT):
        if p and os.path.isfile(p):
            try:
                entries = load_json(p)
            except (OSError, ValueError):
                continue
            if isinstance(entries, list):
                return {"source": p, "entries": [e for e in entries if isinstance(e, dict) and "kernel" in e]}
    return None


# the Triton kernels (by name prefix, ditfast/kernels/triton/) that run each op
OP_KERNELS = {"norm_modulate": ("_norm_modulate_",), "norm_modulate_dual": ("_norm_modulate_",),
              "gated_residual": ("_gated_residual_fwd", "_gated_residual_bwd"),
              "gated_residual_norm_modulate": ("_gated_residual_norm_modulate_",),
              "rms_norm": ("_norm_rope_",), "apply_rope": ("_norm_rope_",), "qk_norm_rope": ("_norm_rope_",),
              "joint_attention": ("_attn_",), "prepare_attention": ("_prepare_",),
              "gelu_tanh_backward": ("_gelu_tanh_bwd",), "swiglu": ("_swiglu_",)}


def _family(label: str) -> str:
    """'FLUX.1-dev', 'FLUX-dev', 'FLUX:...' -> 'flux'; 'SD3.5-large CFG' -> 'sd3'."""
    low = str(label).lower()
    return "flux" if low.startswith("flux") else "sd3" if low.startswith("sd3") else low.split(":")[0]


def sm90_for(op: str, sm90: Optional[dict], shape: Optional[str] = None) -> str:
    """"kernel: regs/spills/CTAs per SM" of the report's kernels that run ``op`` (at ``shape``'s model
    when the report has rows for it); one entry per kernel: its first (primary) config."""
    if not sm90:
        return "no offline report"
    hits = [e for e in sm90["entries"] if str(e["kernel"]).startswith(OP_KERNELS.get(op, (f"_{op}",)))]
    same = [e for e in hits if shape and _family(e.get("shape", "")) == _family(shape)]
    parts = {}
    for e in same or hits:
        parts.setdefault(e["kernel"], f"{e['kernel']}: {e.get('registers')} regs/{e.get('spills')} spills/"
                                      f"{e.get('ctas_per_sm')} CTA/SM")
    return "; ".join(parts.values()) if parts else "not in the offline report"


# ------------------------------------------------------------------------------------------- text tables
def fmt(x, kind: str = "num") -> str:
    if x is None:
        return "-"
    if kind in ("x", "%", "s"):
        return {"x": f"{x:.2f}x", "%": f"{x:.0f}%", "s": f"{x:.1f}s"}[kind]
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    return f"{x:.0f}" if ax >= 100 else f"{x:.1f}" if ax >= 10 else f"{x:.2f}" if ax >= 1 else \
        f"{x:.3g}" if ax >= 0.001 else f"{x:.2e}"


def format_table(headers: Sequence[str], rows, *, left: int = 1) -> str:
    """A plain-text table; the first ``left`` columns and the last one are left-aligned, the rest right."""
    rows = [[str(c) for c in r] + [""] * (len(headers) - len(r)) for r in rows]
    n = len(headers)
    widths = [max([len(headers[i])] + [len(r[i]) for r in rows]) for i in range(n)]
    line = lambda cells: "  ".join(c.ljust(w) if (i < left or i == n - 1) else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _cut(text: Optional[str], limit: int = 70) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def banner(results: dict) -> str:
    m, p, v = results["meta"], results.get("peaks", {}), results["meta"]["versions"]
    commit = (m.get("commit") or "unknown")[:10] + (" (dirty)" if m.get("dirty") else "")
    lines = [f"ditfast benchmark on {m['device']['name']} ({m['device']['type']}) | torch {v.get('torch')} | "
             f"triton {v.get('triton')} | CUDA {v.get('cuda')} | ditfast {v.get('ditfast')} | commit {commit} | "
             f"{m['date']} | {m['dtype']}"]
    if p.get("copy"):
        lines.append(f"peaks measured in this run: copy {fmt(p['copy']['gbps'])} GB/s ({p['copy']['what']}); "
                     f"matmul {fmt(p['matmul']['tflops'])} TFLOP/s ({p['matmul']['what']})")
    lines.append(f"timing: {m.get('timing')}; fwd under no_grad; fwd+bwd = autograd.grad of inputs and parameters")
    if m["mode"] != "gpu":
        bar = "*" * 100
        lines += [bar, "*** " + SMOKE_NOTE, "*** Run on a CUDA GPU for real numbers (benchmarks/gpu_run.sh).", bar]
    return "\n".join(lines)


HEADERS = ["variant", "fwd ms", "{rate}", "%pk", "f+b ms", "{rate}", "%pk", "graph ms", "MiB f+b", "compile",
           "ditfast x", "note"]


def case_table(case: dict, sm90: Optional[dict] = None) -> str:
    headers = [h.format(rate=case["metric"]) for h in HEADERS]
    rows = []
    for v in case["variants"]:
        name = v["name"] + (f" ({v['backend']})" if v["kind"] == "ditfast" and v.get("backend") else "")
        if v["status"] != "ok":
            rows.append([name] + [""] * 10 + [f"{v['status']}: {_cut(v['reason'])}"])
            continue
        f, b, g = v.get("fwd") or {}, v.get("fwd_bwd") or {}, v.get("graph") or {}
        notes = [f"f+b: {_cut(b['reason'], 50)}"] if b.get("ms") is None and b.get("reason") else []
        notes += [n for n in v.get("notes") or [] if "UNFUSED" in n]
        if "triton" in str(v.get("backend")) and case["level"] in ("ops", "attention"):
            notes.append("sm_90: " + sm90_for(case["case"], sm90, case["label"]))
        sp = v.get("speedup") or {}
        rows.append([name, fmt(f.get("ms")), fmt(f.get("rate")), fmt(f.get("pct_peak"), "%"), fmt(b.get("ms")),
                     fmt(b.get("rate")), fmt(b.get("pct_peak"), "%"), fmt(g.get("ms")), fmt(b.get("peak_mem_mb")),
                     "/".join(fmt(s, "s") for s in (v.get("compile_s") or {}).values()),
                     "" if v["name"] == "ditfast" else "/".join(fmt(sp.get(d), "x") for d in DIRS), "; ".join(notes)])
    dims = ", ".join(f"{k}={val}" for k, val in case["dims"].items())
    title = f"== {case['level']} | {case['case']} | {case['label']} | {dims} | {case['dtype']}"
    if not rows:
        return title + "\n" + "; ".join(case.get("notes", []))
    keep = [i for i in range(len(headers)) if i in (0, len(headers) - 1) or any(r[i] not in ("", "-") for r in rows)]
    return title + "\n" + format_table([headers[i] for i in keep], [[r[i] for i in keep] for r in rows])


def summary_table(results: dict) -> str:
    rows = []
    for t in results.get("targets", []):
        unit = "%" if t.get("unit") == "%" else "x"
        vals = t.get("values", {})
        rows.append([t["name"], t.get("goal") or "(report)", fmt(vals.get("fwd"), unit), fmt(vals.get("fwd_bwd"), unit),
                     {True: "MET", False: "not met", None: "-"}[t.get("met")], _cut(t.get("note"), 80)])
    head = "Summary: performance targets as measured ratios (fwd / fwd+bwd); ditfast = automatic backend"
    if results["meta"]["mode"] != "gpu":
        head += "\n(CPU SMOKE: ratios below are not a speed claim and are not evaluated)"
    if not rows:
        return head + "\n(no target cases were measured)"
    return head + "\n" + format_table(["target", "goal", "fwd", "fwd+bwd", "status", "note"], rows)


def render_table(results: dict, sm90: Optional[dict] = None) -> str:
    """The full terminal report: banner, one table per case, the targets summary last."""
    source = sm90["source"] if sm90 else "no offline report (python tests/compile_sm90.py --report FILE.json)"
    parts = [banner(results), f"Triton kernels' registers / spills / CTAs per SM from the offline sm_90 compile: {source}", ""]
    for case in results["results"]:
        parts += [case_table(case, sm90), ""]
    return "\n".join(parts + [summary_table(results)])


# ------------------------------------------------------------------------------------------- README
def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def render_markdown(results: dict, source: Optional[str] = None) -> str:
    """The README's performance table: provenance line, one row per case, the targets."""
    m, p, v = results["meta"], results["peaks"], results["meta"]["versions"]
    commit = (m.get("commit") or "unknown")[:10] + (" (dirty tree)" if m.get("dirty") else "")
    lines = [f"Measured on **{m['device']['name']}** · torch {v.get('torch')} · triton {v.get('triton')} · "
             f"CUDA {v.get('cuda')} · ditfast {v.get('ditfast')} · commit `{commit}` · {m['date']} · {m['dtype']}"
             + (f" · results: `{source}`" if source else ""), "",
             f"Peaks measured in the same run: copy **{fmt(p['copy']['gbps'])} GB/s**, {p['matmul']['dtype']} matmul "
             f"**{fmt(p['matmul']['tflops'])} TFLOP/s**. ditfast = automatic backend choice. `x` = alternative's "
             "time / ditfast's time (above 1: ditfast faster), shown as fwd / fwd+bwd.", ""]
    if m["mode"] != "gpu":
        lines += [f"> **{SMOKE_NOTE}**", ""]
    peers = ("eager", "compile", "diffusers", "diffusers+compile")
    head = ["level", "case", "shape", "ditfast fwd ms", "fwd+bwd ms", "rate (fwd)", "% of peak"] + \
        [f"x {p_}" for p_ in peers] + ["fastest (fwd)"]
    lines += [_md_row(head), _md_row(["---"] * len(head))]
    for case in results["results"]:
        base = _variant(case, "ditfast")
        if not base or base["status"] != "ok":
            continue
        sp = lambda n: ((_variant(case, n) or {}).get("speedup") or {})  # noqa: E731
        xs = [" / ".join(fmt(sp(n).get(d), "x") for d in DIRS) if any(sp(n).get(d) for d in DIRS) else "-" for n in peers]
        rate = _get(base, "fwd", "rate")
        lines.append(_md_row([case["level"], f"{case['case']} {case['label']}" + (f" ({base['backend']})" if base.get("backend") else ""),
                              ", ".join(f"{k}={val}" for k, val in case["dims"].items()), fmt(_get(base, "fwd")),
                              fmt(_get(base, "fwd_bwd")), f"{fmt(rate)} {case['metric']}" if rate else "-",
                              fmt(_get(base, "fwd", "pct_peak"), "%")] + xs + [case.get("fastest", {}).get("fwd") or "-"]))
    if results.get("targets"):
        lines += ["", _md_row(["target", "goal", "fwd", "fwd+bwd", "status"]), _md_row(["---"] * 5)]
        for t in results["targets"]:
            unit, vals = "%" if t.get("unit") == "%" else "x", t.get("values", {})
            lines.append(_md_row([t["name"], t.get("goal") or "(report)", fmt(vals.get("fwd"), unit),
                                  fmt(vals.get("fwd_bwd"), unit), {True: "met", False: "not met", None: "-"}[t.get("met")]]))
    return "\n".join(lines)


def update_readme(text: str, table_md: str) -> str:
    """Replace what lies between the ditfast-bench markers with ``table_md``."""
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {MARK_START} ... {MARK_END} section")
    return text[: start + len(MARK_START)] + "\n" + table_md.rstrip() + "\n" + text[end:]


# ------------------------------------------------------------------------------------------- plot
def make_plot(results: dict, path: str) -> str:
    """One PNG: ditfast's speedup over each alternative (fwd, log scale) and ditfast's % of the measured
    peak (fwd and fwd+bwd) per case. Returns a message; without matplotlib nothing is written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    cases = [c for c in results["results"] if (_variant(c, "ditfast") or {}).get("status") == "ok"]
    if not cases:
        return "plot skipped: no case with a ditfast time"
    m = results["meta"]
    tag = f"{m['device']['name']} | {m['dtype']} | {m['date']}" + ("\nCPU SMOKE - not a speed claim" if m["mode"] != "gpu" else "")
    labels = [f"{c['case']}\n{c['label']}" for c in cases]
    others = sorted({v["name"] for c in cases for v in c["variants"] if v["name"] != "ditfast" and (v.get("speedup") or {}).get("fwd")})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(7, 1.1 * len(cases)), 9))
    width = 0.8 / max(1, len(others))
    for j, other in enumerate(others):
        ys = [((_variant(c, other) or {}).get("speedup") or {}).get("fwd") or 0 for c in cases]
        ax1.bar([i + j * width for i in range(len(cases))], ys, width, label=other)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_yscale("log")
    ax1.set_ylabel("alternative ms / ditfast ms (fwd)")
    ax1.set_title("ditfast speedup over each alternative (above 1: ditfast faster)\n" + tag, fontsize=8)
    if others:
        ax1.legend(fontsize=6, ncol=3)
    if m["mode"] == "gpu":
        for off, d in ((-0.2, "fwd"), (0.2, "fwd_bwd")):
            ax2.bar([i + off for i in range(len(cases))], [_get(_variant(c, "ditfast"), d, "pct_peak") or 0 for c in cases],
                    0.4, label=d)
        ax2.axhline(85, color="black", linestyle="--", linewidth=0.8, label="85% (ops goal)")
        ax2.set_ylabel("% of the peak measured in the same run")
        ax2.set_title("ditfast: % of the copy bandwidth (GB/s cases) or matmul peak (TFLOP/s cases)", fontsize=8)
        ax2.legend(fontsize=7)
    else:  # tiny CPU tensors stay in the caches: a "% of copy bandwidth" would be a meaningless bar
        ax2.text(0.5, 0.5, "CPU smoke: no % of peak is drawn\n(tiny tensors live in the CPU caches; the copy and\n"
                 "matmul peaks say nothing about them)", ha="center", va="center", fontsize=9, transform=ax2.transAxes)
        ax2.set_yticks([])
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, fontsize=6, rotation=30, ha="right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot written: {path}"
