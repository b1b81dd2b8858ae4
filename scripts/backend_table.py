"""Write the measured backend table (ditfast/ops/cuda_impl.py) from a GPU benchmark results file.

usage: python scripts/backend_table.py benchmarks/results/bench_<date>_<commit>.json [--table PATH]

For every "ops" case of an op with both a "triton" and a "cuda" implementation where the run timed
both forced backends ("ditfast:triton", "ditfast:cuda"), the faster one becomes the entry for that
op, dtype and row width (D, or Dh for the rope ops), exactly that width: other widths keep the
fixed AUTO_ORDER. Forward + backward times decide when both have them (training), else forward.
The device's entries in the table file are replaced; other devices' are kept. A CPU smoke run is
refused: its timings say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ditfast.ops import cuda_impl

OPS = ("norm_modulate", "gated_residual_norm_modulate", "apply_rope", "qk_norm_rope")


def _time(variant: Optional[dict], direction: str) -> Optional[float]:
    if not variant or variant.get("status") != "ok" or not variant.get(direction):
        return None
    return variant[direction].get("ms")


def entries_from_results(results: dict) -> List[dict]:
    out = {}
    for case in results.get("results", []):
        if case.get("level") != "ops" or case.get("case") not in OPS:
            continue
        by = {v["name"]: v for v in case.get("variants", [])}
        tri, cu = by.get("ditfast:triton"), by.get("ditfast:cuda")
        direction = "fwd_bwd" if _time(tri, "fwd_bwd") and _time(cu, "fwd_bwd") else "fwd"
        t_tri, t_cu = _time(tri, direction), _time(cu, direction)
        if not t_tri or not t_cu:
            continue
        dims = case["dims"]
        width = int(dims["Dh"] if "Dh" in dims else dims["D"])
        key = (case["case"], case["dtype"], width)
        out[key] = {"op": case["case"], "dtype": case["dtype"], "width_min": width, "width_max": width,
                    "backend": "cuda" if t_cu < t_tri else "triton",
                    "ms": {"cuda": t_cu, "triton": t_tri, "direction": direction, "shape": case.get("label")}}
    return list(out.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results JSON written by python -m ditfast.bench on a GPU")
    ap.add_argument("--table", default=None, help=f"table file (default: ${cuda_impl.TABLE_ENV} or "
                                                   f"{cuda_impl.DEFAULT_TABLE})")
    args = ap.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    meta = results.get("meta", {})
    if meta.get("mode") != "gpu" or meta.get("device", {}).get("type") != "cuda":
        print(f"{args.results} is not a GPU run (mode {meta.get('mode')!r}); nothing written", file=sys.stderr)
        return 2
    entries = entries_from_results(results)
    if not entries:
        print(f"{args.results} times no op on both the triton and the cuda backend; nothing written", file=sys.stderr)
        return 2
    versions = meta.get("versions", {})
    measured = {"torch": versions.get("torch"), "triton": versions.get("triton"), "commit": meta.get("commit"),
                "date": meta.get("date"), "results": Path(args.results).name}
    path = cuda_impl.save_table(entries, meta["device"]["name"], args.table, measured=measured)
    for e in entries:
        print(f"{e['op']:<30} {e['dtype']:<9} width {e['width_min']:>5}: {e['backend']}  ({e['ms']})")
    print(f"wrote {len(entries)} entries for {meta['device']['name']!r} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
