"""Output of the benchmark: the performance targets as measured ratios, the JSON file (and its schema
check), the terminal table, and the Markdown table that goes into the README.

Reading a row: "ms" is the median time of one call; the rate is GB/s (memory-bound ops: bytes that
must move / time) or TFLOP/s (attention, blocks, models); "%pk" is that rate as a percentage of the
peak measured in the same run (copy bandwidth or bf16 matmul); "ditfast ×" is this variant's time
divided by ditfast's (above 1: ditfast is faster than this alternative).
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, List, Optional, Sequence

SMOKE_NOTE = ("CPU smoke: tiny shapes on the reference ops (and the Triton interpreter where enabled). "
              "These timings show that the harness works; they are NOT a speed claim.")
GPU_NOTE = "GPU run: real shapes (REFERENCE.md), CUDA-event timings, medians."
MARK_START, MARK_END = "<!-- ditfast-bench:start -->", "<!-- ditfast-bench:end -->"
DIRS = ("fwd", "fwd_bwd")


# ------------------------------------------------------------------------------------------- helpers
def peak_for(peaks: dict, metric: str) -> Optional[float]:
    if not peaks:
        return None
    if metric == "GB/s":
        return (peaks.get("copy") or {}).get("gbps")
    return (peaks.get("matmul") or {}).get("tflops")


def _variant(case: dict, name: str) -> Optional[dict]:
    for v in case.get("variants", []):
        if v["name"] == name:
            return v
    return None


def _ms(v: Optional[dict], d: str) -> Optional[float]:
    return v[d]["ms"] if v and v.get(d) and v[d].get("ms") else None


def _get(v: Optional[dict], d: str, key: str):
    return v[d].get(key) if v and v.get(d) else None


# ------------------------------------------------------------------------------------------- targets
GOALS = {  # (level, vs): (threshold, unit, description)
    ("ops", "copy"): (85.0, "%", "% of copy bandwidth"),
    ("ops", "eager"): (3.5, "x", "vs eager reference"),
    ("ops", "compile"): (1.15, "x", "vs compiled reference"),
    ("blocks", "eager"): (1.4, "x", "vs eager reference"),
    ("blocks", "compile"): (1.1, "x", "vs compiled reference"),
}
AUTO_GOAL = 0.97  # automatic attention choice within 3% (timing noise) of the fastest backend


def _met(values: dict, threshold: Optional[float]) -> Optional[bool]:
    vals = [x for x in values.values() if x is not None]
    if threshold is None or not vals:
        return None
    return all(x >= threshold for x in vals)


def _target(name: str, case: dict, threshold, unit: str, values: dict, note: str = "", smoke: bool = False) -> dict:
    goal = None if threshold is None else (f">= {threshold:g}%" if unit == "%" else f">= {threshold:g}x")
    return {"name": name, "case": case["key"], "goal": goal, "threshold": threshold, "unit": unit,
            "values": values, "met": None if smoke else _met(values, threshold),
            "note": (note + ("; " if note else "") + "CPU smoke, not evaluated") if smoke else note}


def _mem_note(case: dict, names: Sequence[str]) -> str:
    parts = []
    for n in names:
        mem = _get(_variant(case, n), "fwd_bwd", "peak_mem_mb")
        if mem is not None:
            parts.append(f"{n} {mem:.0f} MiB")
    return ("peak memory fwd+bwd: " + ", ".join(parts)) if parts else ""


def compute_targets(results: dict) -> List[dict]:
    """The performance targets, as measured ratios, for the target cases present in ``results``."""
    smoke = results.get("meta", {}).get("mode") != "gpu"
    out = []
    for case in results.get("results", []):
        if not case.get("target") or not case.get("variants"):
            continue
        level, label = case["level"], f"{case['case']} [{case['label']}]"
        base = _variant(case, "ditfast")
        speed = lambda other: {d: (_variant(case, other) or {}).get("speedup", {}).get(d) for d in DIRS}  # noqa: E731
        if level == "ops":
            pct = {d: _get(base, d, "pct_peak") for d in DIRS}
            thr, unit, desc = GOALS[("ops", "copy")]
            out.append(_target(f"{label}: {desc}", case, thr, unit, pct, smoke=smoke))
            for other in ("eager", "compile"):
                thr, unit, desc = GOALS[("ops", other)]
                out.append(_target(f"{label}: {desc}", case, thr, unit, speed(other), smoke=smoke))
        elif level == "attention":
            values, notes = {}, []
            for d in DIRS:
                fastest = case.get("fastest", {}).get(d)
                f_ms, b_ms = _ms(_variant(case, fastest), d) if fastest else None, _ms(base, d)
                values[d] = (f_ms / b_ms) if (f_ms and b_ms) else None
                if fastest:
                    rate = _get(_variant(case, fastest), d, "rate")
                    notes.append(f"fastest {d}: {fastest}" + (f" ({fmt(rate)} TFLOP/s)" if rate else ""))
            auto = (base or {}).get("backend")
            if auto:
                notes.append(f"ditfast chose {auto}")
            out.append(_target(f"{label}: automatic choice vs fastest backend", case, AUTO_GOAL, "x", values,
                               "; ".join(notes), smoke=smoke))
        elif level == "blocks":
            for other in ("eager", "compile"):
                thr, unit, desc = GOALS[("blocks", other)]
                out.append(_target(f"{label}: {desc}", case, thr, unit, speed(other), smoke=smoke))
            for other in ("diffusers", "diffusers+compile"):
                if _variant(case, other) and _ms(_variant(case, other), "fwd"):
                    out.append(_target(f"{label}: vs {other}", case, None, "x", speed(other), smoke=smoke))
            if case["case"] == "DoubleStreamBlock":
                out.append(_target(f"{label}: training step (fwd+bwd) vs eager", case, None, "x",
                                   {"fwd_bwd": speed("eager")["fwd_bwd"]},
                                   _mem_note(case, ("ditfast", "eager", "compile")), smoke=smoke))
        elif level == "train":
            for other in ("eager", "compile", "diffusers"):
                if _variant(case, other):
                    out.append(_target(f"{label}: training step vs {other}", case, None, "x",
                                       {"fwd_bwd": speed(other)["fwd_bwd"]},
                                       _mem_note(case, ("ditfast", other)), smoke=smoke))
        elif level == "models":
            for other in ("diffusers", "diffusers+compile"):
                out.append(_target(f"{label}: patched vs {other}", case, None, "x", {"fwd": speed(other)["fwd"]},
                                   smoke=smoke))
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
    """Write atomically (a temporary file renamed over the target)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(results), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


