"""PNG plots of a results dict (optional: needs matplotlib; skipped with a message without it).

- ``<stem>_speedup.png``: ditfast's speedup over each alternative, per op / block / model case
  (forward; log scale; 1 = parity);
- ``<stem>_attention_tflops.png``: attention TFLOP/s by backend, per shape;
- ``<stem>_pct_peak.png``: ditfast's % of the measured peak (copy bandwidth or matmul), fwd and fwd+bwd.
"""
from __future__ import annotations

import os
from typing import List, Tuple


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _label(case: dict) -> str:
    return f"{case['case']}\n{case['label']}"


def make_plots(results: dict, out_dir: str, stem: str = "bench") -> Tuple[List[str], str]:
    """Write the PNGs; returns (paths written, message)."""
    plt = _pyplot()
    if plt is None:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    os.makedirs(out_dir, exist_ok=True)
    smoke = results["meta"]["mode"] != "gpu"
    tag = f"{results['meta']['device']['name']} | {results['meta']['dtype']} | {results['meta']['date']}"
    if smoke:
        tag += "\nCPU SMOKE - not a speed claim"
    written = []

    # 1. speedup of ditfast over each alternative
    cases = [c for c in results["results"] if c["level"] != "attention" and c.get("variants")]
    others = sorted({v["name"] for c in cases for v in c["variants"]
                     if v["name"] != "ditfast" and v.get("speedup", {}).get("fwd")})
    if cases and others:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4.5))
        width = 0.8 / len(others)
        for j, other in enumerate(others):
            ys = []
            for c in cases:
                v = next((v for v in c["variants"] if v["name"] == other), None)
                ys.append((v or {}).get("speedup", {}).get("fwd") or 0)
            ax.bar([i + j * width for i in range(len(cases))], ys, width, label=other)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([_label(c) for c in cases], fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("alternative ms / ditfast ms (fwd)")
        ax.set_title("ditfast speedup over each alternative\n" + tag, fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, plt, out_dir, f"{stem}_speedup.png"))

    # 2. attention TFLOP/s by backend
    att = [c for c in results["results"] if c["level"] == "attention" and c.get("variants")]
    names = sorted({v["name"] for c in att for v in c["variants"] if (v.get("fwd") or {}).get("rate")})
    if att and names:
        fig, ax = plt.subplots(figsize=(max(8, 2.5 * len(att)), 5))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ys = []
            for c in att:
                v = next((v for v in c["variants"] if v["name"] == name), None)
                ys.append(((v or {}).get("fwd") or {}).get("rate") or 0)
            ax.bar([i + j * width for i in range(len(att))], ys, width, label=name)
        peak = (results.get("peaks", {}).get("matmul") or {}).get("tflops")
        if peak:
            ax.axhline(peak, color="black", linestyle="--", linewidth=0.8, label="matmul peak")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(att))])
        ax.set_xticklabels([_label(c) for c in att], fontsize=7)
        ax.set_ylabel("TFLOP/s (forward)")
        ax.set_title("attention TFLOP/s by backend\n" + tag, fontsize=8)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        written.append(_save(fig, plt, out_dir, f"{stem}_attention_tflops.png"))

    # 3. ditfast % of peak
    rows = []
    for c in results["results"]:
        v = next((v for v in c.get("variants", []) if v["name"] == "ditfast" and v["status"] == "ok"), None)
        if v:
            rows.append((c, (v.get("fwd") or {}).get("pct_peak") or 0, (v.get("fwd_bwd") or {}).get("pct_peak") or 0))
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
        xs = range(len(rows))
        ax.bar([i - 0.2 for i in xs], [r[1] for r in rows], 0.4, label="fwd")
        ax.bar([i + 0.2 for i in xs], [r[2] for r in rows], 0.4, label="fwd+bwd")
        ax.axhline(85, color="black", linestyle="--", linewidth=0.8, label="85% (ops target)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{_label(r[0])}\n({r[0]['metric']})" for r in rows], fontsize=6, rotation=30, ha="right")
        ax.set_ylabel("% of the peak measured in the same run")
        ax.set_title("ditfast: % of measured peak (copy bandwidth for GB/s, matmul for TFLOP/s)\n" + tag, fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, plt, out_dir, f"{stem}_pct_peak.png"))
    return written, f"plots written: {', '.join(os.path.basename(p) for p in written)}" if written else "no plots"


def _save(fig, plt, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