META_KEYS = ("device", "versions", "commit", "date", "mode", "dtype", "timing")
VERSION_KEYS = ("python", "torch", "triton", "cuda", "ditfast")
CASE_KEYS = ("level", "case", "label", "key", "dims", "dtype", "metric", "target", "work", "variants", "fastest")
VARIANT_KEYS = ("name", "kind", "backend", "status", "reason", "fwd", "fwd_bwd", "graph", "compile_s", "speedup")
MEASURE_KEYS = ("ms", "reps", "method", "rate", "pct_peak", "peak_mem_mb", "first_call_s")


def validate(results: dict) -> List[str]:
    """Problems with a results dict against the schema (empty list: valid)."""
    errs = []
    need = lambda obj, keys, where: errs.extend(f"{where}: missing {k!r}" for k in keys if k not in obj)  # noqa: E731
    need(results, ("schema", "meta", "peaks", "results", "targets"), "top level")
    if errs:
        return errs
    if not str(results["schema"]).startswith("ditfast-bench/"):
        errs.append(f"schema: unexpected {results['schema']!r}")
    meta = results["meta"]
    need(meta, META_KEYS, "meta")
    need(meta.get("versions", {}), VERSION_KEYS, "meta.versions")
    need(meta.get("device", {}), ("name", "type"), "meta.device")
    if meta.get("mode") not in ("gpu", "cpu-smoke"):
        errs.append(f"meta.mode: {meta.get('mode')!r} is not 'gpu' or 'cpu-smoke'")
    for name, keys in (("copy", ("gbps",)), ("matmul", ("tflops", "dtype"))):
        if name not in results["peaks"]:
            errs.append(f"peaks: missing {name!r}")
        else:
            need(results["peaks"][name], keys, f"peaks.{name}")
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
            if v.get("status") == "ok":
                if not v.get("fwd") or v["fwd"].get("ms") is None:
                    errs.append(f"{vw}: status ok without a forward time")
                for d in DIRS:
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


# ------------------------------------------------------------------------------------------- formatting
def fmt(x, kind: str = "num") -> str:
    if x is None:
        return "-"
    if kind == "x":
        return f"{x:.2f}x"
    if kind == "%":
        return f"{x:.0f}%"
    if kind == "s":
        return f"{x:.1f}s"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}" if ax >= 0.001 else f"{x:.2e}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> str:
    """A plain-text table; the first ``left`` columns and the last column are left-aligned."""
    rows = [list(map(str, r)) for r in rows]
    n = len(headers)
    widths = [max([len(headers[i])] + [len(r[i]) for r in rows if i < len(r)]) for i in range(n)]

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            w = widths[i]
            out.append(c.ljust(w) if (i < left or i == n - 1) else c.rjust(w))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r + [""] * (n - len(r))) for r in rows])


def _reason(text: Optional[str], limit: int = 70) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def banner(results: dict) -> str:
    m, p = results["meta"], results.get("peaks", {})
    v = m["versions"]
    commit = (m.get("commit") or "unknown")[:10] + (" (dirty)" if m.get("dirty") else "")
    lines = [
        f"ditfast benchmark on {m['device']['name']} ({m['device']['type']}) | torch {v.get('torch')} | "
        f"triton {v.get('triton')} | CUDA {v.get('cuda')} | ditfast {v.get('ditfast')} | commit {commit} | "
        f"{m['date']} | {m['dtype']}",
    ]
    if p:
        lines.append(f"peaks measured in this run: copy {fmt(p['copy']['gbps'])} GB/s ({p['copy']['what']}); "
                     f"matmul {fmt(p['matmul']['tflops'])} TFLOP/s ({p['matmul']['what']})")
    t = m.get("timing", {})
    flush = f"L2 flushed ({t.get('l2_flush_bytes', 0) // 2**20} MiB written) before each call" \
        if t.get("l2_flush_bytes") else "no L2 flush"
    lines.append(f"timing: {t.get('method')}, median of {t.get('min_reps')}-{t.get('max_reps')} calls "
                 f"(adaptive), {t.get('warmup')} warm-up; {flush}; fwd under no_grad; fwd+bwd = autograd.grad "
                 f"of inputs and parameters")
    if m["mode"] != "gpu":
        bar = "*" * 100
        lines += [bar, "*** " + SMOKE_NOTE, "*** Run on a CUDA GPU for real numbers (benchmarks/gpu_run.sh).", bar]
    return "\n".join(lines)


TABLE_HEADERS = ["variant", "fwd ms", "{rate}", "%pk", "f+b ms", "{rate}", "%pk", "graph ms", "MiB fwd",
                 "MiB f+b", "compile", "ditfast x", "note"]


def case_table(case: dict) -> str:
    rate = case["metric"]
    headers = [h.format(rate=rate) for h in TABLE_HEADERS]
    rows = []
    for v in case["variants"]:
        name = v["name"] + (f" ({v['backend']})" if v["kind"] == "ditfast" and v.get("backend") else "")
        if v["status"] != "ok":
            rows.append([name] + [""] * 11 + [f"{v['status']}: {_reason(v['reason'])}"])
            continue
        f, b, g = v.get("fwd") or {}, v.get("fwd_bwd") or {}, v.get("graph") or {}
        comp = v.get("compile_s") or {}
        sp = v.get("speedup", {})
        speed = "/".join(fmt(sp.get(d), "x") for d in DIRS) if v["name"] != "ditfast" else ""
        notes = []
        if b.get("ms") is None and b.get("reason"):
            notes.append(f"f+b: {_reason(b['reason'], 50)}")
        if g.get("ms") is None and g.get("reason"):
            notes.append(f"graph: {_reason(g['reason'], 40)}")
        rows.append([
            name, fmt(f.get("ms")), fmt(f.get("rate")), fmt(f.get("pct_peak"), "%"),
            fmt(b.get("ms")), fmt(b.get("rate")), fmt(b.get("pct_peak"), "%"), fmt(g.get("ms")),
            fmt(f.get("peak_mem_mb")), fmt(b.get("peak_mem_mb")),
            "/".join(fmt(comp.get(d), "s") for d in DIRS if d in comp) or "",
            speed, "; ".join(notes),
        ])
    dims = ", ".join(f"{k}={v}" for k, v in case["dims"].items())
    title = f"== {case['level']} | {case['case']} | {case['label']} | {dims} | {case['dtype']}"
    if not case["variants"]:
        return title + "\n" + "; ".join(case.get("notes", []))
    # drop the measurement columns nobody filled (graph / memory / compile on CPU, say)
    keep = [i for i in range(len(headers))
            if i == 0 or i == len(headers) - 1 or any(r[i] not in ("", "-") for r in rows)]
    return title + "\n" + format_table([headers[i] for i in keep], [[r[i] for i in keep] for r in rows])


def summary_table(results: dict) -> str:
    rows = []
    for t in results.get("targets", []):
        unit = "%" if t.get("unit") == "%" else "x"
        vals = t.get("values", {})
        met = {True: "MET", False: "not met", None: "-"}[t.get("met")]
        rows.append([t["name"], t.get("goal") or "(report)", fmt(vals.get("fwd"), unit),
                     fmt(vals.get("fwd_bwd"), unit), met, _reason(t.get("note"), 80)])
    head = "Summary: performance targets as measured ratios (fwd / fwd+bwd); ditfast = automatic backend"
    if results["meta"]["mode"] != "gpu":
        head += "\n(CPU SMOKE: ratios below are not a speed claim and are not evaluated)"
    if not rows:
        return head + "\n(no target cases were measured)"
    return head + "\n" + format_table(["target", "goal", "fwd", "fwd+bwd", "status", "note"], rows)


def render_table(results: dict) -> str:
    """The full terminal report: banner, one table per case, the targets summary last."""
    parts = [banner(results), ""]
    for case in results["results"]:
        parts += [case_table(case), ""]
    parts.append(summary_table(results))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- README
def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render_markdown(results: dict, source: Optional[str] = None) -> str:
    """The README's performance table: provenance line, one row per case, the targets."""
    m, p = results["meta"], results["peaks"]
    v = m["versions"]
    commit = (m.get("commit") or "unknown")[:10] + (" (dirty tree)" if m.get("dirty") else "")
    lines = [
        f"Measured on **{m['device']['name']}** · torch {v.get('torch')} · triton {v.get('triton')} · "
        f"CUDA {v.get('cuda')} · ditfast {v.get('ditfast')} · commit `{commit}` · {m['date']} · {m['dtype']}"
        + (f" · results: `{source}`" if source else ""),
        "",
        f"Peaks measured in the same run: copy **{fmt(p['copy']['gbps'])} GB/s**, "
        f"{p['matmul']['dtype']} matmul **{fmt(p['matmul']['tflops'])} TFLOP/s**. "
        "ditfast = automatic backend choice. `x` = alternative's time / ditfast's time (above 1: ditfast "
        "faster), shown as fwd / fwd+bwd.",
        "",
    ]
    if m["mode"] != "gpu":
        lines += [f"> **{SMOKE_NOTE}**", ""]
    head = ["level", "case", "shape", "ditfast fwd ms", "fwd+bwd ms", "rate (fwd)", "% of peak", "x eager",
            "x compile", "x diffusers", "x diffusers+compile", "fastest (fwd)"]
    lines += [_md_row(head), _md_row(["---"] * len(head))]
    for case in results["results"]:
        base = _variant(case, "ditfast")
        if not base or base["status"] != "ok":
            continue
        dims = ", ".join(f"{k}={val}" for k, val in case["dims"].items())

        def x(name):
            sp = (_variant(case, name) or {}).get("speedup", {})
            vals = [sp.get(d) for d in DIRS]
            return " / ".join(fmt(s, "x") for s in vals) if any(s is not None for s in vals) else "-"

        rate = _get(base, "fwd", "rate")
        auto = f" ({base['backend']})" if base.get("backend") else ""
        lines.append(_md_row([
            case["level"], f"{case['case']} {case['label']}{auto}", dims, fmt(_ms(base, "fwd")),
            fmt(_ms(base, "fwd_bwd")), f"{fmt(rate)} {case['metric']}" if rate else "-",
            fmt(_get(base, "fwd", "pct_peak"), "%"), x("eager"), x("compile"), x("diffusers"),
            x("diffusers+compile"), case.get("fastest", {}).get("fwd") or "-",
        ]))
    targets = results.get("targets", [])
    if targets:
        lines += ["", _md_row(["target", "goal", "fwd", "fwd+bwd", "status"]), _md_row(["---"] * 5)]
        for t in targets:
            unit = "%" if t.get("unit") == "%" else "x"
            met = {True: "met", False: "not met", None: "-"}[t.get("met")]
            vals = t.get("values", {})
            lines.append(_md_row([t["name"], t.get("goal") or "(report)", fmt(vals.get("fwd"), unit),
                                  fmt(vals.get("fwd_bwd"), unit), met]))
    return "\n".join(lines)


def update_readme(text: str, table_md: str) -> str:
    """Replace what lies between the ditfast-bench markers with ``table_md``."""
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"the README has no {MARK_START} ... {MARK_END} section")
    return text[: start + len(MARK_START)] + "\n" + table_md.rstrip() + "\n" + text[end:]
